#include "layers/moe.h"

#include <cmath>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "core/ops.h"
#include "core/philox.h"
#include "layers/routing.h"

namespace motley {

namespace ag = autograd;

namespace {

Tensor index_tensor(const std::vector<std::int64_t>& v, Device device) {
  return Tensor::from_vector(v, {static_cast<std::int64_t>(v.size())}, device);
}

// The router runs its softmax in fp32 (SPEC 1.2) or wider: f64 models
// (gradient checks) stay f64.
DType router_dtype(DType model_dtype) {
  return model_dtype == DType::kF64 ? DType::kF64 : DType::kF32;
}

// N(0, 1) noise for the noisy router: element (token, e) is a pure
// function of (seed, layer, step, global token index, e), so every layout
// and every resume draws the same noise.
Tensor router_noise(const MoEContext& ctx, std::int64_t n_tokens, std::int64_t n_experts,
                    DType dtype, Device device) {
  const PhiloxKey key = philox_key(ctx.seed, "router_noise/" + std::to_string(ctx.layer));
  std::vector<double> eps(n_tokens * n_experts);
  for (std::int64_t n = 0; n < n_tokens; ++n) {
    const std::int64_t token = ctx.sequence_offset * ctx.seq_len + n;
    for (std::int64_t e = 0; e < n_experts; ++e) {
      eps[n * n_experts + e] = philox_normal(key, static_cast<std::uint64_t>(ctx.step),
                                             static_cast<std::uint64_t>(token * n_experts + e));
    }
  }
  return Tensor::from_vector(eps, {n_tokens, n_experts}, device).to(dtype);
}

}  // namespace

Variable router_logits(const MoEConfig& config, const MoEWeights& w, const GruWeights* gru,
                       const Variable& m, const Variable& prev_state, const MoEContext& ctx,
                       Variable* new_state) {
  if (config.router == RouterKind::kLinear) return ag::linear(m, w.router);
  if (config.router == RouterKind::kNoisy) {
    Variable clean = ag::linear(m, w.router);
    if (!ctx.training) return clean;
    Tensor eps = router_noise(ctx, m.size(0), config.n_experts, m.dtype(), m.device());
    return ag::add(clean, ag::mul(Variable(eps), ag::softplus(ag::linear(m, w.noise))));
  }
  MOTLEY_CHECK(config.router == RouterKind::kGru, "unknown router ", config.router);
  MOTLEY_CHECK(gru != nullptr, "gru router without GRU weights");
  const std::int64_t p = w.proj.size(0);
  Variable prev;
  if (!prev_state.defined() || config.gru_state == GruStateMode::kNone) {
    prev = Variable(Tensor::zeros({m.size(0), p}, m.dtype(), m.device()));
  } else if (config.gru_state == GruStateMode::kDetached) {
    prev = prev_state.detach();
  } else {
    prev = prev_state;
  }
  Variable s = gru_cell(*gru, ag::linear(m, w.proj), prev);
  if (new_state) *new_state = s;
  return ag::linear(s, w.gate);
}

MoEResult moe_forward(const MoEConfig& config, const std::vector<std::int64_t>& sizes,
                      const MoEWeights& w, const GruWeights* gru, const Variable& m,
                      const Variable& prev_state, const MoEContext& ctx) {
  const std::int64_t n_tokens = m.size(0), d = m.size(1), n_experts = config.n_experts;
  const Device device = m.device();
  MoEResult result;

  // ---- router ------------------------------------------------------------
  // The router (and the GRU cell) stay f32 whatever the matmul precision
  // (SPEC 8.1: router probabilities are fp32; Note [Matmul precision]).
  Variable logits;  // (N, E)
  {
    const ops::MatmulPrecisionGuard router_f32(ops::MatmulPrecision::kF32);
    logits = ag::to_dtype(router_logits(config, w, gru, m, prev_state, ctx, &result.router_state),
                          router_dtype(m.dtype()));
  }
  Variable log_probs = ag::log_softmax(logits);              // (N, E)
  Variable probs = ag::exp(log_probs);                       // (N, E)

  // ---- selection and plan (host) -------------------------------------------
  const std::vector<double> host_probs = probs.data().to_vector<double>();
  const Selection selection =
      ctx.fixed_selection ? *ctx.fixed_selection
      : config.selection == SelectionKind::kTopP
          ? select_topp(host_probs, n_tokens, n_experts, config.top_p, config.max_k)
          : select_topk(host_probs, n_tokens, n_experts, config.top_k);
  const DispatchPlan plan = plan_dispatch(
      selection, expert_capacity(config.capacity_factor, selection.n_pairs(), n_experts));

  // ---- gate weights over the selected pairs ---------------------------------
  std::vector<std::int64_t> pair_token(selection.n_pairs()), pair_flat(selection.n_pairs());
  for (std::int64_t n = 0; n < n_tokens; ++n) {
    for (std::int64_t p = selection.offsets[n]; p < selection.offsets[n + 1]; ++p) {
      pair_token[p] = n;
      pair_flat[p] = n * n_experts + selection.experts[p];
    }
  }
  const Tensor pair_token_t = index_tensor(pair_token, device);
  Variable gates = ag::index_select_rows(ag::reshape(probs, {n_tokens * n_experts, 1}),
                                         index_tensor(pair_flat, device));  // (pairs, 1)
  if (config.renormalize) {
    Variable denom = ag::index_add_rows(gates, pair_token_t, Variable(), n_tokens);  // (N, 1)
    gates = ag::div(gates, ag::index_select_rows(denom, pair_token_t));
  }

  // ---- dispatch, experts, combine -------------------------------------------
  const std::int64_t rows = plan.rows();
  // With an exchange even a process without rows takes part (Note [Expert exchange]).
  if (rows == 0 && ctx.exchange == nullptr) {
    result.out = Variable(Tensor::zeros({n_tokens, d}, m.dtype(), device));
  } else {
    const Tensor row_token = index_tensor(plan.token, device);
    Variable row_gate = ag::to_dtype(
        ag::reshape(ag::index_select_rows(gates, index_tensor(plan.pair, device)), {rows}),
        m.dtype());                                                    // (R)
    Variable x = ag::index_select_rows(m, row_token);                  // (R, d)
    // Experts on rows grouped by expert id, as one op (Note [Grouped
    // experts] in autograd/ops.cpp); with an exchange, on the process
    // holding them.
    auto experts = [&](const Variable& rows_in, const std::vector<std::int64_t>& counts) {
      std::vector<Variable> w1, w3, w2;
      for (std::int64_t e = 0; e < n_experts; ++e) {
        MOTLEY_CHECK(counts[e] == 0 || w.experts[e].w1.defined(), "expert ", e, " of layer ",
                     ctx.layer, ctx.exchange != nullptr
                                    ? " was sent to a process that does not hold it"
                                    : " is not held by this process");
        w1.push_back(w.experts[e].w1);
        w3.push_back(w.experts[e].w3);
        w2.push_back(w.experts[e].w2);
      }
      return ag::grouped_swiglu_ffn(rows_in, counts, w1, w3, w2);
    };
    const Variable y = ctx.exchange != nullptr ? ctx.exchange->run(x, plan.counts, experts)
                                               : experts(x, plan.counts);  // (R, d)
    result.out = ag::index_add_rows(y, row_token, row_gate, n_tokens);    // (N, d)
  }

  // ---- auxiliary losses (SPEC 1.4) -------------------------------------------
  const std::vector<std::int64_t> selected = selection.counts();
  const DType rdt = logits.dtype();
  Variable aux(Tensor::zeros({}, rdt, device));
  const MoEAuxConfig& a = config.aux;
  if (a.balance > 0 || a.size_penalty > 0) {
    Variable mean_probs = ag::mean(probs, 0);  // (E): P_e
    double mean_h = 0;
    for (std::int64_t s : sizes) mean_h += static_cast<double>(s);
    mean_h /= static_cast<double>(n_experts);
    std::vector<double> f(n_experts), f_sized(n_experts);
    for (std::int64_t e = 0; e < n_experts; ++e) {
      f[e] = static_cast<double>(selected[e]) / static_cast<double>(n_tokens);
      f_sized[e] = f[e] * static_cast<double>(sizes[e]) / mean_h;
    }
    auto weighted = [&](const std::vector<double>& coeff, double scale) {
      Tensor c = Tensor::from_vector(coeff, {n_experts}, device).to(rdt);
      return ag::scale(ag::sum(ag::mul(mean_probs, Variable(c))),
                       scale * static_cast<double>(n_experts));
    };
    if (a.balance > 0) aux = ag::add(aux, weighted(f, a.balance));
    if (a.size_penalty > 0) aux = ag::add(aux, weighted(f_sized, a.size_penalty));
  }
  if (a.z_loss > 0) {
    aux = ag::add(aux, ag::scale(ag::mean(ag::square(ag::logsumexp(logits))), a.z_loss));
  }
  if (a.entropy > 0) {
    Variable entropy = ag::neg(ag::sum(ag::mul(probs, log_probs), 1));  // (N)
    aux = ag::add(aux, ag::scale(ag::mean(entropy), a.entropy));
  }
  result.aux_loss = aux;
  result.selection = selection;
  if (ctx.observer != nullptr) {
    MoELayerRecord record;
    record.layer = ctx.layer;
    record.n_tokens = n_tokens;
    record.n_experts = n_experts;
    record.probs = host_probs;
    record.selection = selection;
    ctx.observer->records.push_back(std::move(record));
  }

  // ---- statistics ---------------------------------------------------------------
  MoELayerStats& st = result.stats;
  st.layer = ctx.layer;
  st.tokens = n_tokens;
  st.expert_tokens = plan.counts;
  st.dropped = plan.dropped;
  double active = 0, entropy = 0;
  for (std::int64_t e = 0; e < n_experts; ++e) {
    active += static_cast<double>(plan.counts[e]) * 3.0 * static_cast<double>(d * sizes[e]);
  }
  for (std::int64_t n = 0; n < n_tokens; ++n) {
    for (std::int64_t e = 0; e < n_experts; ++e) {
      const double p = host_probs[n * n_experts + e];
      if (p > 0) entropy -= p * std::log(p);
    }
  }
  st.active_params_per_token = n_tokens ? active / static_cast<double>(n_tokens) : 0.0;
  st.gate_entropy = n_tokens ? entropy / static_cast<double>(n_tokens) : 0.0;
  st.experts_per_token =
      n_tokens ? static_cast<double>(rows) / static_cast<double>(n_tokens) : 0.0;
  return result;
}

}  // namespace motley
