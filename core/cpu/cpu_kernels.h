// The CPU backend's fused kernels, one free function per Backend method
// (private to core/cpu/; the contracts are those of core/backend.h).
// Split from cpu_backend.cpp so that each file stays readable.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>  // first included by cpu_common.h (Note there on GCC 12)
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/tensor.h"

namespace motley::cpu {

// kernels_fused.cpp
void softmax(const Tensor& x, Tensor& y, bool log);
void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx, bool log);
void cross_entropy(const Tensor& logits, const Tensor& targets, std::int64_t ignore_index,
                   Tensor& loss, Tensor& lse);
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, std::int64_t ignore_index,
                            const Tensor& lse, const Tensor& dloss, Tensor& dlogits);
void rmsnorm(const Tensor& x, const Tensor& g, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& x, const Tensor& g, const Tensor& rstd, const Tensor& dy,
                      Tensor& dx, Tensor& dg);
void swiglu(const Tensor& a, const Tensor& b, Tensor& out);
void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dout, Tensor& da, Tensor& db);
void rope(const Tensor& x, double theta, std::int64_t pos_offset, bool inverse, Tensor& y);
void index_select_rows(const Tensor& src, const Tensor& index, Tensor& out);
void index_add_rows(const Tensor& src, const Tensor& index, const Tensor& scale, Tensor& out);
void topk(const Tensor& x, std::int64_t k, Tensor& values, Tensor& indices);
void sort_desc(const Tensor& x, Tensor& values, Tensor& indices);
void adamw(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, double lr,
           double beta1, double beta2, double eps, double weight_decay, std::int64_t step);

// kernels_attention.cpp
void attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out,
               Tensor& lse);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, double scale, Tensor& dq, Tensor& dk,
                        Tensor& dv);

// Row reductions shared by the kernel files, returning double. Floats are
// summed in 16 float lanes over blocks of at most 1024 elements (64 terms
// per lane), each block added into a double: as fast as a float sum (no
// per-element conversion, no add-latency chain) and as accurate as the
// double sum for any row length. Doubles use 8 double lanes.
template <typename T, typename Term>
inline double lane_sum(std::int64_t n, Term term) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr std::int64_t kLanes = 16, kBlock = 1024;
    double total = 0.0;
    std::int64_t i = 0;
    while (i + kLanes <= n) {
      float acc[kLanes] = {};
      const std::int64_t end = std::min(n - kLanes + 1, i + kBlock);
      for (; i < end; i += kLanes) {
        for (int u = 0; u < kLanes; ++u) acc[u] += term(i + u);
      }
      double block = 0.0;
      for (int u = 0; u < kLanes; ++u) block += acc[u];
      total += block;
    }
    for (; i < n; ++i) total += static_cast<double>(term(i));
    return total;
  } else {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      for (int u = 0; u < 8; ++u) acc[u] += static_cast<double>(term(i + u));
    }
    for (; i < n; ++i) acc[0] += static_cast<double>(term(i));
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
}

// Strict double accumulation (every term converted first), for
// Backend::reduce, whose contract promises double sums: losses and the
// gradient norm go through it.
template <typename T>
inline double sum_row_f64(const T* x, std::int64_t n, bool squares) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int u = 0; u < 8; ++u) {
      const double v = static_cast<double>(x[i + u]);
      acc[u] += squares ? v * v : v;
    }
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    acc[0] += squares ? v * v : v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
inline double sum_row(const T* x, std::int64_t n) {
  return lane_sum<T>(n, [x](std::int64_t i) { return x[i]; });
}

template <typename T>
inline double dot_row(const T* x, const T* y, std::int64_t n) {
#if defined(__AVX512F__)
  // The same blocking as lane_sum (64 float lanes, blocks of 1024, each
  // added into a double), written out because the compiler's version of
  // lane_sum keeps one add chain and half-width vectors.
  if constexpr (std::is_same_v<T, float>) {
    double total = 0.0;
    std::int64_t i = 0;
    while (i + 64 <= n) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const std::int64_t end = std::min(n - 63, i + 1024);
      for (; i < end; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(y + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(y + i + 48), a3);
      }
      const __m512 a = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
      total += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)),
                                                  _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1))));
    }
    for (; i < n; ++i) total += static_cast<double>(x[i] * y[i]);
    return total;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  // The same on 32 float lanes (four 8-lane accumulators). lane_sum's
  // version ended each block in a serial chain of 16 double adds, which at
  // RMSNorm's d = 256 cost as much as the products: RMSNorm ran at 55 % of
  // memcpy in an AVX2 build on Zen 4.
  if constexpr (std::is_same_v<T, float>) {
    double total = 0.0;
    std::int64_t i = 0;
    while (i + 32 <= n) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const std::int64_t end = std::min(n - 31, i + 1024);
      for (; i < end; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), a3);
      }
      const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      const __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                                      _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
      const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
      total += _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    }
    for (; i < n; ++i) total += static_cast<double>(x[i] * y[i]);
    return total;
  }
#endif
  return lane_sum<T>(n, [x, y](std::int64_t i) { return x[i] * y[i]; });
}

}  // namespace motley::cpu
