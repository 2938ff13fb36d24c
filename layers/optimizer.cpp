#include "layers/optimizer.h"

#include <cmath>

#include "core/ops.h"

namespace motley {

AdamWState& AdamW::state(const autograd::Variable& param) {
  auto it = state_.find(param.name());
  if (it == state_.end()) {
    AdamWState s{Tensor::zeros(param.shape(), param.dtype(), param.device()),
                  Tensor::zeros(param.shape(), param.dtype(), param.device())};
    it = state_.emplace(param.name(), std::move(s)).first;
  }
  MOTLEY_CHECK(it->second.exp_avg.shape() == param.shape(), "optimizer state of '",
               param.name(), "' has shape ", shape_str(it->second.exp_avg.shape()),
               ", parameter ", shape_str(param.shape()));
  return it->second;
}

void AdamW::step(ParameterSet& params, double lr) {
  ++step_;
  for (const autograd::Variable& p : params.all()) {
    AdamWState& s = state(p);
    Tensor grad = p.grad().defined() ? p.grad() : Tensor::zeros(p.shape(), p.dtype(), p.device());
    Tensor data = p.data();
    ops::adamw_step(data, grad, s.exp_avg, s.exp_avg_sq, lr, config_.beta1, config_.beta2,
                    config_.eps, decays(p) ? config_.weight_decay : 0.0, step_);
  }
}

double learning_rate(const TrainConfig& c, std::int64_t step) {
  if (c.warmup > 0 && step <= c.warmup) {
    return c.lr * static_cast<double>(step) / static_cast<double>(c.warmup);
  }
  if (step >= c.steps) return c.min_lr;
  const double progress =
      static_cast<double>(step - c.warmup) / static_cast<double>(std::max<std::int64_t>(1, c.steps - c.warmup));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

double sum_of_squares(const std::vector<Tensor>& grads) {
  std::vector<Tensor> parts;
  for (const Tensor& g : grads) {
    if (g.defined()) parts.push_back(ops::sum_squares(g).reshape({1}));
  }
  if (parts.empty()) return 0.0;
  double total = 0.0;
  for (const double v : ops::cat(parts, 0).to_vector<double>()) total += v;
  return total;
}

double grad_sum_of_squares(const ParameterSet& params) {
  std::vector<Tensor> grads;
  for (const autograd::Variable& p : params.all()) grads.push_back(p.grad());
  return sum_of_squares(grads);
}

double clip_gradients(ParameterSet& params, double grad_norm, double clip) {
  if (clip <= 0 || !(grad_norm > clip)) return 1.0;
  const double factor = clip / (grad_norm + 1e-6);
  for (const autograd::Variable& p : params.all()) {
    if (!p.grad().defined()) continue;
    Tensor g = p.grad();
    ops::scale_(g, factor);
  }
  return factor;
}

}  // namespace motley
