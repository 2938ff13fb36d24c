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
//
// Under mpirun / srun the same loop runs on every rank of a (dp, ep, pp)
// layout (SPEC section 3, docs/parallel.md): each rank holds one pipeline
// stage's layers and its EP rank's experts, runs its shard's micro-batches
// on the 1F1B schedule with backward(loss_j / (dp * m)) (Note [Gradient
// scaling] in parallel/grad_reducer.h), sums gradients over replicas,
// and agrees with every other rank on the global norm and on skipping.
// Rank 0 alone prints and writes metrics.jsonl; checkpoints are written by
// every rank into one file without gathering (save_checkpoint_sharded), and
// resumed under any layout by each rank reading the tensors it holds. With
// parallel.placement = balanced and ep > 1, experts may change EP rank
// every parallel.replace_every steps (Note [Re-placement] in
// parallel/placement.h; Trainer::replace_experts). A single process (no
// MPI launcher, dp = pp = 1) runs the original loop unchanged, without MPI.
#include <signal.h>

#include <algorithm>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "apps/cli.h"
#include "apps/evaluate.h"
#include "apps/progress.h"
#include "apps/subcommands.h"
#include "apps/train_support.h"
#include "autograd/engine.h"
#include "autograd/ops.h"
#include "checkpoint/checkpoint.h"
#include "core/ops.h"
#include "data/sampler.h"
#include "layers/expert_sizes.h"
#include "nlohmann/json.hpp"
#include "parallel/communicator.h"
#include "parallel/expert_exchange.h"
#include "parallel/grad_reducer.h"
#include "parallel/launcher.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/placement.h"
#include "parallel/process_groups.h"

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

// Handler that persists after delivery (no SA_RESETHAND) and restarts
// interrupted system calls, so a signal never aborts file or MPI I/O.
void install_stop_handler(int signal) {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  MOTLEY_CHECK_KIND(kRuntime, sigaction(signal, &action, nullptr) == 0,
                    "cannot install the handler for signal ", signal);
}

constexpr int kExitResumeMe = 75;
constexpr int kTagActivation = 101;
constexpr int kTagGradient = 102;
constexpr int kTagMigration = 103;

// Note [Fault injection]
// MOTLEY_FAULT_INJECT="rank=R,step=S" makes world rank R throw a kRuntime
// error at the start of step S (before any of that step's
// communication), as a failing rank would. It exists to test that one
// rank's failure ends the whole job (train_main calls MPI_Abort) rather
// than leaving the other ranks blocked in a collective. Unset: nothing.
// A malformed value is a kUsage error naming the variable.
struct FaultInjection {
  int rank = -1;
  std::int64_t step = -1;
};

FaultInjection fault_injection_from_env() {
  FaultInjection f;
  const char* env = std::getenv("MOTLEY_FAULT_INJECT");
  if (env == nullptr || *env == '\0') return f;
  const std::string value = env;
  bool have_rank = false, have_step = false;
  std::size_t start = 0;
  while (start <= value.size()) {
    const std::size_t comma = std::min(value.find(',', start), value.size());
    const std::string item = value.substr(start, comma - start);
    const std::size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const std::string number = eq == std::string::npos ? "" : item.substr(eq + 1);
    char* end = nullptr;
    const long long n = number.empty() ? -1 : std::strtoll(number.c_str(), &end, 10);
    MOTLEY_CHECK_KIND(kUsage, (key == "rank" || key == "step") && !number.empty() &&
                                  *end == '\0' && n >= 0,
                      "MOTLEY_FAULT_INJECT='", value, "' must be \"rank=R,step=S\" with ",
                      "non-negative integers R and S");
    if (key == "rank") {
      f.rank = static_cast<int>(n);
      have_rank = true;
    } else {
      f.step = n;
      have_step = true;
    }
    start = comma + 1;
  }
  MOTLEY_CHECK_KIND(kUsage, have_rank && have_step, "MOTLEY_FAULT_INJECT='", value,
                    "' must name both rank and step, e.g. \"rank=1,step=3\"");
  return f;
}

namespace par = parallel;
namespace ag = autograd;
constexpr int kMaxConsecutiveSkips = 10;

struct StepResult {
  double loss = 0, lm_loss = 0, aux_loss = 0, grad_norm = 0;
  bool skipped = false;
  std::vector<MoELayerStats> moe;  // summed over micro-batches
  // Bytes all ranks sent to other ranks in the expert all-to-alls of the
  // step (forward and backward); 0 without expert parallelism.
  double ep_bytes = 0;
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
  Trainer(Config config, std::string run_dir, const TrainData& data,
          std::shared_ptr<par::ProcessGroups> groups)
      : config_(std::move(config)),
        run_dir_(std::move(run_dir)),
        data_(data),
        groups_(std::move(groups)),
        root_(groups_->rank() == 0),
        parallel_(groups_->layout().world() > 1),
        owner_(expert_owner(config_, *groups_)),
        model_(config_.model, static_cast<std::uint64_t>(config_.train.seed), DType::kF32,
               Device::cpu(), shard_of(config_, *groups_, owner_)),
        optimizer_(config_.train) {
    const ModelConfig& m = config_.model;
    gru_stage_ = -1;
    if (m.moe.n_experts > 0 && m.moe.router == "gru") {
      for (std::int64_t l = 0; l < m.n_layers && gru_stage_ < 0; ++l) {
        if (m.is_moe_layer(l)) gru_stage_ = par::stage_of_layer(m.n_layers, groups_->layout().pp, l);
      }
    }
    if (groups_->layout().ep > 1) {
      exchange_ = std::make_unique<par::CommExpertExchange>(groups_->ep(), owner_);
    }
    replace_every_ = parallel_ && groups_->layout().ep > 1 && m.moe.n_experts > 0 &&
                             config_.parallel.placement == "balanced"
                         ? config_.parallel.replace_every
                         : 0;
    window_tokens_.clear();  // (MoE layers, E), sized by the first step's statistics
    fault_ = fault_injection_from_env();
  }

  // Expert owner map (Note [Expert placement]); every expert on ep_rank 0
  // when ep == 1.
  static std::vector<int> expert_owner(const Config& c, const par::ProcessGroups& g) {
    const std::int64_t e = c.model.moe.n_experts;
    if (e == 0) return {};
    return par::place_experts(c.parallel.placement, expert_hidden_sizes(c.model.moe),
                              g.layout().ep);
  }

  static ModelShard shard_of(const Config& c, const par::ProcessGroups& g,
                             const std::vector<int>& owner) {
    ModelShard shard;
    const par::StageLayers block = par::stage_layers(c.model.n_layers, g.layout().pp, g.pp_rank());
    shard.layer_begin = block.begin;
    shard.layer_end = block.end;
    if (g.layout().ep > 1) {
      for (int o : owner) shard.hold_expert.push_back(o == g.ep_rank());
    }
    return shard;
  }

  // Loads the checkpoint at `path` (model, optimizer, step).
  void resume_from(const std::string& path) {
    const CheckpointReader reader = CheckpointReader::open(path);
    const std::vector<std::string> changed = check_compatible(reader, config_);
    if (!changed.empty() && root_) {
      std::printf("resume: keys that differ from the checkpoint's config (the new values "
                  "apply): %s\n",
                  absl::StrJoin(changed, ", ").c_str());
    }
    load_checkpoint(reader, model_.params(), &optimizer_);
    step_ = reader.meta().step;
    tokens_seen_ = reader.meta().tokens_seen;
    if (root_) {
      std::printf("resumed from %s at step %lld\n", path.c_str(), static_cast<long long>(step_));
    }
  }

  int run() {
    const TrainConfig& tc = config_.train;
    std::optional<MetricsLog> metrics_log;
    if (root_) metrics_log.emplace(run_dir_ + "/metrics.jsonl", step_);
    MetricsLog* metrics = metrics_log ? &*metrics_log : nullptr;
    build_reducer();
    // MFU: the step's model FLOPs (all ranks) over world x one rank's
    // measured sgemm rate (with the BLAS threads it was given; Note [BLAS
    // threads]). Ranks sharing cores (mpirun --oversubscribe) make this an
    // underestimate of what the hardware gives.
    const int world = groups_->layout().world();
    const double rank_peak = root_ ? measured_peak_flops() : 1.0;
    const double peak = rank_peak * world;
    print_model_summary();
    if (root_) {
      std::printf("peak (measured sgemm): %.1f GFLOP/s per rank x %d rank(s); MFU is model FLOPs "
                  "over this peak\n",
                  rank_peak / 1e9, world);
    }
    const std::int64_t tokens_per_step = tc.batch_size * tc.seq_len;
    auto interval_start = std::chrono::steady_clock::now();
    const auto run_start = interval_start;
    const std::int64_t first_step = step_;
    std::int64_t interval_tokens = 0;
    double interval_flops = 0;
    int consecutive_skips = 0;
    if (step_ >= tc.steps && root_) {
      std::printf("run already complete: step %lld of %lld\n", static_cast<long long>(step_),
                  static_cast<long long>(tc.steps));
    }
    while (step_ < tc.steps) {
      const std::int64_t step = step_ + 1;
      const double lr = learning_rate(tc, step);
      if (groups_->rank() == fault_.rank && step == fault_.step) {
        MOTLEY_FAIL(kRuntime, "MOTLEY_FAULT_INJECT: injected failure on rank ", fault_.rank,
                    " at step ", step, " (Note [Fault injection])");
      }
      StepResult r = parallel_ ? train_step_parallel(step, lr) : train_step(step, lr);
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
      // After the update, before eval and checkpoint: the step's row (always
      // written when the map changes) carries the new placement.
      std::optional<Json> placement;
      if (replace_every_ > 0) placement = maybe_replace(step, r);
      if (step % tc.log_every == 0 || step == tc.steps || placement) {
        const auto now = std::chrono::steady_clock::now();
        const double secs = std::chrono::duration<double>(now - interval_start).count();
        const double done_secs = std::chrono::duration<double>(now - run_start).count();
        const double tok_s = interval_tokens / std::max(secs, 1e-9);
        const double mfu = interval_flops / std::max(secs, 1e-9) / peak;
        const double eta = done_secs / static_cast<double>(step - first_step) *
                           static_cast<double>(tc.steps - step);
        log_step(metrics, step, lr, r, tok_s, mfu, eta, placement ? &*placement : nullptr);
        interval_start = now;
        interval_tokens = 0;
        interval_flops = 0;
      }
      const auto before_side_work = std::chrono::steady_clock::now();
      if (data_.valid && tc.eval_every > 0 && step % tc.eval_every == 0 && step != tc.steps) {
        run_eval(metrics, step, /*final=*/false);
      }
      const bool stop = stop_requested();
      if ((tc.ckpt_every > 0 && step % tc.ckpt_every == 0) || step == tc.steps || stop) {
        save();
      }
      // Evaluation and checkpoints do not count against training throughput.
      interval_start += std::chrono::steady_clock::now() - before_side_work;
      if (stop) {
        if (root_) std::printf("received signal %d: saved a checkpoint at step %lld; exiting with %d so "
                    "the job can be resumed\n",
                    static_cast<int>(g_stop_signal), static_cast<long long>(step),
                    kExitResumeMe);
        return kExitResumeMe;
      }
    }
    if (data_.valid) run_eval(metrics, step_, /*final=*/true);
    if (root_) std::printf("done: %lld steps, %s tokens, run directory %s\n", static_cast<long long>(step_),
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

  // ---- parallel step (docs/parallel.md) ---------------------------------------------
  // Whether any rank received a stop signal: the decision to checkpoint and
  // exit must be the same everywhere.
  bool stop_requested() {
    if (!parallel_) return g_stop_signal != 0;
    Tensor flag = Tensor::from_vector(std::vector<double>{g_stop_signal != 0 ? 1.0 : 0.0}, {1});
    groups_->world().allreduce_sum(flag);
    return flag.to_vector<double>()[0] > 0;
  }

  // Whether the router state travels with x at the boundary after `layer_end`.
  bool state_crosses(std::int64_t layer_end) const {
    const ModelConfig& m = config_.model;
    if (m.moe.n_experts == 0 || m.moe.router != "gru") return false;
    for (std::int64_t l = 0; l < layer_end; ++l) {
      if (m.is_moe_layer(l)) return true;
    }
    return false;
  }

  // Note [Pipeline messages] (parallel/pipeline_schedule.h): one flat
  // buffer per micro-batch and direction: x (b, T, d) then, for the gru
  // router, the state (b*T, p). Shapes are derived from the config on
  // both sides, never sent.
  Tensor pack(const Tensor& x, const Tensor& state) const {
    if (!state.defined()) return x.contiguous().reshape({x.numel()}).clone();
    return ops::cat(std::vector<Tensor>{x.contiguous().reshape({x.numel()}),
                                        state.contiguous().reshape({state.numel()})},
                    0);
  }

  StepResult train_step_parallel(std::int64_t step, double lr) {
    const TrainConfig& tc = config_.train;
    const par::GroupLayout& layout = groups_->layout();
    const std::int64_t micro = tc.micro_batches;
    const std::int64_t per_micro = tc.batch_size / (layout.dp * micro);
    const std::int64_t shard_first = groups_->dp_rank() * (tc.batch_size / layout.dp);
    // Note [Gradient scaling] in parallel/grad_reducer.h.
    const double inv = 1.0 / static_cast<double>(layout.dp * micro);
    const bool first = groups_->first_stage(), last = groups_->last_stage();
    const std::int64_t t = tc.seq_len, d = config_.model.d_model, p = config_.model.moe.gru_dim;
    const bool state_in = state_crosses(model_.layer_begin());
    const bool state_out = state_crosses(model_.layer_end());
    par::Communicator& pp = groups_->pp();

    struct InFlight {
      Activations in;   // received leaves (stages after the first)
      Activations out;  // sent to the next stage
      Variable aux;     // this stage's aux loss
      Variable loss;    // last stage: lm + aux
    };
    std::map<std::int64_t, InFlight> flight;
    std::vector<par::Request> sends;
    model_.params().zero_grad();
    StepResult r;
    double lm_sum = 0, aux_sum = 0;
    std::int64_t backwards = 0;
    for (const par::PipelineAction& action :
         par::one_f_one_b(groups_->pp_rank(), layout.pp, micro)) {
      const std::int64_t j = action.micro_batch;
      const std::int64_t seq_first = shard_first + j * per_micro;
      if (action.kind == par::PipelineAction::kForward) {
        const Batch batch = sample_batch(*data_.train, static_cast<std::uint64_t>(tc.seed), step,
                                         seq_first, per_micro, t);
        ForwardContext ctx;
        ctx.step = step;
        ctx.sequence_offset = seq_first;
        ctx.expert_exchange = exchange_.get();
        InFlight f;
        Activations in;
        if (first) {
          in = model_.embed(batch.tokens);
        } else {
          const std::int64_t nx = per_micro * t * d, ns = state_in ? per_micro * t * p : 0;
          Tensor buf = Tensor::empty({nx + ns});
          pp.recv(buf, groups_->prev_stage(), kTagActivation);
          in.x = Variable(buf.narrow(0, 0, nx).view({per_micro, t, d}).clone(), true);
          if (state_in) {
            in.router_state = Variable(buf.narrow(0, nx, ns).view({per_micro * t, p}).clone(), true);
          }
          f.in = in;
        }
        ModelOutput out;
        Activations act = model_.run_layers(in, ctx, out);
        accumulate_stats(r.moe, out.moe_stats);
        f.aux = out.aux_loss;
        if (f.aux.defined()) aux_sum += f.aux.data().item() * inv;
        if (last) {
          Variable lm = model_.head_loss(act.x, batch.targets);
          lm_sum += lm.data().item() * inv;
          f.loss = f.aux.defined() ? ag::add(lm, ag::to_dtype(f.aux, lm.dtype())) : lm;
        } else {
          f.out = act;
          sends.push_back(pp.isend(
              pack(act.x.data(), state_out ? act.router_state.data() : Tensor()),
              groups_->next_stage(), kTagActivation));
        }
        flight[j] = std::move(f);
      } else {
        InFlight& f = flight.at(j);
        // The step's last backward on this stage: the reducer may start.
        if (++backwards == micro && reducer_) reducer_->arm();
        if (last) {
          ag::scale(f.loss, inv).backward();
        } else {
          const std::int64_t nx = per_micro * t * d, ns = state_out ? per_micro * t * p : 0;
          Tensor buf = Tensor::empty({nx + ns});
          pp.recv(buf, groups_->next_stage(), kTagGradient);
          std::vector<Variable> roots{f.out.x};
          std::vector<Tensor> grads{buf.narrow(0, 0, nx).view({per_micro, t, d})};
          if (state_out && f.out.router_state.requires_grad()) {
            roots.push_back(f.out.router_state);
            grads.push_back(buf.narrow(0, nx, ns).view({per_micro * t, p}));
          }
          if (f.aux.defined() && f.aux.requires_grad()) {
            Variable scaled = ag::scale(f.aux, inv);
            roots.push_back(scaled);
            grads.push_back(Tensor::ones({}, scaled.dtype()));
          }
          ag::backward(roots, grads);
        }
        if (!first) {
          auto grad_of = [](const Variable& v) {
            return v.grad().defined() ? v.grad() : Tensor::zeros(v.shape(), v.dtype());
          };
          sends.push_back(pp.isend(pack(grad_of(f.in.x), state_in ? grad_of(f.in.router_state)
                                                                   : Tensor()),
                                   groups_->prev_stage(), kTagGradient));
        }
        flight.erase(j);
      }
    }
    par::wait_all(sends);
    if (reducer_) reducer_->finish();
    if (gru_stage_ >= 0 && layout.pp > 1) {
      par::reduce_shared_gru(model_.params(), *groups_, config_.model.moe.gru_dim, DType::kF32);
    }
    // Losses: every rank adds its share (lm on the last stage, aux on each
    // stage with MoE layers); the sums over the world are the step's means.
    // The expert all-to-all bytes ride along (exact integers in a double).
    const double ep_bytes = exchange_ ? static_cast<double>(exchange_->bytes_sent()) : 0.0;
    if (exchange_) exchange_->reset_bytes_sent();
    Tensor losses = Tensor::from_vector(std::vector<double>{lm_sum, aux_sum, ep_bytes}, {3});
    groups_->world().allreduce_sum(losses);
    const std::vector<double> lv = losses.to_vector<double>();
    r.lm_loss = lv[0];
    r.aux_loss = lv[1];
    r.loss = lv[0] + lv[1];
    r.ep_bytes = lv[2];
    reduce_stats(r.moe);
    r.grad_norm = std::sqrt(par::global_grad_sum_of_squares(model_.params(), *groups_, gru_stage_));
    // Every rank sees the same reduced loss and norm, so all skip together.
    if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) {
      r.skipped = true;
      model_.params().zero_grad();
      return r;
    }
    clip_gradients(model_.params(), r.grad_norm, tc.grad_clip);
    optimizer_.step(model_.params(), lr);
    return r;
  }

  // Sums the routing statistics of every rank into one entry per MoE layer
  // of the whole model (token-weighted means for the per-token values).
  // Collective over the world.
  void reduce_stats(std::vector<MoELayerStats>& moe) const {
    const ModelConfig& m = config_.model;
    if (m.moe.n_experts == 0) return;
    std::vector<std::int64_t> layers;
    for (std::int64_t l = 0; l < m.n_layers; ++l) {
      if (m.is_moe_layer(l)) layers.push_back(l);
    }
    const std::int64_t e = m.moe.n_experts, width = 5 + e;
    std::vector<double> buf(layers.size() * width, 0.0);
    for (const MoELayerStats& s : moe) {
      const auto at = std::find(layers.begin(), layers.end(), s.layer) - layers.begin();
      double* row = &buf[at * width];
      const double tokens = static_cast<double>(s.tokens);
      row[0] = tokens;
      row[1] = static_cast<double>(s.dropped);
      row[2] = s.active_params_per_token * tokens;
      row[3] = s.gate_entropy * tokens;
      row[4] = s.experts_per_token * tokens;
      for (std::int64_t k = 0; k < e; ++k) row[5 + k] = static_cast<double>(s.expert_tokens[k]);
    }
    Tensor t = Tensor::from_vector(buf, {static_cast<std::int64_t>(buf.size())});
    groups_->world().allreduce_sum(t);
    buf = t.to_vector<double>();
    moe.clear();
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const double* row = &buf[i * width];
      MoELayerStats s;
      s.layer = layers[i];
      s.tokens = static_cast<std::int64_t>(row[0]);
      s.dropped = static_cast<std::int64_t>(row[1]);
      const double tokens = std::max(row[0], 1.0);
      s.active_params_per_token = row[2] / tokens;
      s.gate_entropy = row[3] / tokens;
      s.experts_per_token = row[4] / tokens;
      for (std::int64_t k = 0; k < e; ++k) s.expert_tokens.push_back(static_cast<std::int64_t>(row[5 + k]));
      moe.push_back(std::move(s));
    }
  }

  // ---- expert re-placement (Note [Re-placement] in parallel/placement.h) -------------
  // The gradient reducer of the current parameters (dp > 1): its buckets
  // and hooks bind them, so it is rebuilt whenever the parameters are.
  void build_reducer() {
    reducer_.reset();
    if (parallel_ && groups_->layout().dp > 1) {
      reducer_ = std::make_unique<par::GradReducer>(model_.params(), *groups_);
    }
  }

  // Adds the step's routed tokens (world-reduced, per MoE layer: the one
  // owner map serves them all, Note [Re-placement]) to the window and, every
  // replace_every steps, decides and migrates. Returns the metrics row's
  // "placement" field when the map changed. Collective over the world.
  std::optional<Json> maybe_replace(std::int64_t step, const StepResult& r) {
    const std::int64_t n_experts = config_.model.moe.n_experts;
    // r.moe holds every MoE layer of the model (world-reduced), in order.
    if (window_tokens_.size() != r.moe.size()) {
      window_tokens_.assign(r.moe.size(), std::vector<double>(n_experts, 0.0));
    }
    for (std::size_t l = 0; l < r.moe.size(); ++l) {
      for (std::int64_t e = 0; e < n_experts; ++e) {
        window_tokens_[l][e] += static_cast<double>(r.moe[l].expert_tokens[e]);
      }
    }
    if (step % replace_every_ != 0) return std::nullopt;
    const int ep = groups_->layout().ep;
    const par::ReplacementDecision d =
        par::decide_replacement(owner_, window_tokens_, model_.expert_sizes(), ep);
    for (std::vector<double>& layer : window_tokens_) layer.assign(n_experts, 0.0);
    // The counts are exact integers reduced identically on every rank, so
    // every rank computes the same decision; world rank 0's is the one
    // applied all the same, so the ranks cannot diverge.
    std::vector<std::int64_t> message(1 + n_experts, 0);
    message[0] = d.replace ? 1 : 0;
    for (std::int64_t e = 0; e < n_experts; ++e) message[1 + e] = d.candidate[e];
    Tensor t = Tensor::from_vector(message, {1 + n_experts});
    groups_->world().broadcast(t, 0);
    message = t.to_vector<std::int64_t>();
    if (message[0] == 0) return std::nullopt;
    const std::vector<int> next(message.begin() + 1, message.end());
    const std::vector<int> before = owner_;
    replace_experts(next);

    const std::vector<double> load_before = par::rank_loads(before, d.load, ep);
    const std::vector<double> load_after = par::rank_loads(next, d.load, ep);
    const std::vector<std::int64_t> params =
        par::rank_expert_params(next, model_.expert_sizes(), config_.model.d_model, ep);
    std::vector<int> moved;
    for (const par::ExpertMove& m : par::expert_moves(before, next)) moved.push_back(m.expert);
    Json field;
    field["owner"] = next;
    field["moved"] = moved;
    field["rank_load_before"] = load_before;
    field["rank_load_after"] = load_after;
    field["rank_expert_params"] = params;
    field["cost_before"] = d.current_max;
    field["cost_after"] = d.candidate_max;
    if (root_) {
      std::printf("re-placement at step %lld (routing of the last %lld steps, load = tokens * "
                  "h_e): expert cost (sum over MoE layers of the busiest rank's load) %s -> %s "
                  "(%.1f%% lower), experts {%s} move\n",
                  static_cast<long long>(step), static_cast<long long>(replace_every_),
                  format_count(d.current_max).c_str(), format_count(d.candidate_max).c_str(),
                  100.0 * (1.0 - d.candidate_max / d.current_max),
                  absl::StrJoin(moved, ", ").c_str());
      for (int rank = 0; rank < ep; ++rank) {
        std::printf("  ep_rank %d: experts {%s}, %s expert parameters per MoE layer, load %s -> "
                    "%s\n",
                    rank, absl::StrJoin(experts_of(next, rank), ", ").c_str(),
                    format_count(static_cast<double>(params[rank])).c_str(),
                    format_count(load_before[rank]).c_str(),
                    format_count(load_after[rank]).c_str());
      }
      std::fflush(stdout);
    }
    return field;
  }

  // Moves every expert whose owner changes from `owner_` to `next` to its
  // new EP rank, in every EP group: the old owner sends each of this
  // stage's MoE layers' w1, w2, w3 of the expert (registration order) and
  // their AdamW moments; the new owner receives them into a Transformer
  // built for the new shard, which takes every other tensor from the
  // current one. Then everything built from the map is rebuilt: the model
  // (owner_, ModelShard), the optimizer's state (moved entries erased on
  // the sender; the step count is global and stays), the reducer, the
  // expert exchange and the checkpoint writers. No value changes.
  // Point-to-point over the ep group; sends are non-blocking, so a swap
  // between two ranks cannot deadlock, and MPI keeps one pair's messages
  // with one tag in order.
  void replace_experts(const std::vector<int>& next) {
    const std::vector<par::ExpertMove> moves = par::expert_moves(owner_, next);
    reducer_.reset();  // removes its hooks from the current parameters
    Transformer next_model(config_.model, static_cast<std::uint64_t>(config_.train.seed),
                           DType::kF32, Device::cpu(), shard_of(config_, *groups_, next));
    const ParameterSet& now = model_.params();
    for (const Variable& p : next_model.params().all()) {
      if (!now.contains(p.name())) continue;
      Tensor data = p.data();
      data.copy_(now.get(p.name()).data());
    }
    par::Communicator& ep = groups_->ep();
    const int me = groups_->ep_rank();
    std::vector<par::Request> sends;
    std::vector<std::string> sent;
    for (const par::ExpertMove& move : moves) {
      if (move.from == me) {
        for (const std::string& name : expert_param_names(now, move.expert)) {
          const Variable& p = now.get(name);
          const AdamWState& st = optimizer_.state(p);
          sends.push_back(ep.isend(p.data(), move.to, kTagMigration));
          sends.push_back(ep.isend(st.exp_avg, move.to, kTagMigration));
          sends.push_back(ep.isend(st.exp_avg_sq, move.to, kTagMigration));
          sent.push_back(name);
        }
      } else if (move.to == me) {
        for (const std::string& name : expert_param_names(next_model.params(), move.expert)) {
          const Variable& p = next_model.params().get(name);
          MOTLEY_CHECK(!optimizer_.has_state(name), "optimizer state of '", name,
                       "' on a rank that did not hold it");
          AdamWState& st = optimizer_.state(p);
          Tensor data = p.data();
          ep.recv(data, move.from, kTagMigration);
          ep.recv(st.exp_avg, move.from, kTagMigration);
          ep.recv(st.exp_avg_sq, move.from, kTagMigration);
        }
      }
    }
    par::wait_all(sends);
    for (const std::string& name : sent) optimizer_.erase_state(name);
    model_ = std::move(next_model);
    owner_ = next;
    exchange_ = std::make_unique<par::CommExpertExchange>(groups_->ep(), owner_);
    build_reducer();
    ckpt_specs_.clear();  // writers follow owner_ (checkpoint_writer)
    ckpt_writer_.clear();
  }

  // Names of global expert `expert`'s parameters in `params`, in
  // registration order (by layer, then w1, w2, w3).
  static std::vector<std::string> expert_param_names(const ParameterSet& params, int expert) {
    const std::string key = absl::StrCat(".moe.experts.", expert, ".");
    std::vector<std::string> names;
    for (const Variable& p : params.all()) {
      if (p.name().find(key) != std::string::npos) names.push_back(p.name());
    }
    return names;
  }

  static std::vector<std::int64_t> experts_of(const std::vector<int>& owner, int rank) {
    std::vector<std::int64_t> held;
    for (std::size_t e = 0; e < owner.size(); ++e) {
      if (owner[e] == rank) held.push_back(static_cast<std::int64_t>(e));
    }
    return held;
  }

  // World rank that writes parameter `name` to a checkpoint and sends it
  // to a gathered copy (checkpoint_writer in checkpoint/checkpoint.h).
  int contributor(const std::string& name) const {
    return checkpoint_writer(name, config_.model, groups_->layout(), owner_);
  }

  // Gathers every parameter and its AdamW moments into full_model_ /
  // full_optim_ on rank 0 (built on first use with the single-process
  // registration order). Collective over the world: each contributor
  // sends its tensors in its own registration order, a subsequence of the
  // full order in which rank 0 receives them.
  void gather_full() {
    par::Communicator& world = groups_->world();
    const int me = world.rank();
    if (root_) {
      if (!full_model_) {
        full_model_ = std::make_unique<Transformer>(
            config_.model, static_cast<std::uint64_t>(config_.train.seed));
        full_optim_ = std::make_unique<AdamW>(config_.train);
      }
      for (const Variable& p : full_model_->params().all()) {
        AdamWState& st = full_optim_->state(p);
        Tensor data = p.data();
        const int from = contributor(p.name());
        if (from == me) {
          const Variable& mine = model_.params().get(p.name());
          AdamWState& local = optimizer_.state(mine);
          data.copy_(mine.data());
          st.exp_avg.copy_(local.exp_avg);
          st.exp_avg_sq.copy_(local.exp_avg_sq);
        } else {
          world.recv(data, from, 1);
          world.recv(st.exp_avg, from, 2);
          world.recv(st.exp_avg_sq, from, 3);
        }
      }
      full_optim_->set_step_count(optimizer_.step_count());
    } else {
      for (const Variable& p : model_.params().all()) {
        if (contributor(p.name()) != me) continue;
        AdamWState& local = optimizer_.state(p);
        world.send(p.data().contiguous(), 0, 1);
        world.send(local.exp_avg.contiguous(), 0, 2);
        world.send(local.exp_avg_sq.contiguous(), 0, 3);
      }
    }
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

  void log_step(MetricsLog* metrics, std::int64_t step, double lr, const StepResult& r,
                double tok_s, double mfu, double eta, const Json* placement = nullptr) {
    if (!root_) return;
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
    if (placement) row["placement"] = *placement;
    if (groups_->layout().ep > 1) row["ep_bytes"] = r.ep_bytes;
    metrics->append(row);
  }

  Json moe_layer_indices() const {
    Json layers = Json::array();
    for (std::int64_t l = 0; l < config_.model.n_layers; ++l) {
      if (config_.model.is_moe_layer(l)) layers.push_back(l);
    }
    return layers;
  }

  void run_eval(MetricsLog* metrics, std::int64_t step, bool final) {
    // Parallel runs evaluate on rank 0 with the gathered full model (not
    // parallel yet: docs/parallel.md).
    Transformer* model = &model_;
    if (parallel_) {
      gather_full();
      model = full_model_.get();
    }
    if (!root_) {
      groups_->world().barrier();
      return;
    }
    ProgressBar bar("eval", eval_window_count(data_.valid->size(), config_.train.seq_len));
    const EvalResult e =
        evaluate(*model, *data_.valid, config_.train.seq_len,
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
    metrics->append(row);
    if (parallel_) groups_->world().barrier();
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
    if (parallel_) {
      // No gathering: every rank writes the tensors it is the writer of
      // into one shared file through parallel HDF5 (save_checkpoint_sharded
      // in checkpoint/checkpoint.h); the file is complete and renamed when
      // it returns on every rank. LATEST and pruning are rank 0's.
      if (ckpt_specs_.empty()) {
        ckpt_specs_ = global_parameter_specs(config_.model);
        for (const TensorSpec& spec : ckpt_specs_) ckpt_writer_.push_back(contributor(spec.name));
      }
      save_checkpoint_sharded(path, model_.params(), optimizer_, meta,
                              data_.tokenizer ? data_.tokenizer->to_json() : std::string(),
                              ckpt_specs_, ckpt_writer_, groups_->world());
      if (root_) {
        write_latest(run_dir_, fs::path(path).filename().string());
        prune_checkpoints(run_dir_, config_.train.keep_last);
        std::printf("saved checkpoint %s\n", path.c_str());
        std::fflush(stdout);
      }
      groups_->world().barrier();  // LATEST names the new file for every rank
      return;
    }
    save_checkpoint(path, model_.params(), &optimizer_, meta,
                    data_.tokenizer ? data_.tokenizer->to_json() : std::string());
    write_latest(run_dir_, fs::path(path).filename().string());
    prune_checkpoints(run_dir_, config_.train.keep_last);
    std::printf("saved checkpoint %s\n", path.c_str());
  }

  void print_model_summary() const {
    if (!root_) return;
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
    if (parallel_) print_layout();
    std::fflush(stdout);
  }

  void print_layout() const {
    const par::GroupLayout& layout = groups_->layout();
    const ModelConfig& m = config_.model;
    std::printf("parallel: %d ranks = pp %d x dp %d, ep %d, placement %s%s\n", layout.world(),
                layout.pp, layout.dp, layout.ep, config_.parallel.placement.c_str(),
                replace_every_ > 0
                    ? absl::StrFormat(" (from sizes; re-placed from measured routing every %d "
                                      "steps when the max per-rank load drops >= %.0f%%)",
                                      replace_every_, 100.0 * par::kReplaceMinGain)
                          .c_str()
                    : "");
    for (int s = 0; s < layout.pp; ++s) {
      const par::StageLayers b = par::stage_layers(m.n_layers, layout.pp, s);
      std::printf("  stage %d: layers [%lld, %lld)\n", s, static_cast<long long>(b.begin),
                  static_cast<long long>(b.end));
    }
    if (m.moe.n_experts > 0 && layout.ep > 1) {
      const std::vector<std::int64_t> params =
          par::rank_expert_params(owner_, model_.expert_sizes(), m.d_model, layout.ep);
      for (int r = 0; r < layout.ep; ++r) {
        const std::vector<std::int64_t> held = experts_of(owner_, r);
        std::printf("  ep_rank %d: experts {%s}, %s expert parameters per MoE layer\n", r,
                    absl::StrJoin(held, ", ").c_str(),
                    format_count(static_cast<double>(params[r])).c_str());
      }
    }
  }

  Config config_;
  std::string run_dir_;
  const TrainData& data_;
  std::shared_ptr<par::ProcessGroups> groups_;
  bool root_ = true;       // world rank 0: prints, metrics, checkpoints
  bool parallel_ = false;  // world size > 1
  std::vector<int> owner_;  // Note [Expert placement]
  int gru_stage_ = -1;      // first stage holding the shared GRU cell
  Transformer model_;
  AdamW optimizer_;
  std::unique_ptr<par::CommExpertExchange> exchange_;
  std::unique_ptr<par::GradReducer> reducer_;
  std::vector<TensorSpec> ckpt_specs_;  // every global parameter (sharded saves)
  std::vector<int> ckpt_writer_;        // world rank writing each of ckpt_specs_
  std::unique_ptr<Transformer> full_model_;  // rank 0, gathered for evaluation
  std::unique_ptr<AdamW> full_optim_;
  std::int64_t replace_every_ = 0;     // 0: the owner map never changes
  // (MoE layers, E) routed tokens since the last decision.
  std::vector<std::vector<double>> window_tokens_;
  FaultInjection fault_;               // Note [Fault injection]
  std::int64_t step_ = 0;
  std::int64_t tokens_seen_ = 0;
  std::int64_t skipped_ = 0;
};

// The training command of one process of the job: parses the command
// line, sets up MPI and the process groups when launched by mpirun/srun,
// and runs the Trainer.
int train_rank_main(int argc, char** argv, std::shared_ptr<par::Communicator> world) {
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
  // Before any work, identical on every rank (docs/parallel.md).
  par::validate_layout(config, world->size());
  const bool root = world->rank() == 0;

  const TrainData data = open_train_data(config);
  check_vocab(config, data);
  if (root) {
    fs::create_directories(run_dir + "/checkpoints");
    std::ofstream out(run_dir + "/config.json");
    out << config.resolved_json().dump(2) << "\n";
    std::printf("config (resolved):\n%s\n", config.resolved_json().dump(2).c_str());
  }

  // SIGTERM / SIGUSR1 stay caught for the whole run, saves included: a
  // second signal during a save only sets the flag again, so the save
  // completes (Note [Atomic checkpoints] covers SIGKILL).
  install_stop_handler(SIGTERM);
  install_stop_handler(SIGUSR1);
  install_stop_handler(SIGINT);

  par::GroupLayout layout;
  layout.dp = static_cast<int>(config.parallel.dp);
  layout.ep = static_cast<int>(config.parallel.ep);
  layout.pp = static_cast<int>(config.parallel.pp);
  auto groups = std::make_shared<par::ProcessGroups>(world, layout);
  Trainer trainer(config, run_dir, data, groups);
  if (layout.world() > 1) world->barrier();  // the run directory exists
  if (resume == "auto") {
    if (auto latest = latest_checkpoint(run_dir)) trainer.resume_from(*latest);
  } else if (resume != "none") {
    trainer.resume_from(resume);
  }
  return trainer.run();
}

}  // namespace

int train_main(int argc, char** argv) {
  // Without an MPI launcher this is one process with a LocalCommunicator:
  // no MPI calls at all, the original single-process behaviour.
  if (!par::launched_by_mpi()) {
    return train_rank_main(argc, argv, std::make_shared<par::LocalCommunicator>());
  }
  // MPI_Init with the launcher cross-checks (Note [Launcher cross-check] in
  // parallel/launcher.h): a mismatch, e.g. srun without PMIx, is kUsage (exit 2).
  std::shared_ptr<par::Communicator> world = par::start_mpi_job().world;
  int code = 0;
  try {
    code = train_rank_main(argc, argv, world);
  } catch (const Error& e) {
    // Usage errors from validation are raised identically by every rank
    // before any communication: report once and leave cleanly (exit 2).
    // Anything else may have happened on this rank alone: bring the whole
    // job down now rather than leave the others waiting forever.
    if (e.kind() == ErrorKind::kUsage) {
      if (world->rank() == 0) {
        std::fprintf(stderr, "motley train: %s: %s\n", error_kind_name(e.kind()), e.what());
      }
      world.reset();
      par::mpi_finalize();
      return exit_code_for(e.kind());
    }
    std::fprintf(stderr, "motley train (rank %d): %s: %s\n", world->rank(),
                 error_kind_name(e.kind()), e.what());
    std::fflush(stderr);
    par::mpi_abort(exit_code_for(e.kind()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "motley train (rank %d): internal error: %s\n", world->rank(), e.what());
    std::fflush(stderr);
    par::mpi_abort(1);
  }
  world.reset();
  par::mpi_finalize();
  return code;
}

}  // namespace motley::apps
