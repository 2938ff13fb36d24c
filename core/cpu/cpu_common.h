// Helpers shared by the CPU backend's kernel files (private to core/cpu/).
//
// * dtype dispatch: call a generic lambda with a value of the C++ type of a
//   DType, throwing kShape for dtypes the kernel does not support;
// * strided loops: walk N same-shaped strided operands as a sequence of
//   1-D runs, after merging dimensions that are contiguous in every operand;
// * BLAS wrappers templated on float/double;
// * a vectorisable exp for float (the libm one does not vectorise).
#pragma once

#include <cblas.h>

#if defined(__AVX2__)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 headers trip -Wuninitialized on their own
// _mm512_undefined_* placeholders once inlined (GCC bug 105593); the
// state applies to the header's lines, so it is set around the include.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif
#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "core/backend.h"
#include "core/check.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace motley::cpu {

// dtype_name as a std::string: absl::StrCat does not take std::string_view
// when Abseil is built with its own string_view.
inline std::string dtype_str(DType dtype) { return std::string(dtype_name(dtype)); }

// ---- dtype dispatch ---------------------------------------------------------

// f32 and f64: every floating kernel of the CPU backend.
template <typename F>
decltype(auto) dispatch_float(const char* kernel, DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(float{});
    case DType::kF64:
      return f(double{});
    default:
      break;
  }
  MOTLEY_FAIL(kShape, "cpu ", kernel, ": dtype ", dtype_str(dtype),
              " not supported (f32 or f64 expected)");
}

// f32, f64, i32, i64: arithmetic that also makes sense on integers.
template <typename F>
decltype(auto) dispatch_arith(const char* kernel, DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(float{});
    case DType::kF64:
      return f(double{});
    case DType::kI32:
      return f(std::int32_t{});
    case DType::kI64:
      return f(std::int64_t{});
    default:
      break;
  }
  MOTLEY_FAIL(kShape, "cpu ", kernel, ": dtype ", dtype_str(dtype),
              " not supported (f32, f64, i32 or i64 expected)");
}

// Every dtype (copies, fills, masks).
template <typename F>
decltype(auto) dispatch_all(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(float{});
    case DType::kF64:
      return f(double{});
    case DType::kBF16:
      return f(BFloat16{});
    case DType::kI32:
      return f(std::int32_t{});
    case DType::kI64:
      return f(std::int64_t{});
  }
  MOTLEY_FAIL(kInternal, "unknown dtype");
}

// Index tensors: i32 or i64.
template <typename F>
decltype(auto) dispatch_index(const char* kernel, DType dtype, F&& f) {
  switch (dtype) {
    case DType::kI32:
      return f(std::int32_t{});
    case DType::kI64:
      return f(std::int64_t{});
    default:
      break;
  }
  MOTLEY_FAIL(kShape, "cpu ", kernel, ": index dtype ", dtype_str(dtype),
              " not supported (i32 or i64 expected)");
}

// Value conversion between any two element types (bf16 through float).
template <typename D, typename S>
inline D cast_value(S s) {
  if constexpr (std::is_same_v<D, S>) {
    return s;
  } else if constexpr (std::is_same_v<S, BFloat16>) {
    return cast_value<D>(static_cast<float>(s));
  } else if constexpr (std::is_same_v<D, BFloat16>) {
    return BFloat16(static_cast<float>(s));
  } else {
    return static_cast<D>(s);
  }
}

template <typename T>
inline bool is_nonzero(T v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return (v.bits & 0x7fffu) != 0;
  } else {
    return v != T(0);
  }
}

template <typename T>
inline const T* cdata(const Tensor& t) {
  return static_cast<const T*>(t.raw_data());
}
template <typename T>
inline T* mdata(const Tensor& t) {
  return static_cast<T*>(t.raw_data());
}

inline void require_contiguous(const char* kernel, const Tensor& t, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.is_contiguous(), "cpu ", kernel, ": ", name, " ", t.str(),
                    " must be contiguous");
}

// Rows view: (numel / n, n) with n the size of the last dimension.
inline std::int64_t last_dim(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }
inline std::int64_t row_count(const Tensor& t) {
  const std::int64_t n = last_dim(t);
  return n == 0 ? 0 : t.numel() / n;
}

// ---- strided loops ----------------------------------------------------------

// Walks N operands of the same logical shape. `run(offsets, n, strides)` is
// called once per innermost run with each operand's element offset (from
// its raw_data()) and its stride along the run. Dimensions of size 1 are
// dropped and adjacent dimensions that are contiguous in every operand are
// merged, so contiguous operands give one run of numel elements.
template <std::size_t N, typename Run>
void strided_loop(const Shape& shape, const std::array<const Shape*, N>& strides, Run&& run) {
  constexpr int kMaxDims = 16;
  std::int64_t sizes[kMaxDims];
  std::int64_t st[N][kMaxDims];
  int nd = 0;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) return;
    if (shape[d] == 1) continue;
    MOTLEY_CHECK(nd < kMaxDims, "too many dimensions: ", shape.size());
    sizes[nd] = shape[d];
    for (std::size_t o = 0; o < N; ++o) st[o][nd] = (*strides[o])[d];
    ++nd;
  }
  // Merge dimension d into d+1 (outer into inner) where contiguous.
  int merged = 0;
  for (int d = 0; d < nd; ++d) {
    if (merged > 0) {
      bool can = true;
      for (std::size_t o = 0; o < N; ++o) {
        if (st[o][merged - 1] != st[o][d] * sizes[d]) can = false;
      }
      if (can) {
        sizes[merged - 1] *= sizes[d];
        for (std::size_t o = 0; o < N; ++o) st[o][merged - 1] = st[o][d];
        continue;
      }
    }
    sizes[merged] = sizes[d];
    for (std::size_t o = 0; o < N; ++o) st[o][merged] = st[o][d];
    ++merged;
  }
  nd = merged;
  std::array<std::int64_t, N> off{};
  std::array<std::int64_t, N> inner{};
  if (nd == 0) {  // a single element
    for (std::size_t o = 0; o < N; ++o) inner[o] = 1;
    run(off, std::int64_t{1}, inner);
    return;
  }
  for (std::size_t o = 0; o < N; ++o) inner[o] = st[o][nd - 1];
  const std::int64_t n = sizes[nd - 1];
  std::int64_t idx[kMaxDims] = {0};
  while (true) {
    run(off, n, inner);
    int d = nd - 2;
    for (; d >= 0; --d) {
      ++idx[d];
      for (std::size_t o = 0; o < N; ++o) off[o] += st[o][d];
      if (idx[d] < sizes[d]) break;
      for (std::size_t o = 0; o < N; ++o) off[o] -= st[o][d] * sizes[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

// ---- BLAS -------------------------------------------------------------------

inline void blas_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                      const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                      float beta, float* c, std::int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

inline void blas_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k,
                      double alpha, const double* a, std::int64_t lda, const double* b,
                      std::int64_t ldb, double beta, double* c, std::int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// ---- math -------------------------------------------------------------------

#if defined(__AVX512F__)
// The lanes of a 16-float vector starting `left` elements before the end of
// an array: all 16, or the masked tail.
inline __mmask16 lanes_left_mask(std::int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}
#endif

// Vectorised exp. libm's exp is an opaque call that GCC does not
// vectorise, so float goes through an AVX2/FMA polynomial (below) where the
// compiler targets it, and everything else through Eigen's packet exp.
template <typename T>
using ArrayMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

#if defined(__AVX2__) && defined(__FMA__)
#define MOTLEY_CPU_AVX2 1
// exp of 8 floats: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and
// Cephes' degree-6 polynomial p(r) = e^r (about 1 ulp); 2^n is applied by
// adding n to the exponent field of p (p in [0.707, 1.414], so the sum
// stays a normal float for every x in range). Below the normal range
// (x < -87.33, -inf included) the result is 0; above 88.7228 (the float
// overflow threshold), +inf; NaN propagates.
inline __m256 exp_avx2(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.5f)), _mm256_set1_ps(88.8f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_cvtps_epi32(fx), 23);
  __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), n));
  y = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_LT_OQ), y);
  // Beyond 128 ln2 the exponent field would reach 255 with p's mantissa
  // (a NaN pattern): return +inf there.
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY),
                       _mm256_cmp_ps(x, _mm256_set1_ps(88.7228f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

#if defined(__AVX512F__)
// exp_avx2 on 16 lanes (the same reduction, polynomial and special cases).
inline __m512 exp_avx512(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.5f)), _mm512_set1_ps(88.8f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i n = _mm512_slli_epi32(_mm512_cvtps_epi32(fx), 23);
  __m512 y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), n));
  y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_NLT_UQ), y);
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.7228f), _CMP_GT_OQ),
                         _mm512_set1_ps(INFINITY));
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
#endif

// y[i] = exp(a * x[i] + b); y may alias x, or be null when only the sum
// is wanted. Returns the sum of the exps, accumulated in double, when `sum`
// is true (else 0).
template <typename T>
inline double exp_affine(const T* x, T a, T b, T* y, std::int64_t n, bool sum = false) {
  if (n <= 0) return 0.0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    __m512d acc = _mm512_setzero_pd();
    std::int64_t i = 0;
    while (i < n) {
      __m512 block = _mm512_setzero_ps();
      const std::int64_t block_end = std::min(n, i + 32 * 16);
      for (; i + 16 <= block_end; i += 16) {
        const __m512 e = exp_avx512(_mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), vb));
        if (y) _mm512_storeu_ps(y + i, e);
        block = _mm512_add_ps(block, e);
      }
      if (i < block_end) {  // the last, partial vector
        const __mmask16 k = lanes_left_mask(block_end - i);
        const __m512 e = _mm512_maskz_mov_ps(
            k, exp_avx512(_mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(k, x + i), vb)));
        if (y) _mm512_mask_storeu_ps(y + i, k, e);
        block = _mm512_add_ps(block, e);
        i = block_end;
      }
      if (sum) {
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(block)));
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_extractf32x8_ps(block, 1)));
      }
    }
    return sum ? _mm512_reduce_add_pd(acc) : 0.0;
  }
#elif defined(MOTLEY_CPU_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    // The sum: 8 float lanes over blocks of 32 vectors, each block flushed
    // into double lanes, so the float part never adds more than 32 terms.
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    std::int64_t i = 0;
    while (i + 8 <= n) {
      __m256 block = _mm256_setzero_ps();
      const std::int64_t block_end = std::min(n - 7, i + 32 * 8);
      for (; i < block_end; i += 8) {
        const __m256 e = exp_avx2(_mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), vb));
        if (y) _mm256_storeu_ps(y + i, e);
        block = _mm256_add_ps(block, e);
      }
      if (sum) {
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(block)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(block, 1)));
      }
    }
    double total = 0.0;
    if (sum) {
      alignas(32) double lanes[4];
      _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
      total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    }
    for (; i < n; ++i) {
      const float e = std::exp(a * x[i] + b);
      if (y) y[i] = e;
      total += e;
    }
    return sum ? total : 0.0;
  }
#endif
  double total = 0.0;
  for (std::int64_t i0 = 0; i0 < n; i0 += 512) {
    const std::int64_t c = std::min<std::int64_t>(512, n - i0);
    T scratch[512];
    T* out = y ? y + i0 : scratch;
    ArrayMap<T>(out, c) = (ConstArrayMap<T>(x + i0, c) * a + b).exp();
    if (sum) {
      for (std::int64_t i = 0; i < c; ++i) total += static_cast<double>(out[i]);
    }
  }
  return total;
}

// ---- shifted exp for softmax and cross-entropy ------------------------------------
//
// Note [Shifted exp]
// Softmax, log-softmax and cross-entropy only ever take exp(x - b) where b
// is the row's maximum or its log-sum-exp, so every argument is <= ~0 (a
// few ulp above 0 at most), never NaN once the row is checked (row_max
// below). That removes the overflow and NaN blends of exp_avx2, and the
// reduction uses the round-to-nearest "magic number" trick (n = x log2e +
// 1.5 2^23 - 1.5 2^23, whose bit pattern also carries n for 2^n), so the
// exp costs 12 to 14 vector instructions instead of 21. The polynomial is a
// degree-6 fit of e^r on |r| <= ln2/2 (p(r) = 1 + r + r^2 q(r), q of degree
// 4, fitted for minimum relative error): 1.1 ulp at most in float, like
// exp_avx2. Arguments below -86.5 (where 2^n would leave the normal
// range) give exactly 0, as libm's expf gives 0 or a subnormal there.
// With AVX-512 the same code runs on 16 lanes with masked tails, and is
// shaped for latency as well as instruction count (these kernels run
// out of the reorder window before they run out of ports): q in Estrin's
// form (depth 3 instead of 4), 2^n applied by vscalefps (one instruction
// instead of a shift and an integer add), and no clamp ahead of the
// reduction, since the lanes below -86.5 (where the reduction may give
// garbage, or NaN for -inf) are zeroed at the end anyway: 2.8 ns instead
// of 3.4 per 16 lanes on the Xeon of docs/perf.md, at the same accuracy.
#if defined(__AVX512F__)
#define MOTLEY_CPU_AVX512 1
// kSumOnly: for callers that only add the exps up (cross-entropy's and
// log-softmax's log-sum-exp). A degree-5 polynomial (q of degree 3, at most
// 2.5 ulp per term; the sum's relative error stays below 3e-7, i.e. 3e-7
// absolute in the log-sum-exp, a third of an ulp of a value near 8) and no
// zeroing below -86.5 (arguments are clamped there instead): such a term
// adds exp(-86.5) = 2.7e-38 to a sum of at least 1 instead of 0, which
// cannot change it.
// A NaN argument gives NaN unless kSumOnly (Note [Vector sigmoid] relies
// on it; the callers of kSumOnly have ruled NaN out).
template <bool kSumOnly = false>
inline __m512 exp_shifted_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-86.5f);
  const __m512 xc = kSumOnly ? _mm512_max_ps(x, lo) : x;
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m512 fx = _mm512_sub_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 q;
  if constexpr (kSumOnly) {  // (c0 + c1 r) + r^2 (c2 + c3 r)
    q = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_set1_ps(8.312525227665901e-3f), r,
                        _mm512_set1_ps(4.189011454582214e-2f)),
        r2,
        _mm512_fmadd_ps(_mm512_set1_ps(1.6667114198207855e-1f), r,
                        _mm512_set1_ps(4.99992311000824e-1f)));
  } else {  // (c0 + c1 r) + r^2 ((c2 + c3 r) + r^2 c4)
    const __m512 hi = _mm512_fmadd_ps(
        _mm512_set1_ps(1.381461275741458e-3f), r2,
        _mm512_fmadd_ps(_mm512_set1_ps(8.368710055947304e-3f), r,
                        _mm512_set1_ps(4.166838899254799e-2f)));
    q = _mm512_fmadd_ps(hi, r2,
                        _mm512_fmadd_ps(_mm512_set1_ps(1.666652113199234e-1f), r,
                                        _mm512_set1_ps(4.999999403953552e-1f)));
  }
  const __m512 p = _mm512_fmadd_ps(q, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 y = _mm512_scalef_ps(p, fx);  // p 2^n, exact in the normal range
  if constexpr (kSumOnly) return y;
  // Not-less-than, unordered: NaN lanes keep their NaN.
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
}
#endif
#ifdef MOTLEY_CPU_AVX2
// exp_shifted_avx512 on 8 lanes (the same polynomials in the same form and
// the kSumOnly variant), with 2^n added into the exponent field (no
// vscalefps) and therefore the clamp at -86.5 always; NaN gives 0.
template <bool kSumOnly = false>
inline __m256 exp_shifted_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-86.5f);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 fx = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  __m256 q;
  if constexpr (kSumOnly) {
    q = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.312525227665901e-3f), r,
                                        _mm256_set1_ps(4.189011454582214e-2f)),
                        r2,
                        _mm256_fmadd_ps(_mm256_set1_ps(1.6667114198207855e-1f), r,
                                        _mm256_set1_ps(4.99992311000824e-1f)));
  } else {
    const __m256 hi = _mm256_fmadd_ps(
        _mm256_set1_ps(1.381461275741458e-3f), r2,
        _mm256_fmadd_ps(_mm256_set1_ps(8.368710055947304e-3f), r,
                        _mm256_set1_ps(4.166838899254799e-2f)));
    q = _mm256_fmadd_ps(hi, r2,
                        _mm256_fmadd_ps(_mm256_set1_ps(1.666652113199234e-1f), r,
                                        _mm256_set1_ps(4.999999403953552e-1f)));
  }
  const __m256 p = _mm256_fmadd_ps(q, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  const __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), n));
  if constexpr (kSumOnly) return y;
  return _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), y);
}
#endif

// ---- sigmoid without a division ---------------------------------------------------
//
// Note [Vector sigmoid]
// sigmoid(x) = 1 / (1 + e^-x) costs a vector division per element in the
// plain form, and vdivps (10 to 16 cycles per 16 lanes) is slower than the
// exp: SwiGLU became compute-bound on it. Instead, with e = exp(-|x|) in
// (0, 1] (the shifted exp of Note [Shifted exp], its argument is <= 0):
//     sigmoid(x) = 1 / (1 + e)   for x >= 0,    e / (1 + e)   for x < 0,
// and 1 / (1 + e), 1 + e in [1, 2], is the hardware reciprocal estimate
// refined by one Newton step r' = r + r (1 - (1 + e) r): about 1 ulp, no
// subnormals. Both branches are accurate in relative terms (no 1 - s
// cancellation). Below x = -86.5 the result is 0 (instead of a value
// under 3e-38, where the float formula itself turns subnormal and then 0);
// NaN propagates; sigmoid(+inf) = 1, sigmoid(-inf) = 0.
#ifdef MOTLEY_CPU_AVX512
inline __m512 sigmoid_avx512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 neg_abs = _mm512_or_ps(x, _mm512_set1_ps(-0.0f));  // -|x|
  const __m512 e = exp_shifted_avx512(neg_abs);
  const __m512 d = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
  // x < 0: e r. A NaN x has made e, and so r, NaN already.
  return _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), e, r);
}
#endif
#ifdef MOTLEY_CPU_AVX2
// sigmoid_avx512 on 8 lanes, but with a division: _mm256_rcp_ps has only
// 12 bits, and one Newton step from it misses exact values (sigmoid(0)
// came out 0.49999997); an 8-lane vdivps costs half of a 16-lane one.
// exp_shifted_avx2 zeroes NaN, hence the final blend.
inline __m256 sigmoid_avx2(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 neg_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 e = exp_shifted_avx2(neg_abs);
  const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
  return _mm256_blendv_ps(s, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

// The row's maximum into *m; false when the row holds a NaN or its maximum
// is not finite (+inf, or -inf for a row of -inf), where callers take the
// general path (exp_affine), whose exp propagates NaN and infinities.
template <typename T>
inline bool row_max(const T* x, std::int64_t n, T* m) {
#ifdef MOTLEY_CPU_AVX512
  if constexpr (std::is_same_v<T, float>) {
    // Four independent maxima hide the latency of vmaxps.
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    __mmask16 nan = 0;
    std::int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
      const __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
      m0 = _mm512_max_ps(m0, v0);
      m1 = _mm512_max_ps(m1, v1);
      m2 = _mm512_max_ps(m2, v2);
      m3 = _mm512_max_ps(m3, v3);
      nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v2, v3, _CMP_UNORD_Q);
    }
    __m512 vmax = _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      vmax = _mm512_max_ps(vmax, v);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (i < n) {
      const __mmask16 k = lanes_left_mask(n - i);
      const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i);
      vmax = _mm512_max_ps(vmax, v);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    *m = _mm512_reduce_max_ps(vmax);
    return nan == 0 && std::isfinite(*m);
  }
#elif defined(MOTLEY_CPU_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // As above on 8 lanes (the scalar loop below, with its per-element
    // NaN test, held softmax and cross-entropy to 20 to 30 % of copy
    // bandwidth on AVX2-only CPUs). NaN lanes are collected with an
    // unordered compare and or-ed together.
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    __m256 nan = _mm256_setzero_ps();
    std::int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
      const __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
      m0 = _mm256_max_ps(m0, v0);
      m1 = _mm256_max_ps(m1, v1);
      m2 = _mm256_max_ps(m2, v2);
      m3 = _mm256_max_ps(m3, v3);
      nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q),
                                           _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q)));
    }
    __m256 vmax = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      vmax = _mm256_max_ps(vmax, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float best = lanes[0];
    for (int j = 1; j < 8; ++j) best = std::max(best, lanes[j]);
    bool finite = _mm256_movemask_ps(nan) == 0;
    for (; i < n; ++i) {
      finite = finite && !std::isnan(x[i]);
      best = std::max(best, x[i]);
    }
    *m = best;
    return finite && std::isfinite(best);
  }
#endif
  T best = x[0];
  bool finite = true;
  for (std::int64_t i = 0; i < n; ++i) {
    finite = finite && !std::isnan(x[i]);
    best = x[i] > best ? x[i] : best;
  }
  *m = best;
  return finite && std::isfinite(best);
}

#ifdef MOTLEY_CPU_AVX512
// The AVX-512 body of exp_shifted (below).
template <bool kSumOnly>
inline double exp_shifted_run_avx512(const float* x, float b, float scale, float* y, std::int64_t n,
                                     bool sum, const float* next) {
  const __m512 vb = _mm512_set1_ps(b), vs = _mm512_set1_ps(scale);
  __m512d acc = _mm512_setzero_pd();
  std::int64_t i = 0;
  while (i < n) {
    // Float lanes over blocks of at most 32 vectors, flushed into double.
    // Two sums in flight hide the latency of the adds.
    __m512 block = _mm512_setzero_ps(), block1 = _mm512_setzero_ps();
    const std::int64_t block_end = std::min(n, i + 32 * 16);
    for (; i + 32 <= block_end; i += 32) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T2);
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + i + 16), _MM_HINT_T2);
      const __m512 e0 = exp_shifted_avx512<kSumOnly>(_mm512_sub_ps(_mm512_loadu_ps(x + i), vb));
      const __m512 e1 =
          exp_shifted_avx512<kSumOnly>(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vb));
      if (y) {
        _mm512_storeu_ps(y + i, _mm512_mul_ps(e0, vs));
        _mm512_storeu_ps(y + i + 16, _mm512_mul_ps(e1, vs));
      }
      block = _mm512_add_ps(block, e0);
      block1 = _mm512_add_ps(block1, e1);
    }
    block = _mm512_add_ps(block, block1);
    for (; i + 16 <= block_end; i += 16) {
      const __m512 e = exp_shifted_avx512<kSumOnly>(_mm512_sub_ps(_mm512_loadu_ps(x + i), vb));
      if (y) _mm512_storeu_ps(y + i, _mm512_mul_ps(e, vs));
      block = _mm512_add_ps(block, e);
    }
    if (i < block_end) {  // the row's last, partial vector
      const __mmask16 k = lanes_left_mask(block_end - i);
      const __m512 e = _mm512_maskz_mov_ps(
          k, exp_shifted_avx512<kSumOnly>(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vb)));
      if (y) _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(e, vs));
      block = _mm512_add_ps(block, e);
      i = block_end;
    }
    if (sum) {
      acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(block)));
      acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_extractf32x8_ps(block, 1)));
    }
  }
  return sum ? _mm512_reduce_add_pd(acc) : 0.0;
}
#endif

// y[i] = scale * exp(x[i] - b) for a row whose maximum is finite and at
// most b + a few ulp (Note [Shifted exp]); y may be null. Returns the sum of
// exp(x[i] - b) (unscaled) accumulated in double when `sum` is true.
// `next` (may be null) is the next row's data, n elements, prefetched into
// L2 while this row's exps are computed from cache so that memory keeps
// streaming during the compute-bound pass. Into L2, not L1: with the L1
// hint the prefetches stalled the exp loop waiting for line-fill buffers,
// and cross-entropy over (4096, 4096) logits read 9 GB/s against a
// 14 GB/s copy; with the L2 hint, 12 to 13 GB/s (docs/perf.md). A row
// longer than L1 (a 32k vocabulary: 128 KiB) also fits in L2.
template <typename T>
inline double exp_shifted(const T* x, T b, T scale, T* y, std::int64_t n, bool sum,
                          const T* next = nullptr) {
#ifdef MOTLEY_CPU_AVX512
  if constexpr (std::is_same_v<T, float>) {
    // Only a sum wanted (y null): the cheaper exp of exp_shifted_avx512.
    return (y == nullptr && sum) ? exp_shifted_run_avx512<true>(x, b, scale, y, n, sum, next)
                                 : exp_shifted_run_avx512<false>(x, b, scale, y, n, sum, next);
  }
#elif defined(MOTLEY_CPU_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 vb = _mm256_set1_ps(b), vs = _mm256_set1_ps(scale);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    const bool sum_only = y == nullptr && sum;
    std::int64_t i = 0;
    while (i + 8 <= n) {
      __m256 block = _mm256_setzero_ps();
      const std::int64_t block_end = std::min(n - 7, i + 32 * 8);
      // Only a sum wanted: the cheaper exp (exp_shifted_avx512's kSumOnly).
      auto run = [&](auto sum_only_tag) {
        constexpr bool kSumOnly = decltype(sum_only_tag)::value;
        for (; i < block_end; i += 8) {
          if (next && i % 16 == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T2);
          }
          const __m256 e = exp_shifted_avx2<kSumOnly>(_mm256_sub_ps(_mm256_loadu_ps(x + i), vb));
          if (!kSumOnly && y) _mm256_storeu_ps(y + i, _mm256_mul_ps(e, vs));
          block = _mm256_add_ps(block, e);
        }
      };
      if (sum_only) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
      if (sum) {
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(block)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(block, 1)));
      }
    }
    double total = 0.0;
    if (sum) {
      alignas(32) double lanes[4];
      _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
      total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    }
    for (; i < n; ++i) {
      const float e = std::exp(x[i] - b);
      if (y) y[i] = scale * e;
      total += e;
    }
    return sum ? total : 0.0;
  }
#endif
  const double total = exp_affine(x, T(1), -b, y, n, sum);
  if (y && scale != T(1)) {
    for (std::int64_t i = 0; i < n; ++i) y[i] *= scale;
  }
  return total;
}

// Largest element of x[0, n), n >= 1 (vectorised; NaN handling unspecified).
template <typename T>
inline T max_of(const T* x, std::int64_t n) {
  return ConstArrayMap<T>(x, n).maxCoeff();
}

// Note [Streaming prefetch]
// An elementwise kernel with a long computation per element (SwiGLU's
// sigmoid: ~20 vector instructions per 16 floats) reads its inputs too
// slowly for the hardware prefetcher to run far enough ahead, and memory
// sits idle while the core computes: SwiGLU moved 20 to 23 GB/s against a
// 29 GB/s copy on the Xeon of docs/perf.md. Prefetching each input stream
// a fixed distance ahead keeps memory busy during the computation (26 to
// 28 GB/s there, alike for 1 to 8 KiB ahead). Kernels that do a few
// instructions per element don't need it: the hardware streams them.
constexpr std::size_t kPrefetchAheadBytes = 4096;

// Prefetch into L1 the line kPrefetchAheadBytes past p, which may lie
// beyond the end of the array: a prefetch never faults, and the address is
// formed as an integer (no out-of-bounds pointer).
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) + kPrefetchAheadBytes),
      /*rw=*/0, /*locality=*/3);
}

// prefetch_ahead for a line about to be written: fetched for ownership
// (PREFETCHW), so the store that follows does not wait for it.
inline void prefetch_ahead_for_write(const void* p) {
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) + kPrefetchAheadBytes),
      /*rw=*/1, /*locality=*/3);
}

// Elementwise work on long arrays is done in chunks of kChunk elements so
// that a vectorised exp/sqrt pass and plain arithmetic passes share data
// in L1.
constexpr std::int64_t kChunk = 512;

template <typename T>
inline T sigmoid_t(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace motley::cpu
