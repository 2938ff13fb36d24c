// Tensor operations without autograd: validate, allocate, call the backend.
//
// Every function here checks dtype, device and shapes and throws kShape
// with the op's name and the offending shapes; results are new contiguous
// tensors on the inputs' device. Inputs may be non-contiguous; ops that
// need contiguous data copy first. The differentiable versions live in
// autograd/ops.h and are built from these.
#pragma once

#include <cstdint>
#include <utility>

#include "core/backend.h"
#include "core/tensor.h"

namespace motley::ops {

// ---- elementwise (NumPy broadcasting between a and b) ----------------------
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);
Tensor eq(const Tensor& a, const Tensor& b);
Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b);
Tensor silu_backward(const Tensor& x, const Tensor& dy);
// alpha * a + beta * b (same shape).
Tensor axpby(double alpha, const Tensor& a, double beta, const Tensor& b);
// a += b in place (same shape, a contiguous). Used to accumulate gradients.
void add_(Tensor& a, const Tensor& b);
// a = alpha * a in place.
void scale_(Tensor& a, double alpha);

Tensor unary(UnaryOp op, const Tensor& a, double alpha = 0.0);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor rsqrt(const Tensor& a);
Tensor square(const Tensor& a);
Tensor silu(const Tensor& a);
Tensor sigmoid(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor softplus(const Tensor& a);
Tensor relu(const Tensor& a);
Tensor scale(const Tensor& a, double alpha);
Tensor add_scalar(const Tensor& a, double alpha);
Tensor pow_scalar(const Tensor& a, double alpha);

// Shape of broadcasting a against b (throws kShape when incompatible).
Shape broadcast_shape(absl::Span<const std::int64_t> a,
                      absl::Span<const std::int64_t> b);
// Sums `grad` down to `shape` (the reverse of broadcasting `shape` up to
// grad's shape). Returns grad itself when shapes match.
Tensor sum_to(const Tensor& grad, absl::Span<const std::int64_t> shape);

// ---- reductions -------------------------------------------------------------
Tensor sum(const Tensor& a);                                  // 0-d
Tensor sum(const Tensor& a, std::int64_t dim, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, std::int64_t dim, bool keepdim = false);
Tensor amax(const Tensor& a, std::int64_t dim, bool keepdim = false);
Tensor sum_squares(const Tensor& a);                          // 0-d
Tensor argmax(const Tensor& a);                               // over last dim, i64
Tensor cumsum(const Tensor& a);                               // over last dim
bool all_finite(const Tensor& a);

// ---- shape ------------------------------------------------------------------
// Concatenate along dim (same dtype/device, equal other sizes).
Tensor cat(absl::Span<const Tensor> parts, std::int64_t dim);

// ---- matrix products ----------------------------------------------------------
// Note [Matmul precision]
// The precision of this thread's matrix products (matmul, linear,
// gemm_accumulate) on f32 tensors. kBf16Inputs is SPEC 8.1's bf16: both
// operands are rounded to bf16 (nearest even) and multiplied with f32
// accumulation into an f32 result. On a GPU the operands are bf16 copies
// and cuBLAS runs a bf16 x bf16 -> f32 GEMM on tensor cores; on the CPU
// they are rounded in place of a copy (bf16 values held in f32) and the f32
// sgemm runs, which gives the same numbers without the speed. Set it with
// MatmulPrecisionGuard; autograd's matrix ops capture it at forward so
// their backward products use the same precision. Other dtypes (f64,
// bf16 tensors) are unaffected.
enum class MatmulPrecision : std::uint8_t { kF32, kBf16Inputs };
MatmulPrecision matmul_precision();
// RAII: sets this thread's matmul precision; nests.
class MatmulPrecisionGuard {
 public:
  explicit MatmulPrecisionGuard(MatmulPrecision precision);
  ~MatmulPrecisionGuard();
  MatmulPrecisionGuard(const MatmulPrecisionGuard&) = delete;
  MatmulPrecisionGuard& operator=(const MatmulPrecisionGuard&) = delete;

 private:
  MatmulPrecision previous_;
};

// a (..., m, k) @ b (..., k, n) -> (..., m, n). Leading (batch) dims must
// match exactly, or b may be 2-D (shared across the batch: one GEMM).
Tensor matmul(const Tensor& a, const Tensor& b);
// x (..., in) @ w^T with w (out, in), PyTorch Linear layout -> (..., out).
Tensor linear(const Tensor& x, const Tensor& w);
// c += alpha * op(a) @ op(b) for 2-D tensors (c contiguous). Used to
// accumulate weight gradients without a temporary.
void gemm_accumulate(const Tensor& a, bool trans_a, const Tensor& b,
                     bool trans_b, double alpha, Tensor& c);

// ---- fused model kernels -------------------------------------------------------
Tensor softmax(const Tensor& x);       // over the last dim
Tensor log_softmax(const Tensor& x);   // over the last dim
Tensor softmax_backward(const Tensor& y, const Tensor& dy, bool log);
// Returns (loss per row (N), lse (N)). logits (N, V), targets (N) int.
std::pair<Tensor, Tensor> cross_entropy(const Tensor& logits,
                                        const Tensor& targets,
                                        std::int64_t ignore_index = -100);
Tensor cross_entropy_backward(const Tensor& logits, const Tensor& targets,
                              std::int64_t ignore_index, const Tensor& lse,
                              const Tensor& dloss);
// Returns (y, rstd). x (..., d), g (d).
std::pair<Tensor, Tensor> rmsnorm(const Tensor& x, const Tensor& g, double eps);
// Returns (dx, dg).
std::pair<Tensor, Tensor> rmsnorm_backward(const Tensor& x, const Tensor& g,
                                           const Tensor& rstd,
                                           const Tensor& dy);
Tensor swiglu(const Tensor& a, const Tensor& b);
std::pair<Tensor, Tensor> swiglu_backward(const Tensor& a, const Tensor& b,
                                          const Tensor& dout);
// x (B, H, T, hd).
Tensor rope(const Tensor& x, double theta, std::int64_t pos_offset = 0,
            bool inverse = false);
// Returns (out, lse). q (B, H, Tq, hd), k, v (B, H, Tk, hd).
std::pair<Tensor, Tensor> attention(const Tensor& q, const Tensor& k,
                                    const Tensor& v, double scale);
struct AttentionGrads {
  Tensor dq, dk, dv;
};
AttentionGrads attention_backward(const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& out,
                                  const Tensor& lse, const Tensor& dout,
                                  double scale);
// src (R, d...) rows picked by index (n) -> (n, d...).
Tensor index_select_rows(const Tensor& src, const Tensor& index);
// out (rows, d...) of zeros with out[index[i]] += scale[i] * src[i].
Tensor index_add_rows(const Tensor& src, const Tensor& index,
                      const Tensor& scale, std::int64_t rows);
// In place: out[index[i]] += scale[i] * src[i].
void index_add_rows_(Tensor& out, const Tensor& src, const Tensor& index,
                     const Tensor& scale = Tensor());
// Returns (values, indices i64), k largest per row, descending, ties by
// lower index.
std::pair<Tensor, Tensor> topk(const Tensor& x, std::int64_t k);
std::pair<Tensor, Tensor> sort_desc(const Tensor& x);
void adamw_step(Tensor& param, const Tensor& grad, Tensor& exp_avg,
                Tensor& exp_avg_sq, double lr, double beta1, double beta2,
                double eps, double weight_decay, std::int64_t step);

// ---- comparisons for tests ------------------------------------------------------
// Normalised mean squared error: sum((a-b)^2) / max(sum(b^2), tiny), in
// double on the host. Scale-free, for comparing backends.
double nmse(const Tensor& a, const Tensor& b);
// Largest |a - b| in double on the host.
double max_abs_diff(const Tensor& a, const Tensor& b);

}  // namespace motley::ops
