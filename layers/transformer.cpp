#include "layers/transformer.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "autograd/ops.h"
#include "layers/expert_sizes.h"
#include "layers/parameter_layout.h"

namespace motley {

namespace ag = autograd;

Transformer::Transformer(const ModelConfig& config, std::uint64_t seed, DType dtype,
                         Device device, ModelShard shard)
    : config_(config), params_(seed, dtype, device) {
  const std::int64_t n_layers = config.n_layers;
  const std::int64_t n_experts = config.moe.n_experts;
  layer_begin_ = shard.layer_begin;
  layer_end_ = shard.layer_end < 0 ? n_layers : shard.layer_end;
  MOTLEY_CHECK(0 <= layer_begin_ && layer_begin_ < layer_end_ && layer_end_ <= n_layers,
               "layer block [", layer_begin_, ", ", layer_end_, ") of ", n_layers);
  expert_sizes_ = expert_hidden_sizes(config.moe);
  std::vector<bool> hold = shard.hold_expert;
  if (hold.empty()) hold.assign(n_experts, true);
  MOTLEY_CHECK(static_cast<std::int64_t>(hold.size()) == n_experts, "hold_expert has ",
               hold.size(), " entries for ", n_experts, " experts");

  // Register the shard's parameters from the one description of the
  // model (Note [Parameter layout]), then wire them to the layers by name.
  for (const ParameterSpec& spec : parameter_layout(config)) {
    total_parameters_ += shape_numel(spec.shape);
    if (shard_holds(spec, config, layer_begin_, layer_end_, hold)) {
      params_.add(spec.name, spec.shape, spec.init);
    }
  }
  auto get = [&](const std::string& name) { return params_.get(name); };
  if (has_embedding()) embed_ = get("embed.weight");
  if (params_.contains("moe_gru.weight_ih")) {
    gru_.weight_ih = get("moe_gru.weight_ih");
    gru_.weight_hh = get("moe_gru.weight_hh");
    gru_.bias_ih = get("moe_gru.bias_ih");
    gru_.bias_hh = get("moe_gru.bias_hh");
    has_gru_ = true;
  }
  for (std::int64_t l = layer_begin_; l < layer_end_; ++l) {
    const std::string prefix = absl::StrCat("layers.", l, ".");
    Layer layer;
    layer.attn_norm = get(prefix + "attn_norm.weight");
    layer.attn.wq = get(prefix + "attn.wq");
    layer.attn.wk = get(prefix + "attn.wk");
    layer.attn.wv = get(prefix + "attn.wv");
    layer.attn.wo = get(prefix + "attn.wo");
    layer.ffn_norm = get(prefix + "ffn_norm.weight");
    layer.is_moe = config.is_moe_layer(l);
    if (!layer.is_moe) {
      layer.ffn.w1 = get(prefix + "ffn.w1");
      layer.ffn.w2 = get(prefix + "ffn.w2");
      layer.ffn.w3 = get(prefix + "ffn.w3");
    } else {
      const std::string moe = prefix + "moe.";
      if (config.moe.router == RouterKind::kGru) {
        layer.moe.proj = get(moe + "router.proj");
        layer.moe.gate = get(moe + "router.gate");
      } else {
        layer.moe.router = get(moe + "router.weight");
        if (config.moe.router == RouterKind::kNoisy) layer.moe.noise = get(moe + "router.noise");
      }
      layer.moe.experts.resize(n_experts);
      for (std::int64_t e = 0; e < n_experts; ++e) {
        if (!hold[e]) continue;
        const std::string ex = absl::StrCat(moe, "experts.", e, ".");
        layer.moe.experts[e].w1 = get(ex + "w1");
        layer.moe.experts[e].w2 = get(ex + "w2");
        layer.moe.experts[e].w3 = get(ex + "w3");
      }
    }
    layers_.push_back(std::move(layer));
  }
  if (has_head()) {
    final_norm_ = get("final_norm.weight");
    lm_head_ = get("lm_head.weight");
  }
}

Activations Transformer::embed(const Tensor& tokens) const {
  MOTLEY_CHECK(has_embedding(), "embed() on a shard without the embedding");
  MOTLEY_CHECK_KIND(kShape, tokens.dim() == 2, "tokens must be (B, T), got ", tokens.str());
  return {ag::embedding(embed_, tokens), Variable()};
}

Activations Transformer::run_layers(Activations in, const ForwardContext& ctx,
                                    ModelOutput& out) const {
  Variable x = in.x;
  Variable state = in.router_state;
  const std::int64_t b = x.size(0), t = x.size(1), d = x.size(2);
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    const std::int64_t l = layer_begin_ + static_cast<std::int64_t>(i);
    Variable a = ag::rmsnorm(x, layer.attn_norm, config_.norm_eps);
    x = ag::add(x, attention_block(layer.attn, a, config_.n_heads, config_.rope_theta));
    Variable m = ag::rmsnorm(x, layer.ffn_norm, config_.norm_eps);
    if (!layer.is_moe) {
      x = ag::add(x, swiglu_ffn(layer.ffn, m));
      continue;
    }
    MoEContext mctx;
    mctx.training = ctx.training;
    mctx.step = ctx.step;
    mctx.layer = l;
    mctx.seed = params_.seed();
    mctx.sequence_offset = ctx.sequence_offset;
    mctx.seq_len = t;
    mctx.exchange = ctx.expert_exchange;
    mctx.observer = ctx.moe_observer;
    MoEResult r = moe_forward(config_.moe, expert_sizes_, layer.moe, has_gru_ ? &gru_ : nullptr,
                              ag::reshape(m, {b * t, d}), state, mctx);
    x = ag::add(x, ag::reshape(r.out, {b, t, d}));
    if (r.router_state.defined()) state = r.router_state;
    out.aux_loss = out.aux_loss.defined() ? ag::add(out.aux_loss, r.aux_loss) : r.aux_loss;
    out.moe_stats.push_back(std::move(r.stats));
  }
  return {x, state};
}

Variable Transformer::head_logits(const Variable& x) const {
  MOTLEY_CHECK(has_head(), "head on a shard without the LM head");
  return ag::linear(ag::rmsnorm(x, final_norm_, config_.norm_eps), lm_head_);
}

Variable Transformer::head_loss(const Variable& x, const Tensor& targets) const {
  Variable logits = head_logits(x);  // (B, T, V)
  const std::int64_t rows = logits.size(0) * logits.size(1);
  return ag::cross_entropy(ag::reshape(logits, {rows, config_.vocab_size}),
                           targets.reshape({rows}));
}

ModelOutput Transformer::forward(const Tensor& tokens, const Tensor& targets,
                                 const ForwardContext& ctx) {
  MOTLEY_CHECK(has_embedding() && has_head(), "forward() needs the whole model");
  MOTLEY_CHECK_KIND(kShape, targets.shape() == tokens.shape(), "targets ", targets.str(),
                    " do not match tokens ", tokens.str());
  ModelOutput out;
  Activations act = run_layers(embed(tokens), ctx, out);
  out.lm_loss = head_loss(act.x, targets);
  out.loss = total_loss(out.lm_loss, out.aux_loss);
  if (!out.aux_loss.defined()) {
    out.aux_loss = Variable(Tensor::zeros({}, out.lm_loss.dtype(), out.lm_loss.device()));
  }
  return out;
}

Variable Transformer::total_loss(const Variable& lm_loss, const Variable& aux_loss) {
  if (!aux_loss.defined()) return lm_loss;
  return ag::add(lm_loss, ag::to_dtype(aux_loss, lm_loss.dtype()));
}

Variable Transformer::logits(const Tensor& tokens, const ForwardContext& ctx) {
  MOTLEY_CHECK(has_embedding() && has_head(), "logits() needs the whole model");
  ModelOutput unused;
  return head_logits(run_layers(embed(tokens), ctx, unused).x);
}

}  // namespace motley
