// The decoder-only MoE transformer of SPEC section 1.
//
//   x_0 = embed[t]
//   x'  = x_l + attn_l(rmsnorm(x_l))
//   x_{l+1} = x' + moe_l(rmsnorm(x'))       (dense SwiGLU where the layer is dense)
//   logits = rmsnorm(x_L) @ lm_head^T
//   loss = mean CE over all B*T positions + aux (summed over MoE layers)
//
// A Transformer holds the parameters of a contiguous block of layers
// [layer_begin, layer_end) (a pipeline stage; the whole model by default),
// the embedding when the block starts at layer 0, the final norm and LM
// head when it ends at the last layer, and the experts selected by
// `hold_expert` (expert parallelism; all by default). Parameter names and
// values do not depend on that choice: see Note [Parameter identity].
#pragma once

#include <cstdint>
#include <vector>

#include "autograd/variable.h"
#include "core/config.h"
#include "layers/moe.h"
#include "layers/modules.h"
#include "layers/parameters.h"

namespace motley {

struct ModelShard {
  std::int64_t layer_begin = 0;
  std::int64_t layer_end = -1;     // -1: n_layers
  std::vector<bool> hold_expert;   // (E); empty: every expert
};

struct ForwardContext {
  bool training = true;
  std::int64_t step = 0;             // update number, for the noisy router
  std::int64_t sequence_offset = 0;  // global index of the first sequence
  // Expert parallelism: passed to every MoE layer (Note [Expert exchange]).
  ExpertExchange* expert_exchange = nullptr;
  // Passed to every MoE layer (Note [MoE observer] in layers/moe.h); null: none.
  MoEObserver* moe_observer = nullptr;
};

// What flows between blocks of layers (and between pipeline stages).
struct Activations {
  Variable x;             // (B, T, d)
  Variable router_state;  // (B*T, p) for the gru router; undefined otherwise
};

struct ModelOutput {
  Variable loss;       // 0-d: lm_loss + aux_loss
  Variable lm_loss;    // 0-d: mean cross-entropy
  Variable aux_loss;   // 0-d
  std::vector<MoELayerStats> moe_stats;  // one per MoE layer run
};

class Transformer {
 public:
  Transformer(const ModelConfig& config, std::uint64_t seed, DType dtype = DType::kF32,
              Device device = Device::cpu(), ModelShard shard = {});

  const ModelConfig& config() const { return config_; }
  ParameterSet& params() { return params_; }
  const ParameterSet& params() const { return params_; }
  const std::vector<std::int64_t>& expert_sizes() const { return expert_sizes_; }
  std::int64_t layer_begin() const { return layer_begin_; }
  std::int64_t layer_end() const { return layer_end_; }
  bool has_embedding() const { return layer_begin_ == 0; }
  bool has_head() const { return layer_end_ == config_.n_layers; }

  // Whole-model forward: tokens, targets (B, T) integer tensors.
  ModelOutput forward(const Tensor& tokens, const Tensor& targets, const ForwardContext& ctx);
  // Logits (B, T, V) without loss (eval, generation).
  Variable logits(const Tensor& tokens, const ForwardContext& ctx);

  // Pieces for pipeline stages.
  Activations embed(const Tensor& tokens) const;
  // Runs this shard's layers; appends aux losses and stats to `out`.
  Activations run_layers(Activations in, const ForwardContext& ctx, ModelOutput& out) const;
  Variable head_logits(const Variable& x) const;            // (B, T, V)
  Variable head_loss(const Variable& x, const Tensor& targets) const;  // 0-d mean CE
  // The training loss of SPEC section 1: lm + aux (aux cast to lm's dtype;
  // undefined aux, as in a dense model or a stage without MoE layers,
  // counts as 0). The one place the loss is composed.
  static Variable total_loss(const Variable& lm_loss, const Variable& aux_loss);

  // Parameter counts of the whole model (not only this shard): total, and
  // activated per token for a given number of experts per token per layer
  // of average size `mean_active_hidden` (dense parts always count).
  std::int64_t total_parameters() const { return total_parameters_; }

 private:
  struct Layer {
    Variable attn_norm, ffn_norm;
    AttentionWeights attn;
    bool is_moe = false;
    SwiGluWeights ffn;  // dense layers
    MoEWeights moe;     // MoE layers
  };

  ModelConfig config_;
  ParameterSet params_;
  std::vector<std::int64_t> expert_sizes_;
  std::int64_t layer_begin_ = 0, layer_end_ = 0;
  std::int64_t total_parameters_ = 0;  // the whole model's, summed from its layout
  Variable embed_, final_norm_, lm_head_;
  GruWeights gru_;
  bool has_gru_ = false;
  std::vector<Layer> layers_;  // [layer_begin_, layer_end_)
};

}  // namespace motley
