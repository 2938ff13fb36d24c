// Elementwise kernels: fill, strided copy with casts, unary / binary /
// axpby / where over broadcast views, and the fused pointwise model kernels
// (SwiGLU, RoPE, AdamW).
//
// Every kernel is a grid-stride loop. Strided operands are addressed
// through a collapsed Layout (Note [Collapsed layouts] in kernels.h); the
// op is a runtime switch rather than a template parameter, which keeps the
// number of instantiations (and nvcc time) small at the cost of a uniform
// branch per element in memory-bound kernels.
#include "core/cuda/device_utils.cuh"

namespace motley::cuda_kernels {
namespace {

// Offsets of logical element `idx` (row-major over layout.sizes) in each
// operand.
template <int N>
__device__ __forceinline__ void layout_offsets(const Layout<N>& layout, std::int64_t idx,
                                               std::int64_t (&off)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] = 0;
  for (int d = layout.rank - 1; d > 0; --d) {
    const std::int64_t size = layout.sizes[d];
    const std::int64_t q = idx / size;
    const std::int64_t c = idx - q * size;
    idx = q;
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] += c * layout.strides[k][d];
  }
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] += idx * layout.strides[k][0];
}

template <int N>
__device__ __forceinline__ void element_offsets(const Layout<N>& layout, std::int64_t idx,
                                                std::int64_t (&off)[N]) {
  if (layout.contiguous) {
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] = idx;
  } else {
    layout_offsets(layout, idx, off);
  }
}

// ---- fill / copy -------------------------------------------------------------------

template <typename U>
__global__ void fill_kernel(U* out, U pattern, Layout<1> layout, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[1];
    element_offsets(layout, i, off);
    out[off[0]] = pattern;
  }
}

template <typename S, typename D>
__global__ void copy_kernel(const S* src, D* dst, Layout<2> layout, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[2];
    element_offsets(layout, i, off);
    dst[off[0]] = convert<D>(src[off[1]]);
  }
}

template <typename S>
cudaError_t copy_from(const S* src, void* dst, DType dst_dtype, const Layout<2>& layout,
                      std::int64_t n, cudaStream_t stream) {
  const unsigned grid = grid_for(n);
  switch (dst_dtype) {
    case DType::kF32:
      copy_kernel<<<grid, 256, 0, stream>>>(src, static_cast<float*>(dst), layout, n);
      break;
    case DType::kF64:
      copy_kernel<<<grid, 256, 0, stream>>>(src, static_cast<double*>(dst), layout, n);
      break;
    case DType::kBF16:
      copy_kernel<<<grid, 256, 0, stream>>>(src, static_cast<Bf16*>(dst), layout, n);
      break;
    case DType::kI32:
      copy_kernel<<<grid, 256, 0, stream>>>(src, static_cast<std::int32_t*>(dst), layout, n);
      break;
    case DType::kI64:
      copy_kernel<<<grid, 256, 0, stream>>>(src, static_cast<std::int64_t*>(dst), layout, n);
      break;
  }
  return cudaGetLastError();
}

// ---- unary / binary ------------------------------------------------------------------

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float apply_unary(UnaryCode op, float x, float alpha) {
  switch (op) {
    case UnaryCode::kNeg:
      return -x;
    case UnaryCode::kExp:
      return expf(x);
    case UnaryCode::kLog:
      return logf(x);
    case UnaryCode::kSqrt:
      return sqrtf(x);
    case UnaryCode::kRsqrt:
      return 1.0f / sqrtf(x);
    case UnaryCode::kSquare:
      return x * x;
    case UnaryCode::kAbs:
      return fabsf(x);
    case UnaryCode::kSilu:
      return x * sigmoid_f(x);
    case UnaryCode::kSigmoid:
      return sigmoid_f(x);
    case UnaryCode::kTanh:
      return tanhf(x);
    // log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow for large x,
    // full precision for very negative x.
    case UnaryCode::kSoftplus:
      return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
    case UnaryCode::kRelu:
      return x > 0.0f ? x : 0.0f;
    case UnaryCode::kScale:
      return alpha * x;
    case UnaryCode::kAddScalar:
      return x + alpha;
    case UnaryCode::kPowScalar:
      return alpha == 2.0f ? x * x : powf(x, alpha);
    case UnaryCode::kReciprocal:
      return 1.0f / x;
  }
  return x;
}

__device__ __forceinline__ float apply_binary(BinaryCode op, float a, float b) {
  switch (op) {
    case BinaryCode::kAdd:
      return a + b;
    case BinaryCode::kSub:
      return a - b;
    case BinaryCode::kMul:
      return a * b;
    case BinaryCode::kDiv:
      return a / b;
    // As the CPU backend writes them (NaN in b wins, NaN in a loses).
    case BinaryCode::kMax:
      return a > b ? a : b;
    case BinaryCode::kMin:
      return a < b ? a : b;
    case BinaryCode::kSiluBackward: {
      // d/dx x*s(x) = s(x) * (1 + x * (1 - s(x)))
      const float s = sigmoid_f(a);
      return b * s * (1.0f + a * (1.0f - s));
    }
    case BinaryCode::kEq:
      return a == b ? 1.0f : 0.0f;
  }
  return a;
}

// No __restrict__: out may alias an input (in-place ops).
template <typename T>
__global__ void unary_kernel(UnaryCode op, float alpha, const T* a, T* out, Layout<2> layout,
                             std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[2];
    element_offsets(layout, i, off);
    store_f(out + off[0], apply_unary(op, load_f(a + off[1]), alpha));
  }
}

template <typename T>
__global__ void binary_kernel(BinaryCode op, const T* a, const T* b, T* out, Layout<3> layout,
                              std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[3];
    element_offsets(layout, i, off);
    store_f(out + off[0], apply_binary(op, load_f(a + off[1]), load_f(b + off[2])));
  }
}

// Integer tensors (counts, index arithmetic), computed in their own type
// like the CPU backend. kSiluBackward is rejected by the host.
template <typename T>
__device__ __forceinline__ T apply_binary_int(BinaryCode op, T a, T b) {
  switch (op) {
    case BinaryCode::kAdd:
      return a + b;
    case BinaryCode::kSub:
      return a - b;
    case BinaryCode::kMul:
      return a * b;
    case BinaryCode::kDiv:
      return b == 0 ? T(0) : a / b;  // no trap on the GPU
    case BinaryCode::kMax:
      return a > b ? a : b;
    case BinaryCode::kMin:
      return a < b ? a : b;
    case BinaryCode::kEq:
      return a == b ? T(1) : T(0);
    default:
      return T(0);
  }
}

template <typename T>
__global__ void binary_int_kernel(BinaryCode op, const T* a, const T* b, T* out, Layout<3> layout,
                                  std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[3];
    element_offsets(layout, i, off);
    out[off[0]] = apply_binary_int(op, a[off[1]], b[off[2]]);
  }
}

template <typename T>
__global__ void axpby_kernel(float alpha, const T* a, float beta, const T* b, T* out,
                             Layout<3> layout, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[3];
    element_offsets(layout, i, off);
    store_f(out + off[0], alpha * load_f(a + off[1]) + beta * load_f(b + off[2]));
  }
}

// ---- where --------------------------------------------------------------------------

template <typename M>
__device__ __forceinline__ bool nonzero(M m) {
  if constexpr (std::is_same_v<M, Bf16>) {
    return bf16_to_float(m) != 0.0f;  // -0 is zero, NaN is not
  } else {
    return m != M(0);
  }
}

template <typename M, typename U>
__global__ void where_kernel(const M* mask, const U* a, const U* b, U* out, Layout<4> layout,
                             std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    std::int64_t off[4];
    element_offsets(layout, i, off);
    out[off[0]] = nonzero(mask[off[1]]) ? a[off[2]] : b[off[3]];
  }
}

template <typename M>
cudaError_t where_mask(const M* mask, const void* a, const void* b, void* out, int elem_size,
                       const Layout<4>& layout, std::int64_t n, cudaStream_t stream) {
  const unsigned grid = grid_for(n);
  switch (elem_size) {
    case 2:
      where_kernel<<<grid, 256, 0, stream>>>(mask, static_cast<const std::uint16_t*>(a),
                                             static_cast<const std::uint16_t*>(b),
                                             static_cast<std::uint16_t*>(out), layout, n);
      break;
    case 4:
      where_kernel<<<grid, 256, 0, stream>>>(mask, static_cast<const std::uint32_t*>(a),
                                             static_cast<const std::uint32_t*>(b),
                                             static_cast<std::uint32_t*>(out), layout, n);
      break;
    case 8:
      where_kernel<<<grid, 256, 0, stream>>>(mask, static_cast<const std::uint64_t*>(a),
                                             static_cast<const std::uint64_t*>(b),
                                             static_cast<std::uint64_t*>(out), layout, n);
      break;
    default:
      return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

// ---- matrix scaling (GEMM with k = 0) ---------------------------------------------------

template <typename T>
__global__ void scale_matrix_kernel(T* out, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                    float alpha) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    const std::int64_t r = i / cols;
    T* p = out + r * ld + (i - r * cols);
    store_f(p, alpha == 0.0f ? 0.0f : alpha * load_f(p));
  }
}

// ---- SwiGLU ------------------------------------------------------------------------------

template <typename T>
__global__ void swiglu_kernel(const T* a, const T* b, T* out, std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    const float x = load_f(a + i);
    store_f(out + i, x / (1.0f + expf(-x)) * load_f(b + i));
  }
}

// out = silu(a) * b:  da = dout * b * silu'(a),  db = dout * silu(a).
template <typename T>
__global__ void swiglu_backward_kernel(const T* a, const T* b, const T* dout, T* da, T* db,
                                       std::int64_t n) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    // Same expression order as the CPU backend.
    const float x = load_f(a + i);
    const float g = load_f(dout + i);
    const float s = 1.0f / (1.0f + expf(-x));
    store_f(db + i, g * x * s);
    store_f(da + i, g * load_f(b + i) * s * (1.0f + x * (1.0f - s)));
  }
}

// ---- RoPE ----------------------------------------------------------------------------------

// One thread per rotated pair (row, i), i < hd / 2. The angle is formed in
// f64 (positions reach 1e4-1e5 radians, where an f32 angle would already
// be off by ~1e-3), then rounded once to f32 cos/sin.
template <typename T>
__global__ void rope_kernel(const T* x, T* y, std::int64_t rows, std::int64_t t, std::int64_t hd,
                            double theta, std::int64_t pos_offset, bool inverse) {
  const std::int64_t half = hd / 2;
  const std::int64_t n = rows * half;
  for (std::int64_t idx = global_thread(); idx < n; idx += grid_stride()) {
    const std::int64_t row = idx / half;
    const std::int64_t i = idx - row * half;
    const std::int64_t pos = pos_offset + row % t;
    const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
    double sn, cs;
    sincos(static_cast<double>(pos) * inv_freq, &sn, &cs);
    const float c = static_cast<float>(cs);
    const float s = inverse ? -static_cast<float>(sn) : static_cast<float>(sn);
    const T* xr = x + row * hd;
    T* yr = y + row * hd;
    const float x1 = load_f(xr + i);
    const float x2 = load_f(xr + i + half);
    store_f(yr + i, x1 * c - x2 * s);
    store_f(yr + i + half, x2 * c + x1 * s);
  }
}

// ---- AdamW -------------------------------------------------------------------------------

// torch.optim.AdamW (_single_tensor_adamw), in the CPU backend's order:
//   p *= 1 - lr * wd
//   m = lerp(m, g, 1 - b1) = m + (1 - b1) (g - m)
//   v = v b2 + (1 - b2) g^2
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// with decay_factor = 1 - lr * wd, step_size = lr / bc1 and
// sqrt_bc2 = sqrt(1 - b2^step) computed in f64 on the host, as Python does.
__global__ void adamw_kernel(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                             std::int64_t n, float one_minus_beta1, float beta2,
                             float one_minus_beta2, float decay_factor, float step_size,
                             float sqrt_bc2, float eps) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    const float g = grad[i];
    const float m = exp_avg[i] + one_minus_beta1 * (g - exp_avg[i]);
    const float v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float denom = sqrtf(v) / sqrt_bc2 + eps;
    param[i] = param[i] * decay_factor - step_size * (m / denom);
  }
}

}  // namespace

// ---- launchers --------------------------------------------------------------------------------

cudaError_t fill(void* out, int elem_size, std::uint64_t pattern, const Layout<1>& layout,
                 std::int64_t numel, cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  switch (elem_size) {
    case 2:
      fill_kernel<<<grid, 256, 0, stream>>>(static_cast<std::uint16_t*>(out),
                                            static_cast<std::uint16_t>(pattern), layout, numel);
      break;
    case 4:
      fill_kernel<<<grid, 256, 0, stream>>>(static_cast<std::uint32_t*>(out),
                                            static_cast<std::uint32_t>(pattern), layout, numel);
      break;
    case 8:
      fill_kernel<<<grid, 256, 0, stream>>>(static_cast<std::uint64_t*>(out), pattern, layout,
                                            numel);
      break;
    default:
      return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t copy(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                 const Layout<2>& layout, std::int64_t numel, cudaStream_t stream) {
  switch (src_dtype) {
    case DType::kF32:
      return copy_from(static_cast<const float*>(src), dst, dst_dtype, layout, numel, stream);
    case DType::kF64:
      return copy_from(static_cast<const double*>(src), dst, dst_dtype, layout, numel, stream);
    case DType::kBF16:
      return copy_from(static_cast<const Bf16*>(src), dst, dst_dtype, layout, numel, stream);
    case DType::kI32:
      return copy_from(static_cast<const std::int32_t*>(src), dst, dst_dtype, layout, numel,
                       stream);
    case DType::kI64:
      return copy_from(static_cast<const std::int64_t*>(src), dst, dst_dtype, layout, numel,
                       stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t unary(UnaryCode op, float alpha, const void* a, void* out, DType dtype,
                  const Layout<2>& layout, std::int64_t numel, cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  if (dtype == DType::kF32) {
    unary_kernel<<<grid, 256, 0, stream>>>(op, alpha, static_cast<const float*>(a),
                                           static_cast<float*>(out), layout, numel);
  } else if (dtype == DType::kBF16) {
    unary_kernel<<<grid, 256, 0, stream>>>(op, alpha, static_cast<const Bf16*>(a),
                                           static_cast<Bf16*>(out), layout, numel);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t binary(BinaryCode op, const void* a, const void* b, void* out, DType dtype,
                   const Layout<3>& layout, std::int64_t numel, cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  if (dtype == DType::kF32) {
    binary_kernel<<<grid, 256, 0, stream>>>(op, static_cast<const float*>(a),
                                            static_cast<const float*>(b), static_cast<float*>(out),
                                            layout, numel);
  } else if (dtype == DType::kBF16) {
    binary_kernel<<<grid, 256, 0, stream>>>(op, static_cast<const Bf16*>(a),
                                            static_cast<const Bf16*>(b), static_cast<Bf16*>(out),
                                            layout, numel);
  } else if (dtype == DType::kI32) {
    binary_int_kernel<<<grid, 256, 0, stream>>>(op, static_cast<const std::int32_t*>(a),
                                                static_cast<const std::int32_t*>(b),
                                                static_cast<std::int32_t*>(out), layout, numel);
  } else if (dtype == DType::kI64) {
    binary_int_kernel<<<grid, 256, 0, stream>>>(op, static_cast<const std::int64_t*>(a),
                                                static_cast<const std::int64_t*>(b),
                                                static_cast<std::int64_t*>(out), layout, numel);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t axpby(float alpha, const void* a, float beta, const void* b, void* out, DType dtype,
                  const Layout<3>& layout, std::int64_t numel, cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  if (dtype == DType::kF32) {
    axpby_kernel<<<grid, 256, 0, stream>>>(alpha, static_cast<const float*>(a), beta,
                                           static_cast<const float*>(b), static_cast<float*>(out),
                                           layout, numel);
  } else if (dtype == DType::kBF16) {
    axpby_kernel<<<grid, 256, 0, stream>>>(alpha, static_cast<const Bf16*>(a), beta,
                                           static_cast<const Bf16*>(b), static_cast<Bf16*>(out),
                                           layout, numel);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t where(const void* mask, DType mask_dtype, const void* a, const void* b, void* out,
                  DType dtype, const Layout<4>& layout, std::int64_t numel, cudaStream_t stream) {
  const int size = static_cast<int>(dtype_size(dtype));
  switch (mask_dtype) {
    case DType::kF32:
      return where_mask(static_cast<const float*>(mask), a, b, out, size, layout, numel, stream);
    case DType::kF64:
      return where_mask(static_cast<const double*>(mask), a, b, out, size, layout, numel, stream);
    case DType::kBF16:
      return where_mask(static_cast<const Bf16*>(mask), a, b, out, size, layout, numel, stream);
    case DType::kI32:
      return where_mask(static_cast<const std::int32_t*>(mask), a, b, out, size, layout, numel,
                        stream);
    case DType::kI64:
      return where_mask(static_cast<const std::int64_t*>(mask), a, b, out, size, layout, numel,
                        stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t scale_matrix(void* out, DType dtype, std::int64_t rows, std::int64_t cols,
                         std::int64_t ld, float alpha, cudaStream_t stream) {
  const unsigned grid = grid_for(rows * cols);
  if (dtype == DType::kF32) {
    scale_matrix_kernel<<<grid, 256, 0, stream>>>(static_cast<float*>(out), rows, cols, ld, alpha);
  } else if (dtype == DType::kBF16) {
    scale_matrix_kernel<<<grid, 256, 0, stream>>>(static_cast<Bf16*>(out), rows, cols, ld, alpha);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t swiglu(const void* a, const void* b, void* out, DType dtype, std::int64_t numel,
                   cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  if (dtype == DType::kF32) {
    swiglu_kernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(a),
                                            static_cast<const float*>(b), static_cast<float*>(out),
                                            numel);
  } else if (dtype == DType::kBF16) {
    swiglu_kernel<<<grid, 256, 0, stream>>>(
        static_cast<const Bf16*>(a), static_cast<const Bf16*>(b), static_cast<Bf16*>(out), numel);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const void* a, const void* b, const void* dout, void* da, void* db,
                            DType dtype, std::int64_t numel, cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  if (dtype == DType::kF32) {
    swiglu_backward_kernel<<<grid, 256, 0, stream>>>(
        static_cast<const float*>(a), static_cast<const float*>(b), static_cast<const float*>(dout),
        static_cast<float*>(da), static_cast<float*>(db), numel);
  } else if (dtype == DType::kBF16) {
    swiglu_backward_kernel<<<grid, 256, 0, stream>>>(
        static_cast<const Bf16*>(a), static_cast<const Bf16*>(b), static_cast<const Bf16*>(dout),
        static_cast<Bf16*>(da), static_cast<Bf16*>(db), numel);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t rope(const void* x, void* y, DType dtype, std::int64_t bh, std::int64_t t,
                 std::int64_t hd, double theta, std::int64_t pos_offset, bool inverse,
                 cudaStream_t stream) {
  const std::int64_t rows = bh * t;
  const unsigned grid = grid_for(rows * (hd / 2));
  if (dtype == DType::kF32) {
    rope_kernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(x), static_cast<float*>(y),
                                          rows, t, hd, theta, pos_offset, inverse);
  } else if (dtype == DType::kBF16) {
    rope_kernel<<<grid, 256, 0, stream>>>(static_cast<const Bf16*>(x), static_cast<Bf16*>(y), rows,
                                          t, hd, theta, pos_offset, inverse);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t adamw(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                  std::int64_t numel, float one_minus_beta1, float beta2, float one_minus_beta2,
                  float decay_factor, float step_size, float sqrt_bc2, float eps,
                  cudaStream_t stream) {
  adamw_kernel<<<grid_for(numel), 256, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, numel,
                                                    one_minus_beta1, beta2, one_minus_beta2,
                                                    decay_factor, step_size, sqrt_bc2, eps);
  return cudaGetLastError();
}

}  // namespace motley::cuda_kernels
