#include "core/config.h"

#include <cstdio>
#include <fstream>

#include <gtest/gtest.h>

#include "core/check.h"

namespace motley {
namespace {

using Json = nlohmann::ordered_json;

// Expects a kUsage error whose message contains `needle`.
template <typename F>
void expect_usage_error(F f, const std::string& needle) {
  try {
    f();
    FAIL() << "expected a usage error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Config, FileThenOverrides) {
  const Json j = Json::parse(R"({"model": {"d_model": 64, "n_heads": 4,
      "moe": {"router": "gru", "aux": {"z_loss": 0.001}}}, "train": {"lr": 0.01}})");
  const Config c = Config::from_json(j, {"train.lr=3e-4", "model.moe.expert_sizes=modse",
                                         "model.moe.expert_sizes=[64,64,64,64,64,64,64,64]",
                                         "data.train=some/file.h5"});
  EXPECT_EQ(c.model.d_model, 64);
  EXPECT_EQ(c.model.moe.router, RouterKind::kGru);
  EXPECT_DOUBLE_EQ(c.model.moe.aux.z_loss, 0.001);
  EXPECT_DOUBLE_EQ(c.train.lr, 3e-4);
  EXPECT_EQ(c.model.moe.expert_sizes, ExpertSizing::kList);
  EXPECT_EQ(c.model.moe.expert_size_list.size(), 8u);
  EXPECT_EQ(c.data.train, "some/file.h5");
  EXPECT_EQ(c.model.n_layers, Config::defaults().model.n_layers);
}

TEST(Config, ResolvedJsonRoundTrips) {
  const Config c = Config::from_json(Json::parse(R"({"model": {"moe": {"top_k": 1}}})"),
                                     {"model.moe.expert_sizes=[600,680,640,640,640,640,640,640]"});
  const Json resolved = c.resolved_json();
  EXPECT_EQ(resolved["model"]["moe"]["top_k"], 1);
  EXPECT_TRUE(resolved["model"]["moe"]["expert_sizes"].is_array());
  EXPECT_TRUE(resolved["train"].contains("keep_last"));
  const Config back = Config::from_json(resolved);
  EXPECT_TRUE(config_differences(c, back).empty());
  EXPECT_EQ(back.resolved_json(), resolved);
  const Config other = Config::from_json(resolved, {"train.lr=0.5", "model.d_model=512"});
  EXPECT_EQ(config_differences(c, other),
            (std::vector<std::string>{"model.d_model", "train.lr"}));
}

TEST(Config, UnknownKeysAndWrongTypesNameTheKey) {
  expect_usage_error([] { Config::from_json(Json::parse(R"({"model": {"d_modle": 3}})")); },
                     "model.d_modle");
  expect_usage_error([] { Config::from_json(Json::parse(R"({"trian": {}})")); }, "trian");
  expect_usage_error([] { Config::from_json(Json::parse(R"({"model": {"d_model": "big"}})")); },
                     "model.d_model");
  expect_usage_error([] { Config::from_json(Json::parse(R"({"model": {"d_model": 1.5}})")); },
                     "model.d_model");
  expect_usage_error([] { Config::from_json(Json::parse(R"({"model": 3})")); }, "model");
  expect_usage_error([] { Config::from_json(Json::object(), {"train.lrr=1"}); }, "train.lrr");
  expect_usage_error([] { Config::from_json(Json::object(), {"train.lr"}); }, "key=value");
  expect_usage_error([] { Config::from_json(Json::object(), {"model.moe.renormalize=maybe"}); },
                     "model.moe.renormalize");
}

TEST(Config, InvalidValuesNameTheKeyAndTheRule) {
  expect_usage_error([] { Config::from_json(Json::object(), {"model.n_heads=3"}); },
                     "model.n_heads");
  expect_usage_error([] { Config::from_json(Json::object(), {"model.moe.router=lstm"}); },
                     "model.moe.router");
  expect_usage_error([] { Config::from_json(Json::object(), {"model.moe.top_k=9"}); },
                     "model.moe.top_k");
  expect_usage_error([] { Config::from_json(Json::object(), {"parallel.dp=4", "parallel.ep=3"}); },
                     "parallel.ep");
  expect_usage_error([] { Config::from_json(Json::object(), {"train.batch_size=10", "parallel.dp=4"}); },
                     "train.batch_size");
  expect_usage_error([] { Config::from_json(Json::object(), {"train.seq_len=5000"}); },
                     "train.seq_len");
  expect_usage_error(
      [] { Config::from_json(Json::object(), {"model.moe.expert_sizes=[1,2]"}); },
      "model.moe.expert_sizes");
  // A dense model is valid with n_experts = 0.
  const Config dense = Config::from_json(Json::object(), {"model.moe.n_experts=0"});
  EXPECT_FALSE(dense.model.is_moe_layer(0));
}

TEST(Config, MoELayerPattern) {
  ModelConfig m;
  m.n_layers = 6;
  m.moe.every = 2;
  m.moe.first_dense = 2;
  std::vector<bool> pattern;
  for (int l = 0; l < 6; ++l) pattern.push_back(m.is_moe_layer(l));
  EXPECT_EQ(pattern, (std::vector<bool>{false, false, false, true, false, true}));
}

TEST(Config, LoadReportsFileProblems) {
  expect_usage_error([] { Config::load("no/such/config.json"); }, "no/such/config.json");
  const std::string path = ::testing::TempDir() + "/bad_config.json";
  {
    std::ofstream out(path);
    out << "{ \"model\": { \"d_model\": 64, } ";
  }
  expect_usage_error([&] { Config::load(path); }, "not valid JSON");
  {
    std::ofstream out(path);
    out << "// comments are allowed\n{ \"model\": { \"d_model\": 64, \"n_heads\": 2 } }";
  }
  EXPECT_EQ(Config::load(path).model.d_model, 64);
  std::remove(path.c_str());
}

// Counts that other checks divide or multiply by are bounded first: a zero
// or huge parallel.dp used to end in SIGFPE inside validation.
TEST(Config, ZeroAndHugeRankCountsAreUsageErrors) {
  for (const char* set :
       {"parallel.dp=0", "parallel.dp=4611686018427387904", "parallel.pp=0", "parallel.ep=0",
        "train.micro_batches=0", "train.micro_batches=4611686018427387904"}) {
    const std::string key = std::string(set).substr(0, std::string(set).find('='));
    expect_usage_error([&] { Config::from_json(Json::object(), {set}); }, key);
  }
}

TEST(Config, JsonNestingDepthIsCountedWithoutRecursion) {
  EXPECT_EQ(json_nesting_depth("3"), 0u);
  EXPECT_EQ(json_nesting_depth(R"({"a": [1, {"b": []}]})"), 4u);
  EXPECT_EQ(json_nesting_depth(R"({"a": "[[[[{{{"})"), 1u);            // brackets in strings
  EXPECT_EQ(json_nesting_depth(R"({"a": "\"[[["})"), 1u);              // an escaped quote
  EXPECT_EQ(json_nesting_depth(R"({"a": "\\", "b": [[]]})"), 3u);      // an escaped backslash
  EXPECT_EQ(json_nesting_depth(std::string(1000000, '[')), 1000000u);  // no stack used
}

// 200,000 levels used to overflow the stack (SIGSEGV) while the error
// message serialised the value; now the text is refused before parsing.
TEST(Config, DeeplyNestedValuesAreRefusedBeforeParsing) {
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  expect_usage_error([&] { Config::from_json(Json::object(), {"model.d_model=" + deep}); },
                     "nested more than");
  const std::string path = ::testing::TempDir() + "motley_deep_config.json";
  {
    std::ofstream out(path);
    out << R"({"model": {"d_model": )" << deep << "}}";
  }
  expect_usage_error([&] { Config::load(path); }, "nested more than");
  std::remove(path.c_str());
  // The limit leaves room for any real config.
  const std::string ok = std::string(kMaxJsonDepth, '[') + std::string(kMaxJsonDepth, ']');
  EXPECT_EQ(json_nesting_depth(ok), kMaxJsonDepth);
}

// Experts with no MoE layer to put them in: accepted before, and inspect
// then printed "active parameters per token -nan".
TEST(Config, ExpertsWithoutAnyMoELayerAreRefused) {
  const Json base = Json::parse(R"({"model": {"n_layers": 2, "moe": {"n_experts": 4}}})");
  expect_usage_error([&] { Config::from_json(base, {"model.moe.every=4"}); }, "model.moe.every");
  expect_usage_error([&] { Config::from_json(base, {"model.moe.first_dense=2"}); },
                     "leaves no MoE layer");
  // Huge values are computed with, not searched through.
  expect_usage_error([&] { Config::from_json(base, {"model.moe.every=4611686018427387904"}); },
                     "no MoE layer");
  expect_usage_error(
      [&] { Config::from_json(base, {"model.moe.first_dense=4611686018427387904"}); },
      "no MoE layer");
  EXPECT_NO_THROW(Config::from_json(base, {"model.moe.every=2"}));  // layer 1
  EXPECT_NO_THROW(Config::from_json(base, {"model.moe.first_dense=1"}));
  EXPECT_NO_THROW(Config::from_json(base, {"model.moe.n_experts=0", "model.moe.every=4"}));
}

}  // namespace
}  // namespace motley
