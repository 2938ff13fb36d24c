// bf16 matmuls on the CPU: oneDNN bf16 x bf16 -> f32 against OpenBLAS fp32
// sgemm, on the GEMM shapes of a motley training step (configs/bench.json and
// configs/smoke.json) plus 1024^3. Standalone: not part of the CMake build.
//
// Build (from the repository root; Debian 12: apt-get install libdnnl-dev
// libopenblas-dev):
//
//   g++ -O3 -march=native -std=c++17 -fopenmp bench/bf16_gemm.cpp -o build/bf16_gemm -ldnnl -lopenblas
//
// Run (about 4 minutes; the machine should be otherwise idle):
//
//   build/bf16_gemm --threads 1,2 --reps 9
//
// Threads: OpenBLAS (pthreads) gets openblas_set_num_threads(t), oneDNN
// (OpenMP runtime in Debian's build) and the conversion loop
// omp_set_num_threads(t). With t > 1 the methods are separated by a pause
// (--gap-ms, default 150) so that the idle workers of one runtime (OpenBLAS
// spins about 2^28 cycles after a call, libgomp about 300000 iterations) do
// not compete with the other's for the cores (without it OpenBLAS's
// 2-thread rate fell below its 1-thread rate), and each pause is followed
// by 5 ms of untimed calls (woken workers, and the VM's idle vCPU, are slow
// for the first calls).
//
// ONEDNN_VERBOSE=1 with --reps 1 prints oneDNN's ISA and dispatch; the
// implementation each matmul primitive chose is also printed in the table
// (primitive_desc::impl_info_str()).
//
// For every shape Y (M x N) = X (M x K) W^T, W (N x K) as in motley's Linear
// layers, three products (row-major, as motley's CPU backend calls them):
//   fwd  Y  = X W^T        M x N x K
//   dX   dX = dY W         M x K x N
//   dW   dW = dY^T X       N x K x M
// and three methods:
//   a  cblas_sgemm, fp32 inputs and output;
//   b  oneDNN matmul, bf16 inputs (converted beforehand: the GEMM alone),
//      f32 output (fp32 accumulation);
//   c  b plus converting both fp32 inputs to bf16 on every call (what an
//      autocast pays with fp32 master weights), with the faster of a
//      oneDNN reorder and an AVX-512 vcvtne2ps2bf16 loop (measured first,
//      per thread count, on the sizes of the inputs below).
// Each sample times a loop of calls (about --sample-ms long); a, b and c
// alternate sample by sample (b before c in even repetitions, c before b in
// odd ones) so that machine noise affects all alike; each figure is the
// median of --reps samples (GFLOP/s = 2 M N K / time).
// err = max |C_bf16 - C_fp32| / max |C_fp32|, inputs uniform in [-1, 1].
#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

extern "C" void openblas_set_num_threads(int);

namespace {

using Clock = std::chrono::steady_clock;
using dnnl::memory;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

template <class F>
double time_loop(F&& f, int n) {
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) f();
  return std::chrono::duration<double>(Clock::now() - t0).count() / n;
}

// ---- fp32 -> bf16 -----------------------------------------------------------

inline std::uint16_t to_bf16_scalar(float f) {  // round to nearest even
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

void cvt_serial(const float* src, std::uint16_t* dst, std::size_t n) {
  std::size_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 32 <= n; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i), hi = _mm512_loadu_ps(src + i + 16);
    const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), reinterpret_cast<const __m512i&>(v));
  }
#endif
  for (; i < n; ++i) dst[i] = to_bf16_scalar(src[i]);
}

// The loop over `threads` OpenMP threads (chunks of whole cache lines).
void cvt_avx512(const float* src, std::uint16_t* dst, std::size_t n, int threads) {
  if (threads <= 1 || n < (1u << 15)) return cvt_serial(src, dst, n);
  const std::size_t chunk = ((n + threads - 1) / threads + 31) / 32 * 32;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const std::size_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
    cvt_serial(src + b, dst + b, e - b);
  }
}

// ---- buffers ----------------------------------------------------------------

struct Matrix {  // row-major rows x cols, fp32 and its bf16 copy
  std::int64_t rows = 0, cols = 0;
  std::vector<float> f;
  std::vector<std::uint16_t> h;
  std::size_t size() const { return static_cast<std::size_t>(rows * cols); }
};

Matrix make_matrix(std::int64_t rows, std::int64_t cols, std::uint32_t seed) {
  Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.f.resize(m.size());
  m.h.resize(m.size());
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (float& x : m.f) x = u(gen);
  cvt_serial(m.f.data(), m.h.data(), m.size());
  return m;
}

// ---- one product, three methods ---------------------------------------------

struct Converter {
  bool use_reorder = false;
  int threads = 1;
  dnnl::engine* eng = nullptr;
  dnnl::stream* strm = nullptr;
};

// C (m x n) = op(A) (m x k) op(B) (k x n), A/B stored row-major as Matrix.
struct Product {
  std::string shape, orient;
  std::int64_t m = 0, n = 0, k = 0;
  bool ta = false, tb = false;
  Matrix *a = nullptr, *b = nullptr;
  std::vector<float> c32, c16;  // outputs of a and of b/c
  dnnl::matmul mm;
  memory a_h, b_h, c_h, a_f, b_f;  // oneDNN views of the buffers
  dnnl::reorder ra, rb;
  std::string impl;

  void init(dnnl::engine& eng) {
    c32.assign(static_cast<std::size_t>(m * n), 0.f);
    c16.assign(static_cast<std::size_t>(m * n), 0.f);
    const memory::desc a_md({m, k}, dt::bf16, ta ? tag::ba : tag::ab);
    const memory::desc b_md({k, n}, dt::bf16, tb ? tag::ba : tag::ab);
    const memory::desc c_md({m, n}, dt::f32, tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), eng);
    impl = pd.impl_info_str();
    mm = dnnl::matmul(pd);
    a_h = memory(a_md, eng, a->h.data());
    b_h = memory(b_md, eng, b->h.data());
    c_h = memory(c_md, eng, c16.data());
    // The reorders convert the stored (rows x cols) matrices as they lie.
    const memory::desc a_fs({a->rows, a->cols}, dt::f32, tag::ab);
    const memory::desc a_hs({a->rows, a->cols}, dt::bf16, tag::ab);
    const memory::desc b_fs({b->rows, b->cols}, dt::f32, tag::ab);
    const memory::desc b_hs({b->rows, b->cols}, dt::bf16, tag::ab);
    a_f = memory(a_fs, eng, a->f.data());
    b_f = memory(b_fs, eng, b->f.data());
    ra_dst = memory(a_hs, eng, a->h.data());
    rb_dst = memory(b_hs, eng, b->h.data());
    ra = dnnl::reorder(a_f, ra_dst);
    rb = dnnl::reorder(b_f, rb_dst);
  }
  memory ra_dst, rb_dst;

  void run_sgemm() {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.f, a->f.data(),
                static_cast<int>(a->cols), b->f.data(), static_cast<int>(b->cols), 0.f,
                c32.data(), static_cast<int>(n));
  }
  void run_bf16(dnnl::stream& s) {
    mm.execute(s, {{DNNL_ARG_SRC, a_h}, {DNNL_ARG_WEIGHTS, b_h}, {DNNL_ARG_DST, c_h}});
    s.wait();
  }
  void convert(const Converter& cv) {
    if (cv.use_reorder) {
      ra.execute(*cv.strm, a_f, ra_dst);
      rb.execute(*cv.strm, b_f, rb_dst);
      cv.strm->wait();
    } else {
      cvt_avx512(a->f.data(), a->h.data(), a->size(), cv.threads);
      cvt_avx512(b->f.data(), b->h.data(), b->size(), cv.threads);
    }
  }
  double rel_err() const {
    double maxref = 0, maxdiff = 0;
    for (std::size_t i = 0; i < c32.size(); ++i) {
      maxref = std::max(maxref, std::fabs(static_cast<double>(c32[i])));
      maxdiff = std::max(maxdiff, std::fabs(static_cast<double>(c32[i]) - c16[i]));
    }
    return maxdiff / maxref;
  }
};

struct Shape {
  std::string name;
  std::int64_t m, n, k;  // Y (m x n) = X (m x k) W^T
};

std::vector<int> parse_ints(const std::string& s) {
  std::vector<int> v;
  std::size_t p = 0;
  while (p <= s.size()) {
    const std::size_t q = s.find(',', p);
    v.push_back(std::atoi(s.substr(p, q - p).c_str()));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> thread_counts = {1, 2};
  int reps = 9;
  double sample_ms = 15;
  double gap_ms = 150;  // pause between methods when threads > 1
  std::string only;  // substring filter on the shape name
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--threads") thread_counts = parse_ints(next());
    else if (a == "--reps") reps = std::atoi(next().c_str());
    else if (a == "--sample-ms") sample_ms = std::atof(next().c_str());
    else if (a == "--gap-ms") gap_ms = std::atof(next().c_str());
    else if (a == "--only") only = next();
    else {
      std::fprintf(stderr, "usage: %s [--threads 1,2] [--reps 9] [--sample-ms 15] [--gap-ms 150] [--only S]\n",
                   argv[0]);
      return 2;
    }
  }

  const dnnl_version_t* v = dnnl_version();
  std::printf("oneDNN %d.%d.%d (hash %s), cpu runtime %s; OpenBLAS %s\n", v->major, v->minor,
              v->patch, v->hash, v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other",
              openblas_get_config());
#if defined(__AVX512BF16__)
  std::printf("AVX-512 conversion loop: vcvtne2ps2bf16 (compiled with AVX512_BF16)\n");
#else
  std::printf("AVX-512 conversion loop: NOT compiled with AVX512_BF16 (scalar fallback)\n");
#endif
  const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
  std::printf("oneDNN effective cpu isa: 0x%x (avx512_core_bf16 = 0x%x, avx512_core = 0x%x)\n",
              isa, static_cast<int>(dnnl::cpu_isa::avx512_core_bf16),
              static_cast<int>(dnnl::cpu_isa::avx512_core));

  // configs/bench.json: 16 x 256 tokens, d 256, expert_hidden 640 (modse:
  // 1152 128 1024 256 768 512 640 640), 8 experts top-2 (1024 tokens per
  // expert on average), vocab 4096. configs/smoke.json: 16 x 128 tokens, d
  // 128, expert_hidden 320 (modse: 576 64 512 128 384 256 320 320), 512
  // tokens per expert, vocab 4096.
  const std::vector<Shape> shapes = {
      {"bench qkvo", 4096, 256, 256},     {"bench up h128", 1024, 128, 256},
      {"bench up h640", 1024, 640, 256},  {"bench up h1152", 1024, 1152, 256},
      {"bench dn h128", 1024, 256, 128},  {"bench dn h640", 1024, 256, 640},
      {"bench dn h1152", 1024, 256, 1152}, {"bench lm_head", 4096, 4096, 256},
      {"smoke qkvo", 2048, 128, 128},     {"smoke up h64", 512, 64, 128},
      {"smoke up h320", 512, 320, 128},   {"smoke up h576", 512, 576, 128},
      {"smoke dn h64", 512, 128, 64},     {"smoke dn h320", 512, 128, 320},
      {"smoke dn h576", 512, 128, 576},   {"smoke lm_head", 2048, 4096, 128},
      {"1024^3", 1024, 1024, 1024},
  };

  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);

  for (int threads : thread_counts) {
    openblas_set_num_threads(threads);
    omp_set_num_threads(threads);
    std::printf("\n==== threads %d (OpenBLAS %d, OpenMP max %d) ====\n", threads, threads,
                omp_get_max_threads());
    // With 2 threads the two runtimes' idle workers (OpenBLAS spins about
    // 2^28 cycles after a call, libgomp about 300000 iterations) would
    // compete for the cores when the methods alternate; a pause before each
    // switch lets them go to sleep, so that each method runs as it would on
    // its own.
    const auto gap = [&] {
      if (threads > 1 && gap_ms > 0)
        std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(gap_ms));
    };
    // After a pause the sleeping workers (and, in a VM, the idle vCPU) take
    // a while to come back: untimed calls for 5 ms (at least one) first.
    const auto warm = [&](const std::function<void()>& f) {
      const auto t0 = Clock::now();
      do f();
      while (threads > 1 && Clock::now() - t0 < std::chrono::milliseconds(5));
    };

    // Build the products (primitives are created after the thread count is
    // set: oneDNN picks its blocking for the threads it will have).
    std::vector<Matrix> store;
    store.reserve(shapes.size() * 4);
    std::vector<Product> prods;
    std::uint32_t seed = 1;
    for (const Shape& s : shapes) {
      if (!only.empty() && s.name.find(only) == std::string::npos) continue;
      store.push_back(make_matrix(s.m, s.k, seed++));  // X
      Matrix* x = &store.back();
      store.push_back(make_matrix(s.n, s.k, seed++));  // W
      Matrix* w = &store.back();
      store.push_back(make_matrix(s.m, s.n, seed++));  // dY
      Matrix* dy = &store.back();
      auto add = [&](const char* orient, std::int64_t m, std::int64_t n, std::int64_t k, bool ta,
                     bool tb, Matrix* a, Matrix* b) {
        Product& p = prods.emplace_back();
        p.shape = s.name;
        p.orient = orient;
        p.m = m;
        p.n = n;
        p.k = k;
        p.ta = ta;
        p.tb = tb;
        p.a = a;
        p.b = b;
      };
      add("fwd", s.m, s.n, s.k, false, true, x, w);  // Y = X W^T
      add("dX", s.m, s.k, s.n, false, false, dy, w);  // dX = dY W
      add("dW", s.n, s.k, s.m, true, false, dy, x);   // dW = dY^T X
    }
    for (Product& p : prods) p.init(eng);

    // Conversion: oneDNN reorder against the AVX-512 loop on every input
    // matrix, alternating, median of reps; the faster in total is used in c.
    Converter cv;
    cv.threads = threads;
    cv.eng = &eng;
    cv.strm = &strm;
    {
      // Start the thread pools and let OpenBLAS's fresh workers go idle.
      {
        Matrix& m0 = store.front();
        const auto t0 = Clock::now();
        while (Clock::now() - t0 < std::chrono::milliseconds(50))
          cvt_avx512(m0.f.data(), m0.h.data(), m0.size(), threads);
        gap();
      }
      std::printf("\nfp32 -> bf16 conversion of the stored inputs (median us, GB/s = 6 bytes/elt)\n");
      std::printf("  %-16s %10s %10s %10s %10s %10s\n", "matrix", "elements", "loop us",
                  "reorder us", "loop GB/s", "reord GB/s");
      double tot_loop = 0, tot_reorder = 0, log_ratio = 0;
      int n_mats = 0;
      std::size_t last = 0;
      for (std::size_t i = 0; i < prods.size(); i += 3) {  // X, W, dY of each shape
        Product& p = prods[i];
        Matrix* mats[3] = {p.a, p.b, prods[i + 1].a};
        const char* names[3] = {"X", "W", "dY"};
        for (int j = 0; j < 3; ++j) {
          Matrix* mt = mats[j];
          if (mt->size() == last) continue;  // a repeated size says nothing new
          last = mt->size();
          const memory::desc fs({mt->rows, mt->cols}, dt::f32, tag::ab);
          const memory::desc hs({mt->rows, mt->cols}, dt::bf16, tag::ab);
          memory mf(fs, eng, mt->f.data()), mh(hs, eng, mt->h.data());
          dnnl::reorder r(mf, mh);
          auto loop = [&] { cvt_avx512(mt->f.data(), mt->h.data(), mt->size(), threads); };
          auto reord = [&] {
            r.execute(strm, mf, mh);
            strm.wait();
          };
          warm(loop);
          warm(reord);
          const double t1 = time_loop(loop, 3);
          const int n = std::max(1, static_cast<int>(sample_ms * 1e-3 / 3 / t1));
          std::vector<double> tl, tr;
          for (int rep = 0; rep < reps; ++rep) {
            tl.push_back(time_loop(loop, n));
            tr.push_back(time_loop(reord, n));
          }  // both run on libgomp's threads: no pause needed
          const double ml = median(tl), mr = median(tr);
          tot_loop += ml;
          tot_reorder += mr;
          log_ratio += std::log(mr / ml);
          ++n_mats;
          char label[64];
          std::snprintf(label, sizeof label, "%s %s", p.shape.c_str(), names[j]);
          std::printf("  %-16s %10zu %10.1f %10.1f %10.1f %10.1f\n", label, mt->size(), ml * 1e6,
                      mr * 1e6, 6.0 * mt->size() / ml / 1e9, 6.0 * mt->size() / mr / 1e9);
        }
      }
      // Faster = the smaller geometric mean time over the matrices (the sum
      // would be decided by the few largest, memory-bound ones alone).
      const double gm = std::exp(log_ratio / std::max(1, n_mats));
      cv.use_reorder = gm < 1;
      std::printf("  total: loop %.1f us, reorder %.1f us; geometric mean reorder/loop time "
                  "%.2f -> c uses the %s\n",
                  tot_loop * 1e6, tot_reorder * 1e6, gm,
                  cv.use_reorder ? "oneDNN reorder" : "AVX-512 loop");
    }

    // GEMMs.
    std::printf("\n%-15s %-4s %5s %5s %5s %9s %9s %9s %6s %6s %8s  %s\n", "shape", "op", "M", "N",
                "K", "a fp32", "b bf16", "c +cvt", "b/a", "c/a", "err", "oneDNN impl");
    double log_ba = 0, log_ca = 0;
    double sum_a = 0, sum_b = 0, sum_c = 0;  // seconds over all products (equal weights)
    for (Product& p : prods) {
      auto fa = [&] { p.run_sgemm(); };
      auto fb = [&] { p.run_bf16(strm); };
      auto fc = [&] {
        p.convert(cv);
        p.run_bf16(strm);
      };
      // Warm up and size the loop of one sample on the slowest method.
      gap();
      for (int i = 0; i < 2; ++i) fa();
      const double t1a = time_loop(fa, 2);
      gap();
      for (int i = 0; i < 2; ++i) { fb(); fc(); }
      const double t1 = std::max({t1a, time_loop(fb, 2), time_loop(fc, 2)});
      const int n = std::max(1, static_cast<int>(sample_ms * 1e-3 / t1));
      std::vector<double> ta, tb, tc;
      for (int rep = 0; rep < reps; ++rep) {
        gap();
        warm(fa);
        ta.push_back(time_loop(fa, n));
        gap();
        // b and c share libgomp's threads: no pause between them, and their
        // order alternates so that neither always runs on freshly woken
        // threads.
        if (rep % 2 == 0) {
          warm(fb);
          tb.push_back(time_loop(fb, n));
          tc.push_back(time_loop(fc, n));
        } else {
          warm(fc);
          tc.push_back(time_loop(fc, n));
          tb.push_back(time_loop(fb, n));
        }
      }
      const double flops = 2.0 * p.m * p.n * p.k;
      const double ma = median(ta), mb = median(tb), mc = median(tc);
      sum_a += ma;
      sum_b += mb;
      sum_c += mc;
      log_ba += std::log(ma / mb);
      log_ca += std::log(ma / mc);
      // Sanity: c's result is b's (same bf16 inputs); compare with fp32.
      p.run_sgemm();
      p.convert(cv);
      p.run_bf16(strm);
      std::printf("%-15s %-4s %5lld %5lld %5lld %9.1f %9.1f %9.1f %6.2f %6.2f %8.1e  %s\n",
                  p.shape.c_str(), p.orient.c_str(), static_cast<long long>(p.m),
                  static_cast<long long>(p.n), static_cast<long long>(p.k), flops / ma / 1e9,
                  flops / mb / 1e9, flops / mc / 1e9, ma / mb, ma / mc, p.rel_err(),
                  p.impl.c_str());
      std::fflush(stdout);
    }
    const double np = static_cast<double>(prods.size());
    std::printf("geometric mean over %zu products: b/a %.2f, c/a %.2f\n", prods.size(),
                std::exp(log_ba / np), std::exp(log_ca / np));
    std::printf("sum of median times (one call each): a %.2f ms, b %.2f ms, c %.2f ms "
                "(b/a %.2f, c/a %.2f in rate)\n",
                sum_a * 1e3, sum_b * 1e3, sum_c * 1e3, sum_a / sum_b, sum_a / sum_c);
  }
  return 0;
}
