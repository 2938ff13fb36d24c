// motley eval, generate and inspect: commands that read a checkpoint
// through checkpoint/ (SPEC sections 5 and 6).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "apps/cli.h"
#include "apps/evaluate.h"
#include "apps/progress.h"
#include "apps/subcommands.h"
#include "apps/train_support.h"
#include "autograd/ops.h"
#include "checkpoint/checkpoint.h"
#include "core/philox.h"
#include "data/sampler.h"
#include "layers/expert_sizes.h"
#include "train/device.h"

namespace motley::apps {
namespace {

namespace fs = std::filesystem;

// A checkpoint file, or a run directory (its LATEST) for convenience.
std::string resolve_checkpoint(const std::string& path) {
  if (fs::is_directory(path)) {
    auto latest = latest_checkpoint(path);
    MOTLEY_CHECK_KIND(kCheckpoint, latest.has_value(), path,
                      " is a directory without checkpoints/LATEST");
    return *latest;
  }
  return path;
}

struct LoadedModel {
  Config config;
  std::unique_ptr<Transformer> model;
  std::optional<Tokenizer> tokenizer;
  CheckpointMeta meta;
};

LoadedModel load_model(const std::string& path, const std::vector<std::string>& overrides) {
  const CheckpointReader reader = CheckpointReader::open(resolve_checkpoint(path));
  LoadedModel m;
  m.config = reader.config(overrides);
  m.meta = reader.meta();
  // train.device / train.precision (SPEC 8.1): checkpoints are fp32 on the
  // host whatever they were trained on, so any device loads any of them.
  const Device device = train::compute_device(m.config.train);
  train::check_precision(m.config.train, device);
  m.model = std::make_unique<Transformer>(
      m.config.model, static_cast<std::uint64_t>(m.config.train.seed), DType::kF32, device);
  load_checkpoint(reader, m.model->params(), nullptr);
  if (auto json = reader.tokenizer_json()) m.tokenizer = Tokenizer::from_json(*json);
  return m;
}

}  // namespace

int eval_main(int argc, char** argv) {
  CommandLine cli("eval",
                  "Evaluate a checkpoint: mean cross-entropy over consecutive windows of "
                  "train.seq_len + 1 tokens, perplexity and bits per byte. Prints "
                  "'eval_loss <value>' on its own line.");
  cli.flag("checkpoint", "PATH", "a checkpoint file, or a run directory (its LATEST)");
  cli.flag("data", "FILE", "token file to evaluate (default: the config's data.valid)");
  cli.repeated("set", "KEY=VALUE", "override a config key (e.g. train.seq_len, train.batch_size)");
  if (!cli.parse(argc, argv)) return 0;
  LoadedModel m = load_model(cli.get("checkpoint"), cli.all("set"));
  const ops::MatmulPrecisionGuard precision(train::matmul_precision_of(m.config.train));
  const std::string data_path = cli.get_or("data", m.config.data.valid);
  MOTLEY_CHECK_KIND(kUsage, !data_path.empty(),
                    "no data to evaluate: pass --data FILE (the checkpoint's config has no "
                    "data.valid)");
  const TokenFile file = TokenFile::open(data_path);
  MOTLEY_CHECK_KIND(kUsage, file.vocab_size() <= m.config.model.vocab_size, data_path,
                    " has vocab_size ", file.vocab_size(), ", larger than the model's ",
                    m.config.model.vocab_size);
  // Bits per byte need the tokenizer that made the tokens: the checkpoint's,
  // or the config's; omitted (not guessed) otherwise.
  std::optional<Tokenizer> tokenizer = m.tokenizer;
  if (!tokenizer) tokenizer = find_tokenizer(m.config.data.tokenizer, data_path);
  if (tokenizer && tokenizer->vocab_size() != file.vocab_size()) tokenizer.reset();
  const TrainConfig& tc = m.config.train;
  ProgressBar bar("eval", eval_window_count(file.size(), tc.seq_len));
  const EvalResult r = evaluate(*m.model, file, tc.seq_len,
                                std::max<std::int64_t>(1, tc.batch_size / tc.micro_batches),
                                tokenizer ? &*tokenizer : nullptr,
                                [&](std::int64_t done, std::int64_t) { bar.update(done); });
  bar.finish();
  std::printf("checkpoint step %lld, %s: %lld predicted tokens\n",
              static_cast<long long>(m.meta.step), data_path.c_str(),
              static_cast<long long>(r.tokens));
  std::printf("eval_loss %.6f\n", r.loss);
  std::printf("eval_ppl %.4f\n", r.perplexity);
  if (r.bits_per_byte) {
    std::printf("eval_bpb %.6f\n", *r.bits_per_byte);
  } else {
    std::printf("eval_bpb n/a (no tokenizer for this token file)\n");
  }
  return 0;
}

int generate_main(int argc, char** argv) {
  CommandLine cli("generate", "Sample text from a checkpoint, streaming it to stdout.");
  cli.flag("checkpoint", "PATH", "a checkpoint file, or a run directory (its LATEST)");
  cli.flag("prompt", "TEXT", "the text to continue", std::string(""));
  cli.flag("tokens", "N", "number of tokens to generate", std::string("200"));
  cli.flag("temperature", "X", "softmax temperature; 0 picks the most likely token",
           std::string("0.8"));
  cli.flag("top-k", "K", "sample among the K most likely tokens (0: all)", std::string("50"));
  cli.flag("seed", "S", "sampling seed", std::string("1"));
  cli.repeated("set", "KEY=VALUE", "override a config key (e.g. train.device=cuda)");
  if (!cli.parse(argc, argv)) return 0;
  LoadedModel m = load_model(cli.get("checkpoint"), cli.all("set"));
  const ops::MatmulPrecisionGuard precision(train::matmul_precision_of(m.config.train));
  MOTLEY_CHECK_KIND(kCheckpoint, m.tokenizer.has_value(), cli.get("checkpoint"),
                    " stores no tokenizer, so text cannot be encoded or decoded");
  const std::int64_t n_tokens = cli.get_int("tokens");
  const double temperature = cli.get_double("temperature");
  const std::int64_t top_k = cli.get_int("top-k");
  MOTLEY_CHECK_KIND(kUsage, n_tokens >= 0, "--tokens must be >= 0");
  MOTLEY_CHECK_KIND(kUsage, temperature >= 0, "--temperature must be >= 0");
  MOTLEY_CHECK_KIND(kUsage, top_k >= 0, "--top-k must be >= 0");
  const PhiloxKey key = philox_key(cli.get_uint64("seed"), "generate");
  const std::string prompt = cli.get("prompt");
  std::vector<std::int32_t> ids = m.tokenizer->encode(prompt);
  if (ids.empty()) ids.push_back(m.tokenizer->eot_id());  // start of a document
  std::fputs(prompt.c_str(), stdout);
  std::fflush(stdout);
  autograd::NoGradGuard no_grad;
  ForwardContext ctx;
  ctx.training = false;
  const std::int64_t vocab = m.config.model.vocab_size;
  const std::int64_t window = m.config.model.max_seq_len;
  for (std::int64_t i = 0; i < n_tokens; ++i) {
    const std::int64_t start = std::max<std::int64_t>(0, static_cast<std::int64_t>(ids.size()) - window);
    std::vector<std::int64_t> context(ids.begin() + start, ids.end());
    const std::int64_t t = static_cast<std::int64_t>(context.size());
    const Tensor tokens = Tensor::from_vector(context, {1, t}).to(m.model->params().device());
    const std::vector<double> logits =
        m.model->logits(tokens, ctx).data().select(1, t - 1).to_vector<double>();
    std::vector<std::int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b]; });
    std::int32_t next = order[0];
    if (temperature > 0) {
      const std::int64_t k = top_k > 0 ? std::min(top_k, vocab) : vocab;
      std::vector<double> p(k);
      double total = 0;
      for (std::int64_t j = 0; j < k; ++j) {
        total += p[j] = std::exp((logits[order[j]] - logits[order[0]]) / temperature);
      }
      double u = philox_uniform(key, static_cast<std::uint64_t>(i)) * total;
      for (std::int64_t j = 0; j < k; ++j) {
        next = order[j];
        if ((u -= p[j]) < 0) break;
      }
    }
    ids.push_back(next);
    if (next == m.tokenizer->eot_id()) break;
    const std::string piece = m.tokenizer->decode({next});
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  }
  std::fputs("\n", stdout);
  return 0;
}

int inspect_main(int argc, char** argv) {
  CommandLine cli("inspect",
                  "Summarise a checkpoint: step, config, parameter shapes and sizes, total and "
                  "active parameters per token.");
  cli.positional("PATH", "a checkpoint file, or a run directory (its LATEST)");
  if (!cli.parse(argc, argv)) return 0;
  const std::string path = resolve_checkpoint(cli.get("PATH"));
  const CheckpointReader reader = CheckpointReader::open(path);
  const CheckpointMeta& meta = reader.meta();
  const Config config = reader.config();
  const ModelConfig& mc = config.model;
  std::printf("checkpoint    %s\n", path.c_str());
  std::printf("format        %s v%lld, created %s\n", kCheckpointFormat,
              static_cast<long long>(meta.format_version), meta.created_utc.c_str());
  std::printf("step          %lld (optimizer step %lld), %s tokens seen, seed %lld\n",
              static_cast<long long>(meta.step), static_cast<long long>(reader.optimizer_step()),
              format_count(static_cast<double>(meta.tokens_seen)).c_str(),
              static_cast<long long>(meta.seed));
  std::printf("saved layout  dp %lld, ep %lld, pp %lld\n", static_cast<long long>(meta.dp),
              static_cast<long long>(meta.ep), static_cast<long long>(meta.pp));
  std::printf("model         d_model %lld, %lld layers, %lld heads, vocab %lld, max_seq_len %lld\n",
              static_cast<long long>(mc.d_model), static_cast<long long>(mc.n_layers),
              static_cast<long long>(mc.n_heads), static_cast<long long>(mc.vocab_size),
              static_cast<long long>(mc.max_seq_len));
  const std::vector<std::int64_t> sizes = expert_hidden_sizes(mc.moe);
  if (mc.moe.n_experts > 0) {
    std::printf("moe           %lld experts (%s: %s), router %s%s, %s\n",
                static_cast<long long>(mc.moe.n_experts), config_name(mc.moe.expert_sizes),
                absl::StrJoin(sizes, " ").c_str(), config_name(mc.moe.router),
                mc.moe.router == RouterKind::kGru
                    ? absl::StrCat(" (", config_name(mc.moe.gru_state), ")").c_str()
                    : "",
                mc.moe.selection == SelectionKind::kTopK
                    ? absl::StrFormat("top-%d", mc.moe.top_k).c_str()
                    : absl::StrFormat("top-p %.2f (max %d)", mc.moe.top_p, mc.moe.max_k).c_str());
  }
  std::printf("tokenizer     %s\n", reader.tokenizer_json() ? "stored" : "none");
  std::printf("\n%-40s %-16s %12s\n", "parameter", "shape", "elements");
  std::int64_t total = 0, experts_total = 0;
  for (const std::string& name : reader.names("model")) {
    const Shape shape = reader.shape("model", name);
    const std::int64_t n = shape_numel(shape);
    total += n;
    if (name.find(".moe.experts.") != std::string::npos) experts_total += n;
    std::printf("%-40s %-16s %12lld\n", name.c_str(), shape_str(shape).c_str(),
                static_cast<long long>(n));
  }
  std::printf("\ntotal parameters            %lld (%s)\n", static_cast<long long>(total),
              format_count(static_cast<double>(total)).c_str());
  if (mc.moe.n_experts > 0) {
    std::int64_t moe_layers = 0;
    for (std::int64_t l = 0; l < mc.n_layers; ++l) moe_layers += mc.is_moe_layer(l) ? 1 : 0;
    const double mean_expert =
        static_cast<double>(experts_total) / static_cast<double>(moe_layers * mc.moe.n_experts);
    const double k =
        mc.moe.selection == SelectionKind::kTopK ? static_cast<double>(mc.moe.top_k) : 0.0;
    const double embed = static_cast<double>(mc.vocab_size * mc.d_model);
    const double non_expert = static_cast<double>(total - experts_total) - embed;
    if (k > 0) {
      std::printf("active parameters per token %.0f (%s; top-%d of the average expert, "
                  "without the embedding lookup)\n",
                  non_expert + k * mean_expert * moe_layers,
                  format_count(non_expert + k * mean_expert * moe_layers).c_str(),
                  static_cast<int>(k));
    } else {
      std::printf("active parameters per token depend on top-p routing: %s without experts, "
                  "plus %s per expert per MoE layer on average (see metrics.jsonl)\n",
                  format_count(non_expert).c_str(), format_count(mean_expert).c_str());
    }
  }
  // The stored text as the checkpoint has it; pretty-printed when it is
  // JSON of a sane depth (dump recurses per level).
  const nlohmann::ordered_json stored =
      json_nesting_depth(meta.config_json) <= kMaxJsonDepth
          ? nlohmann::ordered_json::parse(meta.config_json, nullptr, false)
          : nlohmann::ordered_json(nlohmann::ordered_json::value_t::discarded);
  std::printf("\nconfig\n%s\n",
              stored.is_discarded() ? meta.config_json.c_str() : stored.dump(2).c_str());
  return 0;
}

}  // namespace motley::apps
