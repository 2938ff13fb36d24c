// motley bench-kernels: throughput of the CPU backend's kernels on this
// machine, each next to a baseline measured in the same run:
//   * GEMM through Backend::gemm against raw cblas_sgemm on the same
//     buffers (the backend adds only dispatch, so the ratio should be ~1);
//   * fused elementwise/row kernels in GB/s against memcpy of the same
//     number of bytes (read + written), the bandwidth they could reach;
//   * flash-style causal attention forward and backward in GFLOP/s.
// Every figure is the median over --reps timed repetitions after --warmup
// untimed ones; GEMM and its baseline alternate rep by rep so that clock
// drift affects both alike. docs/perf.md records the figures and method.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "apps/cli.h"
#include "apps/subcommands.h"
#include "core/backend.h"
#include "core/ops.h"
#include "core/philox.h"

namespace motley::apps {
namespace {

using Clock = std::chrono::steady_clock;

// Sizes of the benchmarked kernels; the defaults are configs/bench.json's
// shapes (16 x 256 tokens, d 256, expert hidden 640, vocab 4096, 4 heads).
struct BenchOptions {
  int warmup = 2, reps = 11;
  std::int64_t tokens = 4096, d_model = 256, hidden = 640, vocab = 4096;
  std::int64_t attn_batch = 16, attn_heads = 4, attn_seq = 256, attn_head_dim = 64;
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median seconds of f over the timed reps.
double time_median(const std::function<void()>& f, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(seconds_since(t0));
  }
  return median(t);
}

// Median seconds of f and g, alternating rep by rep.
std::pair<double, double> time_pair(const std::function<void()>& f,
                                    const std::function<void()>& g, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) {
    f();
    g();
  }
  std::vector<double> tf, tg;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    f();
    tf.push_back(seconds_since(t0));
    t0 = Clock::now();
    g();
    tg.push_back(seconds_since(t0));
  }
  return {median(tf), median(tg)};
}

Tensor randn(Shape shape, std::uint64_t stream, double std = 1.0) {
  Tensor t = Tensor::empty(std::move(shape));
  fill_normal(t, philox_key(1234, "bench-kernels"), 0.0, std, stream);
  return t;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

// ---- GEMM --------------------------------------------------------------------

void bench_gemm(const BenchOptions& o) {
  const int warmup = o.warmup, reps = o.reps;
  const std::int64_t t = o.tokens, d = o.d_model, h = o.hidden, v = o.vocab;
  struct Layer {
    const char* name;
    std::int64_t in, out;  // Linear (out, in)
  };
  const Layer layers[] = {{"w1/w3 (d->h)", d, h}, {"w2 (h->d)", h, d}, {"lm_head (d->V)", d, v}};
  Backend& be = backend_for(Device::cpu());
  std::printf("\nGEMM, f32, C (M x N) = op(A) (M x K) @ op(B) (K x N), %d OpenBLAS thread(s)\n",
              openblas_get_num_threads());
  std::printf("%-16s %-6s %6s %6s %6s %12s %12s %7s\n", "layer", "pass", "M", "K", "N",
              "motley GF/s", "cblas GF/s", "ratio");
  for (const Layer& l : layers) {
    const Tensor x = randn({t, l.in}, 1);      // (tokens, in)
    const Tensor w = randn({l.out, l.in}, 2);  // (out, in)
    const Tensor dy = randn({t, l.out}, 3);    // (tokens, out)
    Tensor y = Tensor::empty({t, l.out});      // (tokens, out)
    Tensor dx = Tensor::empty({t, l.in});      // (tokens, in)
    Tensor dw = Tensor::empty({l.out, l.in});  // (out, in)
    struct Pass {
      const char* name;
      bool ta, tb;
      std::int64_t m, n, k;
      const Tensor *a, *b;
      Tensor* c;
      std::int64_t lda, ldb;
    };
    // forward y = x w^T (NT); data grad dx = dy w (NN); weight grad dw = dy^T x (TN).
    const Pass passes[] = {
        {"fwd", false, true, t, l.out, l.in, &x, &w, &y, l.in, l.in},
        {"dgrad", false, false, t, l.in, l.out, &dy, &w, &dx, l.out, l.in},
        {"wgrad", true, false, l.out, l.in, t, &dy, &x, &dw, l.out, l.in},
    };
    for (const Pass& p : passes) {
      const float* pa = static_cast<const float*>(p.a->raw_data());
      const float* pb = static_cast<const float*>(p.b->raw_data());
      float* pc = static_cast<float*>(p.c->raw_data());
      auto motley_gemm = [&] {
        be.gemm(p.ta, p.tb, p.m, p.n, p.k, 1.0, *p.a, p.lda, *p.b, p.ldb, 0.0, *p.c, p.n);
      };
      auto raw_gemm = [&] {
        cblas_sgemm(CblasRowMajor, p.ta ? CblasTrans : CblasNoTrans,
                    p.tb ? CblasTrans : CblasNoTrans, p.m, p.n, p.k, 1.0f, pa, p.lda, pb, p.ldb,
                    0.0f, pc, p.n);
      };
      const auto [tm, tr] = time_pair(motley_gemm, raw_gemm, warmup, reps);
      const double flops = 2.0 * p.m * p.n * p.k;
      std::printf("%-16s %-6s %6lld %6lld %6lld %12.1f %12.1f %6.1f%%\n", l.name, p.name,
                  static_cast<long long>(p.m), static_cast<long long>(p.k),
                  static_cast<long long>(p.n), flops / tm * 1e-9, flops / tr * 1e-9,
                  100.0 * tr / tm);
    }
  }
}

// ---- elementwise and row kernels -------------------------------------------------

void bench_elementwise(const BenchOptions& o) {
  const int warmup = o.warmup, reps = o.reps;
  const std::int64_t t = o.tokens, d = o.d_model, h = o.hidden, v = o.vocab;
  Backend& be = backend_for(Device::cpu());
  std::printf("\nFused kernels, f32, single thread; GB/s = bytes read + written per call / time\n");
  std::printf("%-22s %-14s %10s %9s %11s %7s\n", "kernel", "shape", "MB moved", "GB/s",
              "memcpy GB/s", "ratio");
  // memcpy moving the same bytes (half read, half written), same run.
  std::vector<char> src, dst;
  auto report = [&](const char* name, const std::string& shape, double bytes,
                    const std::function<void()>& f) {
    const std::size_t half = static_cast<std::size_t>(bytes / 2);
    src.assign(half, 1);
    dst.assign(half, 0);
    auto copy = [&] { std::memcpy(dst.data(), src.data(), half); };
    const auto [tk, tc] = time_pair(f, copy, warmup, reps);
    std::printf("%-22s %-14s %10.1f %9.1f %11.1f %6.1f%%\n", name, shape.c_str(), bytes / 1e6,
                bytes / tk * 1e-9, bytes / tc * 1e-9, 100.0 * tc / tk);
  };
  auto shape2 = [](std::int64_t a, std::int64_t b) {
    return std::to_string(a) + "x" + std::to_string(b);
  };
  const double f4 = sizeof(float);
  {
    const Tensor a = randn({t, h}, 10), b = randn({t, h}, 11);
    Tensor out = Tensor::empty({t, h});
    report("swiglu", shape2(t, h), 3 * f4 * t * h, [&] { be.swiglu(a, b, out); });
    Tensor da = Tensor::empty({t, h}), db = Tensor::empty({t, h});
    report("swiglu_backward", shape2(t, h), 5 * f4 * t * h,
           [&] { be.swiglu_backward(a, b, out, da, db); });
  }
  {
    const Tensor x = randn({t, d}, 12), g = randn({d}, 13);
    Tensor y = Tensor::empty({t, d}), rstd = Tensor::empty({t});
    report("rmsnorm", shape2(t, d), f4 * (2.0 * t * d + t), [&] { be.rmsnorm(x, g, 1e-5, y, rstd); });
    Tensor dx = Tensor::empty({t, d}), dg = Tensor::zeros({d});
    report("rmsnorm_backward", shape2(t, d), f4 * (3.0 * t * d + t),
           [&] { be.rmsnorm_backward(x, g, rstd, y, dx, dg); });
  }
  {
    const Tensor a = randn({t, d}, 14), b = randn({t, d}, 15);
    Tensor out = Tensor::empty({t, d});
    report("add", shape2(t, d), 3 * f4 * t * d, [&] { be.binary(BinaryOp::kAdd, a, b, out); });
    const Tensor bias = randn({d}, 16).expand({t, d});
    report("add (broadcast row)", shape2(t, d), 2 * f4 * t * d,
           [&] { be.binary(BinaryOp::kAdd, a, bias, out); });
  }
  {
    const Tensor x = randn({t, v}, 17, 3.0);
    Tensor y = Tensor::empty({t, v});
    report("softmax", shape2(t, v), 2 * f4 * t * v, [&] { be.softmax(x, y, false); });
    Tensor dx = Tensor::empty({t, v});
    report("softmax_backward", shape2(t, v), 3 * f4 * t * v,
           [&] { be.softmax_backward(y, x, dx, false); });
    std::vector<std::int64_t> tv(t);
    for (std::int64_t i = 0; i < t; ++i) tv[i] = (i * 7919) % v;
    const Tensor targets = Tensor::from_vector(tv, {t});
    Tensor loss = Tensor::empty({t}), lse = Tensor::empty({t});
    report("cross_entropy", shape2(t, v), f4 * t * v,
           [&] { be.cross_entropy(x, targets, -100, loss, lse); });
    const Tensor dloss = Tensor::full({t}, 1.0 / t);
    report("cross_entropy_backward", shape2(t, v), 2 * f4 * t * v,
           [&] { be.cross_entropy_backward(x, targets, -100, lse, dloss, dx); });
  }
  {
    const std::int64_t n = 4 * d * h;  // four expert matrices' worth of parameters
    Tensor p = randn({n}, 18, 0.02), m = Tensor::zeros({n}), s = Tensor::zeros({n});
    const Tensor g = randn({n}, 19, 1e-3);
    std::int64_t step = 0;
    report("adamw", std::to_string(n), 7 * f4 * n,
           [&] { be.adamw(p, g, m, s, 1e-3, 0.9, 0.95, 1e-8, 0.1, ++step); });
  }
  {
    const std::int64_t b = o.attn_batch, hh = o.attn_heads, tt = o.attn_seq, hd = o.attn_head_dim;
    const Tensor x = randn({b, hh, tt, hd}, 20);
    Tensor y = Tensor::empty({b, hh, tt, hd});
    report("rope", std::to_string(b * hh * tt) + "x" + std::to_string(hd),
           2 * f4 * b * hh * tt * hd, [&] { be.rope(x, 10000.0, 0, false, y); });
  }
  {
    const Tensor table = randn({v, d}, 21);
    std::vector<std::int64_t> idx(t);
    for (std::int64_t i = 0; i < t; ++i) idx[i] = (i * 104729) % v;
    const Tensor index = Tensor::from_vector(idx, {t});
    Tensor out = Tensor::empty({t, d});
    report("index_select_rows", shape2(t, d), 2 * f4 * t * d,
           [&] { be.index_select_rows(table, index, out); });
    Tensor grad = Tensor::zeros({v, d});
    report("index_add_rows", shape2(t, d), 3 * f4 * t * d,
           [&] { be.index_add_rows(out, index, Tensor(), grad); });
  }
}

// ---- attention -------------------------------------------------------------------------

void bench_attention(const BenchOptions& o) {
  const int warmup = o.warmup, reps = o.reps;
  const std::int64_t b = o.attn_batch, h = o.attn_heads, t = o.attn_seq, hd = o.attn_head_dim;
  const Tensor q = randn({b, h, t, hd}, 30), k = randn({b, h, t, hd}, 31);
  const Tensor v = randn({b, h, t, hd}, 32), dout = randn({b, h, t, hd}, 33);
  Backend& be = backend_for(Device::cpu());
  Tensor out = Tensor::empty({b, h, t, hd}), lse = Tensor::empty({b, h, t});
  Tensor dq = Tensor::empty({b, h, t, hd}), dk = Tensor::empty({b, h, t, hd});
  Tensor dv = Tensor::empty({b, h, t, hd});
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const double tf = time_median([&] { be.attention(q, k, v, scale, out, lse); }, warmup, reps);
  const double tb = time_median(
      [&] { be.attention_backward(q, k, v, out, lse, dout, scale, dq, dk, dv); }, warmup, reps);
  // Causal FLOPs (useful work, half the square): forward 2 GEMMs, backward
  // 5 (S recomputed, dV, dP, dQ, dK), each 2 T^2 hd / 2 per head.
  const double per_gemm = 2.0 * b * h * t * t * hd / 2;
  std::printf("\nCausal attention, f32, B=%lld H=%lld T=%lld hd=%lld (flash-style, "
              "single thread apart from OpenBLAS)\n",
              static_cast<long long>(b), static_cast<long long>(h), static_cast<long long>(t),
              static_cast<long long>(hd));
  std::printf("%-10s %10s %10s %12s\n", "pass", "ms", "GFLOP/s", "tokens/s");
  std::printf("%-10s %10.2f %10.1f %12.0f\n", "forward", tf * 1e3, 2 * per_gemm / tf * 1e-9,
              b * t / tf);
  std::printf("%-10s %10.2f %10.1f %12.0f\n", "backward", tb * 1e3, 5 * per_gemm / tb * 1e-9,
              b * t / tb);
}

}  // namespace

int bench_kernels_main(int argc, char** argv) {
  CommandLine cli("bench-kernels",
                  "Throughput of the CPU backend's kernels on this machine: GEMM through the "
                  "backend next to raw cblas_sgemm, fused kernels in GB/s next to memcpy of the "
                  "same bytes, and causal attention forward/backward. Figures are medians over "
                  "--reps; see docs/perf.md.");
  cli.flag("reps", "N", "timed repetitions per kernel; the median is reported", "11");
  cli.flag("warmup", "N", "untimed repetitions before timing each kernel", "2");
  cli.flag("threads", "N",
           "OpenBLAS threads for GEMM (motley's own kernels are single-threaded; 1 matches "
           "one MPI rank per core)",
           "1");
  cli.flag("sections", "LIST", "comma-separated sections to run: gemm, elementwise, attention",
           "gemm,elementwise,attention");
  cli.flag("tokens", "N", "rows (batch x sequence tokens) of the GEMMs and row kernels", "4096");
  cli.flag("d-model", "N", "model width d (GEMM K/N, RMSNorm width)", "256");
  cli.flag("hidden", "N", "expert hidden size (GEMM N/K, SwiGLU width)", "640");
  cli.flag("vocab", "N", "vocabulary size (lm_head GEMM, softmax and cross-entropy width)",
           "4096");
  cli.flag("attn-batch", "N", "attention batch size B", "16");
  cli.flag("attn-heads", "N", "attention heads H", "4");
  cli.flag("attn-seq", "N", "attention sequence length T", "256");
  cli.flag("attn-head-dim", "N", "attention head dimension hd", "64");
  if (!cli.parse(argc, argv)) return 0;

  BenchOptions o;
  o.reps = static_cast<int>(cli.get_int("reps"));
  o.warmup = static_cast<int>(cli.get_int("warmup"));
  o.tokens = cli.get_int("tokens");
  o.d_model = cli.get_int("d-model");
  o.hidden = cli.get_int("hidden");
  o.vocab = cli.get_int("vocab");
  o.attn_batch = cli.get_int("attn-batch");
  o.attn_heads = cli.get_int("attn-heads");
  o.attn_seq = cli.get_int("attn-seq");
  o.attn_head_dim = cli.get_int("attn-head-dim");
  const std::int64_t threads = cli.get_int("threads");
  MOTLEY_CHECK_KIND(kUsage, o.reps >= 1 && o.warmup >= 0 && threads >= 1,
                    "bench-kernels: --reps and --threads must be >= 1, --warmup >= 0");
  for (std::int64_t size : {o.tokens, o.d_model, o.hidden, o.vocab, o.attn_batch, o.attn_heads,
                            o.attn_seq, o.attn_head_dim}) {
    MOTLEY_CHECK_KIND(kUsage, size >= 1, "bench-kernels: sizes must be >= 1, got ", size);
  }
  openblas_set_num_threads(static_cast<int>(threads));

  std::printf("motley bench-kernels: %u hardware threads, CPU %s\n",
              std::thread::hardware_concurrency(), cpu_model().c_str());
  std::printf("OpenBLAS: %s\n", openblas_get_config());
  std::printf("median of %d reps after %d warm-up\n", o.reps, o.warmup);
  for (const absl::string_view section : absl::StrSplit(cli.get("sections"), ',')) {
    if (section == "gemm") {
      bench_gemm(o);
    } else if (section == "elementwise") {
      bench_elementwise(o);
    } else if (section == "attention") {
      bench_attention(o);
    } else if (!section.empty()) {
      MOTLEY_FAIL(kUsage, "bench-kernels: --sections: unknown section '", std::string(section),
                  "' (expected gemm, elementwise, attention)");
    }
  }
  return 0;
}

}  // namespace motley::apps
