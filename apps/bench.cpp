// motley bench: throughput of a config's training step and of its MoE layer
// on this machine (SPEC section 6). Figures are medians over repetitions,
// measured side by side in one run with the machine's sgemm rate.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "absl/strings/str_join.h"
#include "apps/cli.h"
#include "apps/subcommands.h"
#include "apps/train_support.h"
#include "autograd/ops.h"
#include "core/ops.h"
#include "core/philox.h"
#include "layers/expert_sizes.h"
#include "core/backend.h"
#include "layers/transformer.h"
#include "parallel/communicator.h"
#include "train/device.h"
#include "train/flops.h"
#include "train/trainer.h"

namespace motley::apps {
namespace {

namespace ag = autograd;
namespace par = parallel;
using Clock = std::chrono::steady_clock;

// Minor page faults of this process so far (first touches of new pages).
long minor_page_faults() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// The process's peak resident set (Linux reports KiB).
double peak_rss_mib() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

Tensor random_tokens(std::int64_t b, std::int64_t t, std::int64_t vocab, std::uint64_t salt) {
  std::vector<std::int64_t> ids(b * t);
  const PhiloxKey key = philox_key(salt, "bench/tokens");
  for (std::size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<std::int64_t>(philox_u64(key, i) % static_cast<std::uint64_t>(vocab));
  }
  return Tensor::from_vector(ids, {b, t});
}

struct MoEBench {
  double seconds = 0;     // median forward + backward
  double flops = 0;       // model FLOPs of one forward + backward
  double sgemm_rate = 0;  // FLOP/s of a 1024^3 sgemm timed between the repetitions (median)
};

// Seconds of one 1024^3 sgemm through the backend.
double time_sgemm(const Tensor& a, const Tensor& b) {
  const auto t0 = Clock::now();
  Tensor c = ops::matmul(a, b);
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One MoE layer, forward and backward, on `tokens` rows of width d.
MoEBench bench_moe_layer(const ModelConfig& model, ExpertSizing sizes_scheme, std::int64_t tokens,
                         int reps) {
  MoEConfig cfg = model.moe;
  cfg.expert_sizes = sizes_scheme;
  const std::vector<std::int64_t> sizes = expert_hidden_sizes(cfg);
  const std::int64_t d = model.d_model, e = cfg.n_experts;
  ParameterSet params(1, DType::kF32, Device::cpu());
  MoEWeights w;
  w.router = params.add("router", {e, d}, Init::normal(0.02));
  for (std::int64_t i = 0; i < e; ++i) {
    const std::string p = "experts." + std::to_string(i) + ".";
    w.experts.push_back({params.add(p + "w1", {sizes[i], d}, Init::normal(0.02)),
                         params.add(p + "w3", {sizes[i], d}, Init::normal(0.02)),
                         params.add(p + "w2", {d, sizes[i]}, Init::normal(0.02))});
  }
  Tensor x = Tensor::empty({tokens, d});
  fill_normal(x, philox_key(2, "bench/x"), 0.0, 1.0);
  // The sgemm baseline alternates with the layer, so that other load on
  // the machine affects both alike (the ratio is the figure to quote).
  const std::int64_t n = 1024;
  Tensor ga = Tensor::empty({n, n}), gb = Tensor::empty({n, n});
  fill_uniform(ga, philox_key(0, "bench/sgemm-a"), -1, 1);
  fill_uniform(gb, philox_key(0, "bench/sgemm-b"), -1, 1);
  std::vector<double> times, sgemm_times;
  MoEBench r;
  for (int rep = 0; rep < reps + 1; ++rep) {
    const double sg = time_sgemm(ga, gb);
    if (rep > 0) sgemm_times.push_back(sg);
    params.zero_grad();
    ag::Variable input(x, true);
    const auto t0 = Clock::now();
    MoEResult out = moe_forward(cfg, sizes, w, nullptr, input, ag::Variable(), MoEContext{});
    ag::add(ag::sum(out.out), out.aux_loss).backward();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (rep > 0) times.push_back(s);  // the first repetition warms up
    double row_flops = 0;
    for (std::int64_t i = 0; i < e; ++i) {
      row_flops += static_cast<double>(out.stats.expert_tokens[i]) * 6.0 * d * sizes[i];
    }
    r.flops = 3.0 * row_flops;  // forward + backward (twice the forward)
  }
  r.seconds = median(times);
  r.sgemm_rate = 2.0 * n * n * n / median(sgemm_times);
  return r;
}

}  // namespace

int bench_main(int argc, char** argv) {
  CommandLine cli("bench",
                  "Measure a config's training-step throughput and its MoE layer's rate on this "
                  "machine (random tokens; no data needed). Prints medians.");
  cli.flag("config", "FILE", "the JSON config (e.g. configs/bench.json)");
  cli.repeated("set", "KEY=VALUE", "override a config key");
  cli.flag("steps", "N", "training steps to time (after one warm-up step)", std::string("5"));
  cli.flag("moe-tokens", "N", "rows for the MoE layer benchmark (0 skips it)",
           std::string("4096"));
  cli.flag("moe-reps", "N",
           "timed repetitions of the MoE layer per size scheme, each next to a 1024^3 sgemm "
           "(medians are reported)",
           std::string("7"));
  if (!cli.parse(argc, argv)) return 0;
  Config config = Config::load(cli.get("config"), cli.all("set"));
  // One process: the config's layout does not apply here.
  config.parallel.dp = config.parallel.ep = config.parallel.pp = 1;
  const Device device = train::compute_device(config.train);
  train::check_precision(config.train, device);
  const std::int64_t steps = cli.get_int("steps");
  const std::int64_t moe_tokens = cli.get_int("moe-tokens");
  const int reps = static_cast<int>(cli.get_int("moe-reps"));
  MOTLEY_CHECK_KIND(kUsage, steps >= 1, "--steps must be >= 1");
  MOTLEY_CHECK_KIND(kUsage, reps >= 1, "--moe-reps must be >= 1");
  const double peak = train::measured_peak_flops(device);
  std::printf("sgemm (through motley's backend on %s): %.1f GFLOP/s\n", device.str().c_str(),
              peak / 1e9);

  if (moe_tokens > 0 && config.model.moe.n_experts > 0) {
    std::printf("\nMoE layer forward + backward: d %lld, %lld experts, %lld tokens, %s\n",
                static_cast<long long>(config.model.d_model),
                static_cast<long long>(config.model.moe.n_experts),
                static_cast<long long>(moe_tokens),
                config.model.moe.selection == SelectionKind::kTopK
                    ? ("top-" + std::to_string(config.model.moe.top_k)).c_str()
                    : "top-p");
    std::printf("  %-11s %10s %12s %12s %10s %s\n", "sizes", "ms", "GFLOP/s", "sgemm GF/s",
                "of sgemm", "expert sizes");
    double uniform_s = 0;
    for (const ExpertSizing sizing :
         {ExpertSizing::kUniform, ExpertSizing::kModse, ExpertSizing::kArithmetic}) {
      const char* scheme = config_name(sizing);
      MoEConfig moe = config.model.moe;
      moe.expert_sizes = sizing;
      if (sizing == ExpertSizing::kModse && moe.n_experts % 2 != 0) continue;
      const MoEBench b = bench_moe_layer(config.model, sizing, moe_tokens, reps);
      if (sizing == ExpertSizing::kUniform) uniform_s = b.seconds;
      std::printf("  %-11s %10.2f %12.1f %12.1f %9.0f%% %s\n", scheme, b.seconds * 1e3,
                  b.flops / b.seconds / 1e9, b.sgemm_rate / 1e9,
                  100.0 * b.flops / b.seconds / b.sgemm_rate,
                  absl::StrJoin(expert_hidden_sizes(moe), " ").c_str());
      if (uniform_s > 0 && sizing != ExpertSizing::kUniform) {
        std::printf("  %-11s time relative to uniform: %.2f\n", "", b.seconds / uniform_s);
      }
    }
  }

  // The training step is train::Trainer::step(), the one `motley train`
  // runs, on a world of one, fed random tokens.
  const TrainConfig& tc = config.train;
  const std::int64_t micro = tc.micro_batches;
  const std::int64_t vocab = config.model.vocab_size, seq_len = tc.seq_len;
  train::BatchSource batches = [vocab, seq_len](std::int64_t step, std::int64_t first,
                                                std::int64_t count) {
    const Tensor all = random_tokens(
        count, seq_len + 1, vocab,
        static_cast<std::uint64_t>(step) * 1000003u + static_cast<std::uint64_t>(first));
    return Batch{all.narrow(1, 0, seq_len).contiguous(), all.narrow(1, 1, seq_len).contiguous()};
  };
  train::Trainer trainer(
      config,
      train::make_process_groups(std::make_shared<par::LocalCommunicator>(), {}, device),
      batches, device);
  const Transformer& model = trainer.model();
  Backend& backend = backend_for(device);
  std::vector<double> times, faults;
  double step_flops = 0;
  for (std::int64_t step = 0; step <= steps; ++step) {
    backend.synchronize();
    const long faults_before = minor_page_faults();
    const auto t0 = Clock::now();
    const train::StepResult r = trainer.step();
    backend.synchronize();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (step > 0) {  // the first step warms up
      times.push_back(s);
      faults.push_back(static_cast<double>(minor_page_faults() - faults_before));
    }
    step_flops = r.model_flops;
  }
  const double s = median(times);
  const double tokens = static_cast<double>(tc.batch_size * tc.seq_len);
  std::printf("\ntraining step: %s parameters, batch %lld x %lld, %lld micro-batches\n",
              std::to_string(model.total_parameters()).c_str(),
              static_cast<long long>(tc.batch_size), static_cast<long long>(tc.seq_len),
              static_cast<long long>(micro));
  std::printf("  median step %.1f ms over %lld steps | %.0f tokens/s | %.1f GFLOP/s | MFU %.1f%%\n",
              s * 1e3, static_cast<long long>(steps), tokens / s, step_flops / s / 1e9,
              100.0 * step_flops / s / peak);
  const MemoryStats mem = backend.memory_stats();
  std::printf("  memory: %.0f minor page faults per step (median) | peak RSS %.1f MiB | %s peak "
              "in use %.1f MiB, cached %.1f MiB, %zu allocations from the system, %zu cache hits\n",
              median(faults), peak_rss_mib(), device.str().c_str(),
              static_cast<double>(mem.peak_bytes_in_use) / (1 << 20),
              static_cast<double>(mem.bytes_cached) / (1 << 20), mem.num_device_allocs,
              mem.num_cache_hits);
  return 0;
}

}  // namespace motley::apps
