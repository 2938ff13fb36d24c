#include "layers/parameter_layout.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "layers/expert_sizes.h"

namespace motley {

std::vector<ParameterSpec> gru_cell_layout(const ModelConfig& config) {
  using Part = ParameterSpec::Part;
  const std::int64_t p = config.moe.gru_dim;
  const Init gru = Init::uniform(1.0 / std::sqrt(static_cast<double>(p)));  // as GRUCell
  return {{"moe_gru.weight_ih", {3 * p, p}, gru, Part::kGruCell},
          {"moe_gru.weight_hh", {3 * p, p}, gru, Part::kGruCell},
          {"moe_gru.bias_ih", {3 * p}, gru, Part::kGruCell},
          {"moe_gru.bias_hh", {3 * p}, gru, Part::kGruCell}};
}

std::vector<ParameterSpec> parameter_layout(const ModelConfig& config) {
  using Part = ParameterSpec::Part;
  const std::int64_t d = config.d_model, n_layers = config.n_layers;
  const std::int64_t n_experts = config.moe.n_experts, p = config.moe.gru_dim;
  const Init matrix = Init::normal(0.02);
  // Output projections of residual branches: N(0, 0.02 / sqrt(2 L)).
  const Init residual = Init::normal(0.02 / std::sqrt(2.0 * static_cast<double>(n_layers)));
  std::vector<ParameterSpec> out;
  auto add = [&](std::string name, Shape shape, Init init, Part part, std::int64_t layer = -1,
                 std::int64_t expert = -1) {
    out.push_back({std::move(name), std::move(shape), init, part, layer, expert});
  };
  add("embed.weight", {config.vocab_size, d}, matrix, Part::kEmbedding);
  bool any_moe = false;
  for (std::int64_t l = 0; l < n_layers; ++l) any_moe |= config.is_moe_layer(l);
  if (any_moe && config.moe.router == RouterKind::kGru) {
    for (ParameterSpec& spec : gru_cell_layout(config)) out.push_back(std::move(spec));
  }
  const std::vector<std::int64_t> sizes =
      n_experts > 0 ? expert_hidden_sizes(config.moe) : std::vector<std::int64_t>{};
  for (std::int64_t l = 0; l < n_layers; ++l) {
    const std::string prefix = absl::StrCat("layers.", l, ".");
    add(prefix + "attn_norm.weight", {d}, Init::ones(), Part::kLayer, l);
    add(prefix + "attn.wq", {d, d}, matrix, Part::kLayer, l);
    add(prefix + "attn.wk", {d, d}, matrix, Part::kLayer, l);
    add(prefix + "attn.wv", {d, d}, matrix, Part::kLayer, l);
    add(prefix + "attn.wo", {d, d}, residual, Part::kLayer, l);
    add(prefix + "ffn_norm.weight", {d}, Init::ones(), Part::kLayer, l);
    if (!config.is_moe_layer(l)) {
      const std::int64_t h = config.ffn_hidden;
      add(prefix + "ffn.w1", {h, d}, matrix, Part::kLayer, l);
      add(prefix + "ffn.w2", {d, h}, residual, Part::kLayer, l);
      add(prefix + "ffn.w3", {h, d}, matrix, Part::kLayer, l);
      continue;
    }
    const std::string moe = prefix + "moe.";
    if (config.moe.router == RouterKind::kGru) {
      add(moe + "router.proj", {p, d}, matrix, Part::kLayer, l);
      add(moe + "router.gate", {n_experts, p}, matrix, Part::kLayer, l);
    } else {
      add(moe + "router.weight", {n_experts, d}, matrix, Part::kLayer, l);
      if (config.moe.router == RouterKind::kNoisy) {
        add(moe + "router.noise", {n_experts, d}, matrix, Part::kLayer, l);
      }
    }
    for (std::int64_t e = 0; e < n_experts; ++e) {
      const std::string ex = absl::StrCat(moe, "experts.", e, ".");
      const std::int64_t h = sizes[e];
      add(ex + "w1", {h, d}, matrix, Part::kLayer, l, e);
      add(ex + "w2", {d, h}, residual, Part::kLayer, l, e);
      add(ex + "w3", {h, d}, matrix, Part::kLayer, l, e);
    }
  }
  add("final_norm.weight", {d}, Init::ones(), Part::kHead);
  add("lm_head.weight", {config.vocab_size, d}, matrix, Part::kHead);
  return out;
}

bool shard_holds(const ParameterSpec& spec, const ModelConfig& config, std::int64_t layer_begin,
                 std::int64_t layer_end, const std::vector<bool>& hold_expert) {
  switch (spec.part) {
    case ParameterSpec::Part::kEmbedding:
      return layer_begin == 0;
    case ParameterSpec::Part::kHead:
      return layer_end == config.n_layers;
    case ParameterSpec::Part::kGruCell:
      for (std::int64_t l = layer_begin; l < layer_end; ++l) {
        if (config.is_moe_layer(l)) return true;
      }
      return false;
    case ParameterSpec::Part::kLayer:
      if (spec.layer < layer_begin || spec.layer >= layer_end) return false;
      return spec.expert < 0 || hold_expert.empty() || hold_expert[spec.expert];
  }
  return false;
}

}  // namespace motley
