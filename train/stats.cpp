#include "train/stats.h"

#include <algorithm>

namespace motley::train {

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

void reduce_stats(std::vector<MoELayerStats>& moe, const ModelConfig& m,
                  parallel::Communicator& world) {
  if (m.moe.n_experts == 0) return;
  std::vector<std::int64_t> layers;
  for (std::int64_t l = 0; l < m.n_layers; ++l) {
    if (m.is_moe_layer(l)) layers.push_back(l);
  }
  // One row per MoE layer of the model: tokens, dropped, three token-weighted
  // sums, then the E expert counts.
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
  world.allreduce_sum(t);
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
    for (std::int64_t k = 0; k < e; ++k) {
      s.expert_tokens.push_back(static_cast<std::int64_t>(row[5 + k]));
    }
    moe.push_back(std::move(s));
  }
}

}  // namespace motley::train
