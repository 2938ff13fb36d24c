#include "apps/train_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "apps/progress.h"
#include "core/backend.h"
#include "parallel/placement.h"

namespace motley::apps {
namespace {

using Json = nlohmann::ordered_json;
namespace par = parallel;

void print_layout(const train::Trainer& trainer) {
  const par::GroupLayout& layout = trainer.groups().layout();
  const Config& config = trainer.config();
  const ModelConfig& m = config.model;
  std::printf("parallel: %d ranks = pp %d x dp %d, ep %d, placement %s%s\n", layout.world(),
              layout.pp, layout.dp, layout.ep, config_name(config.parallel.placement),
              trainer.replace_every() > 0
                  ? absl::StrFormat(" (from sizes; re-placed from measured routing every %d "
                                    "steps when the max per-rank load drops >= %.0f%%)",
                                    trainer.replace_every(), 100.0 * par::kReplaceMinGain)
                        .c_str()
                  : "");
  for (int s = 0; s < layout.pp; ++s) {
    const par::StageLayers b = par::stage_layers(m.n_layers, layout.pp, s);
    std::printf("  stage %d: layers [%lld, %lld)\n", s, static_cast<long long>(b.begin),
                static_cast<long long>(b.end));
  }
  if (m.moe.n_experts > 0 && layout.ep > 1) {
    const std::vector<int>& owner = trainer.expert_owner();
    const std::vector<std::int64_t> params =
        par::rank_expert_params(owner, trainer.model().expert_sizes(), m.d_model, layout.ep);
    for (int r = 0; r < layout.ep; ++r) {
      std::printf("  ep_rank %d: experts {%s}, %s expert parameters per MoE layer\n", r,
                  absl::StrJoin(train::experts_of(owner, r), ", ").c_str(),
                  format_count(static_cast<double>(params[r])).c_str());
    }
  }
}

void print_replacement(const train::StepResult& r, const train::ReplacementReport& rep) {
  std::printf(
      "re-placement at step %lld (routing of the last %lld steps, load = tokens * h_e): "
      "expert cost (sum over MoE layers of the busiest rank's load) %s -> %s (%.1f%% "
      "lower), experts {%s} move\n",
      static_cast<long long>(r.step), static_cast<long long>(rep.window_steps),
      format_count(rep.cost_before).c_str(), format_count(rep.cost_after).c_str(),
      100.0 * (1.0 - rep.cost_after / rep.cost_before), absl::StrJoin(rep.moved, ", ").c_str());
  for (std::size_t rank = 0; rank < rep.rank_load_after.size(); ++rank) {
    std::printf("  ep_rank %zu: experts {%s}, %s expert parameters per MoE layer, load %s -> %s\n",
                rank,
                absl::StrJoin(train::experts_of(rep.after, static_cast<int>(rank)), ", ").c_str(),
                format_count(static_cast<double>(rep.rank_expert_params[rank])).c_str(),
                format_count(rep.rank_load_before[rank]).c_str(),
                format_count(rep.rank_load_after[rank]).c_str());
  }
}

}  // namespace

void print_model_summary(const train::Trainer& trainer) {
  const ModelConfig& m = trainer.config().model;
  const Transformer& model = trainer.model();
  std::printf("model: %s parameters, d_model %lld, %lld layers, %lld heads, vocab %lld\n",
              format_count(static_cast<double>(model.total_parameters())).c_str(),
              static_cast<long long>(m.d_model), static_cast<long long>(m.n_layers),
              static_cast<long long>(m.n_heads), static_cast<long long>(m.vocab_size));
  if (m.moe.n_experts > 0) {
    std::printf("experts: %lld per MoE layer (%s sizes: %s), router %s, selection %s\n",
                static_cast<long long>(m.moe.n_experts), config_name(m.moe.expert_sizes),
                absl::StrJoin(model.expert_sizes(), " ").c_str(), config_name(m.moe.router),
                config_name(m.moe.selection));
  }
  std::printf("device: %s, precision %s\n", trainer.device().str().c_str(),
              config_name(trainer.config().train.precision));
  if (trainer.groups().layout().world() > 1) print_layout(trainer);
  std::fflush(stdout);
}

void log_step(MetricsLog& metrics, const train::Trainer& trainer, const train::StepResult& r,
              const StepRates& rates) {
  const TrainConfig& tc = trainer.config().train;
  double load_ratio = 1.0;
  for (const MoELayerStats& s : r.moe) {
    const auto [mn, mx] = std::minmax_element(s.expert_tokens.begin(), s.expert_tokens.end());
    const double ratio = *mn > 0 ? static_cast<double>(*mx) / static_cast<double>(*mn)
                                 : std::numeric_limits<double>::infinity();
    load_ratio = std::max(load_ratio, ratio);
  }
  const std::string load = r.moe.empty()               ? "dense"
                           : std::isfinite(load_ratio) ? absl::StrFormat("%.2f", load_ratio)
                                                       : std::string("inf");
  std::printf(
      "step %*lld/%lld | loss %.4f (lm %.4f aux %.4f) | lr %.2e | gnorm %.3f | %s tok/s "
      "| mfu %.1f%% | load max/min %s | skipped %lld | eta %s\n",
      static_cast<int>(std::to_string(tc.steps).size()), static_cast<long long>(r.step),
      static_cast<long long>(tc.steps), r.loss, r.lm_loss, r.aux_loss, r.lr, r.grad_norm,
      format_count(rates.tokens_per_s).c_str(), 100.0 * rates.mfu, load.c_str(),
      static_cast<long long>(trainer.skipped_steps()), format_duration(rates.eta_s).c_str());
  Json row;
  row["step"] = r.step;
  row["loss"] = r.loss;
  row["lm_loss"] = r.lm_loss;
  row["aux_loss"] = r.aux_loss;
  row["lr"] = r.lr;
  row["grad_norm"] = r.grad_norm;
  row["tokens_per_s"] = rates.tokens_per_s;
  row["mfu"] = rates.mfu;
  row["skipped_steps"] = trainer.skipped_steps();
  Json layers = Json::array(), experts = Json::array(), active = Json::array(),
       entropy = Json::array();
  for (const MoELayerStats& s : r.moe) {
    layers.push_back(s.layer);
    experts.push_back(s.expert_tokens);
    active.push_back(s.active_params_per_token);
    entropy.push_back(s.gate_entropy);
  }
  row["moe_layers"] = layers;
  row["expert_tokens"] = experts;
  row["active_params_per_token"] = active;
  row["gate_entropy"] = entropy;
  if (r.replacement) {
    const train::ReplacementReport& rep = *r.replacement;
    print_replacement(r, rep);
    Json field;
    field["owner"] = rep.after;
    field["moved"] = rep.moved;
    field["rank_load_before"] = rep.rank_load_before;
    field["rank_load_after"] = rep.rank_load_after;
    field["rank_expert_params"] = rep.rank_expert_params;
    field["cost_before"] = rep.cost_before;
    field["cost_after"] = rep.cost_after;
    row["placement"] = field;
  }
  if (trainer.groups().layout().ep > 1) row["ep_bytes"] = r.ep_bytes;
  // Rank 0's allocator (core/backend.h MemoryStats), read when a row is
  // written rather than after every step.
  const MemoryStats memory = backend_for(trainer.device()).memory_stats();
  row["memory_peak_bytes"] = memory.peak_bytes_in_use;
  row["memory_cached_bytes"] = memory.bytes_cached;
  std::fflush(stdout);
  metrics.append(row);
}

void log_eval(MetricsLog& metrics, std::int64_t step, const EvalResult& e, bool final) {
  std::printf("%s step %lld | eval_loss %.4f | ppl %.2f | bpb %s | %lld tokens\n",
              final ? "final eval" : "eval", static_cast<long long>(step), e.loss, e.perplexity,
              e.bits_per_byte ? absl::StrFormat("%.4f", *e.bits_per_byte).c_str() : "n/a",
              static_cast<long long>(e.tokens));
  std::fflush(stdout);
  Json row;
  row["step"] = step;
  row["eval_loss"] = e.loss;
  row["eval_ppl"] = e.perplexity;
  if (e.bits_per_byte) row["eval_bpb"] = *e.bits_per_byte;
  metrics.append(row);
}

}  // namespace motley::apps
