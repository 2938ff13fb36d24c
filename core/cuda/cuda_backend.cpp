// The CUDA backend: argument checks, memory, cuBLAS, and the launches of
// the kernels in kernels_*.cu (declared in kernels.h).
//
// Each Backend method checks what the kernels rely on (device, dtype,
// contiguity, sizes) and throws kShape with the method's name when a
// caller breaks the contract, then enqueues work on the backend's stream
// and returns without waiting, except where noted.
#include "core/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/cuda/cuda_allocator.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/device_scope.h"
#include "core/cuda/kernels.h"

namespace motley {
namespace {

namespace ck = cuda_kernels;

// ---- argument checks -----------------------------------------------------------------

void expect_defined(const Tensor& t, const char* op, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.defined(), op, ": ", name, " is undefined");
}

void expect_dtype(const Tensor& t, DType dtype, const char* op, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.dtype() == dtype, op, ": ", name, " must be ", dtype_name(dtype),
                    ", got ", t.str());
}

bool is_f32_or_bf16(DType d) { return d == DType::kF32 || d == DType::kBF16; }
bool is_index(DType d) { return d == DType::kI32 || d == DType::kI64; }

void expect_float(const Tensor& t, const char* op, const char* name) {
  MOTLEY_CHECK_KIND(kShape, is_f32_or_bf16(t.dtype()), op, ": ", name,
                    " must be f32 or bf16 on the CUDA backend, got ", t.str());
}

void expect_index(const Tensor& t, const char* op, const char* name) {
  MOTLEY_CHECK_KIND(kShape, is_index(t.dtype()), op, ": ", name, " must be i32 or i64, got ",
                    t.str());
}

void expect_contiguous(const Tensor& t, const char* op, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
                    shape_str(t.strides()), " for ", t.str());
}

void expect_same_shape(const Tensor& a, const Tensor& b, const char* op, const char* na,
                       const char* nb) {
  MOTLEY_CHECK_KIND(kShape, a.shape() == b.shape(), op, ": ", na, " ", a.str(), " and ", nb, " ",
                    b.str(), " differ in shape");
}

void expect_numel(const Tensor& t, std::int64_t numel, const char* op, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.numel() == numel, op, ": ", name, " ", t.str(), " must have ", numel,
                    " elements");
}

// Size of the last dimension (1 for a 0-d tensor).
std::int64_t last_dim(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }

void expect_int32_range(std::int64_t v, const char* op, const char* what) {
  MOTLEY_CHECK_KIND(kShape, v >= 0 && v <= INT_MAX, op, ": ", what, " = ", v,
                    " is outside the range the CUDA backend supports (0 .. 2^31 - 1)");
}

// ---- layouts -----------------------------------------------------------------------------

// Note [Collapsed layouts] (kernels.h): drop size-1 dimensions, then merge
// a dimension into the one outside it wherever every operand's outer
// stride equals its inner stride times the inner size.
template <int N>
ck::Layout<N> make_layout(const Shape& shape, const std::array<const Shape*, N>& strides,
                          const char* op) {
  struct Dim {
    std::int64_t size;
    std::array<std::int64_t, N> stride;
  };
  std::vector<Dim> dims;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    Dim dim{shape[d], {}};
    for (int k = 0; k < N; ++k) dim.stride[k] = (*strides[k])[d];
    if (!dims.empty()) {
      Dim& outer = dims.back();
      bool mergeable = true;
      for (int k = 0; k < N; ++k) {
        mergeable = mergeable && outer.stride[k] == dim.stride[k] * dim.size;
      }
      if (mergeable) {
        outer.size *= dim.size;
        outer.stride = dim.stride;
        continue;
      }
    }
    dims.push_back(dim);
  }
  ck::Layout<N> layout;
  if (dims.empty()) {  // a single element
    layout.rank = 1;
    layout.sizes[0] = 1;
    layout.contiguous = true;
    return layout;
  }
  MOTLEY_CHECK_KIND(kShape, static_cast<int>(dims.size()) <= ck::kMaxDims, op, ": a view of ",
                    shape_str(shape), " still has ", dims.size(),
                    " dimensions after merging contiguous ones; the CUDA backend handles at "
                    "most ",
                    ck::kMaxDims, " (call contiguous() first)");
  layout.rank = static_cast<int>(dims.size());
  layout.contiguous = dims.size() == 1;
  for (int d = 0; d < layout.rank; ++d) {
    layout.sizes[d] = dims[d].size;
    for (int k = 0; k < N; ++k) {
      layout.strides[k][d] = dims[d].stride[k];
      if (dims.size() == 1 && dims[d].stride[k] != 1) layout.contiguous = false;
    }
  }
  return layout;
}

// Bit pattern of `value` stored as `dtype`, converted exactly as the CPU
// backend converts (BFloat16 rounds the f32 value to nearest even).
std::uint64_t fill_pattern(DType dtype, double value) {
  switch (dtype) {
    case DType::kF32: {
      const float f = static_cast<float>(value);
      std::uint32_t u;
      std::memcpy(&u, &f, sizeof(u));
      return u;
    }
    case DType::kF64: {
      std::uint64_t u;
      std::memcpy(&u, &value, sizeof(u));
      return u;
    }
    case DType::kBF16:
      return BFloat16(static_cast<float>(value)).bits;
    case DType::kI32:
      return static_cast<std::uint32_t>(static_cast<std::int32_t>(value));
    case DType::kI64:
      return static_cast<std::uint64_t>(static_cast<std::int64_t>(value));
  }
  return 0;
}

ck::UnaryCode unary_code(UnaryOp op) {
  switch (op) {
    case UnaryOp::kNeg:
      return ck::UnaryCode::kNeg;
    case UnaryOp::kExp:
      return ck::UnaryCode::kExp;
    case UnaryOp::kLog:
      return ck::UnaryCode::kLog;
    case UnaryOp::kSqrt:
      return ck::UnaryCode::kSqrt;
    case UnaryOp::kRsqrt:
      return ck::UnaryCode::kRsqrt;
    case UnaryOp::kSquare:
      return ck::UnaryCode::kSquare;
    case UnaryOp::kAbs:
      return ck::UnaryCode::kAbs;
    case UnaryOp::kSilu:
      return ck::UnaryCode::kSilu;
    case UnaryOp::kSigmoid:
      return ck::UnaryCode::kSigmoid;
    case UnaryOp::kTanh:
      return ck::UnaryCode::kTanh;
    case UnaryOp::kSoftplus:
      return ck::UnaryCode::kSoftplus;
    case UnaryOp::kRelu:
      return ck::UnaryCode::kRelu;
    case UnaryOp::kScale:
      return ck::UnaryCode::kScale;
    case UnaryOp::kAddScalar:
      return ck::UnaryCode::kAddScalar;
    case UnaryOp::kPowScalar:
      return ck::UnaryCode::kPowScalar;
    case UnaryOp::kReciprocal:
      return ck::UnaryCode::kReciprocal;
  }
  MOTLEY_FAIL(kInternal, "unary: unknown op ", static_cast<int>(op));
}

ck::BinaryCode binary_code(BinaryOp op) {
  switch (op) {
    case BinaryOp::kAdd:
      return ck::BinaryCode::kAdd;
    case BinaryOp::kSub:
      return ck::BinaryCode::kSub;
    case BinaryOp::kMul:
      return ck::BinaryCode::kMul;
    case BinaryOp::kDiv:
      return ck::BinaryCode::kDiv;
    case BinaryOp::kMax:
      return ck::BinaryCode::kMax;
    case BinaryOp::kMin:
      return ck::BinaryCode::kMin;
    case BinaryOp::kSiluBackward:
      return ck::BinaryCode::kSiluBackward;
    case BinaryOp::kEq:
      return ck::BinaryCode::kEq;
  }
  MOTLEY_FAIL(kInternal, "binary: unknown op ", static_cast<int>(op));
}

ck::ReduceCode reduce_code(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ck::ReduceCode::kSum;
    case ReduceOp::kMax:
      return ck::ReduceCode::kMax;
    case ReduceOp::kMin:
      return ck::ReduceCode::kMin;
    case ReduceOp::kSumSquares:
      return ck::ReduceCode::kSumSquares;
  }
  MOTLEY_FAIL(kInternal, "reduce: unknown op ", static_cast<int>(op));
}

cudaDataType_t cuda_data_type(DType d) { return d == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

// Elements available from t.raw_data() to the end of its storage.
std::int64_t elements_after(const Tensor& t) {
  const std::int64_t elem = static_cast<std::int64_t>(dtype_size(t.dtype()));
  return static_cast<std::int64_t>(t.storage()->nbytes()) / elem - t.offset();
}

// Elements a (batch of) row-major rows x cols matrices with row stride ld
// and batch stride `stride` touch, counted from the first.
std::int64_t matrix_extent(std::int64_t rows, std::int64_t cols, std::int64_t ld,
                           std::int64_t stride, std::int64_t batch) {
  if (rows == 0 || cols == 0 || batch == 0) return 0;
  return (batch - 1) * stride + (rows - 1) * ld + cols;
}

// Byte range [first, last] a view can touch (strides are non-negative).
std::pair<const char*, const char*> view_bytes(const Tensor& t) {
  const char* base = static_cast<const char*>(t.raw_data());
  std::int64_t last = 0;
  for (std::int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const std::int64_t elem = static_cast<std::int64_t>(dtype_size(t.dtype()));
  return {base, base + (last + 1) * elem - 1};
}

// True when two non-empty views of one storage may share bytes.
bool views_overlap(const Tensor& a, const Tensor& b) {
  if (!a.shares_storage(b)) return false;
  const auto [a0, a1] = view_bytes(a);
  const auto [b0, b1] = view_bytes(b);
  return a0 <= b1 && b0 <= a1;
}

// A block of device memory from the allocator for the duration of one
// call. Giving it back at scope exit, while kernels using it may still be
// queued, is safe: see CudaCachingAllocator's stream-order note.
class Scratch {
 public:
  Scratch(CudaCachingAllocator& allocator, std::size_t nbytes)
      : allocator_(allocator), nbytes_(nbytes) {
    if (nbytes_ > 0) ptr_ = allocator_.allocate(nbytes_);
  }
  ~Scratch() {
    if (ptr_ != nullptr) allocator_.release(ptr_, nbytes_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  CudaCachingAllocator& allocator_;
  std::size_t nbytes_;
  void* ptr_ = nullptr;
};

// ---- the backend ------------------------------------------------------------------------

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index) : index_(index), allocator_(index) {
    DeviceScope scope(index_);
    // Default flags (a blocking stream): work on the legacy default stream
    // by other code still orders against ours.
    MOTLEY_CUDA_CHECK(cudaStreamCreate(&stream_));
    MOTLEY_CUBLAS_CHECK(cublasCreate(&cublas_));
    MOTLEY_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    // CUBLAS_DEFAULT_MATH: f32 GEMMs stay in full f32 (no TF32), so that
    // they match the CPU reference; bf16 GEMMs use tensor cores anyway.
    MOTLEY_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    MOTLEY_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&flag_device_), sizeof(int)));
    MOTLEY_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&flag_host_), sizeof(int)));
  }

  Device device() const override { return Device::cuda(index_); }
  const char* name() const override { return "cuda"; }
  cudaStream_t stream() const { return stream_; }
  CudaCachingAllocator& allocator() { return allocator_; }

  // ---- memory ------------------------------------------------------------------
  void* allocate(std::size_t nbytes) override { return allocator_.allocate(nbytes); }
  void deallocate(void* ptr, std::size_t nbytes) override { allocator_.release(ptr, nbytes); }
  std::size_t bytes_in_use() const override { return allocator_.bytes_in_use(); }
  MemoryStats memory_stats() const override {
    MemoryStats s;
    allocator_.stats(&s);
    return s;
  }
  void empty_cache() override { allocator_.empty_cache(); }

  void copy_from_host(void* dst, const void* src, std::size_t nbytes) override {
    if (nbytes == 0) return;
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, stream_));
    // The caller may reuse `src` on return.
    MOTLEY_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void copy_to_host(void* dst, const void* src, std::size_t nbytes) override {
    if (nbytes == 0) return;
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, stream_));
    MOTLEY_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // Overlapping ranges are allowed, as with memmove on the CPU: they go
  // through a scratch buffer, since cudaMemcpy requires disjoint ranges.
  void copy_device(void* dst, const void* src, std::size_t nbytes) override {
    if (nbytes == 0 || dst == src) return;
    DeviceScope scope(index_);
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    if (d < s + nbytes && s < d + nbytes) {
      Scratch tmp(allocator_, nbytes);
      MOTLEY_CUDA_CHECK(cudaMemcpyAsync(tmp.get(), src, nbytes, cudaMemcpyDeviceToDevice, stream_));
      MOTLEY_CUDA_CHECK(cudaMemcpyAsync(dst, tmp.get(), nbytes, cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    MOTLEY_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, stream_));
  }

  void synchronize() override {
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // ---- layout and casts -----------------------------------------------------------
  void fill(Tensor& out, double value) override {
    here(out, "fill", "out");
    const std::int64_t n = out.numel();
    if (n == 0) return;
    DeviceScope scope(index_);
    const std::uint64_t pattern = fill_pattern(out.dtype(), value);
    if (out.is_contiguous() && pattern == 0) {
      MOTLEY_CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, out.nbytes(), stream_));
      return;
    }
    const auto layout = make_layout<1>(out.shape(), {&out.strides()}, "fill");
    MOTLEY_CUDA_CHECK(ck::fill(out.raw_data(), static_cast<int>(dtype_size(out.dtype())), pattern,
                               layout, n, stream_));
  }

  void copy(const Tensor& src, Tensor& dst) override {
    here(src, "copy", "src");
    here(dst, "copy", "dst");
    expect_same_shape(src, dst, "copy", "src", "dst");
    const std::int64_t n = dst.numel();
    if (n == 0) return;
    DeviceScope scope(index_);
    if (src.dtype() == dst.dtype() && src.is_contiguous() && dst.is_contiguous()) {
      copy_device(dst.raw_data(), src.raw_data(), dst.nbytes());
      return;
    }
    if (views_overlap(src, dst)) {
      // An elementwise kernel would read elements it has already written.
      const Tensor staged = src.clone();
      copy(staged, dst);
      return;
    }
    const auto layout = make_layout<2>(dst.shape(), {&dst.strides(), &src.strides()}, "copy");
    MOTLEY_CUDA_CHECK(
        ck::copy(src.raw_data(), src.dtype(), dst.raw_data(), dst.dtype(), layout, n, stream_));
  }

  // ---- elementwise ----------------------------------------------------------------
  void unary(UnaryOp op, const Tensor& a, Tensor& out, double alpha) override {
    const char* name = "unary";
    here(a, name, "a");
    here(out, name, "out");
    expect_float(out, name, "out");
    expect_dtype(a, out.dtype(), name, "a");
    expect_same_shape(a, out, name, "a", "out");
    const std::int64_t n = out.numel();
    if (n == 0) return;
    DeviceScope scope(index_);
    const auto layout = make_layout<2>(out.shape(), {&out.strides(), &a.strides()}, name);
    MOTLEY_CUDA_CHECK(ck::unary(unary_code(op), static_cast<float>(alpha), a.raw_data(),
                                out.raw_data(), out.dtype(), layout, n, stream_));
  }

  void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) override {
    const char* name = "binary";
    here(a, name, "a");
    here(b, name, "b");
    here(out, name, "out");
    MOTLEY_CHECK_KIND(
        kShape,
        is_f32_or_bf16(out.dtype()) || (is_index(out.dtype()) && op != BinaryOp::kSiluBackward),
        name,
        ": out must be f32 or bf16 (or i32 / i64 except for silu_backward) "
        "on the CUDA backend, got ",
        out.str());
    expect_dtype(a, out.dtype(), name, "a");
    expect_dtype(b, out.dtype(), name, "b");
    expect_same_shape(a, out, name, "a", "out");
    expect_same_shape(b, out, name, "b", "out");
    const std::int64_t n = out.numel();
    if (n == 0) return;
    DeviceScope scope(index_);
    const auto layout =
        make_layout<3>(out.shape(), {&out.strides(), &a.strides(), &b.strides()}, name);
    MOTLEY_CUDA_CHECK(ck::binary(binary_code(op), a.raw_data(), b.raw_data(), out.raw_data(),
                                 out.dtype(), layout, n, stream_));
  }

  void axpby(double alpha, const Tensor& a, double beta, const Tensor& b, Tensor& out) override {
    const char* name = "axpby";
    here(a, name, "a");
    here(b, name, "b");
    here(out, name, "out");
    expect_float(out, name, "out");
    expect_dtype(a, out.dtype(), name, "a");
    expect_dtype(b, out.dtype(), name, "b");
    expect_same_shape(a, out, name, "a", "out");
    expect_same_shape(b, out, name, "b", "out");
    const std::int64_t n = out.numel();
    if (n == 0) return;
    DeviceScope scope(index_);
    const auto layout =
        make_layout<3>(out.shape(), {&out.strides(), &a.strides(), &b.strides()}, name);
    MOTLEY_CUDA_CHECK(ck::axpby(static_cast<float>(alpha), a.raw_data(), static_cast<float>(beta),
                                b.raw_data(), out.raw_data(), out.dtype(), layout, n, stream_));
  }

  void where(const Tensor& mask, const Tensor& a, const Tensor& b, Tensor& out) override {
    const char* name = "where";
    here(mask, name, "mask");
    here(a, name, "a");
    here(b, name, "b");
    here(out, name, "out");
    expect_dtype(a, out.dtype(), name, "a");
    expect_dtype(b, out.dtype(), name, "b");
    expect_same_shape(mask, out, name, "mask", "out");
    expect_same_shape(a, out, name, "a", "out");
    expect_same_shape(b, out, name, "b", "out");
    const std::int64_t n = out.numel();
    if (n == 0) return;
    DeviceScope scope(index_);
    const auto layout = make_layout<4>(
        out.shape(), {&out.strides(), &mask.strides(), &a.strides(), &b.strides()}, name);
    MOTLEY_CUDA_CHECK(ck::where(mask.raw_data(), mask.dtype(), a.raw_data(), b.raw_data(),
                                out.raw_data(), out.dtype(), layout, n, stream_));
  }

  // ---- reductions -------------------------------------------------------------------
  void reduce(ReduceOp op, const Tensor& a, std::int64_t outer, std::int64_t n, std::int64_t inner,
              Tensor& out) override {
    const char* name = "reduce";
    here(a, name, "a");
    here(out, name, "out");
    MOTLEY_CHECK_KIND(kShape, is_f32_or_bf16(a.dtype()) || is_index(a.dtype()), name,
                      ": a must be f32, bf16, i32 or i64 on the CUDA backend, got ", a.str());
    expect_dtype(out, a.dtype(), name, "out");
    expect_contiguous(a, name, "a");
    expect_contiguous(out, name, "out");
    MOTLEY_CHECK_KIND(kShape, outer >= 0 && n >= 0 && inner >= 0 && outer * n * inner == a.numel(),
                      name, ": (outer, n, inner) = (", outer, ", ", n, ", ", inner,
                      ") does not cover ", a.str());
    expect_numel(out, outer * inner, name, "out");
    MOTLEY_CHECK_KIND(kShape, n > 0 || op == ReduceOp::kSum || op == ReduceOp::kSumSquares, name,
                      ": max/min over an empty dimension of ", a.str());
    if (outer * inner == 0) return;
    DeviceScope scope(index_);
    Scratch partial(allocator_, ck::reduce_workspace_bytes(outer, n, inner));
    MOTLEY_CUDA_CHECK(ck::reduce(reduce_code(op), a.raw_data(), out.raw_data(), a.dtype(), outer, n,
                                 inner, partial.get(), stream_));
  }

  void argmax(const Tensor& a, Tensor& out) override {
    const char* name = "argmax";
    here(a, name, "a");
    here(out, name, "out");
    expect_float(a, name, "a");
    expect_dtype(out, DType::kI64, name, "out");
    expect_contiguous(a, name, "a");
    expect_contiguous(out, name, "out");
    const std::int64_t n = last_dim(a);
    MOTLEY_CHECK_KIND(kShape, n > 0 || a.numel() == 0, name, ": empty last dimension in ", a.str());
    if (a.numel() == 0) return;
    const std::int64_t rows = a.numel() / n;
    expect_numel(out, rows, name, "out");
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(ck::argmax(a.raw_data(), a.dtype(), rows, n,
                                 static_cast<std::int64_t*>(out.raw_data()), stream_));
  }

  void cumsum(const Tensor& a, Tensor& out) override {
    const char* name = "cumsum";
    here(a, name, "a");
    here(out, name, "out");
    MOTLEY_CHECK_KIND(
        kShape, a.dtype() == DType::kF32 || a.dtype() == DType::kI32 || a.dtype() == DType::kI64,
        name, ": a must be f32, i32 or i64 on the CUDA backend, got ", a.str());
    expect_dtype(out, a.dtype(), name, "out");
    expect_contiguous(a, name, "a");
    expect_contiguous(out, name, "out");
    expect_numel(out, a.numel(), name, "out");
    if (a.numel() == 0) return;
    const std::int64_t n = last_dim(a);
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(
        ck::cumsum(a.raw_data(), out.raw_data(), a.dtype(), a.numel() / n, n, stream_));
  }

  bool all_finite(const Tensor& a) override {
    here(a, "all_finite", "a");
    if (!is_floating(a.dtype()) || a.numel() == 0) return true;
    const Tensor c = a.is_contiguous() ? a : a.contiguous();
    DeviceScope scope(index_);
    const int flag = run_flagged([&](int* f) {
      MOTLEY_CUDA_CHECK(ck::find_nonfinite(c.raw_data(), c.dtype(), c.numel(), f, stream_));
    });
    return flag == 0;
  }

  // ---- matrix products ----------------------------------------------------------------
  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
            double alpha, const Tensor& a, std::int64_t lda, const Tensor& b, std::int64_t ldb,
            double beta, Tensor& c, std::int64_t ldc) override {
    gemm_impl("gemm", trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
  }

  void gemm_strided_batched(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                            std::int64_t k, double alpha, const Tensor& a, std::int64_t lda,
                            std::int64_t stride_a, const Tensor& b, std::int64_t ldb,
                            std::int64_t stride_b, double beta, Tensor& c, std::int64_t ldc,
                            std::int64_t stride_c, std::int64_t batch) override {
    gemm_impl("gemm_strided_batched", trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb,
              stride_b, beta, c, ldc, stride_c, batch);
  }

  // ---- fused model kernels ---------------------------------------------------------------
  void softmax(const Tensor& x, Tensor& y, bool log) override {
    const char* name = log ? "log_softmax" : "softmax";
    rows_op_checks(name, x, y);
    if (x.numel() == 0) return;
    const std::int64_t n = last_dim(x);
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(
        ck::softmax(x.raw_data(), y.raw_data(), x.dtype(), x.numel() / n, n, log, stream_));
  }

  void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx, bool log) override {
    const char* name = log ? "log_softmax_backward" : "softmax_backward";
    rows_op_checks(name, y, dx);
    here(dy, name, "dy");
    expect_dtype(dy, y.dtype(), name, "dy");
    expect_contiguous(dy, name, "dy");
    expect_same_shape(dy, y, name, "dy", "y");
    if (y.numel() == 0) return;
    const std::int64_t n = last_dim(y);
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(ck::softmax_backward(y.raw_data(), dy.raw_data(), dx.raw_data(), y.dtype(),
                                           y.numel() / n, n, log, stream_));
  }

  void cross_entropy(const Tensor& logits, const Tensor& targets, std::int64_t ignore_index,
                     Tensor& loss, Tensor& lse) override {
    const char* name = "cross_entropy";
    const std::pair<std::int64_t, std::int64_t> dims =
        cross_entropy_checks(name, logits, targets, lse);
    const std::int64_t rows = dims.first, v = dims.second;  // captured below
    stat_checks(name, loss, "loss", logits.dtype(), rows);
    if (rows == 0) return;
    MOTLEY_CHECK_KIND(kShape, v > 0, name, ": logits ", logits.str(), " have no classes");
    DeviceScope scope(index_);
    F32Out loss_f(loss), lse_f(lse);
    const int bad = run_flagged([&](int* flag) {
      MOTLEY_CUDA_CHECK(ck::cross_entropy(logits.raw_data(), logits.dtype(), targets.raw_data(),
                                          targets.dtype(), ignore_index, rows, v, loss_f.data(),
                                          lse_f.data(), flag, stream_));
    });
    if (bad != 0) {
      const std::vector<std::int64_t> t = targets.to_vector<std::int64_t>();
      std::int64_t row = 0;
      while (row < rows && (t[row] == ignore_index || (t[row] >= 0 && t[row] < v))) ++row;
      MOTLEY_FAIL(kShape, name, ": target ", row < rows ? t[row] : -1, " at row ", row,
                  " is outside [0, ", v, ") and is not ignore_index (", ignore_index, ")");
    }
    loss_f.commit();
    lse_f.commit();
  }

  void cross_entropy_backward(const Tensor& logits, const Tensor& targets,
                              std::int64_t ignore_index, const Tensor& lse, const Tensor& dloss,
                              Tensor& dlogits) override {
    const char* name = "cross_entropy_backward";
    const auto [rows, v] = cross_entropy_checks(name, logits, targets, lse);
    stat_checks(name, dloss, "dloss", logits.dtype(), rows);
    here(dlogits, name, "dlogits");
    expect_dtype(dlogits, logits.dtype(), name, "dlogits");
    expect_contiguous(dlogits, name, "dlogits");
    expect_same_shape(dlogits, logits, name, "dlogits", "logits");
    if (logits.numel() == 0) return;
    DeviceScope scope(index_);
    const Tensor lse_f = as_f32(lse), dloss_f = as_f32(dloss);
    MOTLEY_CUDA_CHECK(ck::cross_entropy_backward(
        logits.raw_data(), logits.dtype(), targets.raw_data(), targets.dtype(), ignore_index,
        static_cast<const float*>(lse_f.raw_data()), static_cast<const float*>(dloss_f.raw_data()),
        dlogits.raw_data(), rows, v, stream_));
  }

  void rmsnorm(const Tensor& x, const Tensor& g, double eps, Tensor& y, Tensor& rstd) override {
    const char* name = "rmsnorm";
    const auto [rows, d] = rmsnorm_checks(name, x, g, rstd);
    here(y, name, "y");
    expect_dtype(y, x.dtype(), name, "y");
    expect_contiguous(y, name, "y");
    expect_same_shape(y, x, name, "y", "x");
    if (x.numel() == 0) return;
    DeviceScope scope(index_);
    F32Out rstd_f(rstd);
    MOTLEY_CUDA_CHECK(ck::rmsnorm(x.raw_data(), g.raw_data(), y.raw_data(), rstd_f.data(),
                                  x.dtype(), g.dtype(), rows, d, eps, stream_));
    rstd_f.commit();
  }

  void rmsnorm_backward(const Tensor& x, const Tensor& g, const Tensor& rstd, const Tensor& dy,
                        Tensor& dx, Tensor& dg) override {
    const char* name = "rmsnorm_backward";
    const auto [rows, d] = rmsnorm_checks(name, x, g, rstd);
    for (const auto& [t, tn] : {std::pair<const Tensor*, const char*>{&dy, "dy"},
                                std::pair<const Tensor*, const char*>{&dx, "dx"}}) {
      here(*t, name, tn);
      expect_dtype(*t, x.dtype(), name, tn);
      expect_contiguous(*t, name, tn);
      expect_same_shape(*t, x, name, tn, "x");
    }
    here(dg, name, "dg");
    expect_dtype(dg, g.dtype(), name, "dg");
    expect_contiguous(dg, name, "dg");
    expect_same_shape(dg, g, name, "dg", "g");
    if (x.numel() == 0) return;
    DeviceScope scope(index_);
    Scratch partial(allocator_, ck::rmsnorm_workspace_bytes(rows, d));
    const Tensor rstd_f = as_f32(rstd);
    MOTLEY_CUDA_CHECK(ck::rmsnorm_backward(
        x.raw_data(), g.raw_data(), static_cast<const float*>(rstd_f.raw_data()), dy.raw_data(),
        dx.raw_data(), dg.raw_data(), x.dtype(), g.dtype(), rows, d, partial.get(), stream_));
  }

  void swiglu(const Tensor& a, const Tensor& b, Tensor& out) override {
    const char* name = "swiglu";
    same_float_contiguous(name, a, {{&b, "b"}, {&out, "out"}});
    if (a.numel() == 0) return;
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(
        ck::swiglu(a.raw_data(), b.raw_data(), out.raw_data(), a.dtype(), a.numel(), stream_));
  }

  void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dout, Tensor& da,
                       Tensor& db) override {
    const char* name = "swiglu_backward";
    same_float_contiguous(name, a, {{&b, "b"}, {&dout, "dout"}, {&da, "da"}, {&db, "db"}});
    if (a.numel() == 0) return;
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(ck::swiglu_backward(a.raw_data(), b.raw_data(), dout.raw_data(),
                                          da.raw_data(), db.raw_data(), a.dtype(), a.numel(),
                                          stream_));
  }

  void rope(const Tensor& x, double theta, std::int64_t pos_offset, bool inverse,
            Tensor& y) override {
    const char* name = "rope";
    same_float_contiguous(name, x, {{&y, "y"}});
    MOTLEY_CHECK_KIND(kShape, x.dim() == 4, name, ": x must be (B, H, T, hd), got ", x.str());
    const std::int64_t hd = x.size(3);
    MOTLEY_CHECK_KIND(kShape, hd % 2 == 0, name, ": head dim ", hd, " of ", x.str(),
                      " must be even");
    if (x.numel() == 0) return;
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(ck::rope(x.raw_data(), y.raw_data(), x.dtype(), x.size(0) * x.size(1),
                               x.size(2), hd, theta, pos_offset, inverse, stream_));
  }

  void attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out,
                 Tensor& lse) override {
    const char* name = "attention";
    const AttentionDims dims = attention_checks(name, q, k, v, lse);
    attention_operand(name, out, "out", q.shape());
    if (q.numel() == 0) return;
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(ck::attention(
        static_cast<const float*>(q.raw_data()), static_cast<const float*>(k.raw_data()),
        static_cast<const float*>(v.raw_data()), static_cast<float*>(out.raw_data()),
        static_cast<float*>(lse.raw_data()), dims.bh, dims.tq, dims.tk, dims.hd,
        static_cast<float>(scale), stream_));
  }

  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, const Tensor& dout, double scale, Tensor& dq,
                          Tensor& dk, Tensor& dv) override {
    const char* name = "attention_backward";
    const AttentionDims dims = attention_checks(name, q, k, v, lse);
    attention_operand(name, out, "out", q.shape());
    attention_operand(name, dout, "dout", q.shape());
    attention_operand(name, dq, "dq", q.shape());
    attention_operand(name, dk, "dk", k.shape());
    attention_operand(name, dv, "dv", k.shape());
    if (k.numel() == 0) return;
    DeviceScope scope(index_);
    if (q.numel() == 0) {  // no queries: no gradient reaches k or v
      MOTLEY_CUDA_CHECK(cudaMemsetAsync(dk.raw_data(), 0, dk.nbytes(), stream_));
      MOTLEY_CUDA_CHECK(cudaMemsetAsync(dv.raw_data(), 0, dv.nbytes(), stream_));
      return;
    }
    Scratch d_rows(allocator_, ck::attention_backward_workspace_bytes(dims.bh, dims.tq));
    MOTLEY_CUDA_CHECK(ck::attention_backward(
        static_cast<const float*>(q.raw_data()), static_cast<const float*>(k.raw_data()),
        static_cast<const float*>(v.raw_data()), static_cast<const float*>(out.raw_data()),
        static_cast<const float*>(lse.raw_data()), static_cast<const float*>(dout.raw_data()),
        static_cast<float*>(dq.raw_data()), static_cast<float*>(dk.raw_data()),
        static_cast<float*>(dv.raw_data()), dims.bh, dims.tq, dims.tk, dims.hd,
        static_cast<float>(scale), d_rows.get(), stream_));
  }

  void index_select_rows(const Tensor& src, const Tensor& index, Tensor& out) override {
    const char* name = "index_select_rows";
    here(src, name, "src");
    here(index, name, "index");
    here(out, name, "out");
    expect_contiguous(src, name, "src");
    expect_contiguous(out, name, "out");
    expect_dtype(out, src.dtype(), name, "out");
    // Plain copies: C++17 lambdas cannot capture structured bindings.
    const std::array<std::int64_t, 3> dims = index_rows_checks(name, src, index, out, "out");
    const std::int64_t n = dims[0], rows = dims[1], row_elems = dims[2];
    if (n == 0 || row_elems == 0) return;
    DeviceScope scope(index_);
    const std::int64_t row_bytes = row_elems * static_cast<std::int64_t>(dtype_size(src.dtype()));
    const int bad = run_flagged([&](int* flag) {
      MOTLEY_CUDA_CHECK(ck::index_select_rows(src.raw_data(), rows, row_bytes, index.raw_data(),
                                              index.dtype(), n, out.raw_data(), flag, stream_));
    });
    if (bad != 0) report_bad_index(name, index, rows);
  }

  void index_add_rows(const Tensor& src, const Tensor& index, const Tensor& scale,
                      Tensor& out) override {
    const char* name = "index_add_rows";
    here(src, name, "src");
    here(index, name, "index");
    here(out, name, "out");
    expect_float(out, name, "out");
    expect_dtype(src, out.dtype(), name, "src");
    expect_contiguous(src, name, "src");
    expect_contiguous(out, name, "out");
    const std::array<std::int64_t, 3> dims = index_rows_checks(name, out, index, src, "src");
    const std::int64_t n = dims[0], rows = dims[1], d = dims[2];
    if (scale.defined()) {
      here(scale, name, "scale");
      MOTLEY_CHECK_KIND(kShape, scale.dtype() == DType::kF32 || scale.dtype() == src.dtype(), name,
                        ": scale must be f32 or src's dtype, got ", scale.str());
      expect_contiguous(scale, name, "scale");
      expect_numel(scale, n, name, "scale");
    }
    if (n == 0 || d == 0) return;
    MOTLEY_CHECK_KIND(kShape, n < (std::int64_t{1} << 32) - 1 && rows < (std::int64_t{1} << 31),
                      name, ": ", n, " source rows into ", rows,
                      " rows exceeds the CUDA backend's 32-bit sort keys");
    DeviceScope scope(index_);
    std::size_t bytes = 0;
    MOTLEY_CUDA_CHECK(ck::index_add_workspace_bytes(n, rows, &bytes));
    Scratch workspace(allocator_, bytes);
    // Check every index before anything is written (Note [Index checks]).
    const int bad = run_flagged([&](int* flag) {
      MOTLEY_CUDA_CHECK(ck::index_add_prepare(index.raw_data(), index.dtype(), n, rows,
                                              workspace.get(), flag, stream_));
    });
    if (bad != 0) report_bad_index(name, index, rows);
    MOTLEY_CUDA_CHECK(
        ck::index_add_apply(src.raw_data(), scale.defined() ? scale.raw_data() : nullptr,
                            scale.defined() ? scale.dtype() : DType::kF32, out.raw_data(),
                            out.dtype(), n, d, rows, workspace.get(), stream_));
  }

  void topk(const Tensor& x, std::int64_t k, Tensor& values, Tensor& indices) override {
    sort_rows("topk", x, k, values, indices);
  }

  void sort_desc(const Tensor& x, Tensor& values, Tensor& indices) override {
    sort_rows("sort_desc", x, last_dim(x), values, indices);
  }

  void adamw(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, double lr,
             double beta1, double beta2, double eps, double weight_decay,
             std::int64_t step) override {
    const char* name = "adamw";
    for (const auto& [t, tn] : {std::pair<const Tensor*, const char*>{&param, "param"},
                                std::pair<const Tensor*, const char*>{&grad, "grad"},
                                std::pair<const Tensor*, const char*>{&exp_avg, "exp_avg"},
                                std::pair<const Tensor*, const char*>{&exp_avg_sq, "exp_avg_sq"}}) {
      here(*t, name, tn);
      expect_dtype(*t, DType::kF32, name, tn);
      expect_contiguous(*t, name, tn);
      expect_same_shape(*t, param, name, tn, "param");
    }
    MOTLEY_CHECK_KIND(kShape, step >= 1, name, ": step must be >= 1, got ", step);
    if (param.numel() == 0) return;
    // The scalar part of torch's update, in f64 (see adamw_kernel).
    const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    DeviceScope scope(index_);
    MOTLEY_CUDA_CHECK(ck::adamw(
        static_cast<float*>(param.raw_data()), static_cast<const float*>(grad.raw_data()),
        static_cast<float*>(exp_avg.raw_data()), static_cast<float*>(exp_avg_sq.raw_data()),
        param.numel(), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
        static_cast<float>(1.0 - beta2), static_cast<float>(1.0 - lr * weight_decay),
        static_cast<float>(lr / bias_correction1), static_cast<float>(std::sqrt(bias_correction2)),
        static_cast<float>(eps), stream_));
  }

 private:
  struct AttentionDims {
    std::int64_t bh, tq, tk, hd;
  };

  // t is defined and lives on this device.
  void here(const Tensor& t, const char* op, const char* name) const {
    expect_defined(t, op, name);
    MOTLEY_CHECK_KIND(kShape, t.device() == device(), op, ": ", name, " ", t.str(), " is not on ",
                      device().str());
  }

  // Per-row statistics (loss, lse, rstd, dloss): `rows` contiguous values,
  // f32 or the data's dtype. The kernels read and write f32; see F32Out and
  // as_f32 for the other case.
  void stat_checks(const char* name, const Tensor& t, const char* tn, DType data_dtype,
                   std::int64_t rows) const {
    here(t, name, tn);
    MOTLEY_CHECK_KIND(kShape, t.dtype() == DType::kF32 || t.dtype() == data_dtype, name, ": ", tn,
                      " must be f32 or ", dtype_name(data_dtype), ", got ", t.str());
    expect_contiguous(t, name, tn);
    expect_numel(t, rows, name, tn);
  }

  // An f32 view of an input statistic: the tensor itself, or an f32 copy.
  static Tensor as_f32(const Tensor& t) { return t.dtype() == DType::kF32 ? t : t.to(DType::kF32); }

  // An f32 output statistic: the tensor itself, or an f32 temporary that
  // commit() converts into it (ops allocate statistics in the data's dtype,
  // so bf16 inputs give bf16 statistics).
  class F32Out {
   public:
    explicit F32Out(Tensor& dst) : dst_(dst) {
      if (dst.dtype() != DType::kF32) tmp_ = Tensor::empty(dst.shape(), DType::kF32, dst.device());
    }
    float* data() const {
      return static_cast<float*>(tmp_.defined() ? tmp_.raw_data() : dst_.raw_data());
    }
    void commit() {
      if (tmp_.defined()) dst_.copy_(tmp_);
    }

   private:
    Tensor& dst_;
    Tensor tmp_;
  };

  // Note [Index checks]
  // An out-of-range index must surface as a kShape error from the call
  // that received it, so kernels that read indices raise a device flag and
  // the host reads it back here: one memset, the launch, one 4-byte copy
  // and a stream synchronize. That stall (a few microseconds plus draining
  // the queue) is paid by cross_entropy, index_select_rows and
  // index_add_rows on every call; a deferred check at the next
  // synchronisation point would avoid it at the cost of reporting errors
  // late. cross_entropy_backward trusts the forward's check.
  template <typename Launch>
  int run_flagged(Launch&& launch) {
    std::lock_guard<std::mutex> lock(flag_mu_);
    MOTLEY_CUDA_CHECK(cudaMemsetAsync(flag_device_, 0, sizeof(int), stream_));
    launch(flag_device_);
    MOTLEY_CUDA_CHECK(
        cudaMemcpyAsync(flag_host_, flag_device_, sizeof(int), cudaMemcpyDeviceToHost, stream_));
    MOTLEY_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return *flag_host_;
  }

  [[noreturn]] void report_bad_index(const char* op, const Tensor& index, std::int64_t rows) {
    const std::vector<std::int64_t> host = index.to_vector<std::int64_t>();
    std::size_t i = 0;
    while (i < host.size() && host[i] >= 0 && host[i] < rows) ++i;
    MOTLEY_FAIL(kShape, op, ": index ", i < host.size() ? host[i] : -1, " at position ", i,
                " is outside [0, ", rows, ")");
  }

  // x and y (softmax-like row ops): same float dtype, shape, contiguous.
  void rows_op_checks(const char* name, const Tensor& x, const Tensor& y) const {
    here(x, name, "x");
    here(y, name, "y");
    expect_float(x, name, "x");
    expect_dtype(y, x.dtype(), name, "y");
    expect_contiguous(x, name, "x");
    expect_contiguous(y, name, "y");
    expect_same_shape(x, y, name, "x", "y");
  }

  // a and `others`: f32/bf16, a's dtype and shape, contiguous.
  void same_float_contiguous(
      const char* name, const Tensor& a,
      std::initializer_list<std::pair<const Tensor*, const char*>> others) const {
    here(a, name, "a");
    expect_float(a, name, "a");
    expect_contiguous(a, name, "a");
    for (const auto& [t, tn] : others) {
      here(*t, name, tn);
      expect_dtype(*t, a.dtype(), name, tn);
      expect_contiguous(*t, name, tn);
      expect_same_shape(*t, a, name, tn, "a");
    }
  }

  // Returns (rows, classes).
  std::pair<std::int64_t, std::int64_t> cross_entropy_checks(const char* name, const Tensor& logits,
                                                             const Tensor& targets,
                                                             const Tensor& lse) const {
    here(logits, name, "logits");
    here(targets, name, "targets");
    here(lse, name, "lse");
    expect_float(logits, name, "logits");
    expect_index(targets, name, "targets");
    expect_contiguous(logits, name, "logits");
    expect_contiguous(targets, name, "targets");
    MOTLEY_CHECK_KIND(kShape, logits.dim() == 2, name, ": logits must be (N, V), got ",
                      logits.str());
    const std::int64_t rows = logits.size(0);
    expect_numel(targets, rows, name, "targets");
    stat_checks(name, lse, "lse", logits.dtype(), rows);
    return {rows, logits.size(1)};
  }

  // Returns (rows, d).
  std::pair<std::int64_t, std::int64_t> rmsnorm_checks(const char* name, const Tensor& x,
                                                       const Tensor& g, const Tensor& rstd) const {
    here(x, name, "x");
    here(g, name, "g");
    here(rstd, name, "rstd");
    expect_float(x, name, "x");
    MOTLEY_CHECK_KIND(kShape, g.dtype() == DType::kF32 || g.dtype() == x.dtype(), name,
                      ": g must be f32 or x's dtype, got ", g.str(), " with x ", x.str());
    expect_contiguous(x, name, "x");
    expect_contiguous(g, name, "g");
    const std::int64_t d = last_dim(x);
    expect_numel(g, d, name, "g");
    const std::int64_t rows = d == 0 ? 0 : x.numel() / d;
    stat_checks(name, rstd, "rstd", x.dtype(), rows);
    return {rows, d};
  }

  AttentionDims attention_checks(const char* name, const Tensor& q, const Tensor& k,
                                 const Tensor& v, const Tensor& lse) const {
    for (const auto& [t, tn] : {std::pair<const Tensor*, const char*>{&q, "q"},
                                std::pair<const Tensor*, const char*>{&k, "k"},
                                std::pair<const Tensor*, const char*>{&v, "v"}}) {
      here(*t, name, tn);
      expect_dtype(*t, DType::kF32, name, tn);
      expect_contiguous(*t, name, tn);
      MOTLEY_CHECK_KIND(kShape, t->dim() == 4, name, ": ", tn, " must be (B, H, T, hd), got ",
                        t->str());
    }
    expect_same_shape(k, v, name, "k", "v");
    MOTLEY_CHECK_KIND(kShape,
                      q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                      name, ": q ", q.str(), " and k ", k.str(), " differ in B, H or hd");
    const std::int64_t tq = q.size(2);
    const std::int64_t tk = k.size(2);
    const std::int64_t hd = q.size(3);
    MOTLEY_CHECK_KIND(kShape, tq <= tk, name, ": Tq = ", tq, " exceeds Tk = ", tk);
    MOTLEY_CHECK_KIND(kShape, hd >= 1 && hd <= ck::kAttentionMaxHd, name, ": head dim ", hd,
                      " outside the CUDA kernel's range 1 .. ", ck::kAttentionMaxHd);
    expect_int32_range(tk, name, "Tk");
    here(lse, name, "lse");
    expect_dtype(lse, DType::kF32, name, "lse");
    expect_contiguous(lse, name, "lse");
    MOTLEY_CHECK_KIND(
        kShape,
        lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == tq,
        name, ": lse must be (B, H, Tq) for q ", q.str(), ", got ", lse.str());
    return {q.size(0) * q.size(1), tq, tk, hd};
  }

  void attention_operand(const char* name, const Tensor& t, const char* tn,
                         const Shape& shape) const {
    here(t, name, tn);
    expect_dtype(t, DType::kF32, name, tn);
    expect_contiguous(t, name, tn);
    MOTLEY_CHECK_KIND(kShape, t.shape() == shape, name, ": ", tn, " ", t.str(), " must have shape ",
                      shape_str(shape));
  }

  // table (R, ...) and rows (n, ...) with equal trailing size; index (n)
  // i32/i64 contiguous. Returns (n, R, elements per row).
  std::array<std::int64_t, 3> index_rows_checks(const char* name, const Tensor& table,
                                                const Tensor& index, const Tensor& rows_t,
                                                const char* rows_name) const {
    expect_index(index, name, "index");
    expect_contiguous(index, name, "index");
    MOTLEY_CHECK_KIND(kShape, index.dim() <= 1, name, ": index must be 1-D, got ", index.str());
    MOTLEY_CHECK_KIND(kShape, table.dim() >= 1 && rows_t.dim() >= 1, name,
                      ": tensors of rows must have at least one dimension");
    const std::int64_t n = index.numel();
    const std::int64_t r = table.size(0);
    const std::int64_t per_row = r == 0 ? 0 : table.numel() / r;
    MOTLEY_CHECK_KIND(kShape, rows_t.size(0) == n && rows_t.numel() == n * per_row, name, ": ",
                      rows_name, " ", rows_t.str(), " must hold ", n, " rows of ", per_row,
                      " elements for index ", index.str(), " and ", table.str());
    return {n, r, per_row};
  }

  void sort_rows(const char* name, const Tensor& x, std::int64_t k, Tensor& values,
                 Tensor& indices) {
    here(x, name, "x");
    here(values, name, "values");
    here(indices, name, "indices");
    expect_float(x, name, "x");
    expect_dtype(values, x.dtype(), name, "values");
    expect_dtype(indices, DType::kI64, name, "indices");
    expect_contiguous(x, name, "x");
    expect_contiguous(values, name, "values");
    expect_contiguous(indices, name, "indices");
    const std::int64_t n = last_dim(x);
    MOTLEY_CHECK_KIND(kShape, k >= 0 && k <= n, name, ": k = ", k, " outside [0, ", n, "] for ",
                      x.str());
    const std::int64_t rows = n == 0 ? 0 : x.numel() / n;
    expect_numel(values, rows * k, name, "values");
    expect_numel(indices, rows * k, name, "indices");
    if (rows == 0 || k == 0) return;
    MOTLEY_CHECK_KIND(kShape, rows * n < INT_MAX, name, ": ", x.str(),
                      " has more elements than the CUDA sort's 32-bit offsets allow");
    DeviceScope scope(index_);
    std::size_t bytes = 0;
    MOTLEY_CUDA_CHECK(ck::sort_rows_workspace_bytes(rows, n, &bytes));
    Scratch workspace(allocator_, bytes);
    MOTLEY_CUDA_CHECK(ck::sort_rows_desc(x.raw_data(), x.dtype(), rows, n, k, values.raw_data(),
                                         static_cast<std::int64_t*>(indices.raw_data()),
                                         workspace.get(), stream_));
  }

  void gemm_impl(const char* name, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                 std::int64_t k, double alpha, const Tensor& a, std::int64_t lda,
                 std::int64_t stride_a, const Tensor& b, std::int64_t ldb, std::int64_t stride_b,
                 double beta, Tensor& c, std::int64_t ldc, std::int64_t stride_c,
                 std::int64_t batch) {
    here(a, name, "A");
    here(b, name, "B");
    here(c, name, "C");
    expect_float(a, name, "A");
    expect_dtype(b, a.dtype(), name, "B");
    MOTLEY_CHECK_KIND(kShape, c.dtype() == a.dtype() || c.dtype() == DType::kF32, name,
                      ": C must be f32 or A's dtype, got ", c.str(), " with A ", a.str());
    MOTLEY_CHECK_KIND(kShape, m >= 0 && n >= 0 && k >= 0 && batch >= 0, name,
                      ": negative size (m, n, k, batch) = (", m, ", ", n, ", ", k, ", ", batch,
                      ")");
    // Row-major storage: A is (m, k), or (k, m) when transposed; B (k, n)
    // or (n, k); C (m, n).
    const std::int64_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
    const std::int64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
    MOTLEY_CHECK_KIND(kShape, lda >= std::max<std::int64_t>(1, a_cols), name, ": lda = ", lda,
                      " < ", a_cols, " columns of A");
    MOTLEY_CHECK_KIND(kShape, ldb >= std::max<std::int64_t>(1, b_cols), name, ": ldb = ", ldb,
                      " < ", b_cols, " columns of B");
    MOTLEY_CHECK_KIND(kShape, ldc >= std::max<std::int64_t>(1, n), name, ": ldc = ", ldc, " < ", n,
                      " columns of C");
    MOTLEY_CHECK_KIND(kShape, stride_a >= 0 && stride_b >= 0 && stride_c >= 0, name,
                      ": negative batch stride");
    if (m == 0 || n == 0 || batch == 0) return;
    MOTLEY_CHECK_KIND(kShape, matrix_extent(m, n, ldc, stride_c, batch) <= elements_after(c), name,
                      ": C ", c.str(), " is too small for ", batch, " x (", m, ", ", n,
                      ") with ldc ", ldc);
    if (k > 0) {
      MOTLEY_CHECK_KIND(kShape,
                        matrix_extent(a_rows, a_cols, lda, stride_a, batch) <= elements_after(a),
                        name, ": A ", a.str(), " is too small for ", batch, " x (", a_rows, ", ",
                        a_cols, ") with lda ", lda);
      MOTLEY_CHECK_KIND(kShape,
                        matrix_extent(b_rows, b_cols, ldb, stride_b, batch) <= elements_after(b),
                        name, ": B ", b.str(), " is too small for ", batch, " x (", b_rows, ", ",
                        b_cols, ") with ldb ", ldb);
    }
    const std::pair<std::int64_t, const char*> int_args[] = {
        {m, "m"}, {n, "n"}, {k, "k"}, {lda, "lda"}, {ldb, "ldb"}, {ldc, "ldc"}, {batch, "batch"}};
    for (const auto& [v, what] : int_args) expect_int32_range(v, name, what);
    DeviceScope scope(index_);
    if (k == 0) {
      // C = beta C; BLAS semantics: beta == 0 writes zeros without reading C.
      const std::int64_t elem = static_cast<std::int64_t>(dtype_size(c.dtype()));
      for (std::int64_t i = 0; i < batch; ++i) {
        void* ci = static_cast<char*>(c.raw_data()) + i * stride_c * elem;
        MOTLEY_CUDA_CHECK(
            ck::scale_matrix(ci, c.dtype(), m, n, ldc, static_cast<float>(beta), stream_));
      }
      return;
    }
    // cuBLAS is column-major: a row-major (r, c) matrix with leading
    // dimension ld is the column-major (c, r) matrix, its transpose. So
    // C^T = op(B)^T op(A)^T is computed, with B first, n and m swapped,
    // and each operand keeping its own transpose flag.
    const float alpha_f = static_cast<float>(alpha);
    const float beta_f = static_cast<float>(beta);
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cudaDataType_t ab_type = cuda_data_type(a.dtype());
    const cudaDataType_t c_type = cuda_data_type(c.dtype());
    if (batch == 1) {
      MOTLEY_CUBLAS_CHECK(
          cublasGemmEx(cublas_, op_b, op_a, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(k), &alpha_f, b.raw_data(), ab_type, static_cast<int>(ldb),
                       a.raw_data(), ab_type, static_cast<int>(lda), &beta_f, c.raw_data(), c_type,
                       static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
      MOTLEY_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          cublas_, op_b, op_a, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
          &alpha_f, b.raw_data(), ab_type, static_cast<int>(ldb), stride_b, a.raw_data(), ab_type,
          static_cast<int>(lda), stride_a, &beta_f, c.raw_data(), c_type, static_cast<int>(ldc),
          stride_c, static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }

  int index_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  CudaCachingAllocator allocator_;
  std::mutex flag_mu_;
  int* flag_device_ = nullptr;  // one int for run_flagged
  int* flag_host_ = nullptr;    // pinned mirror of it
};

// ---- registry ------------------------------------------------------------------------------

constexpr int kMaxDevices = 64;
std::atomic<CudaBackend*> g_backends[kMaxDevices];
std::mutex g_backends_mu;

CudaBackend& cuda_backend_impl(int index) {
  const int count = cuda_backend_device_count();
  MOTLEY_CHECK_KIND(kRuntime, index >= 0 && index < count, "CUDA device cuda:", index,
                    " requested, but ", count, " CUDA device(s) are visible",
                    count == 0 ? " (no driver or no GPU: check nvidia-smi and "
                                 "CUDA_VISIBLE_DEVICES, or run on the CPU)"
                               : "");
  MOTLEY_CHECK_KIND(kRuntime, index < kMaxDevices, "CUDA device cuda:", index,
                    ": motley supports at most ", kMaxDevices, " devices per process");
  CudaBackend* backend = g_backends[index].load(std::memory_order_acquire);
  if (backend != nullptr) return *backend;
  std::lock_guard<std::mutex> lock(g_backends_mu);
  backend = g_backends[index].load(std::memory_order_relaxed);
  if (backend == nullptr) {
    // Never deleted: see cuda_backend.h.
    backend = new CudaBackend(index);
    g_backends[index].store(backend, std::memory_order_release);
  }
  return *backend;
}

}  // namespace

Backend& cuda_backend(int index) { return cuda_backend_impl(index); }

int cuda_backend_device_count() {
  static const int count = [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear it, so later checks do not see it
      return 0;
    }
    return n;
  }();
  return count;
}

void* cuda_backend_stream(int index) {
  return static_cast<void*>(cuda_backend_impl(index).stream());
}

CudaMemoryStats cuda_memory_stats(int index) {
  CudaMemoryStats stats;
  cuda_backend_impl(index).allocator().stats(&stats);
  return stats;
}

void cuda_empty_cache(int index) { cuda_backend_impl(index).allocator().empty_cache(); }

}  // namespace motley
