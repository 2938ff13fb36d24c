// The run configuration: one JSON file plus `--set a.b.c=value` overrides
// (SPEC section 2), validated against a schema of every known key.
//
//   Config cfg = Config::load("configs/tiny.json", {"train.lr=1e-3"});
//   cfg.model.d_model, cfg.moe.router, cfg.train.lr, ...
//
// Loading merges, in order: the schema defaults, the file, the overrides.
// An unknown key, a value of the wrong type or an invalid value (e.g.
// n_heads not dividing d_model, an unknown router name) throws kUsage
// naming the key, so `motley` exits 2. `resolved_json()` is the fully
// resolved config (every key, defaults included), printed by rank 0,
// written to the run directory and stored in every checkpoint; loading it
// back gives the same Config.
//
// Defaults are documented in docs/config.md and in the schema (config.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/device.h"
#include "nlohmann/json.hpp"

namespace motley {

// The config's string options, parsed once when the config is read (an
// unknown value is a kUsage error naming the key) and written back with
// the same spelling by resolved_json(). config_name() gives that spelling.
enum class RouterKind : std::uint8_t { kLinear, kNoisy, kGru };           // model.moe.router
enum class GruStateMode : std::uint8_t { kRecurrent, kDetached, kNone };  // model.moe.gru_state
enum class SelectionKind : std::uint8_t { kTopK, kTopP };                 // model.moe.selection
enum class ExpertSizing : std::uint8_t { kUniform, kModse, kArithmetic, kList };  // expert_sizes
enum class PlacementKind : std::uint8_t { kContiguous, kPairs, kBalanced };  // parallel.placement
enum class Precision : std::uint8_t { kF32, kBF16 };                         // train.precision

const char* config_name(RouterKind v);     // "linear", "noisy", "gru"
const char* config_name(GruStateMode v);   // "recurrent", "detached", "none"
const char* config_name(SelectionKind v);  // "topk", "topp"
const char* config_name(ExpertSizing v);   // "uniform", "modse", "arithmetic", "list"
const char* config_name(PlacementKind v);  // "contiguous", "pairs", "balanced"
const char* config_name(Precision v);      // "f32", "bf16"
const char* config_name(DeviceType v);     // "cpu", "cuda"
// The value spelled `text` (one of config_name's spellings for E); kUsage
// naming `key` and the allowed spellings otherwise.
template <typename E>
E parse_config_name(const std::string& text, const std::string& key);

struct MoEAuxConfig {
  double balance = 0.01;
  double size_penalty = 0.0;
  double z_loss = 0.0;
  double entropy = 0.0;
};

struct MoEConfig {
  std::int64_t n_experts = 8;         // 0: every layer dense
  std::int64_t top_k = 2;
  std::int64_t expert_hidden = 640;   // mean expert hidden size
  // uniform, modse, arithmetic, or kList: the explicit expert_size_list
  ExpertSizing expert_sizes = ExpertSizing::kUniform;
  std::vector<std::int64_t> expert_size_list;
  std::int64_t size_multiple = 8;
  RouterKind router = RouterKind::kLinear;
  std::int64_t gru_dim = 128;
  GruStateMode gru_state = GruStateMode::kRecurrent;
  SelectionKind selection = SelectionKind::kTopK;
  double top_p = 0.6;
  std::int64_t max_k = 0;             // 0: n_experts
  bool renormalize = true;
  double capacity_factor = 0.0;       // 0: dropless
  std::int64_t every = 1;
  std::int64_t first_dense = 0;
  MoEAuxConfig aux;
};

struct ModelConfig {
  std::int64_t vocab_size = 4096;
  std::int64_t d_model = 256;
  std::int64_t n_layers = 4;
  std::int64_t n_heads = 4;
  std::int64_t max_seq_len = 1024;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  std::int64_t ffn_hidden = 640;
  MoEConfig moe;

  // Whether layer l is an MoE layer (SPEC section 1.2: every / first_dense).
  bool is_moe_layer(std::int64_t layer) const;
};

struct TrainConfig {
  std::int64_t batch_size = 16;
  std::int64_t micro_batches = 1;
  std::int64_t seq_len = 128;
  std::int64_t steps = 1000;
  double lr = 1e-3;
  double min_lr = 1e-4;
  std::int64_t warmup = 100;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;
  std::int64_t seed = 1337;
  std::int64_t log_every = 10;
  std::int64_t eval_every = 200;
  std::int64_t ckpt_every = 500;
  std::int64_t keep_last = 3;
  // SPEC section 8.1. device: "cpu" | "cuda" (one GPU per rank, NCCL for
  // every group); precision: "f32" | "bf16" (bf16 matmul inputs, fp32
  // accumulation, master weights and optimizer state). Whether the machine
  // and build can honour them is checked where a model is built
  // (train/device.h), not here: a config stays loadable anywhere.
  DeviceType device = DeviceType::kCPU;
  Precision precision = Precision::kF32;
};

struct ParallelConfig {
  std::int64_t dp = 1;
  std::int64_t ep = 1;
  std::int64_t pp = 1;
  PlacementKind placement = PlacementKind::kContiguous;
  // balanced with ep > 1: steps between re-placement decisions from
  // measured routing (Note [Re-placement] in parallel/placement.h); 0: never.
  std::int64_t replace_every = 100;
};

struct DataConfig {
  std::string train;
  std::string valid;
  std::string tokenizer;
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  ParallelConfig parallel;
  DataConfig data;

  // Defaults only (no file).
  static Config defaults();
  // Reads `path` (kUsage if missing or not JSON) and applies `overrides`
  // ("a.b.c=value", value parsed as JSON, otherwise taken as a string).
  static Config load(const std::string& path,
                     const std::vector<std::string>& overrides = {});
  // From an already parsed JSON object (e.g. stored in a checkpoint).
  static Config from_json(const nlohmann::ordered_json& json,
                          const std::vector<std::string>& overrides = {});

  // Every key with its resolved value, in schema order.
  nlohmann::ordered_json resolved_json() const;
};

// The deepest nesting of arrays and objects in JSON text (0 for a
// scalar), found in one pass without recursion; brackets inside strings
// do not count. Every reader of user JSON (config files, --set values,
// stored configs, tokenizer files) refuses text nested deeper than
// kMaxJsonDepth before parsing it: nlohmann's dump and the error messages
// built from it recurse once per level.
std::size_t json_nesting_depth(std::string_view text);
inline constexpr std::size_t kMaxJsonDepth = 64;

// The dotted names of the keys whose values differ between two configs
// ("model.d_model", ...), in schema order.
std::vector<std::string> config_differences(const Config& a, const Config& b);

}  // namespace motley
