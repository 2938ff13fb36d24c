#include "train/trainer.h"

#include <cmath>
#include <cstdlib>

#include "autograd/ops.h"
#include "core/ops.h"
#include "data/sampler.h"
#include "layers/expert_sizes.h"
#include "parallel/placement.h"
#include "train/device.h"
#include "train/flops.h"
#include "train/stats.h"

namespace motley::train {
namespace {

namespace par = parallel;
constexpr int kMaxConsecutiveSkips = 10;

// Note [Fault injection]
// MOTLEY_FAULT_INJECT="rank=R,step=S" makes world rank R throw a kRuntime
// error at the start of step S (before any of that step's
// communication), as a failing rank would. It exists to test that one
// rank's failure ends the whole job (apps/train.cpp calls MPI_Abort)
// rather than leaving the other ranks blocked in a collective. Unset:
// nothing. A malformed value is a kUsage error naming the variable.
void fault_injection_from_env(int& rank, std::int64_t& step) {
  const char* env = std::getenv("MOTLEY_FAULT_INJECT");
  if (env == nullptr || *env == '\0') return;
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
    MOTLEY_CHECK_KIND(kUsage,
                      (key == "rank" || key == "step") && !number.empty() && *end == '\0' &&
                          n >= 0 && n <= (1LL << 40),
                      "MOTLEY_FAULT_INJECT='", value, "' must be \"rank=R,step=S\" with ",
                      "non-negative integers R and S");
    if (key == "rank") {
      rank = static_cast<int>(n);
      have_rank = true;
    } else {
      step = n;
      have_step = true;
    }
    start = comma + 1;
  }
  MOTLEY_CHECK_KIND(kUsage, have_rank && have_step, "MOTLEY_FAULT_INJECT='", value,
                    "' must name both rank and step, e.g. \"rank=1,step=3\"");
}

// Expert owner map (Note [Expert placement]); every expert on ep_rank 0
// when ep == 1.
std::vector<int> initial_owner(const Config& c, const par::GroupLayout& layout) {
  if (c.model.moe.n_experts == 0) return {};
  return par::place_experts(c.parallel.placement, expert_hidden_sizes(c.model.moe), layout.ep);
}

// Steps between re-placement decisions: parallel.replace_every for
// balanced placement with expert parallelism, else 0 (the map is fixed).
std::int64_t replacement_interval(const Config& c, const par::GroupLayout& layout) {
  const bool moves = layout.ep > 1 && c.model.moe.n_experts > 0 &&
                     c.parallel.placement == PlacementKind::kBalanced;
  return moves ? c.parallel.replace_every : 0;
}

}  // namespace

BatchSource sampled_batches(const TokenFile& file, const TrainConfig& train) {
  const std::uint64_t seed = static_cast<std::uint64_t>(train.seed);
  const std::int64_t seq_len = train.seq_len;
  return [&file, seed, seq_len](std::int64_t step, std::int64_t first, std::int64_t count) {
    return sample_batch(file, seed, step, first, count, seq_len);
  };
}

Trainer::Trainer(const Config& config, std::shared_ptr<par::ProcessGroups> groups,
                 BatchSource batches, Device device)
    : config_(config),
      groups_(std::move(groups)),
      batches_(std::move(batches)),
      device_(device),
      owner_(initial_owner(config_, groups_->layout())),
      optimizer_(config_.train),
      pipeline_(config_, *groups_),
      window_(replacement_interval(config_, groups_->layout())) {
  const ModelConfig& m = config_.model;
  const par::GroupLayout& layout = groups_->layout();
  model_ = build_model(owner_);
  if (m.moe.n_experts > 0 && m.moe.router == RouterKind::kGru) {
    for (std::int64_t l = 0; l < m.n_layers && gru_stage_ < 0; ++l) {
      if (m.is_moe_layer(l)) gru_stage_ = par::stage_of_layer(m.n_layers, layout.pp, l);
    }
  }
  if (layout.ep > 1) {
    exchange_ = std::make_unique<par::CommExpertExchange>(groups_->ep(), owner_);
  }
  build_reducer();
  fault_injection_from_env(fault_rank_, fault_step_);
}

Trainer::~Trainer() = default;

std::unique_ptr<Transformer> Trainer::build_model(const std::vector<int>& owner) const {
  ModelShard shard;
  const par::StageLayers block =
      par::stage_layers(config_.model.n_layers, groups_->layout().pp, groups_->pp_rank());
  shard.layer_begin = block.begin;
  shard.layer_end = block.end;
  if (groups_->layout().ep > 1) {
    for (int o : owner) shard.hold_expert.push_back(o == groups_->ep_rank());
  }
  return std::make_unique<Transformer>(
      config_.model, static_cast<std::uint64_t>(config_.train.seed), DType::kF32, device_, shard);
}

// The gradient reducer of the current parameters (dp > 1): its buckets and
// hooks bind them, so it is rebuilt whenever the parameters are.
void Trainer::build_reducer() {
  reducer_.reset();
  if (groups_->layout().dp > 1) {
    reducer_ = std::make_unique<par::GradReducer>(model_->params(), *groups_);
  }
}

StepResult Trainer::step() {
  const TrainConfig& tc = config_.train;
  const par::GroupLayout& layout = groups_->layout();
  StepResult r;
  r.step = step_ + 1;
  r.lr = learning_rate(tc, r.step);
  if (groups_->rank() == fault_rank_ && r.step == fault_step_) {
    MOTLEY_FAIL(kRuntime, "MOTLEY_FAULT_INJECT: injected failure on rank ", fault_rank_,
                " at step ", r.step, " (Note [Fault injection])");
  }
  model_->params().zero_grad();
  PipelineResult p;
  {
    // train.precision for every matmul of forward and backward (the
    // router's stay f32: layers/moe.cpp).
    const ops::MatmulPrecisionGuard precision(matmul_precision_of(tc));
    p = pipeline_.run(*model_, r.step, batches_, exchange_.get(), reducer_.get());
  }
  if (reducer_) reducer_->finish();
  if (gru_stage_ >= 0 && layout.pp > 1) {
    par::reduce_shared_gru(model_->params(), *groups_, config_.model);
  }
  // Losses: every rank adds its share (lm on the last stage, aux on each
  // stage with MoE layers); the sums over the world are the step's means.
  // The expert all-to-all bytes ride along (exact integers in a double).
  const double ep_bytes = exchange_ ? static_cast<double>(exchange_->bytes_sent()) : 0.0;
  if (exchange_) exchange_->reset_bytes_sent();
  Tensor losses = Tensor::from_vector(std::vector<double>{p.lm_sum, p.aux_sum, ep_bytes}, {3});
  groups_->host().allreduce_sum(losses);
  const std::vector<double> lv = losses.to_vector<double>();
  r.lm_loss = lv[0];
  r.aux_loss = lv[1];
  r.loss = lv[0] + lv[1];
  r.ep_bytes = lv[2];
  r.moe = std::move(p.moe);
  reduce_stats(r.moe, config_.model, groups_->host());
  r.grad_norm = std::sqrt(par::global_grad_sum_of_squares(model_->params(), *groups_, gru_stage_));
  r.model_flops =
      step_model_flops(config_.model, model_->total_parameters(), model_->expert_sizes(),
                       tc.batch_size * tc.seq_len, tc.seq_len, r.moe);
  step_ = r.step;
  tokens_seen_ += tc.batch_size * tc.seq_len;
  // Every rank sees the same reduced loss and norm, so all skip together.
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    ++skipped_;
    model_->params().zero_grad();
    if (++consecutive_skips_ >= kMaxConsecutiveSkips) {
      MOTLEY_FAIL(kRuntime, kMaxConsecutiveSkips,
                  " consecutive steps had a non-finite loss or gradient (last at step ", r.step,
                  "); stopping without saving. Lower train.lr, raise train.warmup, or check the "
                  "data.");
    }
  } else {
    consecutive_skips_ = 0;
    clip_gradients(model_->params(), r.grad_norm, tc.grad_clip);
    optimizer_.step(model_->params(), r.lr);
  }
  // After the update: the step's report carries the new placement.
  if (window_.every() > 0) {
    r.replacement = window_.observe(r.step, r.moe, owner_, model_->expert_sizes(),
                                    config_.model.d_model, layout.ep, groups_->host());
    if (r.replacement) replace_experts(r.replacement->after);
  }
  return r;
}

// Rebuilds everything built from the owner map: the model (a new shard
// that takes every tensor it keeps from the current one, and the moved
// experts from their old owners), the optimizer's state, the reducer, the
// expert exchange and the checkpoint writers. No value changes.
void Trainer::replace_experts(const std::vector<int>& next) {
  reducer_.reset();  // removes its hooks from the current parameters
  std::unique_ptr<Transformer> next_model = build_model(next);
  migrate_experts(*model_, *next_model, optimizer_, *groups_, owner_, next);
  model_ = std::move(next_model);
  owner_ = next;
  exchange_ = std::make_unique<par::CommExpertExchange>(groups_->ep(), owner_);
  build_reducer();
  ckpt_specs_.clear();  // writers follow owner_ (checkpoint_writer)
  ckpt_writer_.clear();
}

std::vector<std::string> Trainer::resume(const std::string& path) {
  const CheckpointReader reader = CheckpointReader::open(path);
  // Resuming without the moments would silently restart AdamW.
  MOTLEY_CHECK_KIND(kCheckpoint, reader.meta().step == 0 || reader.has_optimizer_state(), path,
                    " has no /optim group (AdamW state) although it was saved at step ",
                    reader.meta().step,
                    ": it cannot resume a run; resume from another checkpoint, or start a new "
                    "run (--resume none)");
  std::vector<std::string> changed = check_compatible(reader, config_);
  load_checkpoint(reader, model_->params(), &optimizer_);
  step_ = reader.meta().step;
  tokens_seen_ = reader.meta().tokens_seen;
  return changed;
}

int Trainer::contributor(const std::string& name) const {
  return checkpoint_writer(name, config_.model, groups_->layout(), owner_);
}

void Trainer::save(const std::string& path, const std::string& tokenizer_json) {
  CheckpointMeta meta;
  meta.step = step_;
  meta.tokens_seen = tokens_seen_;
  meta.seed = config_.train.seed;
  meta.config_json = config_.resolved_json().dump();
  meta.dp = config_.parallel.dp;
  meta.ep = config_.parallel.ep;
  meta.pp = config_.parallel.pp;
  if (groups_->layout().world() == 1) {
    save_checkpoint(path, model_->params(), &optimizer_, meta, tokenizer_json);
    return;
  }
  // No gathering: every rank writes the tensors it is the writer of into
  // one shared file (save_checkpoint_sharded in checkpoint/checkpoint.h).
  if (ckpt_specs_.empty()) {
    ckpt_specs_ = global_parameter_specs(config_.model);
    for (const TensorSpec& spec : ckpt_specs_) ckpt_writer_.push_back(contributor(spec.name));
  }
  save_checkpoint_sharded(path, model_->params(), optimizer_, meta, tokenizer_json, ckpt_specs_,
                          ckpt_writer_, groups_->host());
}

// Parallel runs evaluate on world rank 0 with a gathered copy of the
// parameters (evaluation itself is not parallel yet: docs/parallel.md).
// Each contributor sends its tensors in its own registration order, a
// subsequence of the full order in which rank 0 receives them.
Transformer* Trainer::eval_model() {
  if (groups_->layout().world() == 1) return model_.get();
  par::Communicator& world = groups_->world();
  const int me = world.rank();
  constexpr int kTagGather = 1;
  if (me == 0) {
    if (!full_model_) {
      full_model_ = std::make_unique<Transformer>(
          config_.model, static_cast<std::uint64_t>(config_.train.seed), DType::kF32, device_);
    }
    for (const Variable& p : full_model_->params().all()) {
      Tensor data = p.data();
      const int from = contributor(p.name());
      if (from == me) {
        data.copy_(model_->params().get(p.name()).data());
      } else {
        world.recv(data, from, kTagGather);
      }
    }
    return full_model_.get();
  }
  for (const Variable& p : model_->params().all()) {
    if (contributor(p.name()) != me) continue;
    world.send(p.data().contiguous(), 0, kTagGather);
  }
  return nullptr;
}

bool Trainer::any_rank(bool local) {
  if (groups_->layout().world() == 1) return local;
  Tensor flag = Tensor::from_vector(std::vector<double>{local ? 1.0 : 0.0}, {1});
  groups_->host().allreduce_sum(flag);
  return flag.to_vector<double>()[0] > 0;
}

}  // namespace motley::train
