#include "layers/transformer.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "autograd/ops.h"
#include "layers/expert_sizes.h"

namespace motley {

namespace ag = autograd;

Transformer::Transformer(const ModelConfig& config, std::uint64_t seed, DType dtype,
                         Device device, ModelShard shard)
    : config_(config), params_(seed, dtype, device) {
  const std::int64_t d = config.d_model, n_layers = config.n_layers;
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

  const Init matrix = Init::normal(0.02);
  // Output projections of residual branches: N(0, 0.02 / sqrt(2 L)).
  const Init residual = Init::normal(0.02 / std::sqrt(2.0 * static_cast<double>(n_layers)));

  if (has_embedding()) embed_ = params_.add("embed.weight", {config.vocab_size, d}, matrix);
  bool any_moe = false;
  for (std::int64_t l = layer_begin_; l < layer_end_; ++l) any_moe |= config.is_moe_layer(l);
  if (any_moe && config.moe.router == "gru") {
    const std::int64_t p = config.moe.gru_dim;
    const Init gru_init = Init::uniform(1.0 / std::sqrt(static_cast<double>(p)));
    gru_.weight_ih = params_.add("moe_gru.weight_ih", {3 * p, p}, gru_init);
    gru_.weight_hh = params_.add("moe_gru.weight_hh", {3 * p, p}, gru_init);
    gru_.bias_ih = params_.add("moe_gru.bias_ih", {3 * p}, gru_init);
    gru_.bias_hh = params_.add("moe_gru.bias_hh", {3 * p}, gru_init);
    has_gru_ = true;
  }
  for (std::int64_t l = layer_begin_; l < layer_end_; ++l) {
    const std::string prefix = absl::StrCat("layers.", l, ".");
    Layer layer;
    layer.attn_norm = params_.add(prefix + "attn_norm.weight", {d}, Init::ones());
    layer.attn.wq = params_.add(prefix + "attn.wq", {d, d}, matrix);
    layer.attn.wk = params_.add(prefix + "attn.wk", {d, d}, matrix);
    layer.attn.wv = params_.add(prefix + "attn.wv", {d, d}, matrix);
    layer.attn.wo = params_.add(prefix + "attn.wo", {d, d}, residual);
    layer.ffn_norm = params_.add(prefix + "ffn_norm.weight", {d}, Init::ones());
    layer.is_moe = config.is_moe_layer(l);
    if (!layer.is_moe) {
      const std::int64_t h = config.ffn_hidden;
      layer.ffn.w1 = params_.add(prefix + "ffn.w1", {h, d}, matrix);
      layer.ffn.w2 = params_.add(prefix + "ffn.w2", {d, h}, residual);
      layer.ffn.w3 = params_.add(prefix + "ffn.w3", {h, d}, matrix);
    } else {
      const std::string moe = prefix + "moe.";
      if (config.moe.router == "gru") {
        layer.moe.proj = params_.add(moe + "router.proj", {config.moe.gru_dim, d}, matrix);
        layer.moe.gate = params_.add(moe + "router.gate", {n_experts, config.moe.gru_dim}, matrix);
      } else {
        layer.moe.router = params_.add(moe + "router.weight", {n_experts, d}, matrix);
        if (config.moe.router == "noisy") {
          layer.moe.noise = params_.add(moe + "router.noise", {n_experts, d}, matrix);
        }
      }
      layer.moe.experts.resize(n_experts);
      for (std::int64_t e = 0; e < n_experts; ++e) {
        if (!hold[e]) continue;
        const std::string ex = absl::StrCat(moe, "experts.", e, ".");
        const std::int64_t h = expert_sizes_[e];
        layer.moe.experts[e].w1 = params_.add(ex + "w1", {h, d}, matrix);
        layer.moe.experts[e].w2 = params_.add(ex + "w2", {d, h}, residual);
        layer.moe.experts[e].w3 = params_.add(ex + "w3", {h, d}, matrix);
      }
    }
    layers_.push_back(std::move(layer));
  }
  if (has_head()) {
    final_norm_ = params_.add("final_norm.weight", {d}, Init::ones());
    lm_head_ = params_.add("lm_head.weight", {config.vocab_size, d}, matrix);
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

std::int64_t Transformer::total_parameters() const {
  const std::int64_t d = config_.d_model, v = config_.vocab_size, p = config_.moe.gru_dim;
  const std::int64_t e = config_.moe.n_experts;
  std::int64_t n = 2 * v * d + d;  // embed, lm_head, final norm
  bool gru = false;
  for (std::int64_t l = 0; l < config_.n_layers; ++l) {
    n += 4 * d * d + 2 * d;
    if (!config_.is_moe_layer(l)) {
      n += 3 * d * config_.ffn_hidden;
      continue;
    }
    for (std::int64_t s : expert_sizes_) n += 3 * d * s;
    if (config_.moe.router == "gru") {
      n += p * d + e * p;
      gru = true;
    } else {
      n += (config_.moe.router == "noisy" ? 2 : 1) * e * d;
    }
  }
  if (gru) n += 2 * 3 * p * p + 2 * 3 * p;
  return n;
}

}  // namespace motley
