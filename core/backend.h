// Backend: the kernels of one device type, behind one interface.
//
// Ops (core/ops.h) validate arguments, allocate outputs and then call a
// Backend; nothing above core/ calls Eigen, BLAS or cuBLAS. The CPU backend
// is the reference every other backend is tested against.
//
// Conventions for every kernel below unless its comment says otherwise:
//   * Outputs are allocated by the caller, contiguous, of the stated shape
//     and dtype, on this backend's device.
//   * Inputs named "contiguous" must be contiguous; other inputs may have
//     any strides (stride 0 included, for broadcast views).
//   * Floating kernels support f32 and f64 on the CPU; the CUDA backend
//     supports f32 and, where stated, bf16. Integer index tensors are i32 or
//     i64 (both accepted).
//   * "rows" means the tensor viewed as (numel / n, n) with n the size of
//     its last dimension.
//   * Kernels are asynchronous on the CUDA backend (ordered on the current
//     stream); copy_to_host and synchronize wait.
//   * Errors: a backend throws motley::Error (kShape for unsupported
//     dtype/shape combinations, kRuntime for library failures).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"

namespace motley {

enum class UnaryOp {
  kNeg, kExp, kLog, kSqrt, kRsqrt, kSquare, kAbs,
  kSilu,      // x * sigmoid(x)
  kSigmoid,
  kTanh,
  kSoftplus,  // log(1 + exp(x)), stable for large |x|
  kRelu,
  kScale,     // alpha * x
  kAddScalar, // x + alpha
  kPowScalar, // x ^ alpha
  kReciprocal,
};

enum class BinaryOp {
  kAdd, kSub, kMul, kDiv, kMax, kMin,
  kSiluBackward,  // a = x, b = dy: dy * silu'(x)
  kEq,            // 1 where a == b else 0 (output dtype of a)
};

enum class ReduceOp { kSum, kMax, kMin, kSumSquares };

// What a backend's allocator reports.
struct MemoryStats {
  std::size_t bytes_in_use = 0;       // requested bytes of live tensors
  std::size_t peak_bytes_in_use = 0;  // the largest bytes_in_use so far
  std::size_t bytes_reserved = 0;     // held from the system: live + cached blocks
  std::size_t bytes_cached = 0;       // in free blocks awaiting reuse
  std::size_t num_device_allocs = 0;  // allocations from the system (malloc, cudaMalloc)
  std::size_t num_cache_hits = 0;     // requests served from the cache
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual const char* name() const = 0;

  // ---- memory -------------------------------------------------------------
  virtual void* allocate(std::size_t nbytes) = 0;
  virtual void deallocate(void* ptr, std::size_t nbytes) = 0;
  // Bytes currently allocated to live tensors (not cached free blocks).
  virtual std::size_t bytes_in_use() const = 0;
  // The allocator's counters (both backends cache freed blocks for reuse:
  // core/cpu/host_allocator.h, core/cuda/cuda_allocator.h).
  virtual MemoryStats memory_stats() const = 0;
  // Returns every cached free block to the system (host: the C library;
  // CUDA: the driver). Live tensors are untouched.
  virtual void empty_cache() = 0;
  virtual void copy_from_host(void* dst, const void* src, std::size_t nbytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, std::size_t nbytes) = 0;
  virtual void copy_device(void* dst, const void* src, std::size_t nbytes) = 0;
  virtual void synchronize() = 0;

  // ---- layout and casts ---------------------------------------------------
  // out[i] = value (cast to out's dtype).
  virtual void fill(Tensor& out, double value) = 0;
  // dst = src elementwise; same shape; src any strides and dtype; dst any
  // dtype (values converted), dst may be non-contiguous.
  virtual void copy(const Tensor& src, Tensor& dst) = 0;

  // ---- elementwise --------------------------------------------------------
  // out = op(a) (alpha for kScale/kAddScalar/kPowScalar). a has out's shape.
  virtual void unary(UnaryOp op, const Tensor& a, Tensor& out, double alpha) = 0;
  // out = op(a, b); a and b have out's shape (broadcast views allowed).
  // out may alias a (in-place), when a is contiguous.
  virtual void binary(BinaryOp op, const Tensor& a, const Tensor& b,
                      Tensor& out) = 0;
  // out = alpha * a + beta * b, all same shape; out may alias a or b.
  virtual void axpby(double alpha, const Tensor& a, double beta, const Tensor& b,
                     Tensor& out) = 0;
  // out = where(mask != 0, a, b); mask of any dtype.
  virtual void where(const Tensor& mask, const Tensor& a, const Tensor& b,
                     Tensor& out) = 0;

  // ---- reductions ---------------------------------------------------------
  // a contiguous, viewed as (outer, n, inner); out (outer, inner):
  // out[o, i] = reduce over j of a[o, j, i]. Sums accumulate in double on
  // the CPU.
  virtual void reduce(ReduceOp op, const Tensor& a, std::int64_t outer,
                      std::int64_t n, std::int64_t inner, Tensor& out) = 0;
  // Argmax over the last dimension of contiguous a: out (rows) i64.
  virtual void argmax(const Tensor& a, Tensor& out) = 0;
  // Inclusive prefix sum over the last dimension of contiguous a.
  virtual void cumsum(const Tensor& a, Tensor& out) = 0;
  // 1 if every element of a is finite, else 0 (host bool; synchronises).
  virtual bool all_finite(const Tensor& a) = 0;

  // ---- matrix products (row-major) ----------------------------------------
  // C = alpha * op(A) @ op(B) + beta * C, op(A) (m, k), op(B) (k, n),
  // C (m, n). A is stored (m, k) with row stride lda, or (k, m) when
  // trans_a; same for B. C may be a view (row stride ldc). Elements of the
  // three matrices start at each tensor's raw_data().
  virtual void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                    std::int64_t k, double alpha, const Tensor& a,
                    std::int64_t lda, const Tensor& b, std::int64_t ldb,
                    double beta, Tensor& c, std::int64_t ldc) = 0;
  // `batch` independent gemms; matrix i of A starts at raw_data() +
  // i * stride_a elements (likewise B, C).
  virtual void gemm_strided_batched(
      bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
      std::int64_t k, double alpha, const Tensor& a, std::int64_t lda,
      std::int64_t stride_a, const Tensor& b, std::int64_t ldb,
      std::int64_t stride_b, double beta, Tensor& c, std::int64_t ldc,
      std::int64_t stride_c, std::int64_t batch) = 0;

  // ---- fused model kernels (all inputs contiguous) -------------------------
  // Softmax over the last dimension; log_softmax when `log`.
  virtual void softmax(const Tensor& x, Tensor& y, bool log) = 0;
  // dx from y (the forward output) and dy.
  //   softmax:     dx = y * (dy - sum(dy * y))
  //   log_softmax: dx = dy - exp(y) * sum(dy)
  virtual void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx,
                                bool log) = 0;
  // logits (N, V), targets (N) int; loss (N) = lse - logits[target],
  // lse (N) = logsumexp(logits row). Rows whose target == ignore_index get
  // loss 0. A target outside [0, V) otherwise is a kShape error.
  virtual void cross_entropy(const Tensor& logits, const Tensor& targets,
                             std::int64_t ignore_index, Tensor& loss,
                             Tensor& lse) = 0;
  // dlogits (N, V) = dloss[n] * (softmax(logits) - onehot(target)); 0 for
  // ignored rows. dloss (N).
  virtual void cross_entropy_backward(const Tensor& logits,
                                      const Tensor& targets,
                                      std::int64_t ignore_index,
                                      const Tensor& lse, const Tensor& dloss,
                                      Tensor& dlogits) = 0;
  // x (rows, d), g (d): y = x * rstd * g, rstd (rows) = 1/sqrt(mean(x^2)+eps).
  virtual void rmsnorm(const Tensor& x, const Tensor& g, double eps, Tensor& y,
                       Tensor& rstd) = 0;
  // dx (rows, d) written; dg (d) ACCUMULATED (dg += ...).
  virtual void rmsnorm_backward(const Tensor& x, const Tensor& g,
                                const Tensor& rstd, const Tensor& dy,
                                Tensor& dx, Tensor& dg) = 0;
  // out = silu(a) * b, same shapes.
  virtual void swiglu(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  virtual void swiglu_backward(const Tensor& a, const Tensor& b,
                               const Tensor& dout, Tensor& da, Tensor& db) = 0;
  // x (B, H, T, hd): rotate-half RoPE at positions pos_offset + t,
  // inv_freq_i = theta^(-2i/hd), pairs (i, i + hd/2):
  //   y_i        = x_i cos - x_{i+hd/2} sin
  //   y_{i+hd/2} = x_{i+hd/2} cos + x_i sin
  // inverse = true applies the transpose rotation (the backward pass).
  virtual void rope(const Tensor& x, double theta, std::int64_t pos_offset,
                    bool inverse, Tensor& y) = 0;
  // Causal attention. q (B, H, Tq, hd), k and v (B, H, Tk, hd), Tq <= Tk;
  // query i attends to keys j <= i + (Tk - Tq). out (B, H, Tq, hd),
  // lse (B, H, Tq) f32/f64 = logsumexp of the scaled scores per query.
  // Must not hold more than one block of scores per head at a time.
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         double scale, Tensor& out, Tensor& lse) = 0;
  // dq, dk, dv written (not accumulated).
  virtual void attention_backward(const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& out,
                                  const Tensor& lse, const Tensor& dout,
                                  double scale, Tensor& dq, Tensor& dk,
                                  Tensor& dv) = 0;
  // out (n, d) = src[index[i], :], src (R, d), index (n) int. An index
  // outside [0, R) is a kShape error. (Embedding lookup, expert dispatch.)
  virtual void index_select_rows(const Tensor& src, const Tensor& index,
                                 Tensor& out) = 0;
  // out[index[i], :] += scale[i] * src[i, :]  (scale optional: undefined
  // tensor means 1). src (n, d), out (R, d). Deterministic: rows are added
  // in order of i. (Embedding backward, expert combine.)
  virtual void index_add_rows(const Tensor& src, const Tensor& index,
                              const Tensor& scale, Tensor& out) = 0;
  // Per row of x (rows, n): the k largest values, descending, ties broken
  // by lower index first. values (rows, k) x's dtype, indices (rows, k) i64.
  virtual void topk(const Tensor& x, std::int64_t k, Tensor& values,
                    Tensor& indices) = 0;
  // Per row: full descending sort (stable: equal values keep index order).
  virtual void sort_desc(const Tensor& x, Tensor& values, Tensor& indices) = 0;
  // AdamW step on one parameter, all f32 (or f64) contiguous, same shape:
  //   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
  //   p -= lr * wd * p
  //   p -= lr * (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)
  // exactly torch.optim.AdamW's order of operations.
  virtual void adamw(Tensor& param, const Tensor& grad, Tensor& exp_avg,
                     Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                     double eps, double weight_decay, std::int64_t step) = 0;
};

// The backend of a device. The CPU backend always exists; asking for a
// CUDA device in a build without CUDA, or one that is not present, throws
// kRuntime with a message saying so.
Backend& backend_for(Device device);
bool cuda_available();     // built with CUDA and at least one device present
int cuda_device_count();   // 0 without CUDA

}  // namespace motley
