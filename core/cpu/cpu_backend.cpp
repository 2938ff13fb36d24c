// The CPU backend: memory, layout, elementwise, reductions and GEMM here;
// the fused model kernels in kernels_fused.cpp and kernels_attention.cpp.
//
// Threading: every kernel here runs on the calling thread. motley runs
// several MPI ranks per node and the target machines have few cores per
// rank, so the only threads are OpenBLAS's (its own pool, sized by
// OPENBLAS_NUM_THREADS or `motley bench-kernels --threads`).
//
// Note [BLAS threads]
// OpenBLAS starts one GEMM thread per hardware thread by default, and its
// idle threads spin and sched_yield. With several ranks on a node that is
// ranks x cores threads on cores cores: measured on 2 cores with other
// processes running, a bench-config training step took 15.9 s with the
// default 2 threads against 2.1 s with 1 (perf: 20 % of cycles in
// sched_yield). So under an MPI launcher each rank gets
// max(1, cores / ranks on the node) BLAS threads unless
// OPENBLAS_NUM_THREADS or OMP_NUM_THREADS says otherwise
// (parallel/launcher.cpp); a single process keeps OpenBLAS's default.
#include "core/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "core/cpu/cpu_common.h"
#include "core/cpu/cpu_kernels.h"
#include "core/cpu/host_allocator.h"

namespace motley {

int blas_threads() { return openblas_get_num_threads(); }

void set_blas_threads(int n) {
  MOTLEY_CHECK_KIND(kUsage, n >= 1, "BLAS threads must be >= 1, got ", n);
  openblas_set_num_threads(n);
}

int default_blas_threads(int ranks_per_node) {
  for (const char* var : {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && *v != '\0') return 0;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return std::max(1, static_cast<int>(hw == 0 ? 1 : hw) / std::max(1, ranks_per_node));
}

namespace {

using cpu::cdata;
using cpu::mdata;

// Elementwise map of one input to the (contiguous or strided) output.
template <typename T, typename F>
void map1(const Tensor& a, Tensor& out, F f) {
  const T* pa = cdata<T>(a);
  T* po = mdata<T>(out);
  cpu::strided_loop<2>(out.shape(), {&a.strides(), &out.strides()},
                       [&](const auto& off, std::int64_t n, const auto& s) {
                         const T* x = pa + off[0];
                         T* z = po + off[1];
                         if (s[0] == 1 && s[1] == 1) {
                           for (std::int64_t i = 0; i < n; ++i) z[i] = f(x[i]);
                         } else {
                           for (std::int64_t i = 0; i < n; ++i) z[i * s[1]] = f(x[i * s[0]]);
                         }
                       });
}

// Elementwise map of two inputs. The fast paths cover the layouts that
// broadcasting produces: both contiguous runs, or one side constant along
// the run (stride 0).
template <typename T, typename F>
void map2(const Tensor& a, const Tensor& b, Tensor& out, F f) {
  const T* pa = cdata<T>(a);
  const T* pb = cdata<T>(b);
  T* po = mdata<T>(out);
  cpu::strided_loop<3>(
      out.shape(), {&a.strides(), &b.strides(), &out.strides()},
      [&](const auto& off, std::int64_t n, const auto& s) {
        const T* x = pa + off[0];
        const T* y = pb + off[1];
        T* z = po + off[2];
        if (s[2] == 1 && s[0] == 1 && s[1] == 1) {
          for (std::int64_t i = 0; i < n; ++i) z[i] = f(x[i], y[i]);
        } else if (s[2] == 1 && s[0] == 1 && s[1] == 0) {
          const T yv = *y;
          for (std::int64_t i = 0; i < n; ++i) z[i] = f(x[i], yv);
        } else if (s[2] == 1 && s[0] == 0 && s[1] == 1) {
          const T xv = *x;
          for (std::int64_t i = 0; i < n; ++i) z[i] = f(xv, y[i]);
        } else {
          for (std::int64_t i = 0; i < n; ++i) z[i * s[2]] = f(x[i * s[0]], y[i * s[1]]);
        }
      });
}

void check_same_shape(const char* kernel, const Tensor& a, const Tensor& out) {
  MOTLEY_CHECK_KIND(kShape, a.shape() == out.shape(), "cpu ", kernel, ": input ", a.str(),
                    " does not match output ", out.str());
}

void check_same_dtype(const char* kernel, const Tensor& a, const Tensor& out) {
  MOTLEY_CHECK_KIND(kShape, a.dtype() == out.dtype(), "cpu ", kernel, ": dtype of ",
                    a.str(), " differs from ", out.str());
}

// exp, sigmoid and silu of contiguous tensors through the vectorised exp
// (the strided loop calls libm's exp per element). False when not handled.
template <typename T>
bool unary_exp_contiguous(UnaryOp op, const Tensor& a, Tensor& out) {
  if (!a.is_contiguous() || !out.is_contiguous()) return false;
  const std::int64_t n = out.numel();
  const T* x = cdata<T>(a);
  T* y = mdata<T>(out);  // may alias x (elementwise, same index)
  switch (op) {
    case UnaryOp::kExp:
      cpu::exp_affine(x, T(1), T(0), y, n);
      return true;
    case UnaryOp::kSigmoid:
    case UnaryOp::kSilu: {
      const bool silu = op == UnaryOp::kSilu;
      std::int64_t i0 = 0;  // first element left to the generic loop
#if defined(MOTLEY_CPU_AVX512)
      if constexpr (std::is_same_v<T, float>) {  // Note [Vector sigmoid]
        for (; i0 < n; i0 += 16) {
          const __mmask16 k = cpu::lanes_left_mask(n - i0);
          const __m512 v = _mm512_maskz_loadu_ps(k, x + i0);
          const __m512 s = cpu::sigmoid_avx512(v);
          _mm512_mask_storeu_ps(y + i0, k, silu ? _mm512_mul_ps(v, s) : s);
        }
      }
#elif defined(MOTLEY_CPU_AVX2)
      if constexpr (std::is_same_v<T, float>) {
        for (; i0 + 8 <= n; i0 += 8) {
          const __m256 v = _mm256_loadu_ps(x + i0);
          const __m256 s = cpu::sigmoid_avx2(v);
          _mm256_storeu_ps(y + i0, silu ? _mm256_mul_ps(v, s) : s);
        }
      }
#endif
      for (; i0 < n; i0 += cpu::kChunk) {
        const std::int64_t c = std::min(cpu::kChunk, n - i0);
        T e[cpu::kChunk];  // e^-x of the chunk
        cpu::exp_affine(x + i0, T(-1), T(0), e, c);
        if (op == UnaryOp::kSigmoid) {
          for (std::int64_t j = 0; j < c; ++j) y[i0 + j] = T(1) / (T(1) + e[j]);
        } else {
          for (std::int64_t j = 0; j < c; ++j) y[i0 + j] = x[i0 + j] / (T(1) + e[j]);
        }
      }
      return true;
    }
    default:
      return false;
  }
}

template <typename T>
T softplus_t(T x) {
  // log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow for large x.
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-ax));
}

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }
  const char* name() const override { return "cpu"; }

  // ---- memory ---------------------------------------------------------------
  // 64-byte aligned blocks (a cache line, enough for any vector load);
  // freed memory stays mapped for reuse (core/cpu/host_allocator.h).
  void* allocate(std::size_t nbytes) override { return allocator_.allocate(nbytes); }
  void deallocate(void* ptr, std::size_t nbytes) override { allocator_.release(ptr, nbytes); }
  std::size_t bytes_in_use() const override { return allocator_.bytes_in_use(); }
  MemoryStats memory_stats() const override { return allocator_.stats(); }
  void empty_cache() override { allocator_.empty_cache(); }
  void copy_from_host(void* dst, const void* src, std::size_t nbytes) override {
    if (nbytes) std::memcpy(dst, src, nbytes);
  }
  void copy_to_host(void* dst, const void* src, std::size_t nbytes) override {
    if (nbytes) std::memcpy(dst, src, nbytes);
  }
  void copy_device(void* dst, const void* src, std::size_t nbytes) override {
    if (nbytes) std::memmove(dst, src, nbytes);
  }
  void synchronize() override {}

  // ---- layout and casts -------------------------------------------------------
  void fill(Tensor& out, double value) override {
    cpu::dispatch_all(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T v = cpu::cast_value<T>(value);
      T* po = mdata<T>(out);
      cpu::strided_loop<1>(out.shape(), {&out.strides()},
                           [&](const auto& off, std::int64_t n, const auto& s) {
                             T* z = po + off[0];
                             for (std::int64_t i = 0; i < n; ++i) z[i * s[0]] = v;
                           });
    });
  }

  void copy(const Tensor& src, Tensor& dst) override {
    check_same_shape("copy", src, dst);
    if (dst.numel() == 0) return;
    if (src.dtype() == dst.dtype() && src.is_contiguous() && dst.is_contiguous()) {
      std::memmove(dst.raw_data(), src.raw_data(), dst.nbytes());
      return;
    }
    cpu::dispatch_all(src.dtype(), [&](auto stag) {
      using S = decltype(stag);
      cpu::dispatch_all(dst.dtype(), [&](auto dtag) {
        using D = decltype(dtag);
        const S* ps = cdata<S>(src);
        D* pd = mdata<D>(dst);
        cpu::strided_loop<2>(dst.shape(), {&src.strides(), &dst.strides()},
                             [&](const auto& off, std::int64_t n, const auto& s) {
                               const S* x = ps + off[0];
                               D* z = pd + off[1];
                               if (s[0] == 1 && s[1] == 1) {
                                 for (std::int64_t i = 0; i < n; ++i) {
                                   z[i] = cpu::cast_value<D>(x[i]);
                                 }
                               } else {
                                 for (std::int64_t i = 0; i < n; ++i) {
                                   z[i * s[1]] = cpu::cast_value<D>(x[i * s[0]]);
                                 }
                               }
                             });
      });
    });
  }

  // ---- elementwise --------------------------------------------------------------
  void unary(UnaryOp op, const Tensor& a, Tensor& out, double alpha) override {
    check_same_shape("unary", a, out);
    check_same_dtype("unary", a, out);
    cpu::dispatch_float("unary", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      if (unary_exp_contiguous<T>(op, a, out)) return;
      const T al = static_cast<T>(alpha);
      switch (op) {
        case UnaryOp::kNeg: return map1<T>(a, out, [](T x) { return -x; });
        case UnaryOp::kExp: return map1<T>(a, out, [](T x) { return std::exp(x); });
        case UnaryOp::kLog: return map1<T>(a, out, [](T x) { return std::log(x); });
        case UnaryOp::kSqrt: return map1<T>(a, out, [](T x) { return std::sqrt(x); });
        case UnaryOp::kRsqrt:
          return map1<T>(a, out, [](T x) { return T(1) / std::sqrt(x); });
        case UnaryOp::kSquare: return map1<T>(a, out, [](T x) { return x * x; });
        case UnaryOp::kAbs: return map1<T>(a, out, [](T x) { return std::abs(x); });
        case UnaryOp::kSilu:
          return map1<T>(a, out, [](T x) { return x * cpu::sigmoid_t<T>(x); });
        case UnaryOp::kSigmoid:
          return map1<T>(a, out, [](T x) { return cpu::sigmoid_t<T>(x); });
        case UnaryOp::kTanh: return map1<T>(a, out, [](T x) { return std::tanh(x); });
        case UnaryOp::kSoftplus: return map1<T>(a, out, [](T x) { return softplus_t<T>(x); });
        case UnaryOp::kRelu:
          return map1<T>(a, out, [](T x) { return x > T(0) ? x : T(0); });
        case UnaryOp::kScale: return map1<T>(a, out, [al](T x) { return al * x; });
        case UnaryOp::kAddScalar: return map1<T>(a, out, [al](T x) { return x + al; });
        case UnaryOp::kPowScalar:
          if (alpha == 2.0) return map1<T>(a, out, [](T x) { return x * x; });
          return map1<T>(a, out, [al](T x) { return std::pow(x, al); });
        case UnaryOp::kReciprocal: return map1<T>(a, out, [](T x) { return T(1) / x; });
      }
      MOTLEY_FAIL(kInternal, "cpu unary: unknown op ", static_cast<int>(op));
    });
  }

  void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) override {
    check_same_shape("binary", a, out);
    check_same_shape("binary", b, out);
    check_same_dtype("binary", a, out);
    check_same_dtype("binary", b, out);
    cpu::dispatch_arith("binary", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      switch (op) {
        case BinaryOp::kAdd: return map2<T>(a, b, out, [](T x, T y) { return x + y; });
        case BinaryOp::kSub: return map2<T>(a, b, out, [](T x, T y) { return x - y; });
        case BinaryOp::kMul: return map2<T>(a, b, out, [](T x, T y) { return x * y; });
        case BinaryOp::kDiv: return map2<T>(a, b, out, [](T x, T y) { return x / y; });
        case BinaryOp::kMax:
          return map2<T>(a, b, out, [](T x, T y) { return x > y ? x : y; });
        case BinaryOp::kMin:
          return map2<T>(a, b, out, [](T x, T y) { return x < y ? x : y; });
        case BinaryOp::kEq:
          return map2<T>(a, b, out, [](T x, T y) { return x == y ? T(1) : T(0); });
        case BinaryOp::kSiluBackward:
          if constexpr (std::is_floating_point_v<T>) {
            // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x).
            return map2<T>(a, b, out, [](T x, T dy) {
              const T s = cpu::sigmoid_t<T>(x);
              return dy * s * (T(1) + x * (T(1) - s));
            });
          } else {
            MOTLEY_FAIL(kShape, "cpu binary: silu_backward of integer tensors");
          }
      }
      MOTLEY_FAIL(kInternal, "cpu binary: unknown op ", static_cast<int>(op));
    });
  }

  void axpby(double alpha, const Tensor& a, double beta, const Tensor& b,
             Tensor& out) override {
    check_same_shape("axpby", a, out);
    check_same_shape("axpby", b, out);
    check_same_dtype("axpby", a, out);
    check_same_dtype("axpby", b, out);
    cpu::dispatch_float("axpby", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T al = static_cast<T>(alpha), be = static_cast<T>(beta);
      map2<T>(a, b, out, [al, be](T x, T y) { return al * x + be * y; });
    });
  }

  void where(const Tensor& mask, const Tensor& a, const Tensor& b, Tensor& out) override {
    check_same_shape("where", mask, out);
    check_same_shape("where", a, out);
    check_same_shape("where", b, out);
    check_same_dtype("where", a, out);
    check_same_dtype("where", b, out);
    cpu::dispatch_all(mask.dtype(), [&](auto mtag) {
      using M = decltype(mtag);
      cpu::dispatch_all(out.dtype(), [&](auto tag) {
        using T = decltype(tag);
        const M* pm = cdata<M>(mask);
        const T* pa = cdata<T>(a);
        const T* pb = cdata<T>(b);
        T* po = mdata<T>(out);
        cpu::strided_loop<4>(
            out.shape(), {&mask.strides(), &a.strides(), &b.strides(), &out.strides()},
            [&](const auto& off, std::int64_t n, const auto& s) {
              for (std::int64_t i = 0; i < n; ++i) {
                po[off[3] + i * s[3]] = cpu::is_nonzero(pm[off[0] + i * s[0]])
                                            ? pa[off[1] + i * s[1]]
                                            : pb[off[2] + i * s[2]];
              }
            });
      });
    });
  }

  // ---- reductions -------------------------------------------------------------------
  void reduce(ReduceOp op, const Tensor& a, std::int64_t outer, std::int64_t n,
              std::int64_t inner, Tensor& out) override {
    cpu::require_contiguous("reduce", a, "input");
    cpu::require_contiguous("reduce", out, "output");
    MOTLEY_CHECK_KIND(kShape, outer * n * inner == a.numel() && outer * inner == out.numel(),
                      "cpu reduce: (", outer, ", ", n, ", ", inner, ") does not fit input ",
                      a.str(), " and output ", out.str());
    check_same_dtype("reduce", a, out);
    MOTLEY_CHECK_KIND(kShape, n > 0 || op == ReduceOp::kSum || op == ReduceOp::kSumSquares,
                      "cpu reduce: max/min over an empty dimension of ", a.str());
    cpu::dispatch_arith("reduce", a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      // Accumulator: double for floating sums, int64 for integer ones.
      using Acc = std::conditional_t<std::is_floating_point_v<T>, double, std::int64_t>;
      const T* x = cdata<T>(a);
      T* y = mdata<T>(out);
      std::vector<Acc> acc(inner);
      for (std::int64_t o = 0; o < outer; ++o) {
        const T* xo = x + o * n * inner;
        T* yo = y + o * inner;
        if (op == ReduceOp::kMax || op == ReduceOp::kMin) {
          const bool is_max = op == ReduceOp::kMax;
          for (std::int64_t i = 0; i < inner; ++i) yo[i] = xo[i];
          for (std::int64_t j = 1; j < n; ++j) {
            const T* row = xo + j * inner;
            if (is_max) {
              for (std::int64_t i = 0; i < inner; ++i) yo[i] = row[i] > yo[i] ? row[i] : yo[i];
            } else {
              for (std::int64_t i = 0; i < inner; ++i) yo[i] = row[i] < yo[i] ? row[i] : yo[i];
            }
          }
          continue;
        }
        const bool squares = op == ReduceOp::kSumSquares;
        if (inner == 1) {
          if constexpr (std::is_floating_point_v<T>) {
            yo[0] = static_cast<T>(cpu::sum_row_f64(xo, n, squares));
          } else {
            Acc s = 0;
            for (std::int64_t j = 0; j < n; ++j) s += squares ? Acc(xo[j]) * xo[j] : Acc(xo[j]);
            yo[0] = static_cast<T>(s);
          }
          continue;
        }
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (std::int64_t j = 0; j < n; ++j) {
          const T* row = xo + j * inner;
          if (squares) {
            for (std::int64_t i = 0; i < inner; ++i) acc[i] += Acc(row[i]) * Acc(row[i]);
          } else {
            for (std::int64_t i = 0; i < inner; ++i) acc[i] += Acc(row[i]);
          }
        }
        for (std::int64_t i = 0; i < inner; ++i) yo[i] = static_cast<T>(acc[i]);
      }
    });
  }

  void argmax(const Tensor& a, Tensor& out) override {
    cpu::require_contiguous("argmax", a, "input");
    MOTLEY_CHECK_KIND(kShape, out.dtype() == DType::kI64, "cpu argmax: output ", out.str(),
                      " must be i64");
    const std::int64_t n = cpu::last_dim(a);
    const std::int64_t rows = cpu::row_count(a);
    MOTLEY_CHECK_KIND(kShape, n > 0 && out.numel() == rows, "cpu argmax: output ",
                      out.str(), " for input ", a.str());
    cpu::dispatch_arith("argmax", a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* x = cdata<T>(a);
      std::int64_t* y = mdata<std::int64_t>(out);
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * n;
        std::int64_t best = 0;
        for (std::int64_t j = 1; j < n; ++j) {
          if (row[j] > row[best]) best = j;  // first maximum wins
        }
        y[r] = best;
      }
    });
  }

  void cumsum(const Tensor& a, Tensor& out) override {
    cpu::require_contiguous("cumsum", a, "input");
    check_same_shape("cumsum", a, out);
    check_same_dtype("cumsum", a, out);
    const std::int64_t n = cpu::last_dim(a);
    const std::int64_t rows = cpu::row_count(a);
    cpu::dispatch_arith("cumsum", a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      using Acc = std::conditional_t<std::is_floating_point_v<T>, double, std::int64_t>;
      const T* x = cdata<T>(a);
      T* y = mdata<T>(out);
      for (std::int64_t r = 0; r < rows; ++r) {
        Acc s = 0;
        for (std::int64_t j = 0; j < n; ++j) {
          s += static_cast<Acc>(x[r * n + j]);
          y[r * n + j] = static_cast<T>(s);
        }
      }
    });
  }

  bool all_finite(const Tensor& a) override {
    bool finite = true;
    cpu::dispatch_all(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        // x * 0 is 0 for finite x and NaN for inf/NaN: a branch-free,
        // vectorisable test.
        const T* px = cdata<T>(a);
        T acc = 0;
        cpu::strided_loop<1>(a.shape(), {&a.strides()},
                             [&](const auto& off, std::int64_t n, const auto& s) {
                               const T* x = px + off[0];
                               T local = 0;
                               for (std::int64_t i = 0; i < n; ++i) local += x[i * s[0]] * T(0);
                               acc += local;
                             });
        finite = acc == T(0);
      } else if constexpr (std::is_same_v<T, BFloat16>) {
        const BFloat16* px = cdata<BFloat16>(a);
        cpu::strided_loop<1>(a.shape(), {&a.strides()},
                             [&](const auto& off, std::int64_t n, const auto& s) {
                               for (std::int64_t i = 0; i < n; ++i) {
                                 if ((px[off[0] + i * s[0]].bits & 0x7f80u) == 0x7f80u) {
                                   finite = false;
                                 }
                               }
                             });
      }
    });
    return finite;
  }

  // ---- matrix products -----------------------------------------------------------------
  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
            double alpha, const Tensor& a, std::int64_t lda, const Tensor& b,
            std::int64_t ldb, double beta, Tensor& c, std::int64_t ldc) override {
    gemm_strided_batched(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c,
                         ldc, 0, 1);
  }

  // A loop of cblas calls: for the batched shapes motley uses (per-head
  // products are done inside the fused attention kernel) each matrix is
  // large enough for OpenBLAS to run near peak on its own.
  void gemm_strided_batched(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                            std::int64_t k, double alpha, const Tensor& a,
                            std::int64_t lda, std::int64_t stride_a, const Tensor& b,
                            std::int64_t ldb, std::int64_t stride_b, double beta, Tensor& c,
                            std::int64_t ldc, std::int64_t stride_c,
                            std::int64_t batch) override {
    check_same_dtype("gemm", a, c);
    check_same_dtype("gemm", b, c);
    MOTLEY_CHECK_KIND(kShape, m >= 0 && n >= 0 && k >= 0 && batch >= 0,
                      "cpu gemm: negative size m=", m, " n=", n, " k=", k, " batch=", batch);
    MOTLEY_CHECK_KIND(kShape,
                      lda >= std::max<std::int64_t>(1, trans_a ? m : k) &&
                          ldb >= std::max<std::int64_t>(1, trans_b ? k : n) &&
                          ldc >= std::max<std::int64_t>(1, n),
                      "cpu gemm: leading dimensions lda=", lda, " ldb=", ldb, " ldc=", ldc,
                      " too small for m=", m, " n=", n, " k=", k);
    if (m == 0 || n == 0 || batch == 0) return;
    cpu::dispatch_float("gemm", c.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* pa = cdata<T>(a);
      const T* pb = cdata<T>(b);
      T* pc = mdata<T>(c);
      for (std::int64_t i = 0; i < batch; ++i) {
        T* ci = pc + i * stride_c;
        if (k == 0) {  // C = beta C; BLAS would reject lda = 0 layouts
          for (std::int64_t r = 0; r < m; ++r) {
            for (std::int64_t j = 0; j < n; ++j) {
              ci[r * ldc + j] = beta == 0.0 ? T(0) : static_cast<T>(beta) * ci[r * ldc + j];
            }
          }
          continue;
        }
        cpu::blas_gemm(trans_a, trans_b, m, n, k, static_cast<T>(alpha), pa + i * stride_a,
                       lda, pb + i * stride_b, ldb, static_cast<T>(beta), ci, ldc);
      }
    });
  }

  // ---- fused model kernels --------------------------------------------------------------
  void softmax(const Tensor& x, Tensor& y, bool log) override { cpu::softmax(x, y, log); }
  void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx, bool log) override {
    cpu::softmax_backward(y, dy, dx, log);
  }
  void cross_entropy(const Tensor& logits, const Tensor& targets, std::int64_t ignore_index,
                     Tensor& loss, Tensor& lse) override {
    cpu::cross_entropy(logits, targets, ignore_index, loss, lse);
  }
  void cross_entropy_backward(const Tensor& logits, const Tensor& targets,
                              std::int64_t ignore_index, const Tensor& lse,
                              const Tensor& dloss, Tensor& dlogits) override {
    cpu::cross_entropy_backward(logits, targets, ignore_index, lse, dloss, dlogits);
  }
  void rmsnorm(const Tensor& x, const Tensor& g, double eps, Tensor& y,
               Tensor& rstd) override {
    cpu::rmsnorm(x, g, eps, y, rstd);
  }
  void rmsnorm_backward(const Tensor& x, const Tensor& g, const Tensor& rstd,
                        const Tensor& dy, Tensor& dx, Tensor& dg) override {
    cpu::rmsnorm_backward(x, g, rstd, dy, dx, dg);
  }
  void swiglu(const Tensor& a, const Tensor& b, Tensor& out) override {
    cpu::swiglu(a, b, out);
  }
  void swiglu_backward(const Tensor& a, const Tensor& b, const Tensor& dout, Tensor& da,
                       Tensor& db) override {
    cpu::swiglu_backward(a, b, dout, da, db);
  }
  void rope(const Tensor& x, double theta, std::int64_t pos_offset, bool inverse,
            Tensor& y) override {
    cpu::rope(x, theta, pos_offset, inverse, y);
  }
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                 Tensor& out, Tensor& lse) override {
    cpu::attention(q, k, v, scale, out, lse);
  }
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, const Tensor& dout,
                          double scale, Tensor& dq, Tensor& dk, Tensor& dv) override {
    cpu::attention_backward(q, k, v, out, lse, dout, scale, dq, dk, dv);
  }
  void index_select_rows(const Tensor& src, const Tensor& index, Tensor& out) override {
    cpu::index_select_rows(src, index, out);
  }
  void index_add_rows(const Tensor& src, const Tensor& index, const Tensor& scale,
                      Tensor& out) override {
    cpu::index_add_rows(src, index, scale, out);
  }
  void topk(const Tensor& x, std::int64_t k, Tensor& values, Tensor& indices) override {
    cpu::topk(x, k, values, indices);
  }
  void sort_desc(const Tensor& x, Tensor& values, Tensor& indices) override {
    cpu::sort_desc(x, values, indices);
  }
  void adamw(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq,
             double lr, double beta1, double beta2, double eps, double weight_decay,
             std::int64_t step) override {
    cpu::adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step);
  }

 private:
  HostAllocator allocator_{HostAllocator::keep_freed_by_default()};
};

}  // namespace

Backend& cpu_backend() {
  // Never destroyed: tensors in static storage may outlive main().
  static CpuBackend* backend = new CpuBackend();
  return *backend;
}

}  // namespace motley
