// Differentiable ops: one free function per op, returning a Variable.
//
// Each op computes its value with the core op of the same name
// (core/ops.h: same validation, kShape errors naming the op, results new
// contiguous tensors unless the op is a view) and records a graph node
// whose backward is defined right beside it in ops.cpp. Ops record nothing
// under NoGradGuard or when no input requires grad.
//
// Index, target and mask arguments are plain Tensors (integer or 0/1
// tensors take no gradient). Floating inputs of one op must share dtype
// and device. View ops (reshape, transpose, permute, narrow, slice,
// select, unsqueeze, squeeze, expand) return Variables sharing their
// input's storage; there are no in-place ops, so that is always safe.
//
// Shapes: B batch, H heads, T sequence, hd head size, N rows, V vocab,
// E experts. "Broadcasting" is NumPy's; backward sums the gradient down to
// each input's shape (ops::sum_to).
#pragma once

#include <cstdint>
#include <vector>

#include "autograd/variable.h"
#include "core/tensor.h"

namespace motley::autograd {

// ---- elementwise, broadcasting between a and b ------------------------------------
Variable add(const Variable& a, const Variable& b);
Variable sub(const Variable& a, const Variable& b);
Variable mul(const Variable& a, const Variable& b);
Variable div(const Variable& a, const Variable& b);
// where(mask != 0, a, b); mask, a, b broadcast together. No gradient to mask.
Variable where(const Tensor& mask, const Variable& a, const Variable& b);

// ---- elementwise, unary ------------------------------------------------------------
Variable neg(const Variable& x);
Variable scale(const Variable& x, double alpha);       // alpha * x
Variable add_scalar(const Variable& x, double alpha);  // x + alpha
Variable pow_scalar(const Variable& x, double exponent);
Variable exp(const Variable& x);
Variable log(const Variable& x);
Variable sqrt(const Variable& x);
Variable rsqrt(const Variable& x);
Variable square(const Variable& x);
Variable silu(const Variable& x);  // x * sigmoid(x)
Variable sigmoid(const Variable& x);
Variable tanh(const Variable& x);
Variable softplus(const Variable& x);  // log(1 + exp(x))
Variable relu(const Variable& x);      // derivative 0 at x <= 0
// Cast (e.g. bf16 logits to f32 for the router softmax); the gradient is
// cast back to x's dtype.
Variable to_dtype(const Variable& x, DType dtype);

// ---- reductions ----------------------------------------------------------------------
Variable sum(const Variable& x);  // 0-d
Variable sum(const Variable& x, std::int64_t dim, bool keepdim = false);
Variable mean(const Variable& x);  // 0-d
Variable mean(const Variable& x, std::int64_t dim, bool keepdim = false);
// log(sum(exp(x))) over the last dimension: (..., n) -> (...). Stable (max
// shifted). For the router z-loss.
Variable logsumexp(const Variable& x);

// ---- shape (views unless stated) ------------------------------------------------------
Variable reshape(const Variable& x, Shape shape);  // copies if x is non-contiguous
Variable view(const Variable& x, Shape shape);     // kShape if x is non-contiguous
Variable transpose(const Variable& x, std::int64_t d0, std::int64_t d1);
Variable permute(const Variable& x, const std::vector<std::int64_t>& order);
// Elements [start, start + length) of dimension d.
Variable narrow(const Variable& x, std::int64_t d, std::int64_t start, std::int64_t length);
// Elements start, start + step, ... < end of dimension d.
Variable slice(const Variable& x, std::int64_t d, std::int64_t start, std::int64_t end,
               std::int64_t step = 1);
// Index `index` of dimension d, removing it.
Variable select(const Variable& x, std::int64_t d, std::int64_t index);
Variable unsqueeze(const Variable& x, std::int64_t d);
Variable squeeze(const Variable& x, std::int64_t d);
// Broadcast size-1 (and new leading) dimensions; backward sums them.
Variable expand(const Variable& x, Shape shape);
// x itself when already contiguous, else a contiguous copy.
Variable contiguous(const Variable& x);
// Concatenation along dim (copies). All parts same dtype/device, equal
// sizes except along dim.
Variable cat(const std::vector<Variable>& parts, std::int64_t dim);
// The same data with no graph (x.detach()).
Variable detach(const Variable& x);

// ---- matrix products --------------------------------------------------------------------
// a (..., m, k) @ b (..., k, n) -> (..., m, n); the leading dims must match
// exactly, or b may be 2-D (k, n), shared across a's batch. kShape naming
// "matmul" otherwise.
Variable matmul(const Variable& a, const Variable& b);
// x (..., in) @ w^T with w (out, in), PyTorch Linear layout -> (..., out).
// kShape naming "linear" when w is not 2-D or the in sizes differ.
Variable linear(const Variable& x, const Variable& w);

// ---- model ops ------------------------------------------------------------------------------
// Over the last dimension.
Variable softmax(const Variable& x);
Variable log_softmax(const Variable& x);
// logits (N, V), targets (N) i32/i64. The MEAN of the per-row cross
// entropies over rows whose target != ignore_index (0-d); 0 when every row
// is ignored. Computed on the device without a host sync.
Variable cross_entropy(const Variable& logits, const Tensor& targets,
                       std::int64_t ignore_index = -100);
// Per-row losses (N), 0 for ignored rows.
Variable cross_entropy_rows(const Variable& logits, const Tensor& targets,
                            std::int64_t ignore_index = -100);
// x (..., d), g (d): x / sqrt(mean(x^2) + eps) * g over the last dimension.
Variable rmsnorm(const Variable& x, const Variable& g, double eps);
// silu(a) * b, a and b the same shape.
Variable swiglu(const Variable& a, const Variable& b);
// MoE experts as one op (Note [Grouped experts] in ops.cpp): rows
// [o_e, o_e + counts[e]) of x (R, d), o_e = counts[0] + ... + counts[e-1],
// go through expert e's SwiGLU FFN,
//   y_e = (silu(x_e w1[e]^T) * (x_e w3[e]^T)) w2[e]^T,
// with w1[e], w3[e] (h_e, d) and w2[e] (d, h_e), hidden sizes h_e free per
// expert (no padding). Returns y (R, d). sum(counts) must be R; an expert
// with no rows is skipped and its weights get no gradient. Equals
// cat_e(linear(swiglu(linear(x_e, w1), linear(x_e, w3)), w2)) without the
// per-expert views, concatenation and full-size gradient buffers.
Variable grouped_swiglu_ffn(const Variable& x, const std::vector<std::int64_t>& counts,
                            const std::vector<Variable>& w1, const std::vector<Variable>& w3,
                            const std::vector<Variable>& w2);
// x (B, H, T, hd), hd even: rotate-half RoPE at positions pos_offset + t
// (SPEC section 1).
Variable rope(const Variable& x, double theta, std::int64_t pos_offset = 0);
// Causal attention (flash-style kernels: the scores are never stored).
// q (B, H, Tq, hd), k and v (B, H, Tk, hd), Tq <= Tk; query i attends to
// keys j <= i + (Tk - Tq). Returns (B, H, Tq, hd). Saves q, k, v, the
// output and the per-query logsumexp for backward.
Variable attention(const Variable& q, const Variable& k, const Variable& v, double softmax_scale);
// weight (V, d), ids any shape of i32/i64 in [0, V) -> ids.shape + (d).
// Backward scatters into a (V, d) gradient (repeated ids add up).
Variable embedding(const Variable& weight, const Tensor& ids);
// src (R, d...) rows picked by index (n) -> (n, d...). Expert dispatch.
Variable index_select_rows(const Variable& src, const Tensor& index);
// out (rows, d...) = 0, then out[index[i]] += row_scale[i] * src[i] for i in
// order; row_scale (n) is optional (an undefined Variable means 1).
// Expert combine: gradients flow to src and to row_scale (the gate
// weights). Repeated indices add up.
Variable index_add_rows(const Variable& src, const Tensor& index, const Variable& row_scale,
                        std::int64_t rows);
// x (..., E), idx (..., k) integers in [0, E) with the same leading dims:
// out[..., j] = x[..., idx[..., j]] -> (..., k). E.g. the gate
// probabilities of the selected experts. Reads idx on the host (a sync for
// device tensors; kShape for an index out of range).
Variable take_along_last(const Variable& x, const Tensor& idx);

// ---- operators -------------------------------------------------------------------------------
inline Variable operator+(const Variable& a, const Variable& b) { return add(a, b); }
inline Variable operator-(const Variable& a, const Variable& b) { return sub(a, b); }
inline Variable operator*(const Variable& a, const Variable& b) { return mul(a, b); }
inline Variable operator/(const Variable& a, const Variable& b) { return div(a, b); }
inline Variable operator-(const Variable& x) { return neg(x); }

}  // namespace motley::autograd
