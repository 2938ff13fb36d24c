#include "train/pipeline.h"

#include <map>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "core/ops.h"
#include "parallel/pipeline_schedule.h"
#include "train/stats.h"

namespace motley::train {
namespace {

namespace ag = autograd;
namespace par = parallel;

constexpr int kTagActivation = 101;
constexpr int kTagGradient = 102;

// x then the router state, flattened into one message (Note [Pipeline
// messages]).
Tensor pack(const Tensor& x, const Tensor& state) {
  const Tensor flat_x = x.contiguous().reshape({x.numel()});
  if (!state.defined()) return flat_x;
  return ops::cat(std::vector<Tensor>{flat_x, state.contiguous().reshape({state.numel()})}, 0);
}

Tensor grad_or_zeros(const Variable& v) {
  return v.grad().defined() ? v.grad() : Tensor::zeros(v.shape(), v.dtype(), v.device());
}

}  // namespace

PipelineExecutor::PipelineExecutor(const Config& config, const par::ProcessGroups& groups)
    : config_(config), groups_(groups) {}

bool PipelineExecutor::state_crosses(std::int64_t layer_end) const {
  const ModelConfig& m = config_.model;
  if (m.moe.n_experts == 0 || m.moe.router != RouterKind::kGru) return false;
  for (std::int64_t l = 0; l < layer_end; ++l) {
    if (m.is_moe_layer(l)) return true;
  }
  return false;
}

PipelineResult PipelineExecutor::run(Transformer& model, std::int64_t step,
                                     const BatchSource& batches, ExpertExchange* exchange,
                                     par::GradReducer* reducer) const {
  const TrainConfig& tc = config_.train;
  const par::GroupLayout& layout = groups_.layout();
  const std::int64_t micro = tc.micro_batches;
  const std::int64_t per_micro = tc.batch_size / (layout.dp * micro);
  const std::int64_t shard_first = groups_.dp_rank() * (tc.batch_size / layout.dp);
  // Note [Gradient scaling] in parallel/grad_reducer.h.
  const double inv = 1.0 / static_cast<double>(layout.dp * micro);
  const bool first = groups_.first_stage(), last = groups_.last_stage();
  const std::int64_t t = tc.seq_len, d = config_.model.d_model, p = config_.model.moe.gru_dim;
  const bool state_in = state_crosses(model.layer_begin());
  const bool state_out = state_crosses(model.layer_end());
  const std::int64_t nx = per_micro * t * d;
  const std::int64_t ns_in = state_in ? per_micro * t * p : 0;
  const std::int64_t ns_out = state_out ? per_micro * t * p : 0;
  const DType dtype = model.params().dtype();
  const Device device = model.params().device();
  par::Communicator& pp = groups_.pp();

  struct InFlight {
    Activations in;   // received leaves (stages after the first)
    Activations out;  // sent to the next stage
    Variable aux;     // this stage's aux loss
    Variable loss;    // last stage: lm + aux
  };
  std::map<std::int64_t, InFlight> flight;
  std::vector<par::Request> sends;
  PipelineResult r;
  std::int64_t backwards = 0;
  for (const par::PipelineAction& action : par::one_f_one_b(groups_.pp_rank(), layout.pp, micro)) {
    const std::int64_t j = action.micro_batch;
    const std::int64_t seq_first = shard_first + j * per_micro;
    if (action.kind == par::PipelineAction::kForward) {
      // Only the stages that read tokens or targets sample the batch.
      Batch batch;
      if (first || last) batch = batches(step, seq_first, per_micro);
      ForwardContext ctx;
      ctx.step = step;
      ctx.sequence_offset = seq_first;
      ctx.expert_exchange = exchange;
      InFlight f;
      Activations in;
      if (first) {
        in = model.embed(batch.tokens.to(device));
      } else {
        Tensor buf = Tensor::empty({nx + ns_in}, dtype, device);
        pp.recv(buf, groups_.prev_stage(), kTagActivation);
        // The buffer is this micro-batch's own: the leaves view it.
        in.x = Variable(buf.narrow(0, 0, nx).view({per_micro, t, d}), true);
        if (state_in) {
          in.router_state = Variable(buf.narrow(0, nx, ns_in).view({per_micro * t, p}), true);
        }
        f.in = in;
      }
      ModelOutput out;
      Activations act = model.run_layers(in, ctx, out);
      accumulate_stats(r.moe, out.moe_stats);
      f.aux = out.aux_loss;
      if (f.aux.defined()) r.aux_sum += f.aux.data().item() * inv;
      if (last) {
        Variable lm = model.head_loss(act.x, batch.targets.to(device));
        r.lm_sum += lm.data().item() * inv;
        f.loss = Transformer::total_loss(lm, f.aux);
      } else {
        f.out = act;
        sends.push_back(pp.isend(pack(act.x.data(), state_out ? act.router_state.data() : Tensor()),
                                 groups_.next_stage(), kTagActivation));
      }
      flight[j] = std::move(f);
    } else {
      InFlight& f = flight.at(j);
      // The step's last backward on this stage: the reducer may start.
      if (++backwards == micro && reducer != nullptr) reducer->arm();
      if (last) {
        ag::scale(f.loss, inv).backward();
      } else {
        Tensor buf = Tensor::empty({nx + ns_out}, dtype, device);
        pp.recv(buf, groups_.next_stage(), kTagGradient);
        std::vector<Variable> roots{f.out.x};
        std::vector<Tensor> grads{buf.narrow(0, 0, nx).view({per_micro, t, d})};
        if (state_out && f.out.router_state.requires_grad()) {
          roots.push_back(f.out.router_state);
          grads.push_back(buf.narrow(0, nx, ns_out).view({per_micro * t, p}));
        }
        if (f.aux.defined() && f.aux.requires_grad()) {
          Variable scaled = ag::scale(f.aux, inv);
          roots.push_back(scaled);
          grads.push_back(Tensor::ones({}, scaled.dtype(), scaled.device()));
        }
        ag::backward(roots, grads);
      }
      if (!first) {
        sends.push_back(pp.isend(
            pack(grad_or_zeros(f.in.x), state_in ? grad_or_zeros(f.in.router_state) : Tensor()),
            groups_.prev_stage(), kTagGradient));
      }
      flight.erase(j);
    }
  }
  par::wait_all(sends);
  return r;
}

}  // namespace motley::train
