// motley train: the training loop of one process (SPEC sections 1.5, 2, 4,
// 5, 7). One step, top to bottom:
//
//   lr = schedule(step)
//   for each micro-batch m of this process's shard of the global batch:
//       tokens, targets = sample(seed, step, sequences of m)     (B/M, T)
//       loss_m = model(tokens, targets)           CE + aux of this micro-batch
//       backward(loss_m / M)                      gradients accumulate
//   grad_norm = ||g||; skip the step if anything is non-finite
//   clip; AdamW; log, evaluate, checkpoint as scheduled
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "apps/cli.h"
#include "apps/evaluate.h"
#include "apps/progress.h"
#include "apps/subcommands.h"
#include "apps/train_support.h"
#include "autograd/ops.h"
#include "checkpoint/checkpoint.h"
#include "core/ops.h"
#include "data/sampler.h"
#include "nlohmann/json.hpp"

namespace motley::apps {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signal) {
  g_stop_signal = signal;
  // A second Ctrl-C at the terminal ends the process at once (the previous
  // checkpoint stays intact: see Note [Atomic checkpoints]).
  if (signal == SIGINT) std::signal(SIGINT, SIG_DFL);
}

constexpr int kExitResumeMe = 75;
constexpr int kMaxConsecutiveSkips = 10;

struct StepResult {
  double loss = 0, lm_loss = 0, aux_loss = 0, grad_norm = 0;
  bool skipped = false;
  std::vector<MoELayerStats> moe;  // summed over micro-batches
};

// Adds one micro-batch's routing statistics into the step's.
void accumulate_stats(std::vector<MoELayerStats>& into, const std::vector<MoELayerStats>& add) {
  if (into.empty()) {
    into = add;
    return;
  }
  for (std::size_t i = 0; i < add.size(); ++i) {
    MoELayerStats& s = into[i];
    const double t0 = static_cast<double>(s.tokens), t1 = static_cast<double>(add[i].tokens);
    s.active_params_per_token =
        (s.active_params_per_token * t0 + add[i].active_params_per_token * t1) / (t0 + t1);
    s.gate_entropy = (s.gate_entropy * t0 + add[i].gate_entropy * t1) / (t0 + t1);
    s.experts_per_token = (s.experts_per_token * t0 + add[i].experts_per_token * t1) / (t0 + t1);
    s.tokens += add[i].tokens;
    s.dropped += add[i].dropped;
    for (std::size_t e = 0; e < s.expert_tokens.size(); ++e) {
      s.expert_tokens[e] += add[i].expert_tokens[e];
    }
  }
}

class Trainer {
 public:
  Trainer(Config config, std::string run_dir, const TrainData& data)
      : config_(std::move(config)),
        run_dir_(std::move(run_dir)),
        data_(data),
        model_(config_.model, static_cast<std::uint64_t>(config_.train.seed)),
        optimizer_(config_.train) {}

  // Loads the checkpoint at `path` (model, optimizer, step).
  void resume_from(const std::string& path) {
    const CheckpointReader reader = CheckpointReader::open(path);
    const std::vector<std::string> changed = check_compatible(reader, config_);
    if (!changed.empty()) {
      std::printf("resume: keys that differ from the checkpoint's config (the new values "
                  "apply): %s\n",
                  absl::StrJoin(changed, ", ").c_str());
    }
    load_checkpoint(reader, model_.params(), &optimizer_);
    step_ = reader.meta().step;
    tokens_seen_ = reader.meta().tokens_seen;
    std::printf("resumed from %s at step %lld\n", path.c_str(), static_cast<long long>(step_));
  }

  int run() {
    const TrainConfig& tc = config_.train;
    MetricsLog metrics(run_dir_ + "/metrics.jsonl", step_);
    const double peak = measured_peak_flops();
    print_model_summary();
    std::printf("peak (measured sgemm): %.1f GFLOP/s; MFU is model FLOPs over this peak\n",
                peak / 1e9);
    const std::int64_t tokens_per_step = tc.batch_size * tc.seq_len;
    auto interval_start = std::chrono::steady_clock::now();
    const auto run_start = interval_start;
    const std::int64_t first_step = step_;
    std::int64_t interval_tokens = 0;
    double interval_flops = 0;
    int consecutive_skips = 0;
    if (step_ >= tc.steps) {
      std::printf("run already complete: step %lld of %lld\n", static_cast<long long>(step_),
                  static_cast<long long>(tc.steps));
    }
    while (step_ < tc.steps) {
      const std::int64_t step = step_ + 1;
      const double lr = learning_rate(tc, step);
      StepResult r = train_step(step, lr);
      if (r.skipped) {
        ++skipped_;
        if (++consecutive_skips >= kMaxConsecutiveSkips) {
          MOTLEY_FAIL(kRuntime, kMaxConsecutiveSkips, " consecutive steps had a non-finite loss "
                      "or gradient (last at step ", step, "); stopping without saving. Lower "
                      "train.lr, raise train.warmup, or check the data.");
        }
      } else {
        consecutive_skips = 0;
      }
      step_ = step;
      tokens_seen_ += tokens_per_step;
      interval_tokens += tokens_per_step;
      interval_flops += step_flops(r);
      if (step % tc.log_every == 0 || step == tc.steps) {
        const auto now = std::chrono::steady_clock::now();
        const double secs = std::chrono::duration<double>(now - interval_start).count();
        const double done_secs = std::chrono::duration<double>(now - run_start).count();
        const double tok_s = interval_tokens / std::max(secs, 1e-9);
        const double mfu = interval_flops / std::max(secs, 1e-9) / peak;
        const double eta = done_secs / static_cast<double>(step - first_step) *
                           static_cast<double>(tc.steps - step);
        log_step(metrics, step, lr, r, tok_s, mfu, eta);
        interval_start = now;
        interval_tokens = 0;
        interval_flops = 0;
      }
      const auto before_side_work = std::chrono::steady_clock::now();
      if (data_.valid && tc.eval_every > 0 && step % tc.eval_every == 0 && step != tc.steps) {
        run_eval(metrics, step, /*final=*/false);
      }
      const bool stop = g_stop_signal != 0;
      if ((tc.ckpt_every > 0 && step % tc.ckpt_every == 0) || step == tc.steps || stop) {
        save();
      }
      // Evaluation and checkpoints do not count against training throughput.
      interval_start += std::chrono::steady_clock::now() - before_side_work;
      if (stop) {
        std::printf("received signal %d: saved a checkpoint at step %lld; exiting with %d so "
                    "the job can be resumed\n",
                    static_cast<int>(g_stop_signal), static_cast<long long>(step),
                    kExitResumeMe);
        return kExitResumeMe;
      }
    }
    if (data_.valid) run_eval(metrics, step_, /*final=*/true);
    std::printf("done: %lld steps, %s tokens, run directory %s\n", static_cast<long long>(step_),
                format_count(static_cast<double>(tokens_seen_)).c_str(), run_dir_.c_str());
    return 0;
  }

 private:
  StepResult train_step(std::int64_t step, double lr) {
    const TrainConfig& tc = config_.train;
    const std::int64_t micro = tc.micro_batches;
    const std::int64_t per_micro = tc.batch_size / micro;
    model_.params().zero_grad();
    StepResult r;
    bool finite = true;
    for (std::int64_t m = 0; m < micro; ++m) {
      const std::int64_t first = m * per_micro;
      const Batch batch = sample_batch(*data_.train, static_cast<std::uint64_t>(tc.seed), step,
                                       first, per_micro, tc.seq_len);
      ForwardContext ctx;
      ctx.step = step;
      ctx.sequence_offset = first;
      ModelOutput out = model_.forward(batch.tokens, batch.targets, ctx);
      const double loss = out.loss.data().item();
      finite = finite && std::isfinite(loss);
      r.loss += loss / static_cast<double>(micro);
      r.lm_loss += out.lm_loss.data().item() / static_cast<double>(micro);
      r.aux_loss += out.aux_loss.data().item() / static_cast<double>(micro);
      accumulate_stats(r.moe, out.moe_stats);
      // The step's loss is the mean over micro-batches.
      autograd::scale(out.loss, 1.0 / static_cast<double>(micro)).backward();
    }
    r.grad_norm = std::sqrt(grad_sum_of_squares(model_.params()));
    if (!finite || !std::isfinite(r.grad_norm)) {
      r.skipped = true;
      model_.params().zero_grad();
      return r;
    }
    clip_gradients(model_.params(), r.grad_norm, tc.grad_clip);
    optimizer_.step(model_.params(), lr);
    return r;
  }

  // Model FLOPs of one step: 6 per active parameter per token (forward and
  // backward), plus attention's 12 * L * T * d per token (scores and
  // values, forward and backward), as in the PaLM paper's MFU. Active
  // parameters: everything but the embedding lookup, with each MoE layer
  // counting the experts its tokens actually used.
  double step_flops(const StepResult& r) const {
    const ModelConfig& m = config_.model;
    const double tokens = static_cast<double>(config_.train.batch_size * config_.train.seq_len);
    double active = static_cast<double>(model_.total_parameters()) -
                    static_cast<double>(m.vocab_size * m.d_model);
    for (std::int64_t l = 0; l < m.n_layers; ++l) {
      if (!m.is_moe_layer(l)) continue;
      for (std::int64_t s : model_.expert_sizes()) active -= 3.0 * m.d_model * s;
    }
    for (const MoELayerStats& s : r.moe) active += s.active_params_per_token;
    const double attention = 12.0 * m.n_layers * config_.train.seq_len * m.d_model;
    return tokens * (6.0 * active + attention);
  }

  void log_step(MetricsLog& metrics, std::int64_t step, double lr, const StepResult& r,
                double tok_s, double mfu, double eta) {
    const TrainConfig& tc = config_.train;
    double load_ratio = 1.0;
    for (const MoELayerStats& s : r.moe) {
      const auto [mn, mx] = std::minmax_element(s.expert_tokens.begin(), s.expert_tokens.end());
      const double ratio = *mn > 0 ? static_cast<double>(*mx) / static_cast<double>(*mn)
                                   : std::numeric_limits<double>::infinity();
      load_ratio = std::max(load_ratio, ratio);
    }
    std::string load = r.moe.empty() ? "dense"
                       : std::isfinite(load_ratio) ? absl::StrFormat("%.2f", load_ratio)
                                                   : std::string("inf");
    std::printf("step %*lld/%lld | loss %.4f (lm %.4f aux %.4f) | lr %.2e | gnorm %.3f | %s tok/s "
                "| mfu %.1f%% | load max/min %s | skipped %lld | eta %s\n",
                static_cast<int>(std::to_string(tc.steps).size()), static_cast<long long>(step),
                static_cast<long long>(tc.steps), r.loss, r.lm_loss, r.aux_loss, lr, r.grad_norm,
                format_count(tok_s).c_str(), 100.0 * mfu, load.c_str(),
                static_cast<long long>(skipped_), format_duration(eta).c_str());
    std::fflush(stdout);
    Json row;
    row["step"] = step;
    row["loss"] = r.loss;
    row["lm_loss"] = r.lm_loss;
    row["aux_loss"] = r.aux_loss;
    row["lr"] = lr;
    row["grad_norm"] = r.grad_norm;
    row["tokens_per_s"] = tok_s;
    row["mfu"] = mfu;
    row["skipped_steps"] = skipped_;
    Json experts = Json::array(), active = Json::array(), entropy = Json::array();
    for (const MoELayerStats& s : r.moe) {
      experts.push_back(s.expert_tokens);
      active.push_back(s.active_params_per_token);
      entropy.push_back(s.gate_entropy);
    }
    row["moe_layers"] = moe_layer_indices();
    row["expert_tokens"] = experts;
    row["active_params_per_token"] = active;
    row["gate_entropy"] = entropy;
    metrics.append(row);
  }

  Json moe_layer_indices() const {
    Json layers = Json::array();
    for (std::int64_t l = 0; l < config_.model.n_layers; ++l) {
      if (config_.model.is_moe_layer(l)) layers.push_back(l);
    }
    return layers;
  }

  void run_eval(MetricsLog& metrics, std::int64_t step, bool final) {
    ProgressBar bar("eval", eval_window_count(data_.valid->size(), config_.train.seq_len));
    const EvalResult e =
        evaluate(model_, *data_.valid, config_.train.seq_len,
                 std::max<std::int64_t>(1, config_.train.batch_size / config_.train.micro_batches),
                 data_.tokenizer ? &*data_.tokenizer : nullptr,
                 [&](std::int64_t done, std::int64_t) { bar.update(done); });
    bar.finish();
    std::printf("%s step %lld | eval_loss %.4f | ppl %.2f | bpb %s | %lld tokens\n",
                final ? "final eval" : "eval", static_cast<long long>(step), e.loss, e.perplexity,
                e.bits_per_byte ? absl::StrFormat("%.4f", *e.bits_per_byte).c_str() : "n/a",
                static_cast<long long>(e.tokens));
    std::fflush(stdout);
    Json row;
    row["step"] = step;
    row["eval_loss"] = e.loss;
    row["eval_ppl"] = e.perplexity;
    if (e.bits_per_byte) row["eval_bpb"] = *e.bits_per_byte;
    metrics.append(row);
  }

  void save() {
    CheckpointMeta meta;
    meta.step = step_;
    meta.tokens_seen = tokens_seen_;
    meta.seed = config_.train.seed;
    meta.config_json = config_.resolved_json().dump();
    meta.dp = config_.parallel.dp;
    meta.ep = config_.parallel.ep;
    meta.pp = config_.parallel.pp;
    const std::string path = checkpoint_path(run_dir_, step_);
    save_checkpoint(path, model_.params(), &optimizer_, meta,
                    data_.tokenizer ? data_.tokenizer->to_json() : std::string());
    write_latest(run_dir_, fs::path(path).filename().string());
    prune_checkpoints(run_dir_, config_.train.keep_last);
    std::printf("saved checkpoint %s\n", path.c_str());
  }

  void print_model_summary() const {
    const ModelConfig& m = config_.model;
    std::printf("model: %s parameters, d_model %lld, %lld layers, %lld heads, vocab %lld\n",
                format_count(static_cast<double>(model_.total_parameters())).c_str(),
                static_cast<long long>(m.d_model), static_cast<long long>(m.n_layers),
                static_cast<long long>(m.n_heads), static_cast<long long>(m.vocab_size));
    if (m.moe.n_experts > 0) {
      std::printf("experts: %lld per MoE layer (%s sizes: %s), router %s, selection %s\n",
                  static_cast<long long>(m.moe.n_experts), m.moe.expert_sizes.c_str(),
                  absl::StrJoin(model_.expert_sizes(), " ").c_str(), m.moe.router.c_str(),
                  m.moe.selection.c_str());
    }
    std::fflush(stdout);
  }

  Config config_;
  std::string run_dir_;
  const TrainData& data_;
  Transformer model_;
  AdamW optimizer_;
  std::int64_t step_ = 0;
  std::int64_t tokens_seen_ = 0;
  std::int64_t skipped_ = 0;
};

}  // namespace

int train_main(int argc, char** argv) {
  CommandLine cli("train", "Train a model from a JSON config (docs/config.md lists the keys).");
  cli.flag("config", "FILE", "the JSON config (configs/ holds presets)");
  cli.repeated("set", "KEY=VALUE", "override a config key, e.g. --set train.lr=3e-4");
  cli.flag("run", "DIR", "run directory for config.json, metrics.jsonl and checkpoints/",
           std::string("runs/<config name>"));
  cli.flag("resume", "auto|PATH|none",
           "auto: continue from RUN/checkpoints/LATEST if there is one; PATH: from that "
           "checkpoint; none: start fresh",
           std::string("auto"));
  if (!cli.parse(argc, argv)) return 0;
  const std::string config_path = cli.get("config");
  Config config = Config::load(config_path, cli.all("set"));
  const std::string run_dir =
      cli.has("run") ? cli.get("run") : "runs/" + fs::path(config_path).stem().string();
  const std::string resume = cli.get("resume");

  const TrainData data = open_train_data(config);
  check_vocab(config, data);
  fs::create_directories(run_dir + "/checkpoints");
  {
    std::ofstream out(run_dir + "/config.json");
    out << config.resolved_json().dump(2) << "\n";
  }
  std::printf("config (resolved):\n%s\n", config.resolved_json().dump(2).c_str());

  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGUSR1, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);

  Trainer trainer(config, run_dir, data);
  if (resume == "auto") {
    if (auto latest = latest_checkpoint(run_dir)) trainer.resume_from(*latest);
  } else if (resume != "none") {
    trainer.resume_from(resume);
  }
  return trainer.run();
}

}  // namespace motley::apps
