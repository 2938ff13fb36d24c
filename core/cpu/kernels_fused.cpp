// Fused model kernels of the CPU backend (contracts in core/backend.h).
//
// Each kernel works row by row on contiguous data, with the row in cache
// between its passes. Row sums accumulate in double (sum_row, dot_row) so
// that f32 results do not drift with the row length. All kernels run on
// the calling thread (see the note at the top of cpu_backend.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "core/cpu/cpu_common.h"
#include "core/cpu/cpu_kernels.h"

namespace motley::cpu {
namespace {

void check_shape(const char* kernel, const Tensor& t, const Shape& shape, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.shape() == shape, "cpu ", kernel, ": ", name, " ", t.str(),
                    ", expected shape ", shape_str(shape));
}

void check_dtype(const char* kernel, const Tensor& t, DType dtype, const char* name) {
  MOTLEY_CHECK_KIND(kShape, t.dtype() == dtype, "cpu ", kernel, ": ", name, " ", t.str(),
                    ", expected dtype ", dtype_str(dtype));
}

void check_contiguous(const char* kernel, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) require_contiguous(kernel, *t, "argument");
}

template <typename T>
struct RopeTable {
  double theta = 0;
  std::int64_t hd = -1, pos_offset = -1, t_len = -1;
  std::vector<T> cos, sin;  // (t_len, hd/2)
};

template <typename T>
const RopeTable<T>& rope_table(double theta, std::int64_t hd, std::int64_t pos_offset,
                               std::int64_t t_len) {
  thread_local RopeTable<T> table;
  if (table.theta == theta && table.hd == hd && table.pos_offset == pos_offset &&
      table.t_len == t_len) {
    return table;
  }
  const std::int64_t half = hd / 2;
  table.cos.resize(t_len * half);
  table.sin.resize(t_len * half);
  for (std::int64_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / hd);
    for (std::int64_t t = 0; t < t_len; ++t) {
      const double angle = static_cast<double>(pos_offset + t) * inv_freq;
      table.cos[t * half + i] = static_cast<T>(std::cos(angle));
      table.sin[t * half + i] = static_cast<T>(std::sin(angle));
    }
  }
  table.theta = theta;
  table.hd = hd;
  table.pos_offset = pos_offset;
  table.t_len = t_len;
  return table;
}

// NaN sorts above every number (as in torch.topk / torch.sort).
template <typename T>
inline bool greater_nan_first(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) {
    if (std::isnan(a)) return !std::isnan(b);
    if (std::isnan(b)) return false;
  }
  return a > b;
}

// Target of row n as int64, validated against [0, v) unless ignored.
template <typename I>
std::int64_t checked_target(const I* targets, std::int64_t row, std::int64_t v,
                            std::int64_t ignore_index) {
  const std::int64_t t = static_cast<std::int64_t>(targets[row]);
  if (t == ignore_index) return t;
  MOTLEY_CHECK_KIND(kShape, t >= 0 && t < v, "cross_entropy: target ", t, " at row ", row,
                    " outside [0, ", v, ") (and not ignore_index ", ignore_index, ")");
  return t;
}

}  // namespace

// ---- softmax ------------------------------------------------------------------

void softmax(const Tensor& x, Tensor& y, bool log) {
  check_contiguous("softmax", {&x, &y});
  check_shape("softmax", y, x.shape(), "output");
  check_dtype("softmax", y, x.dtype(), "output");
  const std::int64_t n = last_dim(x), rows = row_count(x);
  dispatch_float("softmax", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = cdata<T>(x);
    T* py = mdata<T>(y);
    // Outputs larger than the caches go out with streaming stores (as a
    // large memcpy does): the exps of a row go to a row buffer that stays
    // in L1, and the scaled row is streamed to y, so y's lines are never
    // read for ownership (8 bytes of memory traffic per element instead
    // of 12).
    [[maybe_unused]] constexpr std::int64_t kStreamBytes = std::int64_t{64} << 20;
    bool stream = false;
    std::vector<T> row_buf;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      stream = !log && rows * n * static_cast<std::int64_t>(sizeof(T)) >= kStreamBytes &&
               n % 16 == 0 && reinterpret_cast<std::uintptr_t>(py) % 64 == 0;
      if (stream) row_buf.resize(n);
    }
#endif
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = px + r * n;  // (n)
      T* yr = py + r * n;        // (n)
      T m;
      if (row_max(xr, n, &m)) {  // Note [Shifted exp]
        T* e = log ? nullptr : stream ? row_buf.data() : yr;
        const double s =
            exp_shifted(xr, m, T(1), e, n, /*sum=*/true, r + 1 < rows ? xr + n : nullptr);
        if (log) {
          const T lse = static_cast<T>(static_cast<double>(m) + std::log(s));
          for (std::int64_t j = 0; j < n; ++j) yr[j] = xr[j] - lse;
        } else if (stream) {
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<T, float>) {
            const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / s));
            for (std::int64_t j = 0; j < n; j += 16) {
              _mm512_stream_ps(yr + j, _mm512_mul_ps(_mm512_loadu_ps(e + j), inv));
            }
          }
#endif
        } else {
          const T inv = static_cast<T>(1.0 / s);
          for (std::int64_t j = 0; j < n; ++j) yr[j] *= inv;
        }
        continue;
      }
      // A NaN or infinite maximum: the general exp propagates it.
      const double s = exp_affine(xr, T(1), -m, yr, n, /*sum=*/true);
      if (log) {
        const T lse = static_cast<T>(static_cast<double>(m) + std::log(s));
        for (std::int64_t j = 0; j < n; ++j) yr[j] = xr[j] - lse;
      } else {
        const T inv = static_cast<T>(1.0 / s);
        for (std::int64_t j = 0; j < n; ++j) yr[j] *= inv;
      }
    }
#if defined(__AVX512F__)
    if (stream) _mm_sfence();  // streaming stores are weakly ordered
#endif
  });
}

void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx, bool log) {
  check_contiguous("softmax_backward", {&y, &dy, &dx});
  check_shape("softmax_backward", dy, y.shape(), "dy");
  check_shape("softmax_backward", dx, y.shape(), "dx");
  check_dtype("softmax_backward", dy, y.dtype(), "dy");
  check_dtype("softmax_backward", dx, y.dtype(), "dx");
  const std::int64_t n = last_dim(y), rows = row_count(y);
  dispatch_float("softmax_backward", y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* py = cdata<T>(y);
    const T* pdy = cdata<T>(dy);
    T* pdx = mdata<T>(dx);
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* yr = py + r * n;
      const T* gr = pdy + r * n;
      T* dr = pdx + r * n;
      if (log) {
        const T s = static_cast<T>(sum_row(gr, n));
        exp_affine(yr, T(1), T(0), dr, n);  // softmax = exp(log_softmax)
        for (std::int64_t j = 0; j < n; ++j) dr[j] = gr[j] - dr[j] * s;
      } else {
        const T dot = static_cast<T>(dot_row(gr, yr, n));
        for (std::int64_t j = 0; j < n; ++j) dr[j] = yr[j] * (gr[j] - dot);
      }
    }
  });
}

// ---- cross-entropy --------------------------------------------------------------

void cross_entropy(const Tensor& logits, const Tensor& targets, std::int64_t ignore_index,
                   Tensor& loss, Tensor& lse) {
  check_contiguous("cross_entropy", {&logits, &targets, &loss, &lse});
  MOTLEY_CHECK_KIND(kShape, logits.dim() == 2, "cpu cross_entropy: logits ", logits.str(),
                    " must be (N, V)");
  const std::int64_t rows = logits.size(0), v = logits.size(1);
  check_shape("cross_entropy", targets, {rows}, "targets");
  check_shape("cross_entropy", loss, {rows}, "loss");
  check_shape("cross_entropy", lse, {rows}, "lse");
  check_dtype("cross_entropy", loss, logits.dtype(), "loss");
  check_dtype("cross_entropy", lse, logits.dtype(), "lse");
  dispatch_float("cross_entropy", logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_index("cross_entropy", targets.dtype(), [&](auto itag) {
      using I = decltype(itag);
      const T* px = cdata<T>(logits);
      const I* pt = cdata<I>(targets);
      T* ploss = mdata<T>(loss);
      T* plse = mdata<T>(lse);
      // Validate every target before writing anything.
      for (std::int64_t r = 0; r < rows; ++r) checked_target(pt, r, v, ignore_index);
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* xr = px + r * v;
        T m;
        const double s = row_max(xr, v, &m)  // Note [Shifted exp]
                             ? exp_shifted(xr, m, T(1), static_cast<T*>(nullptr), v, true,
                                           r + 1 < rows ? xr + v : nullptr)
                             : exp_affine(xr, T(1), -m, static_cast<T*>(nullptr), v, true);
        const double l = static_cast<double>(m) + std::log(s);
        plse[r] = static_cast<T>(l);
        const std::int64_t t = static_cast<std::int64_t>(pt[r]);
        ploss[r] = t == ignore_index ? T(0) : static_cast<T>(l - static_cast<double>(xr[t]));
      }
    });
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, std::int64_t ignore_index,
                            const Tensor& lse, const Tensor& dloss, Tensor& dlogits) {
  check_contiguous("cross_entropy_backward", {&logits, &targets, &lse, &dloss, &dlogits});
  MOTLEY_CHECK_KIND(kShape, logits.dim() == 2, "cpu cross_entropy_backward: logits ", logits.str(),
                    " must be (N, V)");
  const std::int64_t rows = logits.size(0), v = logits.size(1);
  check_shape("cross_entropy_backward", targets, {rows}, "targets");
  check_shape("cross_entropy_backward", lse, {rows}, "lse");
  check_shape("cross_entropy_backward", dloss, {rows}, "dloss");
  check_shape("cross_entropy_backward", dlogits, logits.shape(), "dlogits");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&lse, &dloss, &dlogits}) {
    check_dtype("cross_entropy_backward", *t, logits.dtype(), "argument");
  }
  dispatch_float("cross_entropy_backward", logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_index("cross_entropy_backward", targets.dtype(), [&](auto itag) {
      using I = decltype(itag);
      const T* px = cdata<T>(logits);
      const I* pt = cdata<I>(targets);
      const T* plse = cdata<T>(lse);
      const T* pdl = cdata<T>(dloss);
      T* pdx = mdata<T>(dlogits);
      for (std::int64_t r = 0; r < rows; ++r) checked_target(pt, r, v, ignore_index);
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* xr = px + r * v;
        T* dr = pdx + r * v;
        const std::int64_t t = static_cast<std::int64_t>(pt[r]);
        if (t == ignore_index) {
          std::fill(dr, dr + v, T(0));
          continue;
        }
        const T l = plse[r], g = pdl[r];
        if (std::isfinite(l)) {
          // g * softmax(logits row); x - lse <= 0 up to rounding (Note [Shifted exp]).
          exp_shifted(xr, l, g, dr, v, /*sum=*/false, r + 1 < rows ? xr + v : nullptr);
        } else {  // the forward saw a NaN or infinity: propagate it
          exp_affine(xr, T(1), -l, dr, v);
          for (std::int64_t j = 0; j < v; ++j) dr[j] *= g;
        }
        dr[t] -= g;
      }
    });
  });
}

// ---- RMSNorm --------------------------------------------------------------------

void rmsnorm(const Tensor& x, const Tensor& g, double eps, Tensor& y, Tensor& rstd) {
  check_contiguous("rmsnorm", {&x, &g, &y, &rstd});
  const std::int64_t d = last_dim(x), rows = row_count(x);
  check_shape("rmsnorm", g, {d}, "g");
  check_shape("rmsnorm", y, x.shape(), "y");
  MOTLEY_CHECK_KIND(kShape, rstd.numel() == rows, "cpu rmsnorm: rstd ", rstd.str(), " for ", rows,
                    " rows");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&g, &y, &rstd})
    check_dtype("rmsnorm", *t, x.dtype(), "argument");
  dispatch_float("rmsnorm", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = cdata<T>(x);
    const T* pg = cdata<T>(g);
    T* py = mdata<T>(y);
    T* pr = mdata<T>(rstd);
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* __restrict xr = px + r * d;
      T* __restrict yr = py + r * d;
      const double ms = dot_row(xr, xr, d) / static_cast<double>(d);
      const T rs = static_cast<T>(1.0 / std::sqrt(ms + eps));
      pr[r] = rs;
      for (std::int64_t j = 0; j < d; ++j) yr[j] = xr[j] * rs * pg[j];
    }
  });
}

void rmsnorm_backward(const Tensor& x, const Tensor& g, const Tensor& rstd, const Tensor& dy,
                      Tensor& dx, Tensor& dg) {
  check_contiguous("rmsnorm_backward", {&x, &g, &rstd, &dy, &dx, &dg});
  const std::int64_t d = last_dim(x), rows = row_count(x);
  check_shape("rmsnorm_backward", g, {d}, "g");
  check_shape("rmsnorm_backward", dg, {d}, "dg");
  check_shape("rmsnorm_backward", dy, x.shape(), "dy");
  check_shape("rmsnorm_backward", dx, x.shape(), "dx");
  MOTLEY_CHECK_KIND(kShape, rstd.numel() == rows, "cpu rmsnorm_backward: rstd ", rstd.str(),
                    " for ", rows, " rows");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&g, &rstd, &dy, &dx, &dg}) {
    check_dtype("rmsnorm_backward", *t, x.dtype(), "argument");
  }
  dispatch_float("rmsnorm_backward", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = cdata<T>(x);
    const T* pg = cdata<T>(g);
    const T* pr = cdata<T>(rstd);
    const T* pdy = cdata<T>(dy);
    T* pdx = mdata<T>(dx);
    T* pdg = mdata<T>(dg);
    // y_j = x_j r g_j with r = (mean(x^2) + eps)^-1/2, so
    //   dx_j = r g_j dy_j - x_j r^3 / d * sum_k dy_k g_k x_k
    //   dg_j = sum over rows of dy_j x_j r.
    // dg: blocks of kRowBlock rows summed in T, each block added into
    // double, so that no T partial sum has more than kRowBlock terms (the
    // blocking of lane_sum, across rows) without a conversion per element.
    constexpr std::int64_t kRowBlock = 64;
    std::vector<double> dg_acc(d, 0.0);  // (d) blocks summed in order
    std::vector<T> dg_block(d, T(0));    // (d) rows of the current block
    std::vector<T> gx(d);                // (d) g * x of one row
    constexpr std::int64_t kGroup = 4;   // rows per group (see below)
    // c_row = r^3 / d * sum_k dy_k g_k x_k: the row's dot product.
    auto row_coeff = [&](std::int64_t row) -> T {
      const T* __restrict xr = px + row * d;
      const T* __restrict gr = pdy + row * d;
      const T rs = pr[row];
      double dot = 0.0;
      std::int64_t j0 = 0;  // first element left to the generic loop
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        // 32 float lanes over blocks of 1024 elements, each flushed into
        // double (the accuracy of dot_row).
        j0 = d - d % 16;
        for (std::int64_t b = 0; b < j0; b += 1024) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0;
          const std::int64_t e = std::min(j0, b + 1024);
          std::int64_t j = b;
          for (; j + 32 <= e; j += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(gr + j),
                                 _mm512_mul_ps(_mm512_loadu_ps(pg + j), _mm512_loadu_ps(xr + j)),
                                 a0);
            a1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(gr + j + 16),
                _mm512_mul_ps(_mm512_loadu_ps(pg + j + 16), _mm512_loadu_ps(xr + j + 16)), a1);
          }
          for (; j < e; j += 16) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(gr + j),
                                 _mm512_mul_ps(_mm512_loadu_ps(pg + j), _mm512_loadu_ps(xr + j)),
                                 a0);
          }
          const __m512 a = _mm512_add_ps(a0, a1);
          dot += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)),
                                                    _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1))));
        }
        for (std::int64_t j = j0; j < d; ++j) dot += static_cast<double>(gr[j] * (pg[j] * xr[j]));
        j0 = d;
      }
#endif
      if (j0 < d) {
        T* __restrict gxr = gx.data();
        for (std::int64_t j = 0; j < d; ++j) gxr[j] = pg[j] * xr[j];
        dot = dot_row(gr, gxr, d);
      }
      return static_cast<T>(static_cast<double>(rs) * rs * rs * dot / static_cast<double>(d));
    };
    // dx of rows [row0, row0 + n) and their dg terms into the block sum,
    // column tile by column tile: a tile's dg partial sums stay in
    // registers across the group's rows. (Updated in memory row by row,
    // the dg stores doubled the stores per element; they queue in order
    // behind the dx stores, which miss, and the store buffer filled:
    // 74 to 80 % of copy bandwidth against 100 % with the sums in
    // registers, on the Xeon of docs/perf.md.) Each dg element still
    // receives its rows' terms in row order, as before.
    auto group_update = [&](std::int64_t row0, std::int64_t n, const T* c) {
      T* __restrict dgb = dg_block.data();
      std::int64_t j0 = 0;  // first column left to the generic loop
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        // A tile of K vectors (K a constant: its K accumulators are
        // registers) over the group's rows.
        auto tile = [&](std::int64_t jt, auto k_tag) {
          constexpr int K = decltype(k_tag)::value;
          __m512 acc[K];
          for (int k = 0; k < K; ++k) acc[k] = _mm512_loadu_ps(dgb + jt + 16 * k);
          for (std::int64_t i = 0; i < n; ++i) {
            const std::int64_t off = (row0 + i) * d + jt;
            const T* __restrict xr = px + off;
            const T* __restrict gr = pdy + off;
            T* __restrict dr = pdx + off;
            const __m512 vrs = _mm512_set1_ps(pr[row0 + i]), vc = _mm512_set1_ps(c[i]);
#pragma GCC unroll 16
            for (int k = 0; k < K; ++k) {
              prefetch_ahead(xr + 16 * k);  // Note [RMSNorm backward prefetch]
              prefetch_ahead(gr + 16 * k);
              prefetch_ahead_for_write(dr + 16 * k);
              const __m512 x = _mm512_loadu_ps(xr + 16 * k);
              const __m512 gyr = _mm512_mul_ps(_mm512_loadu_ps(gr + 16 * k), vrs);
              // dx = rs g dy - c x;  dg += dy x rs
              _mm512_storeu_ps(dr + 16 * k, _mm512_fnmadd_ps(vc, x, _mm512_mul_ps(
                                                                        gyr, _mm512_loadu_ps(
                                                                                 pg + jt + 16 * k))));
              acc[k] = _mm512_fmadd_ps(gyr, x, acc[k]);
            }
          }
          for (int k = 0; k < K; ++k) _mm512_storeu_ps(dgb + jt + 16 * k, acc[k]);
        };
        const std::int64_t vectors = d / 16;
        std::int64_t v = 0;
        for (; v + 16 <= vectors; v += 16) tile(16 * v, std::integral_constant<int, 16>{});
        if (v + 8 <= vectors) tile(16 * v, std::integral_constant<int, 8>{}), v += 8;
        if (v + 4 <= vectors) tile(16 * v, std::integral_constant<int, 4>{}), v += 4;
        if (v + 2 <= vectors) tile(16 * v, std::integral_constant<int, 2>{}), v += 2;
        if (v + 1 <= vectors) tile(16 * v, std::integral_constant<int, 1>{}), v += 1;
        j0 = 16 * vectors;
      }
#endif
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t row = row0 + i;
        const T* __restrict xr = px + row * d;
        const T* __restrict gr = pdy + row * d;
        T* __restrict dr = pdx + row * d;
        const T rs = pr[row];
        for (std::int64_t j = j0; j < d; ++j) {
          dr[j] = rs * pg[j] * gr[j] - c[i] * xr[j];
          dgb[j] += gr[j] * xr[j] * rs;
        }
      }
    };
    // Rows in groups of kGroup: the dot products of the group first (the
    // rows are independent, so their reductions overlap instead of each
    // row's update waiting for its own), then the updates while the group's
    // rows are still in L1 (4 rows of x, dy and dx: 12 KiB at d = 256, room
    // to spare in a 32 KiB L1d; 8 rows measured alike or a little slower
    // on Zen 4).
    //
    // Note [RMSNorm backward prefetch]
    // The group's first pass only reads (x, dy) and its second mostly
    // writes (dx), so the hardware prefetchers see the read streams pause
    // while the stores miss, and the stores' read-for-ownership starts only
    // when each store issues. The update therefore prefetches x and dy
    // kPrefetchAheadBytes ahead (the next group's rows at d = 256) and dx
    // for writing: median 62 % of memcpy -> 70 to 75 % on Zen 4 (the read
    // prefetch alone 66 %, the write prefetch alone 72 % with a wider
    // spread; Zen 4 section of docs/perf.md).
    static_assert(kRowBlock % kGroup == 0, "dg blocks hold whole groups");
    T coeff[kGroup];
    for (std::int64_t row0 = 0; row0 < rows; row0 += kGroup) {
      const std::int64_t n = std::min(kGroup, rows - row0);
      for (std::int64_t i = 0; i < n; ++i) coeff[i] = row_coeff(row0 + i);
      group_update(row0, n, coeff);
      const std::int64_t last = row0 + n - 1;
      if ((last + 1) % kRowBlock == 0 || last + 1 == rows) {
        for (std::int64_t j = 0; j < d; ++j) {
          dg_acc[j] += static_cast<double>(dg_block[j]);
          dg_block[j] = T(0);
        }
      }
    }
    for (std::int64_t j = 0; j < d; ++j) pdg[j] += static_cast<T>(dg_acc[j]);
  });
}

// ---- SwiGLU -----------------------------------------------------------------------

void swiglu(const Tensor& a, const Tensor& b, Tensor& out) {
  check_contiguous("swiglu", {&a, &b, &out});
  check_shape("swiglu", b, a.shape(), "b");
  check_shape("swiglu", out, a.shape(), "out");
  check_dtype("swiglu", b, a.dtype(), "b");
  check_dtype("swiglu", out, a.dtype(), "out");
  const std::int64_t n = a.numel();
  dispatch_float("swiglu", a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* __restrict pa = cdata<T>(a);
    const T* __restrict pb = cdata<T>(b);
    T* __restrict po = mdata<T>(out);
    std::int64_t i0 = 0;  // first element left to the generic loop
#if defined(MOTLEY_CPU_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      // One pass, sigmoid without a division (Note [Vector sigmoid]).
      for (; i0 < n; i0 += 16) {
        prefetch_ahead(pa + i0);  // Note [Streaming prefetch]
        prefetch_ahead(pb + i0);
        const __mmask16 k = lanes_left_mask(n - i0);
        const __m512 x = _mm512_maskz_loadu_ps(k, pa + i0), y = _mm512_maskz_loadu_ps(k, pb + i0);
        _mm512_mask_storeu_ps(po + i0, k, _mm512_mul_ps(_mm512_mul_ps(x, y), sigmoid_avx512(x)));
      }
    }
#elif defined(MOTLEY_CPU_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      for (; i0 + 8 <= n; i0 += 8) {
        prefetch_ahead(pa + i0);  // Note [Streaming prefetch]
        prefetch_ahead(pb + i0);
        const __m256 x = _mm256_loadu_ps(pa + i0), y = _mm256_loadu_ps(pb + i0);
        _mm256_storeu_ps(po + i0, _mm256_mul_ps(_mm256_mul_ps(x, y), sigmoid_avx2(x)));
      }
    }
#endif
    // silu(x) y = x y / (1 + e^-x): e^-x of a chunk into `out` (vectorised
    // exp), then the product in place while the chunk is in L1.
    for (; i0 < n; i0 += kChunk) {
      const std::int64_t c = std::min(kChunk, n - i0);
      exp_affine(pa + i0, T(-1), T(0), po + i0, c);
      for (std::int64_t j = 0; j < c; ++j) {
        po[i0 + j] = pa[i0 + j] * pb[i0 + j] / (T(1) + po[i0 + j]);
      }
    }
  });
}

void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dout, Tensor& da, Tensor& db) {
  check_contiguous("swiglu_backward", {&a, &b, &dout, &da, &db});
  for (const Tensor* t : std::initializer_list<const Tensor*>{&b, &dout, &da, &db}) {
    check_shape("swiglu_backward", *t, a.shape(), "argument");
    check_dtype("swiglu_backward", *t, a.dtype(), "argument");
  }
  const std::int64_t n = a.numel();
  dispatch_float("swiglu_backward", a.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* __restrict pa = cdata<T>(a);
    const T* __restrict pb = cdata<T>(b);
    const T* __restrict pg = cdata<T>(dout);
    T* __restrict pda = mdata<T>(da);
    T* __restrict pdb = mdata<T>(db);
    // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x).
    std::int64_t i0 = 0;  // first element left to the generic loop
#if defined(MOTLEY_CPU_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      // One pass, sigmoid without a division (Note [Vector sigmoid]).
      for (; i0 < n; i0 += 16) {
        const __mmask16 k = lanes_left_mask(n - i0);
        const __m512 x = _mm512_maskz_loadu_ps(k, pa + i0), y = _mm512_maskz_loadu_ps(k, pb + i0);
        const __m512 g = _mm512_maskz_loadu_ps(k, pg + i0);
        const __m512 s = sigmoid_avx512(x);
        const __m512 gs = _mm512_mul_ps(g, s);
        const __m512 gsy = _mm512_mul_ps(gs, y);
        _mm512_mask_storeu_ps(pdb + i0, k, _mm512_mul_ps(gs, x));
        // g y s (1 + x (1 - s)) = gsy + gsy (x - x s)
        _mm512_mask_storeu_ps(pda + i0, k,
                              _mm512_fmadd_ps(gsy, _mm512_fnmadd_ps(x, s, x), gsy));
      }
    }
#elif defined(MOTLEY_CPU_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      for (; i0 + 8 <= n; i0 += 8) {
        const __m256 x = _mm256_loadu_ps(pa + i0), y = _mm256_loadu_ps(pb + i0);
        const __m256 s = sigmoid_avx2(x);
        const __m256 gs = _mm256_mul_ps(_mm256_loadu_ps(pg + i0), s);
        const __m256 gsy = _mm256_mul_ps(gs, y);
        _mm256_storeu_ps(pdb + i0, _mm256_mul_ps(gs, x));
        _mm256_storeu_ps(pda + i0, _mm256_fmadd_ps(gsy, _mm256_fnmadd_ps(x, s, x), gsy));
      }
    }
#endif
    // The generic path: the sigmoid of a chunk first (vectorised exp), then
    // both gradients in one pass.
    T s[kChunk];
    for (; i0 < n; i0 += kChunk) {
      const std::int64_t c = std::min(kChunk, n - i0);
      exp_affine(pa + i0, T(-1), T(0), s, c);
      for (std::int64_t j = 0; j < c; ++j) s[j] = T(1) / (T(1) + s[j]);
      for (std::int64_t j = 0; j < c; ++j) {
        const T x = pa[i0 + j], g = pg[i0 + j];
        pdb[i0 + j] = g * x * s[j];
        pda[i0 + j] = g * pb[i0 + j] * s[j] * (T(1) + x * (T(1) - s[j]));
      }
    }
  });
}

// ---- RoPE ---------------------------------------------------------------------------

// Note [RoPE head groups]
// Every (batch, head) rotates its (T, hd) block by the same (T, hd/2) cos
// and sin tables. At T = 256 and hd = 64 the two tables take 64 KiB, more
// than a 32 KiB L1d (Zen 4), so a loop over one head at a time streams them
// from L2 once per head: one table load per element besides x, which held
// RoPE to 51 to 63 % of memcpy there. Heads go four at a time instead: each
// table row is loaded once into registers for the four, and the loop keeps
// eight sequential streams (x and y of each head). Measured alternately on
// Zen 4 (`motley bench-kernels --sections elementwise --reps 31`, four
// runs): two heads 55 to 65 %, four 68 to 86 %, eight 70 to 75 %.
constexpr std::int64_t kRopeHeads = 4;

void rope(const Tensor& x, double theta, std::int64_t pos_offset, bool inverse, Tensor& y) {
  check_contiguous("rope", {&x, &y});
  MOTLEY_CHECK_KIND(kShape, x.dim() == 4 && x.size(3) % 2 == 0, "cpu rope: x ", x.str(),
                    " must be (B, H, T, hd) with hd even");
  check_shape("rope", y, x.shape(), "y");
  check_dtype("rope", y, x.dtype(), "y");
  const std::int64_t bh = x.size(0) * x.size(1), t_len = x.size(2), hd = x.size(3);
  const std::int64_t half = hd / 2;
  dispatch_float("rope", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    // One (T, hd/2) table of cos and sin (angles in double) shared by every
    // (batch, head). Building it costs T * hd/2 cos+sin pairs, as much as
    // rotating a small x, so the last table is kept per thread: q and k of
    // every layer, forward and backward, use the same positions.
    const RopeTable<T>& table = rope_table<T>(theta, hd, pos_offset, t_len);
    const std::vector<T>& cos_t = table.cos;  // (T, hd/2)
    const std::vector<T>& sin_t = table.sin;  // (T, hd/2)
    const T* px = cdata<T>(x);
    T* py = mdata<T>(y);
    // The inverse rotation is the rotation by -angle: sin negated (two
    // loops rather than a multiply by the sign in the inner loop).
    //
    // Heads go kRopeHeads at a time (Note [RoPE head groups]).
    const std::int64_t head_stride = t_len * hd;  // from one head's block to the next
    auto rotate = [&](auto inverse_tag) {
      constexpr bool kInverse = decltype(inverse_tag)::value;
      for (std::int64_t h0 = 0; h0 < bh; h0 += kRopeHeads) {
        const std::int64_t heads = std::min<std::int64_t>(kRopeHeads, bh - h0);
        for (std::int64_t t = 0; t < t_len; ++t) {
          const T* __restrict c = cos_t.data() + t * half;
          const T* __restrict s = sin_t.data() + t * half;
          const T* __restrict x0r = px + (h0 * t_len + t) * hd;
          T* __restrict y0r = py + (h0 * t_len + t) * hd;
          std::int64_t i = 0;
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<T, float>) {
            for (; i + 16 <= half; i += 16) {
              const __m512 ci = _mm512_loadu_ps(c + i), si = _mm512_loadu_ps(s + i);
              for (std::int64_t g = 0; g < heads; ++g) {
                const T* xr = x0r + g * head_stride;
                T* yr = y0r + g * head_stride;
                const __m512 x0 = _mm512_loadu_ps(xr + i), x1 = _mm512_loadu_ps(xr + i + half);
                if constexpr (kInverse) {
                  _mm512_storeu_ps(yr + i, _mm512_fmadd_ps(x1, si, _mm512_mul_ps(x0, ci)));
                  _mm512_storeu_ps(yr + i + half,
                                   _mm512_fnmadd_ps(x0, si, _mm512_mul_ps(x1, ci)));
                } else {
                  _mm512_storeu_ps(yr + i, _mm512_fnmadd_ps(x1, si, _mm512_mul_ps(x0, ci)));
                  _mm512_storeu_ps(yr + i + half,
                                   _mm512_fmadd_ps(x0, si, _mm512_mul_ps(x1, ci)));
                }
              }
            }
          }
#endif
          for (std::int64_t g = 0; g < heads; ++g) {
            const T* xr = x0r + g * head_stride;
            T* yr = y0r + g * head_stride;
            for (std::int64_t j = i; j < half; ++j) {
              const T x0 = xr[j], x1 = xr[j + half];
              if constexpr (kInverse) {
                yr[j] = x0 * c[j] + x1 * s[j];
                yr[j + half] = x1 * c[j] - x0 * s[j];
              } else {
                yr[j] = x0 * c[j] - x1 * s[j];
                yr[j + half] = x1 * c[j] + x0 * s[j];
              }
            }
          }
        }
      }
    };
    if (inverse) {
      rotate(std::true_type{});
    } else {
      rotate(std::false_type{});
    }
  });
}

// ---- row gather / scatter ---------------------------------------------------------------

void index_select_rows(const Tensor& src, const Tensor& index, Tensor& out) {
  check_contiguous("index_select_rows", {&src, &index, &out});
  MOTLEY_CHECK_KIND(kShape, src.dim() >= 1, "cpu index_select_rows: src ", src.str(),
                    " must have rows");
  const std::int64_t rows = src.size(0);
  const std::int64_t n = index.numel();
  const std::int64_t d = rows == 0 ? 0 : src.numel() / rows;
  MOTLEY_CHECK_KIND(kShape, out.numel() == n * d && out.dtype() == src.dtype(),
                    "cpu index_select_rows: output ", out.str(), " for ", n, " rows of ",
                    src.str());
  const std::size_t row_bytes = d * dtype_size(src.dtype());
  const char* ps = static_cast<const char*>(src.raw_data());
  char* po = static_cast<char*>(out.raw_data());
  dispatch_index("index_select_rows", index.dtype(), [&](auto itag) {
    using I = decltype(itag);
    const I* pi = cdata<I>(index);
    // Rows are gathered in index order; the source row kAhead positions on
    // is prefetched (up to 4 KiB of it), since a gather defeats the
    // hardware prefetcher.
    constexpr std::int64_t kAhead = 4;
    const std::size_t prefetch_bytes = std::min<std::size_t>(row_bytes, 4096);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t r = static_cast<std::int64_t>(pi[i]);
      MOTLEY_CHECK_KIND(kShape, r >= 0 && r < rows, "index_select_rows: index ", r, " at position ",
                        i, " outside [0, ", rows, ")");
      if (i + kAhead < n) {
        const std::int64_t ahead = static_cast<std::int64_t>(pi[i + kAhead]);
        if (ahead >= 0 && ahead < rows) {
          for (std::size_t b = 0; b < prefetch_bytes; b += 64) {
            __builtin_prefetch(ps + ahead * row_bytes + b);
          }
        }
      }
      if (row_bytes) std::memcpy(po + i * row_bytes, ps + r * row_bytes, row_bytes);
    }
  });
}

void index_add_rows(const Tensor& src, const Tensor& index, const Tensor& scale, Tensor& out) {
  check_contiguous("index_add_rows", {&src, &index, &out});
  if (scale.defined()) check_contiguous("index_add_rows", {&scale});
  MOTLEY_CHECK_KIND(kShape, out.dim() >= 1, "cpu index_add_rows: out ", out.str(),
                    " must have rows");
  const std::int64_t rows = out.size(0);
  const std::int64_t n = index.numel();
  const std::int64_t d = rows == 0 ? 0 : out.numel() / rows;
  MOTLEY_CHECK_KIND(kShape, src.numel() == n * d, "cpu index_add_rows: src ", src.str(), " for ", n,
                    " indices into ", out.str());
  check_dtype("index_add_rows", src, out.dtype(), "src");
  if (scale.defined()) {
    MOTLEY_CHECK_KIND(kShape, scale.numel() == n, "cpu index_add_rows: scale ", scale.str(),
                      " for ", n, " indices");
    check_dtype("index_add_rows", scale, out.dtype(), "scale");
  }
  dispatch_float("index_add_rows", out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_index("index_add_rows", index.dtype(), [&](auto itag) {
      using I = decltype(itag);
      const I* pi = cdata<I>(index);
      // Validate first so that a bad index leaves `out` untouched.
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t r = static_cast<std::int64_t>(pi[i]);
        MOTLEY_CHECK_KIND(kShape, r >= 0 && r < rows, "index_add_rows: index ", r, " at position ",
                          i, " outside [0, ", rows, ")");
      }
      const T* ps = cdata<T>(src);
      const T* pscale = scale.defined() ? cdata<T>(scale) : nullptr;
      T* po = mdata<T>(out);
      for (std::int64_t i = 0; i < n; ++i) {  // in order of i: deterministic
        T* orow = po + static_cast<std::int64_t>(pi[i]) * d;
        const T* srow = ps + i * d;
        if (pscale) {
          const T s = pscale[i];
          for (std::int64_t j = 0; j < d; ++j) orow[j] += s * srow[j];
        } else {
          for (std::int64_t j = 0; j < d; ++j) orow[j] += srow[j];
        }
      }
    });
  });
}

// ---- top-k and sort ------------------------------------------------------------------------

void topk(const Tensor& x, std::int64_t k, Tensor& values, Tensor& indices) {
  check_contiguous("topk", {&x, &values, &indices});
  const std::int64_t n = last_dim(x), rows = row_count(x);
  MOTLEY_CHECK_KIND(kShape, k >= 0 && k <= n, "topk: k = ", k, " for rows of ", n, " elements in ",
                    x.str());
  MOTLEY_CHECK_KIND(kShape, values.numel() == rows * k && indices.numel() == rows * k,
                    "cpu topk: outputs ", values.str(), " and ", indices.str(), " for k = ", k,
                    " of ", x.str());
  check_dtype("topk", values, x.dtype(), "values");
  check_dtype("topk", indices, DType::kI64, "indices");
  dispatch_arith("topk", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = cdata<T>(x);
    T* pv = mdata<T>(values);
    std::int64_t* pi = mdata<std::int64_t>(indices);
    std::vector<std::int64_t> order(n);
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = px + r * n;
      // Strict total order: larger value first, then lower index.
      auto before = [xr](std::int64_t i, std::int64_t j) {
        if (greater_nan_first(xr[i], xr[j])) return true;
        if (greater_nan_first(xr[j], xr[i])) return false;
        return i < j;
      };
      std::iota(order.begin(), order.end(), std::int64_t{0});
      std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
      for (std::int64_t j = 0; j < k; ++j) {
        pi[r * k + j] = order[j];
        pv[r * k + j] = xr[order[j]];
      }
    }
  });
}

void sort_desc(const Tensor& x, Tensor& values, Tensor& indices) {
  check_contiguous("sort_desc", {&x, &values, &indices});
  check_shape("sort_desc", values, x.shape(), "values");
  check_shape("sort_desc", indices, x.shape(), "indices");
  check_dtype("sort_desc", values, x.dtype(), "values");
  check_dtype("sort_desc", indices, DType::kI64, "indices");
  const std::int64_t n = last_dim(x), rows = row_count(x);
  dispatch_arith("sort_desc", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = cdata<T>(x);
    T* pv = mdata<T>(values);
    std::int64_t* pi = mdata<std::int64_t>(indices);
    std::vector<std::int64_t> order(n);
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = px + r * n;
      std::iota(order.begin(), order.end(), std::int64_t{0});
      std::stable_sort(order.begin(), order.end(), [xr](std::int64_t i, std::int64_t j) {
        return greater_nan_first(xr[i], xr[j]);
      });
      for (std::int64_t j = 0; j < n; ++j) {
        pi[r * n + j] = order[j];
        pv[r * n + j] = xr[order[j]];
      }
    }
  });
}

// ---- AdamW ------------------------------------------------------------------------------------

void adamw(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq, double lr,
           double beta1, double beta2, double eps, double weight_decay, std::int64_t step) {
  check_contiguous("adamw", {&param, &grad, &exp_avg, &exp_avg_sq});
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grad, &exp_avg, &exp_avg_sq}) {
    check_shape("adamw", *t, param.shape(), "argument");
    check_dtype("adamw", *t, param.dtype(), "argument");
  }
  MOTLEY_CHECK_KIND(kShape, step >= 1, "adamw: step must count from 1, got ", step);
  const std::int64_t n = param.numel();
  dispatch_float("adamw", param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    // torch.optim.AdamW (_single_tensor_adamw, non-capturable):
    //   param.mul_(1 - lr * wd)
    //   exp_avg.lerp_(grad, 1 - beta1)
    //   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    //   denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)
    //   param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    // Scalars in double as in Python, elementwise in T.
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    const T decay = static_cast<T>(1.0 - lr * weight_decay);
    const T w1 = static_cast<T>(1.0 - beta1);
    const T b2 = static_cast<T>(beta2);
    const T w2 = static_cast<T>(1.0 - beta2);
    const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
    const T e = static_cast<T>(eps);
    const T step_size = static_cast<T>(lr / bc1);
    T* __restrict p = mdata<T>(param);
    const T* __restrict g = cdata<T>(grad);
    T* __restrict m = mdata<T>(exp_avg);
    T* __restrict v = mdata<T>(exp_avg_sq);
    // Chunks: moments in one pass, the square root through Eigen (std::sqrt
    // keeps errno semantics and does not vectorise), then the update.
    T denom[kChunk];
    for (std::int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const std::int64_t c = std::min(kChunk, n - i0);
      for (std::int64_t j = 0; j < c; ++j) {
        const T gi = g[i0 + j];
        m[i0 + j] = m[i0 + j] + w1 * (gi - m[i0 + j]);  // lerp with weight < 0.5
        v[i0 + j] = v[i0 + j] * b2 + w2 * gi * gi;
      }
      ArrayMap<T>(denom, c) = ConstArrayMap<T>(v + i0, c).sqrt() / bc2_sqrt + e;
      for (std::int64_t j = 0; j < c; ++j) {
        p[i0 + j] = p[i0 + j] * decay - step_size * (m[i0 + j] / denom[j]);
      }
    }
  });
}

}  // namespace motley::cpu
