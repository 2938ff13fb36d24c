#include "layers/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <gtest/gtest.h>

#include "autograd/engine.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tests/layers/layer_test_util.h"

namespace motley {
namespace {

namespace ag = autograd;
using testing::matvec;
using testing::random_param;
using testing::random_tensor;

constexpr std::int64_t kD = 6;

struct MoEFixture {
  MoEConfig config;
  std::vector<std::int64_t> sizes;
  MoEWeights weights;
  GruWeights gru;
};

MoEFixture make_moe(const std::string& router, std::vector<std::int64_t> sizes,
                    const std::string& tag = "moe") {
  MoEFixture f;
  f.config.n_experts = static_cast<std::int64_t>(sizes.size());
  f.config.router = parse_config_name<RouterKind>(router, "model.moe.router");
  f.config.gru_dim = 4;
  f.config.aux.balance = 0.0;
  f.sizes = sizes;
  const std::int64_t e = f.config.n_experts, p = f.config.gru_dim;
  f.weights.router = random_param({e, kD}, tag + ".router");
  f.weights.noise = random_param({e, kD}, tag + ".noise");
  f.weights.proj = random_param({p, kD}, tag + ".proj");
  f.weights.gate = random_param({e, p}, tag + ".gate");
  for (std::int64_t i = 0; i < e; ++i) {
    const std::string ex = tag + ".experts." + std::to_string(i);
    f.weights.experts.push_back({random_param({sizes[i], kD}, ex + ".w1"),
                                 random_param({sizes[i], kD}, ex + ".w3"),
                                 random_param({kD, sizes[i]}, ex + ".w2")});
  }
  f.gru = {random_param({3 * p, p}, tag + ".wih"), random_param({3 * p, p}, tag + ".whh"),
           random_param({3 * p}, tag + ".bih"), random_param({3 * p}, tag + ".bhh")};
  return f;
}

// The MoE output computed token by token with plain loops (linear router).
std::vector<double> naive_moe(const MoEFixture& f, const std::vector<double>& m,
                              std::int64_t n_tokens) {
  const std::int64_t e_count = f.config.n_experts;
  const auto wr = f.weights.router.data().to_vector<double>();
  std::vector<double> out(n_tokens * kD, 0.0);
  for (std::int64_t n = 0; n < n_tokens; ++n) {
    const double* x = &m[n * kD];
    std::vector<double> logits = matvec(wr, e_count, kD, x);
    const double mx = *std::max_element(logits.begin(), logits.end());
    std::vector<double> probs(e_count);
    double z = 0;
    for (std::int64_t e = 0; e < e_count; ++e) z += probs[e] = std::exp(logits[e] - mx);
    for (double& p : probs) p /= z;
    // Selection, independently of layers/routing.cpp.
    std::vector<std::int64_t> order(e_count);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](auto a, auto b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    std::vector<std::int64_t> chosen;
    if (f.config.selection == SelectionKind::kTopK) {
      chosen.assign(order.begin(), order.begin() + f.config.top_k);
    } else {
      double mass = 0;
      const std::int64_t max_k = f.config.max_k > 0 ? f.config.max_k : e_count;
      for (std::int64_t j = 0; j < max_k && mass < f.config.top_p; ++j) {
        chosen.push_back(order[j]);
        mass += probs[order[j]];
      }
    }
    double gate_sum = 0;
    for (auto e : chosen) gate_sum += probs[e];
    for (auto e : chosen) {
      const double g = f.config.renormalize ? probs[e] / gate_sum : probs[e];
      const std::int64_t h = f.sizes[e];
      const auto w1 = f.weights.experts[e].w1.data().to_vector<double>();
      const auto w3 = f.weights.experts[e].w3.data().to_vector<double>();
      const auto w2 = f.weights.experts[e].w2.data().to_vector<double>();
      std::vector<double> a = matvec(w1, h, kD, x), b = matvec(w3, h, kD, x);
      for (std::int64_t i = 0; i < h; ++i) a[i] = testing::silu(a[i]) * b[i];
      const std::vector<double> y = matvec(w2, kD, h, a.data());
      for (std::int64_t j = 0; j < kD; ++j) out[n * kD + j] += g * y[j];
    }
  }
  return out;
}

void expect_matches_naive(MoEFixture& f, std::int64_t n_tokens, const std::string& label) {
  Tensor m = random_tensor({n_tokens, kD}, "input." + label);
  MoEResult r = moe_forward(f.config, f.sizes, f.weights, nullptr, ag::Variable(m),
                            ag::Variable(), MoEContext{});
  const auto got = r.out.data().to_vector<double>();
  const auto want = naive_moe(f, m.to_vector<double>(), n_tokens);
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 1e-12) << label << " element " << i;
  }
}

TEST(MoE, TopkOutputEqualsNaivePerTokenLoop) {
  MoEFixture f = make_moe("linear", {8, 16, 24, 16});
  f.config.top_k = 2;
  expect_matches_naive(f, 13, "topk2");
  f.config.renormalize = false;
  expect_matches_naive(f, 13, "topk2-raw");
  f.config.top_k = 1;
  expect_matches_naive(f, 5, "topk1");
}

TEST(MoE, ToppOutputEqualsNaivePerTokenLoop) {
  MoEFixture f = make_moe("linear", {8, 16, 24, 16});
  f.config.selection = SelectionKind::kTopP;
  f.config.top_p = 0.6;
  expect_matches_naive(f, 17, "topp");
  f.config.max_k = 2;
  expect_matches_naive(f, 17, "topp-maxk");
}

TEST(MoE, AuxLossesMatchHandComputation) {
  MoEFixture f = make_moe("linear", {8, 16, 24, 16});
  f.config.top_k = 2;
  const std::int64_t n = 9;
  Tensor m = random_tensor({n, kD}, "aux.input");
  // Hand computation from the router logits.
  const auto wr = f.weights.router.data().to_vector<double>();
  const auto mv = m.to_vector<double>();
  std::vector<double> mean_p(4, 0.0), frac(4, 0.0);
  double z_sq = 0, entropy = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    auto logits = matvec(wr, 4, kD, &mv[t * kD]);
    double mx = *std::max_element(logits.begin(), logits.end()), s = 0;
    for (double l : logits) s += std::exp(l - mx);
    const double lse = mx + std::log(s);
    z_sq += lse * lse;
    std::vector<double> p(4);
    for (int e = 0; e < 4; ++e) {
      p[e] = std::exp(logits[e] - lse);
      mean_p[e] += p[e] / n;
      entropy -= p[e] * (logits[e] - lse) / n;
    }
    std::vector<int> order = {0, 1, 2, 3};
    std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    frac[order[0]] += 1.0 / n;
    frac[order[1]] += 1.0 / n;
  }
  const double mean_h = (8 + 16 + 24 + 16) / 4.0;
  double balance = 0, penalty = 0;
  for (int e = 0; e < 4; ++e) {
    balance += 4 * frac[e] * mean_p[e];
    penalty += 4 * frac[e] * (f.sizes[e] / mean_h) * mean_p[e];
  }
  auto aux_with = [&](double b, double sp, double zl, double en) {
    f.config.aux = {b, sp, zl, en};
    return moe_forward(f.config, f.sizes, f.weights, nullptr, ag::Variable(m), ag::Variable(),
                       MoEContext{})
        .aux_loss.data()
        .item();
  };
  EXPECT_NEAR(aux_with(0.01, 0, 0, 0), 0.01 * balance, 1e-14);
  EXPECT_NEAR(aux_with(0, 0.1, 0, 0), 0.1 * penalty, 1e-14);
  EXPECT_NEAR(aux_with(0, 0, 0.001, 0), 0.001 * z_sq / n, 1e-14);
  EXPECT_NEAR(aux_with(0, 0, 0, 0.03), 0.03 * entropy, 1e-14);
  EXPECT_NEAR(aux_with(0.01, 0.1, 0.001, 0.03),
              0.01 * balance + 0.1 * penalty + 0.001 * z_sq / n + 0.03 * entropy, 1e-14);
  EXPECT_EQ(aux_with(0, 0, 0, 0), 0.0);
  // With equal sizes the P-Penalty equals the balance loss.
  MoEFixture g = make_moe("linear", {16, 16, 16, 16});
  g.config.aux = {0.0, 0.1, 0.0, 0.0};
  const double sp = moe_forward(g.config, g.sizes, g.weights, nullptr, ag::Variable(m),
                                ag::Variable(), MoEContext{}).aux_loss.data().item();
  g.config.aux = {0.1, 0.0, 0.0, 0.0};
  const double bl = moe_forward(g.config, g.sizes, g.weights, nullptr, ag::Variable(m),
                                ag::Variable(), MoEContext{}).aux_loss.data().item();
  EXPECT_NEAR(sp, bl, 1e-15);
}

TEST(MoE, ExpertWithNoTokensWorksForwardAndBackward) {
  MoEFixture f = make_moe("linear", {8, 16, 24, 16});
  f.config.top_k = 2;
  f.config.aux.balance = 0.01;
  // No token selects expert 3.
  const std::int64_t n = 7;
  Selection fixed;
  fixed.n_tokens = n;
  fixed.n_experts = 4;
  for (std::int64_t t = 0; t < n; ++t) {
    fixed.offsets.push_back(2 * t);
    fixed.experts.push_back(t % 3);
    fixed.experts.push_back((t + 1) % 3);
  }
  fixed.offsets.push_back(2 * n);
  MoEContext ctx;
  ctx.fixed_selection = &fixed;
  ag::Variable m(random_tensor({n, kD}, "empty.input"), true);
  MoEResult r = moe_forward(f.config, f.sizes, f.weights, nullptr, m, ag::Variable(), ctx);
  EXPECT_EQ(r.stats.expert_tokens[3], 0);
  ag::backward({ag::add(ag::sum(r.out), r.aux_loss)}, {Tensor::ones({}, DType::kF64)});
  for (const ag::Variable& w : {f.weights.experts[3].w1, f.weights.experts[3].w2}) {
    if (w.grad().defined()) {
      for (double g : w.grad().to_vector<double>()) EXPECT_EQ(g, 0.0);
    }
  }
  ASSERT_TRUE(f.weights.experts[0].w1.grad().defined());
  double norm = 0;
  for (double g : f.weights.experts[0].w1.grad().to_vector<double>()) norm += g * g;
  EXPECT_GT(norm, 0.0);
  ASSERT_TRUE(m.grad().defined());
}

TEST(MoE, CapacityDropsPairsAndStatsCountRows) {
  MoEFixture f = make_moe("linear", {8, 16, 24, 16});
  f.config.top_k = 2;
  f.config.capacity_factor = 0.5;  // capacity = ceil(0.5 * 2N / 4)
  const std::int64_t n = 16;
  MoEResult r = moe_forward(f.config, f.sizes, f.weights, nullptr,
                            ag::Variable(random_tensor({n, kD}, "cap.input")), ag::Variable(),
                            MoEContext{});
  const std::int64_t cap = 4;
  std::int64_t rows = 0;
  for (std::int64_t c : r.stats.expert_tokens) {
    EXPECT_LE(c, cap);
    rows += c;
  }
  EXPECT_EQ(rows + r.stats.dropped, 2 * n);
  EXPECT_GT(r.stats.dropped, 0);
  double active = 0;
  for (int e = 0; e < 4; ++e) active += r.stats.expert_tokens[e] * 3.0 * kD * f.sizes[e];
  EXPECT_NEAR(r.stats.active_params_per_token, active / n, 1e-9);
}

// Gradient check of the whole layer for each router and selection, with
// the selection held fixed (it is piecewise constant in the inputs).
void gradcheck_moe(MoEFixture f, const std::string& label) {
  const std::int64_t n = 5;
  f.config.aux = {0.01, 0.1, 0.001, 0.03};
  Tensor m = random_tensor({n, kD}, "gc.input." + label);
  Tensor prev = random_tensor({n, f.config.gru_dim}, "gc.prev." + label);
  MoEContext ctx;
  ctx.training = true;  // the noisy router draws its (fixed) noise
  const GruWeights* gru = f.config.router == RouterKind::kGru ? &f.gru : nullptr;
  const Selection fixed = moe_forward(f.config, f.sizes, f.weights, gru, ag::Variable(m),
                                      ag::Variable(prev), ctx).selection;
  ctx.fixed_selection = &fixed;
  Tensor proj = random_tensor({n, kD}, "gc.proj." + label);
  std::vector<Tensor> inputs = {m, f.weights.router.data(), f.weights.noise.data(),
                                f.weights.experts[1].w1.data(), f.weights.experts[2].w2.data(),
                                f.weights.proj.data(), f.weights.gate.data(),
                                f.gru.weight_hh.data(), prev};
  auto fn = [&](const std::vector<ag::Variable>& in) {
    MoEWeights w = f.weights;
    w.router = in[1];
    w.noise = in[2];
    w.experts[1].w1 = in[3];
    w.experts[2].w2 = in[4];
    w.proj = in[5];
    w.gate = in[6];
    GruWeights g = f.gru;
    g.weight_hh = in[7];
    MoEResult r = moe_forward(f.config, f.sizes, w, gru ? &g : nullptr, in[0], in[8], ctx);
    Variable out = ag::sum(ag::mul(r.out, ag::Variable(proj)));
    if (r.router_state.defined()) out = ag::add(out, ag::sum(r.router_state));
    return ag::add(out, r.aux_loss);
  };
  const ag::GradcheckResult r = ag::gradcheck(fn, inputs, {1e-6, 1e-7, 1e-6});
  EXPECT_TRUE(r.ok) << label << ": " << r.message;
}

TEST(MoE, GradientCheckEveryRouterAndSelection) {
  for (const char* router : {"linear", "noisy", "gru"}) {
    for (const char* selection : {"topk", "topp"}) {
      for (bool renormalize : {true, false}) {
        MoEFixture f = make_moe(router, {8, 16, 24, 16}, "gc");
        f.config.selection = parse_config_name<SelectionKind>(selection, "model.moe.selection");
        f.config.top_k = 2;
        f.config.top_p = 0.7;
        f.config.renormalize = renormalize;
        gradcheck_moe(f, std::string(router) + "/" + selection + (renormalize ? "/renorm" : ""));
      }
    }
  }
}

TEST(MoE, NoisyRouterNoiseIsKeyedByStepAndGlobalToken) {
  MoEFixture f = make_moe("noisy", {8, 8, 8, 8});
  Tensor m = random_tensor({6, kD}, "noise.input");  // 2 sequences of 3 tokens
  MoEContext ctx;
  ctx.seq_len = 3;
  ctx.step = 5;
  Variable all = router_logits(f.config, f.weights, nullptr, ag::Variable(m), Variable(), ctx,
                               nullptr);
  // The second sequence alone, at sequence offset 1, draws the same noise.
  MoEContext second = ctx;
  second.sequence_offset = 1;
  Variable part = router_logits(f.config, f.weights, nullptr, ag::Variable(m.narrow(0, 3, 3)),
                                Variable(), second, nullptr);
  const auto a = all.data().narrow(0, 3, 3).contiguous().to_vector<double>();
  const auto b = part.data().to_vector<double>();
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_DOUBLE_EQ(a[i], b[i]);
  // Another step draws other noise; eval draws none.
  MoEContext other = ctx;
  other.step = 6;
  const auto c = router_logits(f.config, f.weights, nullptr, ag::Variable(m), Variable(), other,
                               nullptr).data().to_vector<double>();
  EXPECT_NE(c[0], all.data().to_vector<double>()[0]);
  MoEContext eval = ctx;
  eval.training = false;
  const auto clean = router_logits(f.config, f.weights, nullptr, ag::Variable(m), Variable(),
                                   eval, nullptr).data().to_vector<double>();
  const auto linear = ag::linear(ag::Variable(m), f.weights.router).data().to_vector<double>();
  for (std::size_t i = 0; i < clean.size(); ++i) EXPECT_DOUBLE_EQ(clean[i], linear[i]);
}

// GRU state across two MoE layers: s_1 = GRU(P_1 m_1, s_0), s_0 = GRU(P_0 m_0, 0).
// recurrent: d logits_1 / d P_0 flows through s_0; detached: it is zero
// although the value depends on P_0; none: s_0 does not enter at all.
TEST(MoE, GruStateGradientsFollowTheirDefinitions) {
  MoEFixture f = make_moe("gru", {8, 8, 8, 8}, "grustate");
  const std::int64_t n = 4;
  Tensor m0 = random_tensor({n, kD}, "gs.m0");
  Tensor m1 = random_tensor({n, kD}, "gs.m1");
  Tensor proj0 = random_tensor({f.config.gru_dim, kD}, "gs.proj0", 0.5);
  Tensor c = random_tensor({n, 4}, "gs.c");
  auto second_layer_logits = [&](const std::string& mode, const ag::Variable& p0) {
    MoEConfig cfg = f.config;
    cfg.gru_state = parse_config_name<GruStateMode>(mode, "model.moe.gru_state");
    MoEWeights w0 = f.weights;
    w0.proj = p0;
    MoEContext ctx;
    ctx.training = false;
    Variable s0;
    router_logits(cfg, w0, &f.gru, ag::Variable(m0), Variable(), ctx, &s0);
    Variable logits1 = router_logits(cfg, f.weights, &f.gru, ag::Variable(m1), s0, ctx, nullptr);
    return ag::sum(ag::mul(logits1, ag::Variable(c)));
  };
  // recurrent: analytic matches numeric and is nonzero.
  const ag::GradcheckResult rec = ag::gradcheck(
      [&](const std::vector<ag::Variable>& in) { return second_layer_logits("recurrent", in[0]); },
      {proj0});
  EXPECT_TRUE(rec.ok) << rec.message;
  ag::Variable p(proj0, true);
  second_layer_logits("recurrent", p).backward();
  double norm = 0;
  for (double g : p.grad().to_vector<double>()) norm += g * g;
  EXPECT_GT(norm, 1e-12);
  // detached: no gradient reaches P_0, yet the value depends on it.
  ag::Variable pd(proj0, true);
  Variable loss_d = second_layer_logits("detached", pd);
  loss_d.backward();
  if (pd.grad().defined()) {
    for (double g : pd.grad().to_vector<double>()) EXPECT_EQ(g, 0.0);
  }
  Tensor bumped = proj0.clone();
  bumped.narrow(0, 0, 1).fill_(3.0);
  EXPECT_NE(second_layer_logits("detached", ag::Variable(bumped)).data().item(),
            loss_d.data().item());
  EXPECT_DOUBLE_EQ(loss_d.data().item(),
                   second_layer_logits("recurrent", ag::Variable(proj0)).data().item());
  // none: the value does not depend on P_0 at all.
  const double none_a = second_layer_logits("none", ag::Variable(proj0)).data().item();
  const double none_b = second_layer_logits("none", ag::Variable(bumped)).data().item();
  EXPECT_DOUBLE_EQ(none_a, none_b);
  EXPECT_NE(none_a, loss_d.data().item());
}

}  // namespace
}  // namespace motley
