// The pipeline executor: one stage's forward and backward passes of a
// training step on the 1F1B schedule (parallel/pipeline_schedule.h),
// with the activation and gradient messages between stages.
//
// A single process, or a layout with pp = 1, is the degenerate pipeline of
// one stage: F0 B0 F1 B1 ..., no messages; this is the only code that runs
// forward and backward for training (Trainer::step calls it for every
// layout).
//
// Note [Pipeline messages] (parallel/pipeline_schedule.h): one flat buffer
// per micro-batch and direction, on the model's device: x (b, T, d) then,
// for the gru router when the state crosses the boundary, the state
// (b*T, p). Shapes are derived from the config on both sides, never sent.
// Received activations are views of the receive buffer (no copy).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/config.h"
#include "data/sampler.h"
#include "layers/transformer.h"
#include "parallel/grad_reducer.h"
#include "parallel/process_groups.h"

namespace motley::train {

// Sequences [first, first + count) of step `step`'s global batch: tokens
// and targets (count, T) i64 on the CPU. Called only by the stages that
// read them (the first for tokens, the last for targets).
using BatchSource = std::function<Batch(std::int64_t step, std::int64_t first, std::int64_t count)>;

// What one stage's passes of a step produced on this rank.
struct PipelineResult {
  // This rank's share of the step's mean losses: sum over its micro-batches
  // of loss_j / (dp * m). The lm part is non-zero on the last stage only;
  // aux on every stage with MoE layers. Summed over the world they are the
  // step's lm_loss and aux_loss.
  double lm_sum = 0, aux_sum = 0;
  std::vector<MoELayerStats> moe;  // this stage's MoE layers, summed over micro-batches
};

class PipelineExecutor {
 public:
  // `groups` must outlive the executor.
  PipelineExecutor(const Config& config, const parallel::ProcessGroups& groups);

  // Runs every forward and backward of this rank's micro-batches of step
  // `step` on `model` (this stage's shard), accumulating gradients scaled
  // by 1 / (dp * m) (Note [Gradient scaling] in parallel/grad_reducer.h).
  // `exchange` is passed to the MoE layers (null without expert
  // parallelism); `reducer` (may be null) is armed before the stage's last
  // backward so that its allreduces overlap it. Point-to-point over
  // groups.pp(); the caller zeroes gradients before and reduces after.
  PipelineResult run(Transformer& model, std::int64_t step, const BatchSource& batches,
                     ExpertExchange* exchange, parallel::GradReducer* reducer) const;

 private:
  // Whether the router state travels with x at the boundary after layer_end.
  bool state_crosses(std::int64_t layer_end) const;

  const Config& config_;
  const parallel::ProcessGroups& groups_;
};

}  // namespace motley::train
