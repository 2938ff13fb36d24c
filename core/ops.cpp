// Tensor ops: validation and allocation in front of the backends.
//
// Every check names the op and the offending shapes (kShape), so a user
// sees "matmul: a (2, 3) @ b (4, 5): inner dimensions 3 and 4 differ"
// rather than a kernel's complaint. Kernels receive contiguous inputs
// where backend.h asks for them; elementwise kernels receive broadcast
// views (stride 0) instead of materialised copies.
#include "core/ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace motley::ops {
namespace {

void check_defined(const char* op, const Tensor& t, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.defined(), op, ": ", name, " is an undefined tensor");
}

void check_same_device(const char* op, const Tensor& a, const Tensor& b) {
  MOTLEY_CHECK_KIND(kShape, a.device() == b.device(), op, ": tensors on different devices: ",
                    a.str(), " and ", b.str());
}

void check_same_dtype(const char* op, const Tensor& a, const Tensor& b) {
  MOTLEY_CHECK_KIND(kShape, a.dtype() == b.dtype(), op, ": dtypes differ: ", a.str(),
                    " and ", b.str(), " (convert one with .to(dtype))");
}

void check_floating(const char* op, const Tensor& t) {
  MOTLEY_CHECK_KIND(kShape, is_floating(t.dtype()), op, ": expected a floating tensor, got ",
                    t.str());
}

void check_index(const char* op, const Tensor& t, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.dtype() == DType::kI32 || t.dtype() == DType::kI64, op, ": ",
                    name, " must be i32 or i64, got ", t.str());
}

void check_same_shape(const char* op, const Tensor& a, const Tensor& b, const char* what) {
  MOTLEY_CHECK_KIND(kShape, a.shape() == b.shape(), op, ": ", what, " shapes differ: ",
                    shape_str(a.shape()), " and ", shape_str(b.shape()));
}

// Same dtype, device and shape as `ref`; the common case for fused ops.
void check_like(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  check_defined(op, t, name);
  check_same_device(op, ref, t);
  check_same_dtype(op, ref, t);
  MOTLEY_CHECK_KIND(kShape, ref.shape() == t.shape(), op, ": ", name, " has shape ",
                    shape_str(t.shape()), ", expected ", shape_str(ref.shape()));
}

Shape drop_last(const Shape& s) { return Shape(s.begin(), s.end() - 1); }

Tensor binary_op(const char* op_name, BinaryOp op, const Tensor& a, const Tensor& b) {
  check_defined(op_name, a, "a");
  check_defined(op_name, b, "b");
  check_same_device(op_name, a, b);
  check_same_dtype(op_name, a, b);
  Shape shape;
  try {
    shape = broadcast_shape(a.shape(), b.shape());
  } catch (const Error&) {
    MOTLEY_FAIL(kShape, op_name, ": shapes ", shape_str(a.shape()), " and ",
                shape_str(b.shape()), " do not broadcast");
  }
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  if (out.numel() == 0) return out;
  a.backend().binary(op, a.expand(shape), b.expand(shape), out);
  return out;
}

// A matrix operand for BLAS: the (rows, cols) view described as storage of
// (rows, cols) with row stride ld, or of (cols, rows) when trans, with
// matrices of a batch `batch_stride` elements apart. Copies to contiguous
// memory only when the strides fit neither layout.
struct MatrixOperand {
  Tensor t;
  bool trans = false;
  std::int64_t ld = 1;
  std::int64_t batch_stride = 0;
};

bool describe_matrix(const Tensor& t, MatrixOperand& m) {
  const std::int64_t nd = t.dim();
  const std::int64_t r = t.size(nd - 2), c = t.size(nd - 1);
  std::int64_t sr = t.stride(nd - 2), sc = t.stride(nd - 1);
  // The batch dimensions must collapse into one stride.
  std::int64_t batch_stride = 0;
  bool have_batch = false;
  for (std::int64_t d = nd - 3; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (!have_batch) {
      batch_stride = t.stride(d);
      have_batch = true;
    } else {
      // Dimension d must step over everything inside it.
      std::int64_t inner = 1;
      for (std::int64_t e = d + 1; e < nd - 2; ++e) inner *= t.size(e);
      if (t.stride(d) != batch_stride * inner) return false;
    }
  }
  if (c == 1) sc = 1;
  if (r == 1) sr = std::max<std::int64_t>(c, 1) * sc;
  m.t = t;
  m.batch_stride = batch_stride;
  if (sc == 1 && sr >= std::max<std::int64_t>(c, 1)) {
    m.trans = false;
    m.ld = sr;
    return true;
  }
  if (r == 1) sr = 1;
  if (sr == 1 && sc >= std::max<std::int64_t>(r, 1)) {
    m.trans = true;
    m.ld = sc;
    return true;
  }
  return false;
}

MatrixOperand as_matrix(const Tensor& t) {
  MatrixOperand m;
  if (describe_matrix(t, m)) return m;
  const bool ok = describe_matrix(t.contiguous(), m);
  MOTLEY_CHECK(ok, "contiguous tensor ", t.str(), " not usable as a matrix");
  return m;
}

Tensor reduce_dim(const char* op_name, ReduceOp op, const Tensor& a, std::int64_t dim,
                  bool keepdim) {
  check_defined(op_name, a, "input");
  MOTLEY_CHECK_KIND(kShape, a.dim() >= 1, op_name, ": dim ", dim, " of a 0-d tensor");
  const std::int64_t d = wrap_dim(dim, a.dim());
  const Tensor x = a.contiguous();
  std::int64_t outer = 1, inner = 1;
  for (std::int64_t i = 0; i < d; ++i) outer *= x.size(i);
  for (std::int64_t i = d + 1; i < x.dim(); ++i) inner *= x.size(i);
  const std::int64_t n = x.size(d);
  MOTLEY_CHECK_KIND(kShape, n > 0 || op == ReduceOp::kSum, op_name,
                    ": reduction over the empty dimension ", d, " of ", shape_str(a.shape()));
  Shape out_shape = x.shape();
  if (keepdim) {
    out_shape[d] = 1;
  } else {
    out_shape.erase(out_shape.begin() + d);
  }
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  if (out.numel() == 0) return out;
  x.backend().reduce(op, x, outer, n, inner, out);
  return out;
}

Tensor reduce_all(const char* op_name, ReduceOp op, const Tensor& a) {
  check_defined(op_name, a, "input");
  const Tensor x = a.contiguous();
  Tensor out = Tensor::empty({}, x.dtype(), x.device());
  x.backend().reduce(op, x, 1, x.numel(), 1, out);
  return out;
}

}  // namespace

// ---- elementwise ---------------------------------------------------------------

Tensor add(const Tensor& a, const Tensor& b) { return binary_op("add", BinaryOp::kAdd, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary_op("sub", BinaryOp::kSub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary_op("mul", BinaryOp::kMul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary_op("div", BinaryOp::kDiv, a, b); }
Tensor maximum(const Tensor& a, const Tensor& b) {
  return binary_op("maximum", BinaryOp::kMax, a, b);
}
Tensor minimum(const Tensor& a, const Tensor& b) {
  return binary_op("minimum", BinaryOp::kMin, a, b);
}
Tensor eq(const Tensor& a, const Tensor& b) { return binary_op("eq", BinaryOp::kEq, a, b); }
Tensor silu_backward(const Tensor& x, const Tensor& dy) {
  return binary_op("silu_backward", BinaryOp::kSiluBackward, x, dy);
}

Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b) {
  check_defined("where", mask, "mask");
  check_defined("where", a, "a");
  check_defined("where", b, "b");
  check_same_device("where", mask, a);
  check_same_device("where", a, b);
  check_same_dtype("where", a, b);
  Shape shape;
  try {
    shape = broadcast_shape(broadcast_shape(mask.shape(), a.shape()), b.shape());
  } catch (const Error&) {
    MOTLEY_FAIL(kShape, "where: shapes ", shape_str(mask.shape()), ", ", shape_str(a.shape()),
                " and ", shape_str(b.shape()), " do not broadcast");
  }
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  if (out.numel() == 0) return out;
  a.backend().where(mask.expand(shape), a.expand(shape), b.expand(shape), out);
  return out;
}

Tensor axpby(double alpha, const Tensor& a, double beta, const Tensor& b) {
  check_defined("axpby", a, "a");
  check_like("axpby", a, b, "b");
  check_floating("axpby", a);
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (out.numel() == 0) return out;
  a.backend().axpby(alpha, a, beta, b, out);
  return out;
}

void add_(Tensor& a, const Tensor& b) {
  check_defined("add_", a, "a");
  check_defined("add_", b, "b");
  check_same_device("add_", a, b);
  check_same_dtype("add_", a, b);
  MOTLEY_CHECK_KIND(kShape, a.is_contiguous(), "add_: destination ", a.str(),
                    " must be contiguous");
  Tensor bb;
  try {
    bb = b.expand(a.shape());
  } catch (const Error&) {
    MOTLEY_FAIL(kShape, "add_: cannot add ", shape_str(b.shape()), " into ",
                shape_str(a.shape()));
  }
  if (a.numel() == 0) return;
  // A source that overlaps the destination (other than exactly) would be
  // read after being written; copy it first.
  if (bb.shares_storage(a) && !(bb.offset() == a.offset() && bb.strides() == a.strides())) {
    bb = b.clone().expand(a.shape());
  }
  a.backend().binary(BinaryOp::kAdd, a, bb, a);
}

void scale_(Tensor& a, double alpha) {
  check_defined("scale_", a, "a");
  check_floating("scale_", a);
  if (a.numel() == 0) return;
  if (a.is_contiguous()) {
    a.backend().unary(UnaryOp::kScale, a, a, alpha);
  } else {
    Tensor tmp = Tensor::empty(a.shape(), a.dtype(), a.device());
    a.backend().unary(UnaryOp::kScale, a, tmp, alpha);
    a.copy_(tmp);
  }
}

Tensor unary(UnaryOp op, const Tensor& a, double alpha) {
  check_defined("unary", a, "input");
  check_floating("unary", a);
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (out.numel() == 0) return out;
  a.backend().unary(op, a, out, alpha);
  return out;
}

Tensor neg(const Tensor& a) { return unary(UnaryOp::kNeg, a); }
Tensor exp(const Tensor& a) { return unary(UnaryOp::kExp, a); }
Tensor log(const Tensor& a) { return unary(UnaryOp::kLog, a); }
Tensor sqrt(const Tensor& a) { return unary(UnaryOp::kSqrt, a); }
Tensor rsqrt(const Tensor& a) { return unary(UnaryOp::kRsqrt, a); }
Tensor square(const Tensor& a) { return unary(UnaryOp::kSquare, a); }
Tensor silu(const Tensor& a) { return unary(UnaryOp::kSilu, a); }
Tensor sigmoid(const Tensor& a) { return unary(UnaryOp::kSigmoid, a); }
Tensor tanh(const Tensor& a) { return unary(UnaryOp::kTanh, a); }
Tensor softplus(const Tensor& a) { return unary(UnaryOp::kSoftplus, a); }
Tensor relu(const Tensor& a) { return unary(UnaryOp::kRelu, a); }
Tensor scale(const Tensor& a, double alpha) { return unary(UnaryOp::kScale, a, alpha); }
Tensor add_scalar(const Tensor& a, double alpha) {
  return unary(UnaryOp::kAddScalar, a, alpha);
}
Tensor pow_scalar(const Tensor& a, double alpha) {
  return unary(UnaryOp::kPowScalar, a, alpha);
}

Shape broadcast_shape(absl::Span<const std::int64_t> a, absl::Span<const std::int64_t> b) {
  const std::size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (std::size_t i = 0; i < n; ++i) {
    // Align from the right.
    const std::int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const std::int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    MOTLEY_CHECK_KIND(kShape, da == db || da == 1 || db == 1, "broadcast: shapes ",
                      shape_str(a), " and ", shape_str(b), " are incompatible at dimension ",
                      i);
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Tensor sum_to(const Tensor& grad, absl::Span<const std::int64_t> shape) {
  check_defined("sum_to", grad, "grad");
  if (absl::Span<const std::int64_t>(grad.shape()) == shape) return grad;
  const std::int64_t rank = grad.dim();
  const std::int64_t lead = rank - static_cast<std::int64_t>(shape.size());
  MOTLEY_CHECK_KIND(kShape, lead >= 0, "sum_to: cannot sum ", shape_str(grad.shape()),
                    " down to ", shape_str(shape));
  // Target padded with leading 1s to grad's rank; reduce[i] marks summed dims.
  std::vector<bool> reduce(rank, false);
  for (std::int64_t i = 0; i < rank; ++i) {
    const std::int64_t target = i < lead ? 1 : shape[i - lead];
    if (target == grad.size(i)) continue;
    MOTLEY_CHECK_KIND(kShape, target == 1, "sum_to: cannot sum ", shape_str(grad.shape()),
                      " down to ", shape_str(shape));
    reduce[i] = true;
  }
  // Sum each run of adjacent reduced dimensions with one (outer, n, inner)
  // reduction, innermost run first; summed dimensions stay as size 1.
  Tensor cur = grad.contiguous();
  for (std::int64_t end = rank; end > 0;) {
    if (!reduce[end - 1]) {
      --end;
      continue;
    }
    std::int64_t begin = end - 1;
    while (begin > 0 && reduce[begin - 1]) --begin;
    std::int64_t outer = 1, n = 1, inner = 1;
    for (std::int64_t i = 0; i < begin; ++i) outer *= cur.size(i);
    for (std::int64_t i = begin; i < end; ++i) n *= cur.size(i);
    for (std::int64_t i = end; i < rank; ++i) inner *= cur.size(i);
    Shape out_shape = cur.shape();
    for (std::int64_t i = begin; i < end; ++i) out_shape[i] = 1;
    Tensor out = Tensor::empty(out_shape, cur.dtype(), cur.device());
    if (out.numel() > 0) cur.backend().reduce(ReduceOp::kSum, cur, outer, n, inner, out);
    cur = out;
    end = begin;
  }
  return cur.view(Shape(shape.begin(), shape.end()));
}

// ---- reductions ----------------------------------------------------------------------

Tensor sum(const Tensor& a) { return reduce_all("sum", ReduceOp::kSum, a); }
Tensor sum(const Tensor& a, std::int64_t dim, bool keepdim) {
  return reduce_dim("sum", ReduceOp::kSum, a, dim, keepdim);
}

Tensor mean(const Tensor& a) {
  check_defined("mean", a, "input");
  check_floating("mean", a);
  MOTLEY_CHECK_KIND(kShape, a.numel() > 0, "mean: empty tensor ", a.str());
  Tensor s = sum(a);
  scale_(s, 1.0 / static_cast<double>(a.numel()));
  return s;
}

Tensor mean(const Tensor& a, std::int64_t dim, bool keepdim) {
  check_defined("mean", a, "input");
  check_floating("mean", a);
  Tensor s = sum(a, dim, keepdim);
  const std::int64_t n = a.size(dim);
  MOTLEY_CHECK_KIND(kShape, n > 0, "mean: empty dimension ", dim, " of ", a.str());
  scale_(s, 1.0 / static_cast<double>(n));
  return s;
}

Tensor amax(const Tensor& a, std::int64_t dim, bool keepdim) {
  return reduce_dim("amax", ReduceOp::kMax, a, dim, keepdim);
}

Tensor sum_squares(const Tensor& a) {
  return reduce_all("sum_squares", ReduceOp::kSumSquares, a);
}

Tensor argmax(const Tensor& a) {
  check_defined("argmax", a, "input");
  MOTLEY_CHECK_KIND(kShape, a.dim() >= 1 && a.size(-1) > 0, "argmax: needs a non-empty last ",
                    "dimension, got ", a.str());
  const Tensor x = a.contiguous();
  Tensor out = Tensor::empty(drop_last(x.shape()), DType::kI64, x.device());
  if (out.numel() == 0) return out;
  x.backend().argmax(x, out);
  return out;
}

Tensor cumsum(const Tensor& a) {
  check_defined("cumsum", a, "input");
  MOTLEY_CHECK_KIND(kShape, a.dim() >= 1, "cumsum: needs at least one dimension, got ",
                    a.str());
  const Tensor x = a.contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (out.numel() == 0) return out;
  x.backend().cumsum(x, out);
  return out;
}

bool all_finite(const Tensor& a) {
  check_defined("all_finite", a, "input");
  if (a.numel() == 0) return true;
  return a.backend().all_finite(a);
}

// ---- shape ------------------------------------------------------------------------------

Tensor cat(absl::Span<const Tensor> parts, std::int64_t dim) {
  MOTLEY_CHECK_KIND(kShape, !parts.empty(), "cat: no tensors to concatenate");
  const Tensor& first = parts[0];
  check_defined("cat", first, "part 0");
  const std::int64_t d = wrap_dim(dim, first.dim());
  Shape shape = first.shape();
  std::int64_t total = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const Tensor& p = parts[i];
    check_defined("cat", p, "part");
    check_same_device("cat", first, p);
    check_same_dtype("cat", first, p);
    bool ok = p.dim() == first.dim();
    for (std::int64_t j = 0; ok && j < p.dim(); ++j) {
      if (j != d && p.size(j) != first.size(j)) ok = false;
    }
    MOTLEY_CHECK_KIND(kShape, ok, "cat: part ", i, " has shape ", shape_str(p.shape()),
                      ", incompatible with ", shape_str(first.shape()), " along dim ", d);
    total += p.size(d);
  }
  shape[d] = total;
  Tensor out = Tensor::empty(shape, first.dtype(), first.device());
  std::int64_t offset = 0;
  for (const Tensor& p : parts) {
    if (p.size(d) > 0) {
      Tensor slot = out.narrow(d, offset, p.size(d));
      slot.copy_(p);
    }
    offset += p.size(d);
  }
  return out;
}

// ---- matrix products --------------------------------------------------------------------
namespace {

thread_local MatmulPrecision current_matmul_precision = MatmulPrecision::kF32;

// An operand under Note [Matmul precision]: itself, or its bf16 rounding
// (a bf16 copy on a GPU; bf16 values in f32 on the CPU).
Tensor matmul_operand(const Tensor& t) {
  if (!t.defined() || current_matmul_precision != MatmulPrecision::kBf16Inputs ||
      t.dtype() != DType::kF32) {
    return t;
  }
  const Tensor rounded = t.to(DType::kBF16);
  return t.device().is_cpu() ? rounded.to(DType::kF32) : rounded;
}

}  // namespace

MatmulPrecision matmul_precision() { return current_matmul_precision; }

MatmulPrecisionGuard::MatmulPrecisionGuard(MatmulPrecision precision)
    : previous_(current_matmul_precision) {
  current_matmul_precision = precision;
}

MatmulPrecisionGuard::~MatmulPrecisionGuard() { current_matmul_precision = previous_; }

Tensor matmul(const Tensor& a_in, const Tensor& b_in) {
  const DType out_dtype = a_in.dtype();
  const Tensor a = matmul_operand(a_in), b = matmul_operand(b_in);
  check_defined("matmul", a, "a");
  check_defined("matmul", b, "b");
  check_same_device("matmul", a, b);
  check_same_dtype("matmul", a, b);
  check_floating("matmul", a);
  MOTLEY_CHECK_KIND(kShape, a.dim() >= 2 && b.dim() >= 2, "matmul: a ", shape_str(a.shape()),
                    " @ b ", shape_str(b.shape()), ": both need at least 2 dimensions");
  const std::int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  MOTLEY_CHECK_KIND(kShape, b.size(-2) == k, "matmul: a ", shape_str(a.shape()), " @ b ",
                    shape_str(b.shape()), ": inner dimensions ", k, " and ", b.size(-2),
                    " differ");
  const Shape batch(a.shape().begin(), a.shape().end() - 2);
  if (b.dim() > 2) {
    const Shape b_batch(b.shape().begin(), b.shape().end() - 2);
    MOTLEY_CHECK_KIND(kShape, b_batch == batch, "matmul: a ", shape_str(a.shape()), " @ b ",
                      shape_str(b.shape()), ": batch dimensions differ (b may also be 2-D)");
  }
  Shape out_shape = batch;
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = Tensor::empty(out_shape, out_dtype, a.device());
  if (out.numel() == 0) return out;
  if (k == 0) {
    out.zero_();
    return out;
  }
  Backend& be = a.backend();
  const std::int64_t batch_n = shape_numel(batch);
  if (b.dim() == 2) {
    // A shared weight: fold the batch into the rows of one GEMM when a's
    // rows are evenly spaced, else run a batch with B's stride 0.
    MatrixOperand mb = as_matrix(b);
    const std::int64_t rows = batch_n * m;
    Tensor a2;
    if (a.is_contiguous()) {
      a2 = a.view({rows, k});
    } else if (a.dim() == 2) {
      a2 = a;
    }
    if (a2.defined()) {
      MatrixOperand ma = as_matrix(a2);
      be.gemm(ma.trans, mb.trans, rows, n, k, 1.0, ma.t, ma.ld, mb.t, mb.ld, 0.0, out, n);
      return out;
    }
    MatrixOperand ma = as_matrix(a);
    be.gemm_strided_batched(ma.trans, mb.trans, m, n, k, 1.0, ma.t, ma.ld, ma.batch_stride,
                            mb.t, mb.ld, 0, 0.0, out, n, m * n, batch_n);
    return out;
  }
  MatrixOperand ma = as_matrix(a);
  MatrixOperand mb = as_matrix(b);
  be.gemm_strided_batched(ma.trans, mb.trans, m, n, k, 1.0, ma.t, ma.ld, ma.batch_stride,
                          mb.t, mb.ld, mb.batch_stride, 0.0, out, n, m * n, batch_n);
  return out;
}

Tensor linear(const Tensor& x_in, const Tensor& w_in) {
  const DType out_dtype = x_in.dtype();
  const Tensor x = matmul_operand(x_in), w = matmul_operand(w_in);
  check_defined("linear", x, "x");
  check_defined("linear", w, "w");
  check_same_device("linear", x, w);
  check_same_dtype("linear", x, w);
  check_floating("linear", x);
  MOTLEY_CHECK_KIND(kShape, x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1),
                    "linear: x ", shape_str(x.shape()), " with weight ", shape_str(w.shape()),
                    ": expected x (..., in) and w (out, in)");
  const std::int64_t in = w.size(1), out_features = w.size(0);
  Shape out_shape = drop_last(x.shape());
  out_shape.push_back(out_features);
  Tensor out = Tensor::empty(out_shape, out_dtype, x.device());
  if (out.numel() == 0) return out;
  if (in == 0) {
    out.zero_();
    return out;
  }
  const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in});  // (rows, in)
  const MatrixOperand mx = as_matrix(x2);
  const MatrixOperand mw = as_matrix(w);
  // out = x2 @ w^T: B = w with its layout's transpose flag flipped.
  x.backend().gemm(mx.trans, !mw.trans, x2.size(0), out_features, in, 1.0, mx.t, mx.ld, mw.t,
                   mw.ld, 0.0, out, out_features);
  return out;
}

void gemm_accumulate(const Tensor& a_in, bool trans_a, const Tensor& b_in, bool trans_b,
                     double alpha, Tensor& c) {
  check_defined("gemm_accumulate", a_in, "a");
  check_defined("gemm_accumulate", b_in, "b");
  check_defined("gemm_accumulate", c, "c");
  check_same_device("gemm_accumulate", a_in, c);
  check_same_device("gemm_accumulate", b_in, c);
  check_same_dtype("gemm_accumulate", a_in, c);
  check_same_dtype("gemm_accumulate", b_in, c);
  const Tensor a = matmul_operand(a_in), b = matmul_operand(b_in);
  check_floating("gemm_accumulate", c);
  MOTLEY_CHECK_KIND(kShape, a.dim() == 2 && b.dim() == 2 && c.dim() == 2,
                    "gemm_accumulate: a ", shape_str(a.shape()), ", b ", shape_str(b.shape()),
                    ", c ", shape_str(c.shape()), " must be 2-D");
  const std::int64_t m = trans_a ? a.size(1) : a.size(0);
  const std::int64_t k = trans_a ? a.size(0) : a.size(1);
  const std::int64_t kb = trans_b ? b.size(1) : b.size(0);
  const std::int64_t n = trans_b ? b.size(0) : b.size(1);
  MOTLEY_CHECK_KIND(kShape, k == kb && c.size(0) == m && c.size(1) == n,
                    "gemm_accumulate: op(a) (", m, ", ", k, ") @ op(b) (", kb, ", ", n,
                    ") does not fit c ", shape_str(c.shape()));
  MOTLEY_CHECK_KIND(kShape, c.is_contiguous(), "gemm_accumulate: c ", c.str(),
                    " must be contiguous");
  if (m == 0 || n == 0 || k == 0) return;
  const MatrixOperand ma = as_matrix(a);
  const MatrixOperand mb = as_matrix(b);
  c.backend().gemm(ma.trans != trans_a, mb.trans != trans_b, m, n, k, alpha, ma.t, ma.ld, mb.t,
                   mb.ld, 1.0, c, n);
}

// ---- fused model kernels ------------------------------------------------------------------

namespace {

Tensor softmax_impl(const char* op, const Tensor& x, bool log) {
  check_defined(op, x, "x");
  check_floating(op, x);
  MOTLEY_CHECK_KIND(kShape, x.dim() >= 1, op, ": needs at least one dimension, got ",
                    x.str());
  const Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
  if (y.numel() == 0) return y;
  xc.backend().softmax(xc, y, log);
  return y;
}

}  // namespace

Tensor softmax(const Tensor& x) { return softmax_impl("softmax", x, false); }
Tensor log_softmax(const Tensor& x) { return softmax_impl("log_softmax", x, true); }

Tensor softmax_backward(const Tensor& y, const Tensor& dy, bool log) {
  const char* op = log ? "log_softmax_backward" : "softmax_backward";
  check_defined(op, y, "y");
  check_like(op, y, dy, "dy");
  check_floating(op, y);
  MOTLEY_CHECK_KIND(kShape, y.dim() >= 1, op, ": needs at least one dimension");
  const Tensor yc = y.contiguous(), dyc = dy.contiguous();
  Tensor dx = Tensor::empty(yc.shape(), yc.dtype(), yc.device());
  if (dx.numel() == 0) return dx;
  yc.backend().softmax_backward(yc, dyc, dx, log);
  return dx;
}

std::pair<Tensor, Tensor> cross_entropy(const Tensor& logits, const Tensor& targets,
                                        std::int64_t ignore_index) {
  check_defined("cross_entropy", logits, "logits");
  check_defined("cross_entropy", targets, "targets");
  check_same_device("cross_entropy", logits, targets);
  check_floating("cross_entropy", logits);
  check_index("cross_entropy", targets, "targets");
  MOTLEY_CHECK_KIND(kShape,
                    logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
                    "cross_entropy: logits ", shape_str(logits.shape()), " and targets ",
                    shape_str(targets.shape()), ": expected (N, V) and (N)");
  MOTLEY_CHECK_KIND(kShape, logits.size(1) > 0 || logits.size(0) == 0,
                    "cross_entropy: logits ", shape_str(logits.shape()), " have no classes");
  const Tensor x = logits.contiguous(), t = targets.contiguous();
  const std::int64_t rows = x.size(0);
  Tensor loss = Tensor::empty({rows}, x.dtype(), x.device());
  Tensor lse = Tensor::empty({rows}, x.dtype(), x.device());
  if (rows == 0) return {loss, lse};
  x.backend().cross_entropy(x, t, ignore_index, loss, lse);
  return {loss, lse};
}

Tensor cross_entropy_backward(const Tensor& logits, const Tensor& targets,
                              std::int64_t ignore_index, const Tensor& lse,
                              const Tensor& dloss) {
  const char* op = "cross_entropy_backward";
  check_defined(op, logits, "logits");
  check_defined(op, targets, "targets");
  check_defined(op, lse, "lse");
  check_defined(op, dloss, "dloss");
  check_same_device(op, logits, targets);
  check_same_device(op, logits, lse);
  check_same_device(op, logits, dloss);
  check_same_dtype(op, logits, lse);
  check_same_dtype(op, logits, dloss);
  check_index(op, targets, "targets");
  MOTLEY_CHECK_KIND(kShape,
                    logits.dim() == 2 && targets.dim() == 1 &&
                        targets.size(0) == logits.size(0) && lse.shape() == targets.shape() &&
                        dloss.shape() == targets.shape(),
                    op, ": logits ", shape_str(logits.shape()), ", targets ",
                    shape_str(targets.shape()), ", lse ", shape_str(lse.shape()), ", dloss ",
                    shape_str(dloss.shape()), ": expected (N, V), (N), (N), (N)");
  const Tensor x = logits.contiguous();
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (dx.numel() == 0) return dx;
  x.backend().cross_entropy_backward(x, targets.contiguous(), ignore_index, lse.contiguous(),
                                     dloss.contiguous(), dx);
  return dx;
}

std::pair<Tensor, Tensor> rmsnorm(const Tensor& x, const Tensor& g, double eps) {
  check_defined("rmsnorm", x, "x");
  check_defined("rmsnorm", g, "g");
  check_same_device("rmsnorm", x, g);
  check_same_dtype("rmsnorm", x, g);
  check_floating("rmsnorm", x);
  MOTLEY_CHECK_KIND(kShape, x.dim() >= 1 && g.dim() == 1 && g.size(0) == x.size(-1),
                    "rmsnorm: x ", shape_str(x.shape()), " with gain ", shape_str(g.shape()),
                    ": expected x (..., d) and g (d)");
  const Tensor xc = x.contiguous(), gc = g.contiguous();
  Tensor y = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
  Tensor rstd = Tensor::empty(drop_last(xc.shape()), xc.dtype(), xc.device());
  if (y.numel() == 0) return {y, rstd};
  xc.backend().rmsnorm(xc, gc, eps, y, rstd);
  return {y, rstd};
}

std::pair<Tensor, Tensor> rmsnorm_backward(const Tensor& x, const Tensor& g,
                                           const Tensor& rstd, const Tensor& dy) {
  const char* op = "rmsnorm_backward";
  check_defined(op, x, "x");
  check_defined(op, g, "g");
  check_defined(op, rstd, "rstd");
  check_like(op, x, dy, "dy");
  check_same_device(op, x, g);
  check_same_device(op, x, rstd);
  check_same_dtype(op, x, g);
  check_same_dtype(op, x, rstd);
  MOTLEY_CHECK_KIND(kShape,
                    x.dim() >= 1 && g.dim() == 1 && g.size(0) == x.size(-1) &&
                        rstd.shape() == drop_last(x.shape()),
                    op, ": x ", shape_str(x.shape()), ", g ", shape_str(g.shape()), ", rstd ",
                    shape_str(rstd.shape()), ": expected (..., d), (d), (...)");
  const Tensor xc = x.contiguous();
  Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
  Tensor dg = Tensor::zeros(g.shape(), g.dtype(), g.device());
  if (dx.numel() == 0) return {dx, dg};
  xc.backend().rmsnorm_backward(xc, g.contiguous(), rstd.contiguous(), dy.contiguous(), dx, dg);
  return {dx, dg};
}

Tensor swiglu(const Tensor& a, const Tensor& b) {
  check_defined("swiglu", a, "a");
  check_like("swiglu", a, b, "b");
  check_floating("swiglu", a);
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (out.numel() == 0) return out;
  a.backend().swiglu(a.contiguous(), b.contiguous(), out);
  return out;
}

std::pair<Tensor, Tensor> swiglu_backward(const Tensor& a, const Tensor& b,
                                          const Tensor& dout) {
  check_defined("swiglu_backward", a, "a");
  check_like("swiglu_backward", a, b, "b");
  check_like("swiglu_backward", a, dout, "dout");
  check_floating("swiglu_backward", a);
  Tensor da = Tensor::empty(a.shape(), a.dtype(), a.device());
  Tensor db = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (da.numel() == 0) return {da, db};
  a.backend().swiglu_backward(a.contiguous(), b.contiguous(), dout.contiguous(), da, db);
  return {da, db};
}

Tensor rope(const Tensor& x, double theta, std::int64_t pos_offset, bool inverse) {
  check_defined("rope", x, "x");
  check_floating("rope", x);
  MOTLEY_CHECK_KIND(kShape, x.dim() == 4 && x.size(3) % 2 == 0, "rope: x ",
                    shape_str(x.shape()), ": expected (B, H, T, hd) with hd even");
  MOTLEY_CHECK_KIND(kShape, pos_offset >= 0, "rope: negative position offset ", pos_offset);
  const Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
  if (y.numel() == 0) return y;
  xc.backend().rope(xc, theta, pos_offset, inverse, y);
  return y;
}

namespace {

void check_attention_inputs(const char* op, const Tensor& q, const Tensor& k,
                            const Tensor& v) {
  check_defined(op, q, "q");
  check_defined(op, k, "k");
  check_defined(op, v, "v");
  check_same_device(op, q, k);
  check_same_device(op, q, v);
  check_same_dtype(op, q, k);
  check_same_dtype(op, q, v);
  check_floating(op, q);
  MOTLEY_CHECK_KIND(kShape,
                    q.dim() == 4 && k.dim() == 4 && v.shape() == k.shape() &&
                        q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                        q.size(3) == k.size(3) && q.size(2) <= k.size(2) && q.size(3) > 0,
                    op, ": q ", shape_str(q.shape()), ", k ", shape_str(k.shape()), ", v ",
                    shape_str(v.shape()),
                    ": expected q (B, H, Tq, hd), k and v (B, H, Tk, hd) with Tq <= Tk");
}

}  // namespace

std::pair<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    double scale) {
  check_attention_inputs("attention", q, k, v);
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Tensor out = Tensor::empty(qc.shape(), qc.dtype(), qc.device());
  Tensor lse = Tensor::empty({q.size(0), q.size(1), q.size(2)}, qc.dtype(), qc.device());
  if (out.numel() == 0) return {out, lse};
  qc.backend().attention(qc, kc, vc, scale, out, lse);
  return {out, lse};
}

AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, const Tensor& dout,
                                  double scale) {
  const char* op = "attention_backward";
  check_attention_inputs(op, q, k, v);
  check_like(op, q, out, "out");
  check_like(op, q, dout, "dout");
  check_defined(op, lse, "lse");
  check_same_device(op, q, lse);
  check_same_dtype(op, q, lse);
  MOTLEY_CHECK_KIND(kShape, lse.shape() == drop_last(q.shape()), op, ": lse ",
                    shape_str(lse.shape()), ", expected ", shape_str(drop_last(q.shape())));
  AttentionGrads g;
  g.dq = Tensor::empty(q.shape(), q.dtype(), q.device());
  g.dk = Tensor::empty(k.shape(), k.dtype(), k.device());
  g.dv = Tensor::empty(v.shape(), v.dtype(), v.device());
  if (q.numel() == 0) {
    if (g.dk.numel() > 0) {
      g.dk.zero_();
      g.dv.zero_();
    }
    return g;
  }
  q.backend().attention_backward(q.contiguous(), k.contiguous(), v.contiguous(),
                                 out.contiguous(), lse.contiguous(), dout.contiguous(), scale,
                                 g.dq, g.dk, g.dv);
  return g;
}

Tensor index_select_rows(const Tensor& src, const Tensor& index) {
  check_defined("index_select_rows", src, "src");
  check_defined("index_select_rows", index, "index");
  check_same_device("index_select_rows", src, index);
  check_index("index_select_rows", index, "index");
  MOTLEY_CHECK_KIND(kShape, src.dim() >= 1 && index.dim() == 1, "index_select_rows: src ",
                    shape_str(src.shape()), " and index ", shape_str(index.shape()),
                    ": expected src (R, d...) and index (n)");
  Shape out_shape = src.shape();
  out_shape[0] = index.size(0);
  Tensor out = Tensor::empty(out_shape, src.dtype(), src.device());
  if (index.numel() == 0) return out;
  MOTLEY_CHECK_KIND(kShape, src.size(0) > 0, "index_select_rows: ", index.size(0),
                    " indices into an empty src ", shape_str(src.shape()));
  src.backend().index_select_rows(src.contiguous(), index.contiguous(), out);
  return out;
}

Tensor index_add_rows(const Tensor& src, const Tensor& index, const Tensor& scale,
                      std::int64_t rows) {
  check_defined("index_add_rows", src, "src");
  MOTLEY_CHECK_KIND(kShape, src.dim() >= 1 && rows >= 0, "index_add_rows: src ",
                    shape_str(src.shape()), " into ", rows, " rows");
  Shape out_shape = src.shape();
  out_shape[0] = rows;
  Tensor out = Tensor::zeros(out_shape, src.dtype(), src.device());
  index_add_rows_(out, src, index, scale);
  return out;
}

void index_add_rows_(Tensor& out, const Tensor& src, const Tensor& index,
                     const Tensor& scale) {
  const char* op = "index_add_rows";
  check_defined(op, out, "out");
  check_defined(op, src, "src");
  check_defined(op, index, "index");
  check_same_device(op, out, src);
  check_same_device(op, out, index);
  check_same_dtype(op, out, src);
  check_floating(op, out);
  check_index(op, index, "index");
  MOTLEY_CHECK_KIND(kShape, out.is_contiguous(), op, ": destination ", out.str(),
                    " must be contiguous");
  bool ok = out.dim() >= 1 && src.dim() == out.dim() && index.dim() == 1 &&
            src.size(0) == index.size(0);
  for (std::int64_t d = 1; ok && d < out.dim(); ++d) ok = src.size(d) == out.size(d);
  MOTLEY_CHECK_KIND(kShape, ok, op, ": src ", shape_str(src.shape()), ", index ",
                    shape_str(index.shape()), " into out ", shape_str(out.shape()),
                    ": expected src (n, d...), index (n), out (R, d...)");
  Tensor sc;
  if (scale.defined()) {
    check_same_device(op, out, scale);
    check_same_dtype(op, out, scale);
    MOTLEY_CHECK_KIND(kShape, scale.dim() == 1 && scale.size(0) == index.size(0), op,
                      ": scale ", shape_str(scale.shape()), " for index ",
                      shape_str(index.shape()));
    sc = scale.contiguous();
  }
  if (index.numel() == 0) return;
  Tensor src_c = src.contiguous();
  if (src_c.shares_storage(out)) src_c = src_c.clone();
  out.backend().index_add_rows(src_c, index.contiguous(), sc, out);
}

std::pair<Tensor, Tensor> topk(const Tensor& x, std::int64_t k) {
  check_defined("topk", x, "x");
  MOTLEY_CHECK_KIND(kShape, x.dim() >= 1, "topk: needs at least one dimension, got ", x.str());
  MOTLEY_CHECK_KIND(kShape, k >= 0 && k <= x.size(-1), "topk: k = ", k, " for x ",
                    shape_str(x.shape()), " (last dimension ", x.size(-1), ")");
  const Tensor xc = x.contiguous();
  Shape shape = drop_last(xc.shape());
  shape.push_back(k);
  Tensor values = Tensor::empty(shape, xc.dtype(), xc.device());
  Tensor indices = Tensor::empty(shape, DType::kI64, xc.device());
  if (values.numel() == 0) return {values, indices};
  xc.backend().topk(xc, k, values, indices);
  return {values, indices};
}

std::pair<Tensor, Tensor> sort_desc(const Tensor& x) {
  check_defined("sort_desc", x, "x");
  MOTLEY_CHECK_KIND(kShape, x.dim() >= 1, "sort_desc: needs at least one dimension, got ",
                    x.str());
  const Tensor xc = x.contiguous();
  Tensor values = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
  Tensor indices = Tensor::empty(xc.shape(), DType::kI64, xc.device());
  if (values.numel() == 0) return {values, indices};
  xc.backend().sort_desc(xc, values, indices);
  return {values, indices};
}

void adamw_step(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                std::int64_t step) {
  const char* op = "adamw_step";
  check_defined(op, param, "param");
  check_floating(op, param);
  check_like(op, param, grad, "grad");
  check_like(op, param, exp_avg, "exp_avg");
  check_like(op, param, exp_avg_sq, "exp_avg_sq");
  for (const Tensor* t : {&param, &exp_avg, &exp_avg_sq}) {
    MOTLEY_CHECK_KIND(kShape, t->is_contiguous(), op, ": ", t->str(),
                      " is updated in place and must be contiguous");
  }
  MOTLEY_CHECK_KIND(kShape, step >= 1, op, ": step counts updates from 1, got ", step);
  if (param.numel() == 0) return;
  param.backend().adamw(param, grad.contiguous(), exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
                        weight_decay, step);
}

// ---- comparisons for tests ------------------------------------------------------------------

double nmse(const Tensor& a, const Tensor& b) {
  check_defined("nmse", a, "a");
  check_defined("nmse", b, "b");
  check_same_shape("nmse", a, b, "argument");
  const std::vector<double> x = a.to_vector<double>();
  const std::vector<double> y = b.to_vector<double>();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - y[i]) * (x[i] - y[i]);
    den += y[i] * y[i];
  }
  return num / std::max(den, std::numeric_limits<double>::min());
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  check_defined("max_abs_diff", a, "a");
  check_defined("max_abs_diff", b, "b");
  check_same_shape("max_abs_diff", a, b, "argument");
  const std::vector<double> x = a.to_vector<double>();
  const std::vector<double> y = b.to_vector<double>();
  double m = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double d = std::abs(x[i] - y[i]);
    if (d > m || std::isnan(d)) m = d;
  }
  return m;
}

}  // namespace motley::ops
