// AdamW, the learning-rate schedule and gradient clipping (SPEC 1.5).
//
// AdamW follows torch.optim.AdamW exactly: decoupled weight decay
// p -= lr * wd * p, bias-corrected moments, weight decay only on
// parameters of two or more dimensions. The optimizer state of a parameter
// is keyed by its global name (Note [Parameter identity]) so it can be
// saved, loaded and moved between ranks with the parameter.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "layers/parameters.h"

namespace motley {

struct AdamWState {
  Tensor exp_avg;     // same shape as the parameter
  Tensor exp_avg_sq;
};

class AdamW {
 public:
  AdamW(const TrainConfig& config) : config_(config) {}

  // One update of every parameter in `params` that has a gradient, with
  // learning rate `lr`; increments step() first (steps count from 1).
  // Parameters without a gradient (e.g. an expert that never received a
  // token since the last zero_grad) still decay and update their moments
  // with a zero gradient, exactly as PyTorch would with a zero grad.
  void step(ParameterSet& params, double lr);

  // Number of updates done (the bias-correction count).
  std::int64_t step_count() const { return step_; }
  void set_step_count(std::int64_t step) { step_ = step; }

  // State of a parameter, created (zeros) on first use.
  AdamWState& state(const autograd::Variable& param);
  bool has_state(const std::string& name) const { return state_.count(name) > 0; }
  const std::map<std::string, AdamWState>& states() const { return state_; }
  void erase_state(const std::string& name) { state_.erase(name); }

 private:
  TrainConfig config_;
  std::int64_t step_ = 0;
  std::map<std::string, AdamWState> state_;
};

// lr(s) = lr * s / warmup for s <= warmup, then cosine from lr down to
// min_lr at s = train.steps (and min_lr after). Steps count from 1.
double learning_rate(const TrainConfig& config, std::int64_t step);

// Sum of squares of every gradient in `params` (undefined gradients count
// as zero), in double. The global norm is sqrt of this summed over every
// parameter exactly once across ranks.
double grad_sum_of_squares(const ParameterSet& params);

// Sum over `grads` (undefined: 0) of each tensor's sum of squares, added
// in order in double: the per-tensor sums are computed on the tensors'
// device and read back together, one host synchronisation in all rather
// than one per tensor.
double sum_of_squares(const std::vector<Tensor>& grads);

// Scales every gradient by clip / (norm + 1e-6) when clip > 0 and
// norm > clip (SPEC 1.5). Returns the factor applied (1 when none).
double clip_gradients(ParameterSet& params, double grad_norm, double clip);

}  // namespace motley
