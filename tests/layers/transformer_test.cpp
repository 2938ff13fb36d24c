#include "layers/transformer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "core/ops.h"
#include "layers/parameter_layout.h"
#include "nlohmann/json.hpp"

namespace motley {
namespace {

namespace ag = autograd;
using Json = nlohmann::json;

Json load_fixture(const std::string& name) {
  std::ifstream in(std::string(MOTLEY_FIXTURE_DIR) + "/" + name + ".json");
  EXPECT_TRUE(in.good()) << "missing fixture " << name;
  return Json::parse(in);
}

Tensor int_tensor(const Json& rows) {
  std::vector<std::int64_t> v;
  for (const Json& r : rows) {
    for (const Json& x : r) v.push_back(x.get<std::int64_t>());
  }
  return Tensor::from_vector(v, {static_cast<std::int64_t>(rows.size()),
                                 static_cast<std::int64_t>(rows[0].size())});
}

// Loads a fixture computed by an independent PyTorch implementation of the
// model (fixtures/make_fixtures.py) and checks loss and every gradient.
void check_against_fixture(const std::string& name) {
  SCOPED_TRACE(name);
  const Json fx = load_fixture(name);
  const Config config = Config::from_json(
      nlohmann::ordered_json::parse(fx["config"].dump()), {"train.seq_len=5"});
  Transformer model(config.model, /*seed=*/0, DType::kF64);
  // The same parameter names and shapes, and nothing else.
  ASSERT_EQ(model.params().all().size(), fx["params"].size());
  for (auto& [pname, entry] : fx["params"].items()) {
    ASSERT_TRUE(model.params().contains(pname)) << "motley lacks " << pname;
    ag::Variable p = model.params().get(pname);
    Shape shape;
    for (const Json& s : entry["shape"]) shape.push_back(s.get<std::int64_t>());
    ASSERT_EQ(p.shape(), shape) << pname;
    p.set_data(Tensor::from_vector(entry["data"].get<std::vector<double>>(), shape));
  }
  EXPECT_EQ(model.total_parameters(), model.params().numel());
  const Tensor tokens = int_tensor(fx["tokens"]);
  const Tensor targets = int_tensor(fx["targets"]);
  ModelOutput out = model.forward(tokens, targets, ForwardContext{});
  EXPECT_NEAR(out.loss.data().item(), fx["loss"].get<double>(), 1e-11);
  EXPECT_NEAR(out.lm_loss.data().item(), fx["lm_loss"].get<double>(), 1e-11);
  EXPECT_NEAR(out.aux_loss.data().item(), fx["aux_loss"].get<double>(), 1e-11);
  out.loss.backward();
  for (auto& [pname, grad] : fx["grads"].items()) {
    const ag::Variable& p = model.params().get(pname);
    const std::vector<double> want = grad.get<std::vector<double>>();
    std::vector<double> got(want.size(), 0.0);
    if (p.grad().defined()) got = p.grad().to_vector<double>();
    double worst = 0;
    std::size_t worst_i = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      const double err = std::abs(got[i] - want[i]) / (1e-8 + std::abs(want[i]));
      if (err > worst) {
        worst = err;
        worst_i = i;
      }
    }
    EXPECT_LT(worst, 1e-6) << pname << "[" << worst_i << "]: motley " << got[worst_i]
                           << " vs reference " << want[worst_i];
  }
}

TEST(TransformerReference, LinearRouterTopk) { check_against_fixture("linear_topk"); }
TEST(TransformerReference, GruRecurrentTopp) { check_against_fixture("gru_topp"); }
TEST(TransformerReference, GruDetachedTopk) { check_against_fixture("gru_detached_topk"); }
TEST(TransformerReference, DenseAndMoELayersTop1) { check_against_fixture("dense_mixed_top1"); }

ModelConfig tiny_config() {
  Config c = Config::defaults();
  c.model.vocab_size = 64;
  c.model.d_model = 32;
  c.model.n_layers = 2;
  c.model.n_heads = 2;
  c.model.ffn_hidden = 48;
  c.model.moe.n_experts = 4;
  c.model.moe.expert_hidden = 32;
  c.model.moe.gru_dim = 16;
  return c.model;
}

TEST(Transformer, InitIsKeyedByNameNotByShard) {
  ModelConfig config = tiny_config();
  config.moe.expert_sizes = ExpertSizing::kModse;
  Transformer whole(config, 7);
  ModelShard stage;
  stage.layer_begin = 1;
  stage.hold_expert = {false, true, false, true};
  Transformer part(config, 7, DType::kF32, Device::cpu(), stage);
  EXPECT_FALSE(part.params().contains("embed.weight"));
  EXPECT_FALSE(part.params().contains("layers.0.attn.wq"));
  EXPECT_FALSE(part.params().contains("layers.1.moe.experts.0.w1"));
  EXPECT_TRUE(part.params().contains("lm_head.weight"));
  for (const ag::Variable& p : part.params().all()) {
    EXPECT_EQ(ops::max_abs_diff(p.data(), whole.params().get(p.name()).data()), 0.0) << p.name();
  }
  // A different seed gives different values.
  Transformer other(config, 8);
  EXPECT_GT(ops::max_abs_diff(other.params().get("layers.0.attn.wq").data(),
                              whole.params().get("layers.0.attn.wq").data()),
            0.0);
}

double sample_std(const Tensor& t) {
  double s = 0, s2 = 0;
  const auto v = t.to_vector<double>();
  for (double x : v) {
    s += x;
    s2 += x * x;
  }
  const double n = static_cast<double>(v.size());
  return std::sqrt(s2 / n - (s / n) * (s / n));
}

TEST(Transformer, InitScalesFollowTheSpec) {
  ModelConfig config = tiny_config();
  config.d_model = 128;
  config.n_heads = 4;
  config.moe.expert_hidden = 256;
  config.moe.router = RouterKind::kGru;
  Transformer model(config, 1);
  const double residual = 0.02 / std::sqrt(2.0 * config.n_layers);
  EXPECT_NEAR(sample_std(model.params().get("layers.0.attn.wq").data()), 0.02, 0.001);
  EXPECT_NEAR(sample_std(model.params().get("layers.0.attn.wo").data()), residual, 0.0006);
  EXPECT_NEAR(sample_std(model.params().get("layers.1.moe.experts.2.w2").data()), residual,
              0.0006);
  EXPECT_EQ(sample_std(model.params().get("final_norm.weight").data()), 0.0);
  EXPECT_EQ(model.params().get("final_norm.weight").data().to_vector<float>()[0], 1.0f);
  // GRU: U(-1/sqrt(p), 1/sqrt(p)).
  const double bound = 1.0 / std::sqrt(16.0);
  for (float v : model.params().get("moe_gru.weight_ih").data().to_vector<float>()) {
    EXPECT_LE(std::abs(v), bound);
  }
  EXPECT_NEAR(sample_std(model.params().get("moe_gru.weight_hh").data()), bound / std::sqrt(3.0),
              0.01);
}

// Every router, selection and size scheme trains: a few AdamW steps on one
// fixed batch drive the loss well down.
TEST(Transformer, EveryVariantTrainsInOneProcess) {
  struct Variant {
    const char* router;
    const char* selection;
    const char* sizes;
    const char* gru_state;
  };
  const Variant variants[] = {
      {"linear", "topk", "uniform", "recurrent"},  {"linear", "topk", "modse", "recurrent"},
      {"noisy", "topk", "modse", "recurrent"},     {"linear", "topp", "arithmetic", "recurrent"},
      {"gru", "topk", "uniform", "recurrent"},     {"gru", "topk", "uniform", "detached"},
      {"gru", "topp", "arithmetic", "none"},
  };
  std::vector<std::int64_t> tok(2 * 9);
  for (std::size_t i = 0; i < tok.size(); ++i) tok[i] = (7 * i + 3) % 64;
  const Tensor all = Tensor::from_vector(tok, {2, 9});
  const Tensor tokens = all.narrow(1, 0, 8).contiguous();
  const Tensor targets = all.narrow(1, 1, 8).contiguous();
  for (const Variant& v : variants) {
    SCOPED_TRACE(std::string(v.router) + "/" + v.selection + "/" + v.sizes + "/" + v.gru_state);
    ModelConfig config = tiny_config();
    config.moe.router = parse_config_name<RouterKind>(v.router, "model.moe.router");
    config.moe.selection = parse_config_name<SelectionKind>(v.selection, "model.moe.selection");
    config.moe.expert_sizes = parse_config_name<ExpertSizing>(v.sizes, "model.moe.expert_sizes");
    config.moe.gru_state = parse_config_name<GruStateMode>(v.gru_state, "model.moe.gru_state");
    config.moe.aux.size_penalty = std::string(v.sizes) == "arithmetic" ? 0.01 : 0.0;
    config.moe.aux.entropy = std::string(v.selection) == "topp" ? 0.01 : 0.0;
    Transformer model(config, 3);
    std::vector<Tensor> m1, m2;
    for (const ag::Variable& p : model.params().all()) {
      m1.push_back(Tensor::zeros(p.shape()));
      m2.push_back(Tensor::zeros(p.shape()));
    }
    double first = 0, last = 0;
    for (int step = 1; step <= 30; ++step) {
      model.params().zero_grad();
      ForwardContext ctx;
      ctx.step = step;
      ModelOutput out = model.forward(tokens, targets, ctx);
      ASSERT_TRUE(std::isfinite(out.loss.data().item()));
      if (step == 1) first = out.lm_loss.data().item();
      last = out.lm_loss.data().item();
      ASSERT_EQ(out.moe_stats.size(), 2u);
      out.loss.backward();
      for (std::size_t i = 0; i < model.params().all().size(); ++i) {
        ag::Variable p = model.params().all()[i];
        if (!p.grad().defined()) continue;
        Tensor data = p.data();
        ops::adamw_step(data, p.grad(), m1[i], m2[i], 3e-3, 0.9, 0.95, 1e-8,
                        decays(p) ? 0.1 : 0.0, step);
      }
    }
    EXPECT_NEAR(first, std::log(64.0), 0.3);  // an untrained model is near uniform
    EXPECT_LT(last, 0.5 * first) << "loss went from " << first << " to " << last;
  }
}

// Note [Parameter layout]: a shard registers exactly the layout's entries
// it holds, in the layout's order, with the layout's shapes; the count
// of the whole model is the layout's sum, for every router and mix of
// dense and MoE layers.
TEST(ParameterLayout, ShardsRegisterTheirEntriesInLayoutOrder) {
  for (const char* router : {"linear", "noisy", "gru"}) {
    for (const std::int64_t every : {1, 2}) {
      ModelConfig config = tiny_config();
      config.moe.router = parse_config_name<RouterKind>(router, "model.moe.router");
      config.moe.every = every;
      const std::vector<ParameterSpec> layout = parameter_layout(config);
      std::int64_t total = 0;
      for (const ParameterSpec& s : layout) total += shape_numel(s.shape);
      EXPECT_EQ(Transformer(config, 3).total_parameters(), total);
      const std::vector<std::vector<bool>> holds = {
          {}, {true, false, true, false}, {false, true, false, true}};
      for (std::int64_t begin = 0; begin < config.n_layers; ++begin) {
        for (std::int64_t end = begin + 1; end <= config.n_layers; ++end) {
          for (const std::vector<bool>& hold : holds) {
            ModelShard shard{begin, end, hold};
            const Transformer model(config, 3, DType::kF32, Device::cpu(), shard);
            std::vector<std::string> want;
            for (const ParameterSpec& s : layout) {
              if (shard_holds(s, config, begin, end, hold)) want.push_back(s.name);
            }
            std::vector<std::string> got;
            for (const Variable& p : model.params().all()) {
              got.push_back(p.name());
              const auto it =
                  std::find_if(layout.begin(), layout.end(),
                               [&](const ParameterSpec& s) { return s.name == p.name(); });
              ASSERT_NE(it, layout.end()) << p.name();
              EXPECT_EQ(p.shape(), it->shape) << p.name();
            }
            EXPECT_EQ(got, want) << router << " every " << every << " [" << begin << ", " << end
                                 << ")";
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace motley
