// Differentiable ops, flashlight style: each forward computes its value
// with core ops, then hands record_op() a backward lambda that captures
// only what backward reads (Note [Saved tensor release] in engine.h):
// shapes and scalars by value, input tensors only when the gradient
// formula needs them, and only for inputs that need a gradient.

#include "autograd/ops.h"

#include <utility>

#include "absl/types/span.h"
#include "autograd/engine.h"
#include "core/ops.h"

namespace motley::autograd {

namespace {

bool needs(const Variable& v) { return v.defined() && v.requires_grad(); }

// A 0-d tensor like `like`, broadcast (stride 0) to `shape`.
Tensor filled(double value, const Tensor& like, const Shape& shape) {
  return Tensor::full(Shape{}, value, like.dtype(), like.device()).expand(shape);
}

Tensor zeros_like_meta(const Shape& shape, const Tensor& like) {
  return Tensor::zeros(shape, like.dtype(), like.device());
}

void check_same_float(const char* op, const Variable& a, const Variable& b) {
  MOTLEY_CHECK_KIND(kShape, a.dtype() == b.dtype() && a.device() == b.device(), op,
                    ": inputs differ in dtype or device: ", a.data().str(), " and ",
                    b.data().str());
}

}  // namespace

// ---- elementwise, binary ---------------------------------------------------------------

Variable add(const Variable& a, const Variable& b) {
  Tensor out = ops::add(a.data(), b.data());
  return record_op(
      "add", std::move(out), {a, b},
      [sa = a.shape(), sb = b.shape(), na = needs(a),
       nb = needs(b)](const Tensor& g) -> TensorList {
        return {na ? ops::sum_to(g, sa) : Tensor(), nb ? ops::sum_to(g, sb) : Tensor()};
      });
}

Variable sub(const Variable& a, const Variable& b) {
  Tensor out = ops::sub(a.data(), b.data());
  return record_op(
      "sub", std::move(out), {a, b},
      [sa = a.shape(), sb = b.shape(), na = needs(a),
       nb = needs(b)](const Tensor& g) -> TensorList {
        return {na ? ops::sum_to(g, sa) : Tensor(), nb ? ops::neg(ops::sum_to(g, sb)) : Tensor()};
      });
}

Variable mul(const Variable& a, const Variable& b) {
  Tensor out = ops::mul(a.data(), b.data());
  const bool na = needs(a), nb = needs(b);
  // d(a*b)/da = b and d/db = a: keep each input only for the other's grad.
  return record_op("mul", std::move(out), {a, b},
                   [sa = a.shape(), sb = b.shape(), na, nb, a_saved = nb ? a.data() : Tensor(),
                    b_saved = na ? b.data() : Tensor()](const Tensor& g) -> TensorList {
                     return {na ? ops::sum_to(ops::mul(g, b_saved), sa) : Tensor(),
                             nb ? ops::sum_to(ops::mul(g, a_saved), sb) : Tensor()};
                   });
}

Variable div(const Variable& a, const Variable& b) {
  Tensor out = ops::div(a.data(), b.data());
  const bool na = needs(a), nb = needs(b);
  return record_op("div", std::move(out), {a, b},
                   [sa = a.shape(), sb = b.shape(), na, nb, a_saved = nb ? a.data() : Tensor(),
                    b_saved = b.data()](const Tensor& g) -> TensorList {
                     Tensor ga, gb;
                     if (na) ga = ops::sum_to(ops::div(g, b_saved), sa);
                     if (nb) {
                       // d(a/b)/db = -a / b^2
                       Tensor t = ops::div(ops::mul(g, a_saved), ops::square(b_saved));
                       gb = ops::neg(ops::sum_to(t, sb));
                     }
                     return {ga, gb};
                   });
}

Variable where(const Tensor& mask, const Variable& a, const Variable& b) {
  check_same_float("where", a, b);
  // Broadcast all three explicitly so the kernel sees equal shapes.
  const Shape shape =
      ops::broadcast_shape(mask.shape(), ops::broadcast_shape(a.shape(), b.shape()));
  Tensor m = mask.expand(shape);
  Tensor out = ops::where(m, a.data().expand(shape), b.data().expand(shape));
  return record_op("where", std::move(out), {a, b},
                   [m, sa = a.shape(), sb = b.shape(), na = needs(a),
                    nb = needs(b)](const Tensor& g) -> TensorList {
                     Tensor zero = filled(0.0, g, g.shape());
                     return {na ? ops::sum_to(ops::where(m, g, zero), sa) : Tensor(),
                             nb ? ops::sum_to(ops::where(m, zero, g), sb) : Tensor()};
                   });
}

// ---- elementwise, unary -----------------------------------------------------------------

Variable neg(const Variable& x) {
  return record_op("neg", ops::neg(x.data()), {x},
                   [](const Tensor& g) -> TensorList { return {ops::neg(g)}; });
}

Variable scale(const Variable& x, double alpha) {
  return record_op("scale", ops::scale(x.data(), alpha), {x},
                   [alpha](const Tensor& g) -> TensorList { return {ops::scale(g, alpha)}; });
}

Variable add_scalar(const Variable& x, double alpha) {
  return record_op("add_scalar", ops::add_scalar(x.data(), alpha), {x},
                   [](const Tensor& g) -> TensorList { return {g}; });
}

Variable pow_scalar(const Variable& x, double exponent) {
  return record_op("pow_scalar", ops::pow_scalar(x.data(), exponent), {x},
                   [x_saved = x.data(), exponent](const Tensor& g) -> TensorList {
                     // p * x^(p-1)
                     Tensor d = ops::scale(ops::pow_scalar(x_saved, exponent - 1.0), exponent);
                     return {ops::mul(g, d)};
                   });
}

Variable exp(const Variable& x) {
  Tensor out = ops::exp(x.data());
  return record_op("exp", out, {x},
                   [y = out](const Tensor& g) -> TensorList { return {ops::mul(g, y)}; });
}

Variable log(const Variable& x) {
  return record_op(
      "log", ops::log(x.data()), {x},
      [x_saved = x.data()](const Tensor& g) -> TensorList { return {ops::div(g, x_saved)}; });
}

Variable sqrt(const Variable& x) {
  Tensor out = ops::sqrt(x.data());
  return record_op("sqrt", out, {x}, [y = out](const Tensor& g) -> TensorList {
    return {ops::div(ops::scale(g, 0.5), y)};  // 1 / (2 sqrt(x))
  });
}

Variable rsqrt(const Variable& x) {
  Tensor out = ops::rsqrt(x.data());
  return record_op("rsqrt", out, {x}, [y = out](const Tensor& g) -> TensorList {
    // d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3
    Tensor d = ops::scale(ops::mul(ops::square(y), y), -0.5);
    return {ops::mul(g, d)};
  });
}

Variable square(const Variable& x) {
  return record_op("square", ops::square(x.data()), {x},
                   [x_saved = x.data()](const Tensor& g) -> TensorList {
                     return {ops::mul(g, ops::scale(x_saved, 2.0))};
                   });
}

Variable silu(const Variable& x) {
  return record_op("silu", ops::silu(x.data()), {x},
                   [x_saved = x.data()](const Tensor& g) -> TensorList {
                     return {ops::silu_backward(x_saved, g)};
                   });
}

Variable sigmoid(const Variable& x) {
  Tensor out = ops::sigmoid(x.data());
  return record_op("sigmoid", out, {x}, [y = out](const Tensor& g) -> TensorList {
    // y (1 - y)
    Tensor d = ops::mul(y, ops::add_scalar(ops::neg(y), 1.0));
    return {ops::mul(g, d)};
  });
}

Variable tanh(const Variable& x) {
  Tensor out = ops::tanh(x.data());
  return record_op("tanh", out, {x}, [y = out](const Tensor& g) -> TensorList {
    // 1 - y^2
    Tensor d = ops::add_scalar(ops::neg(ops::square(y)), 1.0);
    return {ops::mul(g, d)};
  });
}

Variable softplus(const Variable& x) {
  return record_op("softplus", ops::softplus(x.data()), {x},
                   [x_saved = x.data()](const Tensor& g) -> TensorList {
                     return {ops::mul(g, ops::sigmoid(x_saved))};
                   });
}

Variable relu(const Variable& x) {
  Tensor out = ops::relu(x.data());
  return record_op("relu", out, {x}, [y = out](const Tensor& g) -> TensorList {
    // y == 0 exactly where x <= 0.
    Tensor zero = filled(0.0, g, g.shape());
    Tensor off = ops::eq(y, zero);
    return {ops::where(off, zero, g)};
  });
}

Variable to_dtype(const Variable& x, DType dtype) {
  MOTLEY_CHECK_KIND(kShape, is_floating(dtype), "to_dtype: target ", std::string(dtype_name(dtype)),
                    " is not floating; use detach().data().to() for index tensors");
  return record_op("to_dtype", x.data().to(dtype), {x},
                   [from = x.dtype()](const Tensor& g) -> TensorList { return {g.to(from)}; });
}

// ---- reductions ------------------------------------------------------------------------------

Variable sum(const Variable& x) {
  return record_op("sum", ops::sum(x.data()), {x},
                   [sx = x.shape()](const Tensor& g) -> TensorList { return {g.expand(sx)}; });
}

Variable sum(const Variable& x, std::int64_t dim, bool keepdim) {
  const std::int64_t d = wrap_dim(dim, x.dim());
  return record_op("sum", ops::sum(x.data(), d, keepdim), {x},
                   [sx = x.shape(), d, keepdim](const Tensor& g) -> TensorList {
                     return {(keepdim ? g : g.unsqueeze(d)).expand(sx)};
                   });
}

Variable mean(const Variable& x) {
  return record_op("mean", ops::mean(x.data()), {x},
                   [sx = x.shape()](const Tensor& g) -> TensorList {
                     const double n = static_cast<double>(shape_numel(sx));
                     return {ops::scale(g, 1.0 / n).expand(sx)};
                   });
}

Variable mean(const Variable& x, std::int64_t dim, bool keepdim) {
  const std::int64_t d = wrap_dim(dim, x.dim());
  return record_op("mean", ops::mean(x.data(), d, keepdim), {x},
                   [sx = x.shape(), d, keepdim](const Tensor& g) -> TensorList {
                     Tensor gs = ops::scale(g, 1.0 / static_cast<double>(sx[d]));
                     return {(keepdim ? gs : gs.unsqueeze(d)).expand(sx)};
                   });
}

Variable logsumexp(const Variable& x) {
  MOTLEY_CHECK_KIND(kShape, x.dim() >= 1, "logsumexp of a 0-d tensor");
  const Tensor& xd = x.data();
  Tensor m = ops::amax(xd, -1, /*keepdim=*/true);                        // (..., 1)
  Tensor s = ops::sum(ops::exp(ops::sub(xd, m)), -1, /*keepdim=*/true);  // (..., 1)
  Tensor lse = ops::add(ops::log(s), m).squeeze(-1);                     // (...)
  return record_op("logsumexp", lse, {x}, [x_saved = xd, lse](const Tensor& g) -> TensorList {
    // d lse / dx = softmax(x) = exp(x - lse)
    Tensor p = ops::exp(ops::sub(x_saved, lse.unsqueeze(-1)));
    return {ops::mul(g.unsqueeze(-1), p)};
  });
}

// ---- shape
// ---------------------------------------------------------------------------------------

Variable reshape(const Variable& x, Shape shape) {
  return record_op("reshape", x.data().reshape(std::move(shape)), {x},
                   [sx = x.shape()](const Tensor& g) -> TensorList { return {g.reshape(sx)}; });
}

Variable view(const Variable& x, Shape shape) {
  return record_op("view", x.data().view(std::move(shape)), {x},
                   [sx = x.shape()](const Tensor& g) -> TensorList { return {g.reshape(sx)}; });
}

Variable transpose(const Variable& x, std::int64_t d0, std::int64_t d1) {
  return record_op("transpose", x.data().transpose(d0, d1), {x},
                   [d0, d1](const Tensor& g) -> TensorList { return {g.transpose(d0, d1)}; });
}

Variable permute(const Variable& x, const std::vector<std::int64_t>& order) {
  Tensor out = x.data().permute(order);  // validates order
  std::vector<std::int64_t> inverse(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    inverse[wrap_dim(order[i], x.dim())] = static_cast<std::int64_t>(i);
  }
  return record_op("permute", std::move(out), {x},
                   [inverse](const Tensor& g) -> TensorList { return {g.permute(inverse)}; });
}

Variable narrow(const Variable& x, std::int64_t d, std::int64_t start, std::int64_t length) {
  const std::int64_t dim = wrap_dim(d, x.dim());
  return record_op("narrow", x.data().narrow(dim, start, length), {x},
                   [sx = x.shape(), dim, start, length](const Tensor& g) -> TensorList {
                     Tensor gx = zeros_like_meta(sx, g);
                     gx.narrow(dim, start, length).copy_(g);
                     return {gx};
                   });
}

Variable slice(const Variable& x, std::int64_t d, std::int64_t start, std::int64_t end,
               std::int64_t step) {
  const std::int64_t dim = wrap_dim(d, x.dim());
  return record_op("slice", x.data().slice(dim, start, end, step), {x},
                   [sx = x.shape(), dim, start, end, step](const Tensor& g) -> TensorList {
                     Tensor gx = zeros_like_meta(sx, g);
                     gx.slice(dim, start, end, step).copy_(g);
                     return {gx};
                   });
}

Variable select(const Variable& x, std::int64_t d, std::int64_t index) {
  const std::int64_t dim = wrap_dim(d, x.dim());
  const std::int64_t i = index < 0 ? index + x.size(dim) : index;
  return record_op("select", x.data().select(dim, i), {x},
                   [sx = x.shape(), dim, i](const Tensor& g) -> TensorList {
                     Tensor gx = zeros_like_meta(sx, g);
                     gx.select(dim, i).copy_(g);
                     return {gx};
                   });
}

Variable unsqueeze(const Variable& x, std::int64_t d) {
  const std::int64_t dim = wrap_dim(d, x.dim() + 1);
  return record_op("unsqueeze", x.data().unsqueeze(dim), {x},
                   [dim](const Tensor& g) -> TensorList { return {g.squeeze(dim)}; });
}

Variable squeeze(const Variable& x, std::int64_t d) {
  const std::int64_t dim = wrap_dim(d, x.dim());
  return record_op("squeeze", x.data().squeeze(dim), {x},
                   [dim](const Tensor& g) -> TensorList { return {g.unsqueeze(dim)}; });
}

Variable expand(const Variable& x, Shape shape) {
  return record_op(
      "expand", x.data().expand(std::move(shape)), {x},
      [sx = x.shape()](const Tensor& g) -> TensorList { return {ops::sum_to(g, sx)}; });
}

Variable contiguous(const Variable& x) {
  if (x.data().is_contiguous()) return x;
  return record_op("contiguous", x.data().contiguous(), {x},
                   [](const Tensor& g) -> TensorList { return {g}; });
}

Variable cat(const std::vector<Variable>& parts, std::int64_t dim) {
  MOTLEY_CHECK_KIND(kShape, !parts.empty(), "cat of no tensors");
  const std::int64_t d = wrap_dim(dim, parts[0].dim());
  std::vector<Tensor> tensors;
  std::vector<std::int64_t> sizes;
  tensors.reserve(parts.size());
  for (const Variable& p : parts) {
    tensors.push_back(p.data());
    sizes.push_back(p.dim() > d ? p.size(d) : 0);
  }
  Tensor out = ops::cat(tensors, d);
  return record_op("cat", std::move(out), parts, [d, sizes](const Tensor& g) -> TensorList {
    TensorList grads;
    grads.reserve(sizes.size());
    std::int64_t start = 0;
    for (std::int64_t size : sizes) {
      grads.push_back(g.narrow(d, start, size));
      start += size;
    }
    return grads;
  });
}

Variable detach(const Variable& x) { return x.detach(); }

// ---- matrix products
// ---------------------------------------------------------------------------------

namespace {

// (k, n) gradient of a 2-D right operand: a2^T @ g2 accumulated into a new
// zero tensor without materialising the transpose.
Tensor weight_grad(const Tensor& a2, const Tensor& g2, std::int64_t rows, std::int64_t cols) {
  Tensor gw = Tensor::zeros({rows, cols}, g2.dtype(), g2.device());
  ops::gemm_accumulate(a2, /*trans_a=*/true, g2, /*trans_b=*/false, 1.0, gw);
  return gw;
}

}  // namespace

Variable matmul(const Variable& a, const Variable& b) {
  MOTLEY_CHECK_KIND(kShape, a.dim() >= 2 && b.dim() >= 2 && a.size(-1) == b.size(-2),
                    "matmul: cannot multiply ", shape_str(a.shape()), " by ", shape_str(b.shape()),
                    " (need a (..., m, k) and b (..., k, n) with equal k)");
  if (b.dim() != 2) {
    bool same_batch = a.dim() == b.dim();
    for (std::int64_t i = 0; same_batch && i < a.dim() - 2; ++i) {
      same_batch = a.size(i) == b.size(i);
    }
    MOTLEY_CHECK_KIND(kShape, same_batch, "matmul: batch dimensions of ", shape_str(a.shape()),
                      " and ", shape_str(b.shape()),
                      " differ (they must match exactly, or b must be 2-D)");
  }
  check_same_float("matmul", a, b);
  Tensor out = ops::matmul(a.data(), b.data());
  const bool na = needs(a), nb = needs(b);
  return record_op("matmul", std::move(out), {a, b},
                   [na, nb, b_2d = b.dim() == 2, a_saved = nb ? a.data() : Tensor(),
                    b_saved = na ? b.data() : Tensor(),
                    precision = ops::matmul_precision()](const Tensor& g) -> TensorList {
                     // Backward products in the forward's precision (Note [Matmul precision]).
                     const ops::MatmulPrecisionGuard same(precision);
                     Tensor ga, gb;
                     // g (..., m, n) @ b^T, where b^T is (n, k) or (..., n, k).
                     if (na) ga = ops::matmul(g, b_saved.transpose(-1, -2));
                     if (nb) {
                       const std::int64_t k = a_saved.size(-1), n = g.size(-1);
                       if (b_2d) {
                         // b was shared across the batch: its gradient sums over every
                         // row of every batch entry, one GEMM over the flattened rows.
                         gb = weight_grad(a_saved.reshape({-1, k}), g.reshape({-1, n}), k, n);
                       } else {
                         gb = ops::matmul(a_saved.transpose(-1, -2), g);
                       }
                     }
                     return {ga, gb};
                   });
}

Variable linear(const Variable& x, const Variable& w) {
  MOTLEY_CHECK_KIND(kShape, w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1),
                    "linear: input ", shape_str(x.shape()), " and weight ", shape_str(w.shape()),
                    " do not fit (need x (..., in) and w (out, in))");
  check_same_float("linear", x, w);
  Tensor out = ops::linear(x.data(), w.data());
  const bool nx = needs(x), nw = needs(w);
  return record_op(
      "linear", std::move(out), {x, w},
      [nx, nw, sx = x.shape(), x_saved = nw ? x.data() : Tensor(),
       w_saved = nx ? w.data() : Tensor(),
       precision = ops::matmul_precision()](const Tensor& g) -> TensorList {
        const ops::MatmulPrecisionGuard same(precision);  // Note [Matmul precision]
        const std::int64_t out_features = g.size(-1);
        const std::int64_t in_features = sx.back();
        Tensor g2 = g.reshape({-1, out_features});  // (N, out)
        Tensor gx, gw;
        if (nx) gx = ops::matmul(g2, w_saved).reshape(sx);  // (N, out) @ (out, in)
        if (nw) {
          // (out, in) = g2^T @ x2
          gw = weight_grad(g2, x_saved.reshape({-1, in_features}), out_features, in_features);
        }
        return {gx, gw};
      });
}

// ---- model ops
// -----------------------------------------------------------------------------------------

Variable softmax(const Variable& x) {
  Tensor out = ops::softmax(x.data());
  return record_op("softmax", out, {x}, [y = out](const Tensor& g) -> TensorList {
    return {ops::softmax_backward(y, g, /*log=*/false)};
  });
}

Variable log_softmax(const Variable& x) {
  Tensor out = ops::log_softmax(x.data());
  return record_op("log_softmax", out, {x}, [y = out](const Tensor& g) -> TensorList {
    return {ops::softmax_backward(y, g, /*log=*/true)};
  });
}

namespace {

void check_cross_entropy_args(const char* op, const Variable& logits, const Tensor& targets) {
  MOTLEY_CHECK_KIND(kShape,
                    logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
                    op, ": logits ", shape_str(logits.shape()), " and targets ",
                    shape_str(targets.shape()), " do not fit (need (N, V) and (N))");
  MOTLEY_CHECK_KIND(kShape, !is_floating(targets.dtype()), op, ": targets must be integers, got ",
                    std::string(dtype_name(targets.dtype())));
}

}  // namespace

Variable cross_entropy_rows(const Variable& logits, const Tensor& targets,
                            std::int64_t ignore_index) {
  check_cross_entropy_args("cross_entropy_rows", logits, targets);
  auto [loss, lse] = ops::cross_entropy(logits.data(), targets, ignore_index);
  return record_op("cross_entropy_rows", std::move(loss), {logits},
                   [logits_saved = logits.data(), targets, ignore_index,
                    lse = std::move(lse)](const Tensor& g) -> TensorList {
                     return {ops::cross_entropy_backward(logits_saved, targets, ignore_index, lse,
                                                         g.contiguous())};
                   });
}

Variable cross_entropy(const Variable& logits, const Tensor& targets, std::int64_t ignore_index) {
  check_cross_entropy_args("cross_entropy", logits, targets);
  const Tensor& x = logits.data();
  const std::int64_t n = x.size(0);
  auto [loss, lse] = ops::cross_entropy(x, targets, ignore_index);
  // The number of counted rows, as a 0-d tensor on the device (no host
  // sync): n - #(targets == ignore_index), at least 1. Targets are compared
  // in the logits' dtype: token ids and ignore_index are exact there.
  Tensor t = targets.to(x.dtype());
  Tensor ignored = ops::sum(ops::eq(t, filled(static_cast<double>(ignore_index), x, t.shape())));
  Tensor counted = ops::add_scalar(ops::neg(ignored), static_cast<double>(n));
  Tensor denom = ops::maximum(counted, Tensor::scalar(1.0, x.dtype(), x.device()));
  Tensor mean_loss = ops::div(ops::sum(loss), denom);
  return record_op(
      "cross_entropy", std::move(mean_loss), {logits},
      [logits_saved = x, targets, ignore_index, lse = std::move(lse), denom,
       n](const Tensor& g) -> TensorList {
        Tensor per_row = ops::div(g, denom).expand({n}).contiguous();  // (N)
        return {ops::cross_entropy_backward(logits_saved, targets, ignore_index, lse, per_row)};
      });
}

Variable rmsnorm(const Variable& x, const Variable& g, double eps) {
  MOTLEY_CHECK_KIND(kShape, g.dim() == 1 && x.dim() >= 1 && x.size(-1) == g.size(0),
                    "rmsnorm: input ", shape_str(x.shape()), " and gain ", shape_str(g.shape()),
                    " do not fit (need x (..., d) and g (d))");
  auto [y, rstd] = ops::rmsnorm(x.data(), g.data(), eps);
  return record_op("rmsnorm", std::move(y), {x, g},
                   [x_saved = x.data(), g_saved = g.data(),
                    rstd = std::move(rstd)](const Tensor& dy) -> TensorList {
                     auto [dx, dg] = ops::rmsnorm_backward(x_saved, g_saved, rstd, dy);
                     return {dx, dg};
                   });
}

Variable swiglu(const Variable& a, const Variable& b) {
  MOTLEY_CHECK_KIND(kShape, a.shape() == b.shape(), "swiglu: shapes ", shape_str(a.shape()),
                    " and ", shape_str(b.shape()), " differ");
  return record_op("swiglu", ops::swiglu(a.data(), b.data()), {a, b},
                   [a_saved = a.data(), b_saved = b.data()](const Tensor& g) -> TensorList {
                     auto [da, db] = ops::swiglu_backward(a_saved, b_saved, g);
                     return {da, db};
                   });
}

// Note [Grouped experts]
// One graph node for all experts of a MoE layer. Forward, per expert with
// rows: a = x_e w1^T, b = x_e w3^T, s = silu(a) b, and y_e = s w2^T written
// straight into its rows of y. Saved: x, the weights, and a, b, s per
// expert (what the per-expert ops would save). Backward, per expert, with
// g_e the rows of the incoming gradient:
//   ds = g_e w2,  dw2 = g_e^T s,  (da, db) = swiglu_backward(a, b, ds),
//   dw1 = da^T x_e,  dw3 = db^T x_e,  dx_e = da w1 + db w3,
// dx_e written into its rows of dx (every row belongs to one expert, so
// dx needs no zero fill and no sum over experts). The per-expert
// composition instead gives x's gradient as a sum over experts of
// full-size (R, d) tensors that are zero outside one block, and
// concatenates the outputs: 2 E extra passes over (R, d) memory.
Variable grouped_swiglu_ffn(const Variable& x, const std::vector<std::int64_t>& counts,
                            const std::vector<Variable>& w1, const std::vector<Variable>& w3,
                            const std::vector<Variable>& w2) {
  const std::size_t n_experts = counts.size();
  MOTLEY_CHECK_KIND(kShape, x.dim() == 2, "grouped_swiglu_ffn: x ", shape_str(x.shape()),
                    " must be (rows, d)");
  MOTLEY_CHECK_KIND(kShape, w1.size() == n_experts && w3.size() == n_experts &&
                                w2.size() == n_experts,
                    "grouped_swiglu_ffn: ", n_experts, " counts but ", w1.size(), "/",
                    w3.size(), "/", w2.size(), " w1/w3/w2 weights");
  const std::int64_t rows = x.size(0), d = x.size(1);
  std::int64_t total = 0;
  std::vector<Variable> inputs = {x};
  for (std::size_t e = 0; e < n_experts; ++e) {
    MOTLEY_CHECK_KIND(kShape, counts[e] >= 0, "grouped_swiglu_ffn: expert ", e, " has ",
                      counts[e], " rows");
    total += counts[e];
    if (counts[e] == 0) continue;
    const std::int64_t h = w1[e].dim() == 2 ? w1[e].size(0) : -1;
    MOTLEY_CHECK_KIND(kShape,
                      h > 0 && w1[e].shape() == Shape({h, d}) && w3[e].shape() == Shape({h, d}) &&
                          w2[e].shape() == Shape({d, h}),
                      "grouped_swiglu_ffn: expert ", e, " weights w1 ", shape_str(w1[e].shape()),
                      ", w3 ", shape_str(w3[e].shape()), ", w2 ", shape_str(w2[e].shape()),
                      " do not fit x ", shape_str(x.shape()), " (need (h, d), (h, d), (d, h))");
    check_same_float("grouped_swiglu_ffn", x, w1[e]);
    check_same_float("grouped_swiglu_ffn", x, w3[e]);
    check_same_float("grouped_swiglu_ffn", x, w2[e]);
  }
  MOTLEY_CHECK_KIND(kShape, total == rows, "grouped_swiglu_ffn: counts sum to ", total,
                    " but x has ", rows, " rows");
  for (std::size_t e = 0; e < n_experts; ++e) inputs.push_back(w1[e]);
  for (std::size_t e = 0; e < n_experts; ++e) inputs.push_back(w3[e]);
  for (std::size_t e = 0; e < n_experts; ++e) inputs.push_back(w2[e]);

  struct Saved {
    Tensor w1, w3, w2, a, b, s;
  };
  const Tensor xd = x.data().contiguous();
  Tensor y = Tensor::empty({rows, d}, x.dtype(), x.device());
  std::vector<Saved> saved(n_experts);
  std::int64_t offset = 0;
  for (std::size_t e = 0; e < n_experts; ++e) {
    const std::int64_t n = counts[e];
    if (n == 0) continue;
    Saved& sv = saved[e];
    const Tensor xe = xd.narrow(0, offset, n);
    sv.w1 = w1[e].data();
    sv.w3 = w3[e].data();
    sv.w2 = w2[e].data();
    sv.a = ops::linear(xe, sv.w1);
    sv.b = ops::linear(xe, sv.w3);
    sv.s = ops::swiglu(sv.a, sv.b);
    Tensor ye = y.narrow(0, offset, n);
    ye.fill_(0.0);
    ops::gemm_accumulate(sv.s, /*trans_a=*/false, sv.w2, /*trans_b=*/true, 1.0, ye);
    offset += n;
  }
  const bool nx = needs(x);
  return record_op("grouped_swiglu_ffn", std::move(y), inputs,
                   [nx, counts, xd, saved = std::move(saved),
                    precision = ops::matmul_precision()](const Tensor& g) -> TensorList {
                     const ops::MatmulPrecisionGuard same(precision);  // Note [Matmul precision]
                     const std::size_t ne = counts.size();
                     const Tensor gc = g.contiguous();
                     TensorList grads(1 + 3 * ne);
                     Tensor dx;
                     if (nx) dx = Tensor::empty(xd.shape(), xd.dtype(), xd.device());
                     std::int64_t offset = 0;
                     for (std::size_t e = 0; e < ne; ++e) {
                       const std::int64_t n = counts[e];
                       if (n == 0) continue;
                       const Saved& sv = saved[e];
                       const Tensor ge = gc.narrow(0, offset, n);  // (n, d)
                       const Tensor xe = xd.narrow(0, offset, n);  // (n, d)
                       const Tensor ds = ops::matmul(ge, sv.w2);   // (n, h)
                       grads[1 + 2 * ne + e] =
                           weight_grad(ge, sv.s, ge.size(1), sv.s.size(1));  // (d, h)
                       auto [da, db] = ops::swiglu_backward(sv.a, sv.b, ds);
                       grads[1 + e] = weight_grad(da, xe, da.size(1), xe.size(1));       // (h, d)
                       grads[1 + ne + e] = weight_grad(db, xe, db.size(1), xe.size(1));  // (h, d)
                       if (nx) {
                         Tensor dxe = dx.narrow(0, offset, n);
                         dxe.fill_(0.0);
                         ops::gemm_accumulate(da, false, sv.w1, false, 1.0, dxe);
                         ops::gemm_accumulate(db, false, sv.w3, false, 1.0, dxe);
                       }
                       offset += n;
                     }
                     grads[0] = dx;
                     return grads;
                   });
}

Variable rope(const Variable& x, double theta, std::int64_t pos_offset) {
  MOTLEY_CHECK_KIND(kShape, x.dim() == 4 && x.size(-1) % 2 == 0, "rope: input ",
                    shape_str(x.shape()), " is not (B, H, T, hd) with even hd");
  return record_op("rope", ops::rope(x.data(), theta, pos_offset), {x},
                   [theta, pos_offset](const Tensor& g) -> TensorList {
                     // A rotation: its transpose (the inverse rotation) is the backward.
                     return {ops::rope(g, theta, pos_offset, /*inverse=*/true)};
                   });
}

Variable attention(const Variable& q, const Variable& k, const Variable& v, double softmax_scale) {
  MOTLEY_CHECK_KIND(kShape,
                    q.dim() == 4 && k.shape() == v.shape() && k.dim() == 4 &&
                        q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                        q.size(3) == k.size(3) && q.size(2) <= k.size(2),
                    "attention: q ", shape_str(q.shape()), ", k ", shape_str(k.shape()), ", v ",
                    shape_str(v.shape()),
                    " do not fit (need q (B, H, Tq, hd), k and v (B, H, Tk, hd), Tq <= Tk)");
  auto [out, lse] = ops::attention(q.data(), k.data(), v.data(), softmax_scale);
  return record_op("attention", out, {q, k, v},
                   [q_saved = q.data(), k_saved = k.data(), v_saved = v.data(), out,
                    lse = std::move(lse), softmax_scale](const Tensor& g) -> TensorList {
                     ops::AttentionGrads d = ops::attention_backward(q_saved, k_saved, v_saved, out,
                                                                     lse, g, softmax_scale);
                     return {d.dq, d.dk, d.dv};
                   });
}

namespace {

void check_index(const char* op, const Tensor& index) {
  MOTLEY_CHECK_KIND(kShape, !is_floating(index.dtype()), op, ": index must be integers, got ",
                    std::string(dtype_name(index.dtype())));
}

}  // namespace

Variable embedding(const Variable& weight, const Tensor& ids) {
  MOTLEY_CHECK_KIND(kShape, weight.dim() == 2, "embedding: weight ", shape_str(weight.shape()),
                    " is not (V, d)");
  check_index("embedding", ids);
  const std::int64_t vocab = weight.size(0), d = weight.size(1);
  Tensor flat = ids.reshape({-1});
  Shape out_shape = ids.shape();
  out_shape.push_back(d);
  Tensor out = ops::index_select_rows(weight.data(), flat).view(out_shape);
  return record_op("embedding", std::move(out), {weight},
                   [flat, vocab, d](const Tensor& g) -> TensorList {
                     Tensor gw = Tensor::zeros({vocab, d}, g.dtype(), g.device());
                     // Rows added in order of position: deterministic for repeated ids.
                     ops::index_add_rows_(gw, g.reshape({-1, d}), flat);
                     return {gw};
                   });
}

Variable index_select_rows(const Variable& src, const Tensor& index) {
  MOTLEY_CHECK_KIND(kShape, src.dim() >= 1 && index.dim() == 1, "index_select_rows: src ",
                    shape_str(src.shape()), " and index ", shape_str(index.shape()),
                    " do not fit (need src (R, ...) and index (n))");
  check_index("index_select_rows", index);
  return record_op("index_select_rows", ops::index_select_rows(src.data(), index), {src},
                   [index, ss = src.shape()](const Tensor& g) -> TensorList {
                     Tensor gs = Tensor::zeros(ss, g.dtype(), g.device());
                     ops::index_add_rows_(gs, g, index);
                     return {gs};
                   });
}

Variable index_add_rows(const Variable& src, const Tensor& index, const Variable& row_scale,
                        std::int64_t rows) {
  MOTLEY_CHECK_KIND(kShape, src.dim() >= 1 && index.dim() == 1 && index.size(0) == src.size(0),
                    "index_add_rows: src ", shape_str(src.shape()), " and index ",
                    shape_str(index.shape()), " do not fit (need src (n, ...) and index (n))");
  check_index("index_add_rows", index);
  const bool scaled = row_scale.defined();
  if (scaled) {
    MOTLEY_CHECK_KIND(kShape, row_scale.dim() == 1 && row_scale.size(0) == src.size(0),
                      "index_add_rows: scale ", shape_str(row_scale.shape()), " does not fit src ",
                      shape_str(src.shape()), " (need (n))");
    check_same_float("index_add_rows", src, row_scale);
  }
  Shape out_shape = src.shape();
  out_shape[0] = rows;
  Tensor out = Tensor::zeros(out_shape, src.dtype(), src.device());
  ops::index_add_rows_(out, src.data(), index, scaled ? row_scale.data() : Tensor());

  const bool n_src = needs(src), n_scale = needs(row_scale);
  const std::int64_t n = src.size(0);
  // Row width; explicit rather than -1, which cannot be inferred when n == 0
  // (an expert that received no tokens).
  const std::int64_t width = shape_numel(absl::MakeConstSpan(src.shape()).subspan(1));
  // The scale as a column (n, 1, ...) that broadcasts against src rows.
  Shape column(src.dim(), 1);
  column[0] = n;
  return record_op("index_add_rows", std::move(out), {src, row_scale},
                   [index, n_src, n_scale, n, width, column,
                    scale_saved = (scaled && n_src) ? row_scale.data().reshape(column) : Tensor(),
                    src_saved = n_scale ? src.data() : Tensor()](const Tensor& g) -> TensorList {
                     // Every src row i went to out row index[i]: gather those gradients.
                     Tensor gathered = ops::index_select_rows(g, index);  // (n, ...)
                     Tensor g_src, g_scale;
                     if (n_src)
                       g_src = scale_saved.defined() ? ops::mul(gathered, scale_saved) : gathered;
                     if (n_scale) {
                       // d out[index[i]] / d scale[i] = src[i]: a row-wise dot product.
                       g_scale = ops::sum(ops::mul(gathered, src_saved).reshape({n, width}), 1);
                     }
                     return {g_src, g_scale};
                   });
}

Variable take_along_last(const Variable& x, const Tensor& idx) {
  check_index("take_along_last", idx);
  bool fits = x.dim() >= 1 && idx.dim() == x.dim();
  for (std::int64_t i = 0; fits && i + 1 < x.dim(); ++i) fits = x.size(i) == idx.size(i);
  MOTLEY_CHECK_KIND(kShape, fits, "take_along_last: x ", shape_str(x.shape()), " and idx ",
                    shape_str(idx.shape()), " do not fit (need (..., E) and (..., k))");
  const std::int64_t e = x.size(-1), k = idx.size(-1);
  const std::int64_t rows = e == 0 ? 0 : x.numel() / e;
  // Row r, column j of the flattened x is element r * E + idx: pick those
  // elements as rows of x viewed (rows * E, 1).
  std::vector<std::int64_t> picks = idx.to_vector<std::int64_t>();
  for (std::size_t i = 0; i < picks.size(); ++i) {
    MOTLEY_CHECK_KIND(kShape, picks[i] >= 0 && picks[i] < e, "take_along_last: index ", picks[i],
                      " at position ", i, " outside [0, ", e, ")");
    picks[i] += static_cast<std::int64_t>(i) / k * e;
  }
  Tensor flat = Tensor::from_vector(picks, {rows * k}, x.device());
  Tensor out = ops::index_select_rows(x.data().reshape({rows * e, 1}), flat).view(idx.shape());
  return record_op("take_along_last", std::move(out), {x},
                   [flat, sx = x.shape(), rows, e](const Tensor& g) -> TensorList {
                     Tensor gx = Tensor::zeros({rows * e, 1}, g.dtype(), g.device());
                     ops::index_add_rows_(gx, g.reshape({-1, 1}), flat);
                     return {gx.view(sx)};
                   });
}

}  // namespace motley::autograd
