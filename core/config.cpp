#include "core/config.h"

#include <algorithm>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/check.h"

namespace motley {
namespace {

using Json = nlohmann::ordered_json;

// One known key: how to read it from JSON into a Config and back.
struct Field {
  const char* key;  // dotted name
  std::function<void(Config&, const Json&, const std::string&)> read;
  std::function<Json(const Config&)> write;
};

const char* json_type_name(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "a list";
    case Json::value_t::object: return "an object";
    case Json::value_t::number_float: return "a real number";
    default: return "an integer";
  }
}

[[noreturn]] void wrong_type(const std::string& key, const char* expected, const Json& j) {
  MOTLEY_FAIL(kUsage, "config key '", key, "' must be ", expected, ", got ",
              json_type_name(j), " (", j.dump(), ")");
}

std::int64_t read_int(const Json& j, const std::string& key) {
  if (j.is_number_integer()) return j.get<std::int64_t>();
  // Accept 1e3-style numbers that are whole.
  if (j.is_number_float()) {
    const double v = j.get<double>();
    if (v == static_cast<double>(static_cast<std::int64_t>(v))) {
      return static_cast<std::int64_t>(v);
    }
  }
  wrong_type(key, "an integer", j);
}

double read_double(const Json& j, const std::string& key) {
  if (j.is_number()) return j.get<double>();
  wrong_type(key, "a number", j);
}

bool read_bool(const Json& j, const std::string& key) {
  if (j.is_boolean()) return j.get<bool>();
  wrong_type(key, "true or false", j);
}

std::string read_string(const Json& j, const std::string& key) {
  if (j.is_string()) return j.get<std::string>();
  wrong_type(key, "a string", j);
}

// Each string option's spellings, in the order the error message lists them.
template <typename E>
struct EnumNames;
template <>
struct EnumNames<RouterKind> {
  static constexpr std::pair<const char*, RouterKind> kValues[] = {
      {"linear", RouterKind::kLinear}, {"noisy", RouterKind::kNoisy}, {"gru", RouterKind::kGru}};
};
template <>
struct EnumNames<GruStateMode> {
  static constexpr std::pair<const char*, GruStateMode> kValues[] = {
      {"recurrent", GruStateMode::kRecurrent},
      {"detached", GruStateMode::kDetached},
      {"none", GruStateMode::kNone}};
};
template <>
struct EnumNames<SelectionKind> {
  static constexpr std::pair<const char*, SelectionKind> kValues[] = {
      {"topk", SelectionKind::kTopK}, {"topp", SelectionKind::kTopP}};
};
template <>
struct EnumNames<ExpertSizing> {
  static constexpr std::pair<const char*, ExpertSizing> kValues[] = {
      {"uniform", ExpertSizing::kUniform},
      {"modse", ExpertSizing::kModse},
      {"arithmetic", ExpertSizing::kArithmetic},
      {"list", ExpertSizing::kList}};
};
template <>
struct EnumNames<PlacementKind> {
  static constexpr std::pair<const char*, PlacementKind> kValues[] = {
      {"contiguous", PlacementKind::kContiguous},
      {"pairs", PlacementKind::kPairs},
      {"balanced", PlacementKind::kBalanced}};
};
template <>
struct EnumNames<Precision> {
  static constexpr std::pair<const char*, Precision> kValues[] = {{"f32", Precision::kF32},
                                                                  {"bf16", Precision::kBF16}};
};
template <>
struct EnumNames<DeviceType> {
  static constexpr std::pair<const char*, DeviceType> kValues[] = {{"cpu", DeviceType::kCPU},
                                                                   {"cuda", DeviceType::kCUDA}};
};

template <typename E>
const char* enum_name(E v) {
  for (const auto& [name, value] : EnumNames<E>::kValues) {
    if (value == v) return name;
  }
  MOTLEY_FAIL(kInternal, "enum value ", static_cast<int>(v), " has no config name");
}

// `allowed`: how many of the leading spellings a user may write (the rest
// are set by other forms, such as "list" by a JSON list).
template <typename E>
E read_enum(const Json& j, const std::string& key,
            std::size_t allowed = std::size(EnumNames<E>::kValues)) {
  const std::string v = read_string(j, key);
  std::vector<std::string> names;
  for (std::size_t i = 0; i < allowed; ++i) {
    const auto& [name, value] = EnumNames<E>::kValues[i];
    if (v == name) return value;
    names.push_back(absl::StrCat("\"", name, "\""));
  }
  MOTLEY_FAIL(kUsage, "config key '", key, "' = \"", v, "\": must be ", absl::StrJoin(names, ", "));
}

#define MOTLEY_INT_FIELD(name, member)                                               \
  Field {                                                                            \
    name, [](Config& c, const Json& j, const std::string& k) { c.member = read_int(j, k); }, \
        [](const Config& c) { return Json(c.member); }                               \
  }
#define MOTLEY_DOUBLE_FIELD(name, member)                                            \
  Field {                                                                            \
    name,                                                                            \
        [](Config& c, const Json& j, const std::string& k) { c.member = read_double(j, k); }, \
        [](const Config& c) { return Json(c.member); }                               \
  }
#define MOTLEY_BOOL_FIELD(name, member)                                              \
  Field {                                                                            \
    name, [](Config& c, const Json& j, const std::string& k) { c.member = read_bool(j, k); }, \
        [](const Config& c) { return Json(c.member); }                               \
  }
#define MOTLEY_ENUM_FIELD(name, member, Enum)                                                     \
  Field {                                                                                         \
    name,                                                                                         \
        [](Config& c, const Json& j, const std::string& k) { c.member = read_enum<Enum>(j, k); }, \
        [](const Config& c) { return Json(enum_name(c.member)); }                                 \
  }
#define MOTLEY_STRING_FIELD(name, member)                                            \
  Field {                                                                            \
    name,                                                                            \
        [](Config& c, const Json& j, const std::string& k) { c.member = read_string(j, k); }, \
        [](const Config& c) { return Json(c.member); }                               \
  }

const std::vector<Field>& schema() {
  static const std::vector<Field> fields = {
      MOTLEY_INT_FIELD("model.vocab_size", model.vocab_size),
      MOTLEY_INT_FIELD("model.d_model", model.d_model),
      MOTLEY_INT_FIELD("model.n_layers", model.n_layers),
      MOTLEY_INT_FIELD("model.n_heads", model.n_heads),
      MOTLEY_INT_FIELD("model.max_seq_len", model.max_seq_len),
      MOTLEY_DOUBLE_FIELD("model.rope_theta", model.rope_theta),
      MOTLEY_DOUBLE_FIELD("model.norm_eps", model.norm_eps),
      MOTLEY_INT_FIELD("model.ffn_hidden", model.ffn_hidden),
      MOTLEY_INT_FIELD("model.moe.n_experts", model.moe.n_experts),
      MOTLEY_INT_FIELD("model.moe.top_k", model.moe.top_k),
      MOTLEY_INT_FIELD("model.moe.expert_hidden", model.moe.expert_hidden),
      Field{"model.moe.expert_sizes",
            [](Config& c, const Json& j, const std::string& k) {
              if (j.is_string()) {
                // "list" is spelled as a JSON list, not as a string.
                c.model.moe.expert_sizes = read_enum<ExpertSizing>(j, k, 3);
                c.model.moe.expert_size_list.clear();
              } else if (j.is_array()) {
                c.model.moe.expert_sizes = ExpertSizing::kList;
                c.model.moe.expert_size_list.clear();
                for (const Json& e : j) c.model.moe.expert_size_list.push_back(read_int(e, k));
              } else {
                wrong_type(k, "\"uniform\", \"modse\", \"arithmetic\" or a list of integers", j);
              }
            },
            [](const Config& c) {
              return c.model.moe.expert_sizes == ExpertSizing::kList
                         ? Json(c.model.moe.expert_size_list)
                         : Json(enum_name(c.model.moe.expert_sizes));
            }},
      MOTLEY_INT_FIELD("model.moe.size_multiple", model.moe.size_multiple),
      MOTLEY_ENUM_FIELD("model.moe.router", model.moe.router, RouterKind),
      MOTLEY_INT_FIELD("model.moe.gru_dim", model.moe.gru_dim),
      MOTLEY_ENUM_FIELD("model.moe.gru_state", model.moe.gru_state, GruStateMode),
      MOTLEY_ENUM_FIELD("model.moe.selection", model.moe.selection, SelectionKind),
      MOTLEY_DOUBLE_FIELD("model.moe.top_p", model.moe.top_p),
      MOTLEY_INT_FIELD("model.moe.max_k", model.moe.max_k),
      MOTLEY_BOOL_FIELD("model.moe.renormalize", model.moe.renormalize),
      MOTLEY_DOUBLE_FIELD("model.moe.capacity_factor", model.moe.capacity_factor),
      MOTLEY_INT_FIELD("model.moe.every", model.moe.every),
      MOTLEY_INT_FIELD("model.moe.first_dense", model.moe.first_dense),
      MOTLEY_DOUBLE_FIELD("model.moe.aux.balance", model.moe.aux.balance),
      MOTLEY_DOUBLE_FIELD("model.moe.aux.size_penalty", model.moe.aux.size_penalty),
      MOTLEY_DOUBLE_FIELD("model.moe.aux.z_loss", model.moe.aux.z_loss),
      MOTLEY_DOUBLE_FIELD("model.moe.aux.entropy", model.moe.aux.entropy),
      MOTLEY_INT_FIELD("train.batch_size", train.batch_size),
      MOTLEY_INT_FIELD("train.micro_batches", train.micro_batches),
      MOTLEY_INT_FIELD("train.seq_len", train.seq_len),
      MOTLEY_INT_FIELD("train.steps", train.steps),
      MOTLEY_DOUBLE_FIELD("train.lr", train.lr),
      MOTLEY_DOUBLE_FIELD("train.min_lr", train.min_lr),
      MOTLEY_INT_FIELD("train.warmup", train.warmup),
      MOTLEY_DOUBLE_FIELD("train.weight_decay", train.weight_decay),
      MOTLEY_DOUBLE_FIELD("train.beta1", train.beta1),
      MOTLEY_DOUBLE_FIELD("train.beta2", train.beta2),
      MOTLEY_DOUBLE_FIELD("train.eps", train.eps),
      MOTLEY_DOUBLE_FIELD("train.grad_clip", train.grad_clip),
      MOTLEY_INT_FIELD("train.seed", train.seed),
      MOTLEY_INT_FIELD("train.log_every", train.log_every),
      MOTLEY_INT_FIELD("train.eval_every", train.eval_every),
      MOTLEY_INT_FIELD("train.ckpt_every", train.ckpt_every),
      MOTLEY_INT_FIELD("train.keep_last", train.keep_last),
      MOTLEY_ENUM_FIELD("train.device", train.device, DeviceType),
      MOTLEY_ENUM_FIELD("train.precision", train.precision, Precision),
      MOTLEY_INT_FIELD("parallel.dp", parallel.dp),
      MOTLEY_INT_FIELD("parallel.ep", parallel.ep),
      MOTLEY_INT_FIELD("parallel.pp", parallel.pp),
      MOTLEY_ENUM_FIELD("parallel.placement", parallel.placement, PlacementKind),
      MOTLEY_INT_FIELD("parallel.replace_every", parallel.replace_every),
      MOTLEY_STRING_FIELD("data.train", data.train),
      MOTLEY_STRING_FIELD("data.valid", data.valid),
      MOTLEY_STRING_FIELD("data.tokenizer", data.tokenizer),
  };
  return fields;
}

#undef MOTLEY_INT_FIELD
#undef MOTLEY_DOUBLE_FIELD
#undef MOTLEY_BOOL_FIELD
#undef MOTLEY_STRING_FIELD
#undef MOTLEY_ENUM_FIELD

const Field* find_field(const std::string& key) {
  for (const Field& f : schema()) {
    if (key == f.key) return &f;
  }
  return nullptr;
}

std::vector<std::string> section_names() {
  std::vector<std::string> sections;
  for (const Field& f : schema()) {
    std::string key = f.key;
    for (std::size_t dot = key.find('.'); dot != std::string::npos;
         dot = key.find('.', dot + 1)) {
      const std::string prefix = key.substr(0, dot);
      if (std::find(sections.begin(), sections.end(), prefix) == sections.end()) {
        sections.push_back(prefix);
      }
    }
  }
  return sections;
}

bool is_section(const std::string& key) {
  static const std::vector<std::string> sections = section_names();
  return std::find(sections.begin(), sections.end(), key) != sections.end();
}

// Applies every leaf of `json` (nested objects) to `config`.
void apply_json(Config& config, const Json& json, const std::string& prefix) {
  MOTLEY_CHECK_KIND(kUsage, json.is_object(), "config ",
                    prefix.empty() ? std::string("file") : "key '" + prefix + "'",
                    " must be a JSON object, got ", json_type_name(json));
  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (const Field* field = find_field(key)) {
      field->read(config, it.value(), key);
    } else if (is_section(key)) {
      apply_json(config, it.value(), key);
    } else {
      MOTLEY_FAIL(kUsage, "unknown config key '", key,
                  "' (see docs/config.md for the known keys)");
    }
  }
}

void apply_override(Config& config, const std::string& text) {
  const std::size_t eq = text.find('=');
  MOTLEY_CHECK_KIND(kUsage, eq != std::string::npos && eq > 0, "--set '", text,
                    "' must have the form key=value, e.g. train.lr=3e-4");
  const std::string key = text.substr(0, eq);
  const std::string value = text.substr(eq + 1);
  const Field* field = find_field(key);
  MOTLEY_CHECK_KIND(kUsage, field != nullptr, "--set: unknown config key '", key,
                    "' (see docs/config.md for the known keys)");
  MOTLEY_CHECK_KIND(kUsage, json_nesting_depth(value) <= kMaxJsonDepth, "--set ", key,
                    ": the value is nested more than ", kMaxJsonDepth, " levels deep");
  Json parsed = Json::parse(value, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) parsed = Json(value);  // not JSON: a string
  field->read(config, parsed, key);
}

template <typename T>
void require(bool ok, const char* key, const T& value, const std::string& why) {
  if (!ok) {
    std::ostringstream v;
    v << value;
    MOTLEY_FAIL(kUsage, "config key '", key, "' = ", v.str(), ": ", why);
  }
}

void validate(const Config& c) {
  const ModelConfig& m = c.model;
  const MoEConfig& e = m.moe;
  require(m.vocab_size >= 2, "model.vocab_size", m.vocab_size, "must be at least 2");
  require(m.d_model >= 1, "model.d_model", m.d_model, "must be positive");
  require(m.n_layers >= 1, "model.n_layers", m.n_layers, "must be positive");
  require(m.n_heads >= 1 && m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
          absl::StrCat("must divide model.d_model = ", m.d_model));
  require((m.d_model / m.n_heads) % 2 == 0, "model.n_heads", m.n_heads,
          "the head size d_model / n_heads must be even for RoPE");
  require(m.max_seq_len >= 1, "model.max_seq_len", m.max_seq_len, "must be positive");
  require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive");
  require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive");
  require(m.ffn_hidden >= 1, "model.ffn_hidden", m.ffn_hidden, "must be positive");

  require(e.n_experts >= 0, "model.moe.n_experts", e.n_experts,
          "must be >= 0 (0 makes every layer dense)");
  if (e.n_experts > 0) {
    require(e.top_k >= 1 && e.top_k <= e.n_experts, "model.moe.top_k", e.top_k,
            absl::StrCat("must be in [1, n_experts = ", e.n_experts, "]"));
    require(e.expert_hidden >= 1, "model.moe.expert_hidden", e.expert_hidden,
            "must be positive");
    if (e.expert_sizes == ExpertSizing::kList) {
      require(static_cast<std::int64_t>(e.expert_size_list.size()) == e.n_experts,
              "model.moe.expert_sizes", Json(e.expert_size_list).dump(),
              absl::StrCat("must list n_experts = ", e.n_experts, " sizes"));
      for (std::int64_t s : e.expert_size_list) {
        require(s >= 1, "model.moe.expert_sizes", s, "every size must be positive");
      }
    }
    if (e.expert_sizes == ExpertSizing::kModse) {
      require(e.n_experts % 2 == 0, "model.moe.n_experts", e.n_experts,
              "modse expert sizes come in pairs: n_experts must be even");
    }
    require(e.size_multiple >= 1, "model.moe.size_multiple", e.size_multiple, "must be positive");
    require(e.gru_dim >= 1, "model.moe.gru_dim", e.gru_dim, "must be positive");
    require(e.top_p > 0 && e.top_p <= 1, "model.moe.top_p", e.top_p, "must be in (0, 1]");
    require(e.max_k >= 0 && e.max_k <= e.n_experts, "model.moe.max_k", e.max_k,
            absl::StrCat("must be in [0, n_experts = ", e.n_experts, "] (0: n_experts)"));
    require(e.capacity_factor >= 0, "model.moe.capacity_factor", e.capacity_factor,
            "must be >= 0 (0: dropless)");
    require(e.every >= 1, "model.moe.every", e.every, "must be positive");
    require(e.first_dense >= 0, "model.moe.first_dense", e.first_dense, "must be >= 0");
    // The first MoE layer is the first l >= first_dense with l % every ==
    // every - 1 (computed, not searched: both may be huge).
    const std::int64_t r =
        e.first_dense < m.n_layers ? (e.every - 1 - e.first_dense % e.every) % e.every : m.n_layers;
    const bool any_moe = e.first_dense < m.n_layers && r < m.n_layers - e.first_dense;
    require(any_moe, "model.moe.every", e.every,
            absl::StrCat("with model.moe.first_dense = ", e.first_dense, " leaves no MoE layer in ",
                         m.n_layers,
                         " layers; lower them, or set model.moe.n_experts = 0 for a "
                         "dense model"));
    for (auto [key, v] : {std::pair{"model.moe.aux.balance", e.aux.balance},
                          {"model.moe.aux.size_penalty", e.aux.size_penalty},
                          {"model.moe.aux.z_loss", e.aux.z_loss},
                          {"model.moe.aux.entropy", e.aux.entropy}}) {
      require(v >= 0, key, v, "must be >= 0 (0 disables the term)");
    }
  }

  const TrainConfig& t = c.train;
  const ParallelConfig& p = c.parallel;
  // Counts of ranks and micro-batches first, bounded, so that the products
  // below neither divide by zero nor overflow.
  constexpr std::int64_t kMaxCount = std::int64_t{1} << 20;
  require(p.dp >= 1 && p.dp <= kMaxCount, "parallel.dp", p.dp,
          absl::StrCat("must be in [1, ", kMaxCount, "]"));
  require(p.pp >= 1 && p.pp <= kMaxCount, "parallel.pp", p.pp,
          absl::StrCat("must be in [1, ", kMaxCount, "]"));
  require(p.ep >= 1 && p.ep <= kMaxCount, "parallel.ep", p.ep,
          absl::StrCat("must be in [1, ", kMaxCount, "]"));
  require(t.micro_batches >= 1 && t.micro_batches <= kMaxCount, "train.micro_batches",
          t.micro_batches, absl::StrCat("must be in [1, ", kMaxCount, "]"));
  require(t.batch_size >= 1 && t.batch_size % (p.dp * t.micro_batches) == 0,
          "train.batch_size", t.batch_size,
          absl::StrCat("must be a positive multiple of parallel.dp * train.micro_batches = ",
                       p.dp * t.micro_batches));
  require(t.seq_len >= 1 && t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len,
          absl::StrCat("must be in [1, model.max_seq_len = ", m.max_seq_len, "]"));
  require(t.steps >= 0, "train.steps", t.steps, "must be >= 0");
  require(t.lr >= 0, "train.lr", t.lr, "must be >= 0");
  require(t.min_lr >= 0 && t.min_lr <= t.lr, "train.min_lr", t.min_lr,
          "must be in [0, train.lr]");
  require(t.warmup >= 0, "train.warmup", t.warmup, "must be >= 0");
  require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0");
  require(t.beta1 >= 0 && t.beta1 < 1, "train.beta1", t.beta1, "must be in [0, 1)");
  require(t.beta2 >= 0 && t.beta2 < 1, "train.beta2", t.beta2, "must be in [0, 1)");
  require(t.eps > 0, "train.eps", t.eps, "must be positive");
  require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0: no clipping)");
  require(t.seed >= 0, "train.seed", t.seed, "must be >= 0");
  require(t.log_every >= 1, "train.log_every", t.log_every, "must be positive");
  require(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0: never)");
  require(t.ckpt_every >= 0, "train.ckpt_every", t.ckpt_every,
          "must be >= 0 (0: only at the end)");
  require(t.keep_last >= 1, "train.keep_last", t.keep_last, "must be positive");

  require(p.pp >= 1 && p.pp <= m.n_layers, "parallel.pp", p.pp,
          absl::StrCat("must be in [1, model.n_layers = ", m.n_layers, "]"));
  require(p.ep >= 1 && p.dp % p.ep == 0, "parallel.ep", p.ep,
          absl::StrCat("must divide parallel.dp = ", p.dp));
  if (e.n_experts > 0) {
    require(e.n_experts % p.ep == 0, "parallel.ep", p.ep,
            absl::StrCat("must divide model.moe.n_experts = ", e.n_experts));
  } else {
    require(p.ep == 1, "parallel.ep", p.ep, "must be 1 for a dense model");
  }
  require(p.replace_every >= 0, "parallel.replace_every", p.replace_every,
          "must be >= 0 (0: never re-place)");
}

}  // namespace

const char* config_name(RouterKind v) { return enum_name(v); }
const char* config_name(GruStateMode v) { return enum_name(v); }
const char* config_name(SelectionKind v) { return enum_name(v); }
const char* config_name(ExpertSizing v) { return enum_name(v); }
const char* config_name(PlacementKind v) { return enum_name(v); }
const char* config_name(Precision v) { return enum_name(v); }
const char* config_name(DeviceType v) { return enum_name(v); }

template <typename E>
E parse_config_name(const std::string& text, const std::string& key) {
  return read_enum<E>(Json(text), key);
}
template RouterKind parse_config_name<RouterKind>(const std::string&, const std::string&);
template GruStateMode parse_config_name<GruStateMode>(const std::string&, const std::string&);
template SelectionKind parse_config_name<SelectionKind>(const std::string&, const std::string&);
template ExpertSizing parse_config_name<ExpertSizing>(const std::string&, const std::string&);
template PlacementKind parse_config_name<PlacementKind>(const std::string&, const std::string&);
template Precision parse_config_name<Precision>(const std::string&, const std::string&);
template DeviceType parse_config_name<DeviceType>(const std::string&, const std::string&);

bool ModelConfig::is_moe_layer(std::int64_t layer) const {
  if (moe.n_experts == 0 || layer < moe.first_dense) return false;
  return layer % moe.every == moe.every - 1;
}

std::size_t json_nesting_depth(std::string_view text) {
  std::size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

Config Config::defaults() { return Config(); }

Config Config::load(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  MOTLEY_CHECK_KIND(kUsage, in.good(), "cannot open config file '", path, "'");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MOTLEY_CHECK_KIND(kUsage, json_nesting_depth(text) <= kMaxJsonDepth, "config file '", path,
                    "' is nested more than ", kMaxJsonDepth, " levels deep");
  Json json = Json::parse(text, nullptr, /*allow_exceptions=*/false, /*ignore_comments=*/true);
  MOTLEY_CHECK_KIND(kUsage, !json.is_discarded(), "config file '", path,
                    "' is not valid JSON");
  try {
    return from_json(json, overrides);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kUsage) throw;
    throw Error(ErrorKind::kUsage, absl::StrCat(path, ": ", e.what()));
  }
}

Config Config::from_json(const Json& json, const std::vector<std::string>& overrides) {
  Config config;
  apply_json(config, json, "");
  for (const std::string& o : overrides) apply_override(config, o);
  validate(config);
  return config;
}

Json Config::resolved_json() const {
  Json out = Json::object();
  for (const Field& f : schema()) {
    Json* node = &out;
    const std::vector<std::string> parts = absl::StrSplit(f.key, '.');
    for (std::size_t i = 0; i + 1 < parts.size(); ++i) {
      Json& child = (*node)[parts[i]];
      if (child.is_null()) child = Json::object();
      node = &child;
    }
    (*node)[parts.back()] = f.write(*this);
  }
  return out;
}

std::vector<std::string> config_differences(const Config& a, const Config& b) {
  std::vector<std::string> keys;
  for (const Field& f : schema()) {
    if (f.write(a) != f.write(b)) keys.push_back(f.key);
  }
  return keys;
}

}  // namespace motley
