// Launchers of the CUDA backend's kernels: the boundary between the .cpp
// side (argument checks, memory, cuBLAS, errors) and the .cu side (device
// code). Private to core/cuda/.
//
// This header is compiled by both nvcc and the host compiler, so it holds
// only plain types: raw device pointers, element counts, DType and
// cudaStream_t. No Tensor, no absl, no exceptions cross it. Every launcher
// enqueues work on `stream` and returns the launch status
// (cudaGetLastError()) for the caller to check with MOTLEY_CUDA_CHECK; the
// caller has already validated shapes and dtypes, and a launcher returns
// cudaErrorNotSupported for a dtype it was not built for.
//
// Conventions shared by all launchers:
//   * counts are elements, not bytes; pointers are to element 0 of a view;
//   * "rows" kernels take (rows, n) contiguous data, row r at r * n;
//   * bf16 data is the raw 16-bit pattern (motley::BFloat16 layout); every
//     kernel computes in f32 and rounds to nearest even on store, like
//     BFloat16::round_from_float;
//   * zero-sized work is the caller's to skip (launchers may assume > 0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace motley::cuda_kernels {

// ---- strided layouts ---------------------------------------------------------
// Note [Collapsed layouts]
// Elementwise kernels walk a logical shape in row-major order and address
// each of N operands through its own strides (elements; 0 for broadcast
// dimensions). The host collapses the shape first: size-1 dimensions are
// dropped and adjacent dimensions merged wherever every operand is
// contiguous across them, so that most views reach the kernel as rank 1-3.
// `contiguous` is set when all operands collapse to one dimension of
// stride 1; kernels then index linearly without any division.
constexpr int kMaxDims = 8;

template <int N>
struct Layout {
  int rank = 1;
  bool contiguous = true;
  std::int64_t sizes[kMaxDims] = {};
  std::int64_t strides[N][kMaxDims] = {};
};

// ---- layout and casts ----------------------------------------------------------
// out (operand 0 of layout) = the `elem_size`-byte pattern, for every element.
cudaError_t fill(void* out, int elem_size, std::uint64_t pattern, const Layout<1>& layout,
                 std::int64_t numel, cudaStream_t stream);
// dst (operand 0) = convert(src (operand 1)); any of the five dtypes each way.
cudaError_t copy(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                 const Layout<2>& layout, std::int64_t numel, cudaStream_t stream);

// ---- elementwise (f32 / bf16; binary also i32 / i64; operand 0 is the output) ----
enum class UnaryCode : int {
  kNeg,
  kExp,
  kLog,
  kSqrt,
  kRsqrt,
  kSquare,
  kAbs,
  kSilu,
  kSigmoid,
  kTanh,
  kSoftplus,
  kRelu,
  kScale,
  kAddScalar,
  kPowScalar,
  kReciprocal,
};
enum class BinaryCode : int {
  kAdd,
  kSub,
  kMul,
  kDiv,
  kMax,
  kMin,
  kSiluBackward,
  kEq,
};

cudaError_t unary(UnaryCode op, float alpha, const void* a, void* out, DType dtype,
                  const Layout<2>& layout, std::int64_t numel, cudaStream_t stream);
cudaError_t binary(BinaryCode op, const void* a, const void* b, void* out, DType dtype,
                   const Layout<3>& layout, std::int64_t numel, cudaStream_t stream);
cudaError_t axpby(float alpha, const void* a, float beta, const void* b, void* out, DType dtype,
                  const Layout<3>& layout, std::int64_t numel, cudaStream_t stream);
// Operands: 0 out, 1 mask, 2 a, 3 b. a, b, out share `dtype` (any of the
// five, moved bit for bit); mask may be any dtype.
cudaError_t where(const void* mask, DType mask_dtype, const void* a, const void* b, void* out,
                  DType dtype, const Layout<4>& layout, std::int64_t numel, cudaStream_t stream);

// out (rows, k) f32 = alpha * out: the beta-scaling of a GEMM with k = 0,
// written 0 (not 0 * old) when alpha == 0, as BLAS does for beta == 0.
cudaError_t scale_matrix(void* out, DType dtype, std::int64_t rows, std::int64_t cols,
                         std::int64_t ld, float alpha, cudaStream_t stream);

// ---- fused elementwise (contiguous, f32 / bf16) ----------------------------------
cudaError_t swiglu(const void* a, const void* b, void* out, DType dtype, std::int64_t numel,
                   cudaStream_t stream);
cudaError_t swiglu_backward(const void* a, const void* b, const void* dout, void* da, void* db,
                            DType dtype, std::int64_t numel, cudaStream_t stream);
// x, y (bh, t, hd); position of row t is pos_offset + t.
cudaError_t rope(const void* x, void* y, DType dtype, std::int64_t bh, std::int64_t t,
                 std::int64_t hd, double theta, std::int64_t pos_offset, bool inverse,
                 cudaStream_t stream);
// f32 only; the scalar factors are computed in f64 on the host
// (see adamw_kernel for the update).
cudaError_t adamw(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                  std::int64_t numel, float one_minus_beta1, float beta2, float one_minus_beta2,
                  float decay_factor, float step_size, float sqrt_bc2, float eps,
                  cudaStream_t stream);

// ---- reductions ---------------------------------------------------------------
enum class ReduceCode : int { kSum, kMax, kMin, kSumSquares };
// a (outer, n, inner) contiguous -> out (outer, inner), same dtype: f32 /
// bf16 accumulated in f64, i32 / i64 in i64. `workspace` holds
// reduce_workspace_bytes(...) bytes (may be null when that is 0).
std::size_t reduce_workspace_bytes(std::int64_t outer, std::int64_t n, std::int64_t inner);
cudaError_t reduce(ReduceCode op, const void* a, void* out, DType dtype, std::int64_t outer,
                   std::int64_t n, std::int64_t inner, void* workspace, cudaStream_t stream);
// out (rows) i64: first index of the maximum. f32 / bf16.
cudaError_t argmax(const void* a, DType dtype, std::int64_t rows, std::int64_t n, std::int64_t* out,
                   cudaStream_t stream);
// Inclusive prefix sum per row. f32 (accumulated in f64), i32, i64
// (accumulated in i64).
cudaError_t cumsum(const void* a, void* out, DType dtype, std::int64_t rows, std::int64_t n,
                   cudaStream_t stream);
// *flag (device int, zeroed by the caller) set to 1 if any element of a is
// NaN or infinite. f32 / bf16 / f64.
cudaError_t find_nonfinite(const void* a, DType dtype, std::int64_t numel, int* flag,
                           cudaStream_t stream);

// ---- row kernels: softmax, cross-entropy, rmsnorm ------------------------------
cudaError_t softmax(const void* x, void* y, DType dtype, std::int64_t rows, std::int64_t n,
                    bool log, cudaStream_t stream);
cudaError_t softmax_backward(const void* y, const void* dy, void* dx, DType dtype,
                             std::int64_t rows, std::int64_t n, bool log, cudaStream_t stream);
// logits (rows, n) f32/bf16; targets i32/i64; loss, lse (rows) f32.
// *bad_target (device int, zeroed by the caller) set to 1 when a target
// that is not ignore_index lies outside [0, n).
cudaError_t cross_entropy(const void* logits, DType dtype, const void* targets, DType target_dtype,
                          std::int64_t ignore_index, std::int64_t rows, std::int64_t n, float* loss,
                          float* lse, int* bad_target, cudaStream_t stream);
cudaError_t cross_entropy_backward(const void* logits, DType dtype, const void* targets,
                                   DType target_dtype, std::int64_t ignore_index, const float* lse,
                                   const float* dloss, void* dlogits, std::int64_t rows,
                                   std::int64_t n, cudaStream_t stream);
// x, y (rows, d) dtype; g (d) g_dtype (f32 or x's dtype); rstd (rows) f32.
cudaError_t rmsnorm(const void* x, const void* g, void* y, float* rstd, DType dtype, DType g_dtype,
                    std::int64_t rows, std::int64_t d, double eps, cudaStream_t stream);
// dx written, dg (d, g_dtype) accumulated through a deterministic two-pass
// column reduction in `workspace` (rmsnorm_workspace_bytes(rows, d) bytes).
std::size_t rmsnorm_workspace_bytes(std::int64_t rows, std::int64_t d);
cudaError_t rmsnorm_backward(const void* x, const void* g, const float* rstd, const void* dy,
                             void* dx, void* dg, DType dtype, DType g_dtype, std::int64_t rows,
                             std::int64_t d, void* workspace, cudaStream_t stream);

// ---- attention (f32, contiguous (bh, t, hd), hd <= kAttentionMaxHd) -------------
constexpr int kAttentionMaxHd = 128;
cudaError_t attention(const float* q, const float* k, const float* v, float* out, float* lse,
                      std::int64_t bh, std::int64_t tq, std::int64_t tk, std::int64_t hd,
                      float scale, cudaStream_t stream);
// `workspace`: attention_backward_workspace_bytes(bh, tq) bytes.
std::size_t attention_backward_workspace_bytes(std::int64_t bh, std::int64_t tq);
cudaError_t attention_backward(const float* q, const float* k, const float* v, const float* out,
                               const float* lse, const float* dout, float* dq, float* dk, float* dv,
                               std::int64_t bh, std::int64_t tq, std::int64_t tk, std::int64_t hd,
                               float scale, void* workspace, cudaStream_t stream);

// ---- row indexing, sorting --------------------------------------------------------
// out (n, row_bytes) = src rows picked by index (i32/i64). Rows whose index
// is outside [0, src_rows) are zero-filled and set *bad_index (device int,
// zeroed by the caller).
cudaError_t index_select_rows(const void* src, std::int64_t src_rows, std::int64_t row_bytes,
                              const void* index, DType index_dtype, std::int64_t n, void* out,
                              int* bad_index, cudaStream_t stream);

// index_add_rows in three steps so that the host can check the indices
// before anything is written (Note [Deterministic index_add] in the .cu):
//   1. index_add_prepare: keys[i] = index[i] (or out_rows, setting
//      *bad_index, when outside [0, out_rows)), vals[i] = i;
//   2. the host reads *bad_index;
//   3. index_add_apply: stable radix sort of (key, i), then one block per
//      distinct row adds the rows in increasing i.
// `workspace`: *bytes from index_add_workspace_bytes(n, out_rows, &bytes)
// (it asks cub for its scratch size, hence the status).
cudaError_t index_add_workspace_bytes(std::int64_t n, std::int64_t out_rows, std::size_t* bytes);
cudaError_t index_add_prepare(const void* index, DType index_dtype, std::int64_t n,
                              std::int64_t out_rows, void* workspace, int* bad_index,
                              cudaStream_t stream);
// src (n, d), out (out_rows, d): f32 or bf16 (same); scale (n) f32 (with
// either), bf16 (with bf16), or null for 1.
cudaError_t index_add_apply(const void* src, const void* scale, DType scale_dtype, void* out,
                            DType dtype, std::int64_t n, std::int64_t d, std::int64_t out_rows,
                            void* workspace, cudaStream_t stream);

// Per row of x (rows, n) f32/bf16: stable descending sort; the first k
// entries of each row go to values (rows, k) x's dtype and indices (rows, k)
// i64. k == n is sort_desc.
cudaError_t sort_rows_workspace_bytes(std::int64_t rows, std::int64_t n, std::size_t* bytes);
cudaError_t sort_rows_desc(const void* x, DType dtype, std::int64_t rows, std::int64_t n,
                           std::int64_t k, void* values, std::int64_t* indices, void* workspace,
                           cudaStream_t stream);

}  // namespace motley::cuda_kernels
