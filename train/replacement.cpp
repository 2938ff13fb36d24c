#include "train/replacement.h"

#include "absl/strings/str_cat.h"
#include "parallel/placement.h"

namespace motley::train {
namespace {

namespace par = parallel;
constexpr int kTagMigration = 103;

// Names of global expert `expert`'s parameters in `params`, in
// registration order (by layer, then w1, w2, w3).
std::vector<std::string> expert_param_names(const ParameterSet& params, int expert) {
  const std::string key = absl::StrCat(".moe.experts.", expert, ".");
  std::vector<std::string> names;
  for (const Variable& p : params.all()) {
    if (p.name().find(key) != std::string::npos) names.push_back(p.name());
  }
  return names;
}

}  // namespace

std::vector<std::int64_t> experts_of(const std::vector<int>& owner, int rank) {
  std::vector<std::int64_t> held;
  for (std::size_t e = 0; e < owner.size(); ++e) {
    if (owner[e] == rank) held.push_back(static_cast<std::int64_t>(e));
  }
  return held;
}

std::optional<ReplacementReport> ReplacementWindow::observe(
    std::int64_t step, const std::vector<MoELayerStats>& moe, const std::vector<int>& owner,
    const std::vector<std::int64_t>& expert_sizes, std::int64_t d_model, int ep,
    par::Communicator& host_world) {
  const std::int64_t n_experts = static_cast<std::int64_t>(expert_sizes.size());
  if (tokens_.size() != moe.size()) {
    tokens_.assign(moe.size(), std::vector<double>(n_experts, 0.0));
  }
  for (std::size_t l = 0; l < moe.size(); ++l) {
    for (std::int64_t e = 0; e < n_experts; ++e) {
      tokens_[l][e] += static_cast<double>(moe[l].expert_tokens[e]);
    }
  }
  if (every_ <= 0 || step % every_ != 0) return std::nullopt;
  const par::ReplacementDecision d = par::decide_replacement(owner, tokens_, expert_sizes, ep);
  for (std::vector<double>& layer : tokens_) layer.assign(n_experts, 0.0);
  // The counts are exact integers reduced identically on every rank, so
  // every rank computes the same decision; world rank 0's is the one
  // applied all the same, so the ranks cannot diverge.
  std::vector<std::int64_t> message(1 + n_experts, 0);
  message[0] = d.replace ? 1 : 0;
  for (std::int64_t e = 0; e < n_experts; ++e) message[1 + e] = d.candidate[e];
  Tensor t = Tensor::from_vector(message, {1 + n_experts});
  host_world.broadcast(t, 0);
  message = t.to_vector<std::int64_t>();
  if (message[0] == 0) return std::nullopt;
  ReplacementReport report;
  report.window_steps = every_;
  report.before = owner;
  report.after.assign(message.begin() + 1, message.end());
  report.rank_load_before = par::rank_loads(report.before, d.load, ep);
  report.rank_load_after = par::rank_loads(report.after, d.load, ep);
  report.rank_expert_params = par::rank_expert_params(report.after, expert_sizes, d_model, ep);
  for (const par::ExpertMove& m : par::expert_moves(report.before, report.after)) {
    report.moved.push_back(m.expert);
  }
  report.cost_before = d.current_max;
  report.cost_after = d.candidate_max;
  return report;
}

void migrate_experts(const Transformer& model, Transformer& next_model, AdamW& optimizer,
                     const par::ProcessGroups& groups, const std::vector<int>& owner,
                     const std::vector<int>& next) {
  const ParameterSet& now = model.params();
  for (const Variable& p : next_model.params().all()) {
    if (!now.contains(p.name())) continue;
    Tensor data = p.data();
    data.copy_(now.get(p.name()).data());
  }
  par::Communicator& ep = groups.ep();
  const int me = groups.ep_rank();
  std::vector<par::Request> sends;
  std::vector<std::string> sent;
  for (const par::ExpertMove& move : par::expert_moves(owner, next)) {
    if (move.from == me) {
      for (const std::string& name : expert_param_names(now, move.expert)) {
        const Variable& p = now.get(name);
        const AdamWState& st = optimizer.state(p);
        sends.push_back(ep.isend(p.data(), move.to, kTagMigration));
        sends.push_back(ep.isend(st.exp_avg, move.to, kTagMigration));
        sends.push_back(ep.isend(st.exp_avg_sq, move.to, kTagMigration));
        sent.push_back(name);
      }
    } else if (move.to == me) {
      for (const std::string& name : expert_param_names(next_model.params(), move.expert)) {
        const Variable& p = next_model.params().get(name);
        MOTLEY_CHECK(!optimizer.has_state(name), "optimizer state of '", name,
                     "' on a rank that did not hold it");
        AdamWState& st = optimizer.state(p);
        Tensor data = p.data();
        ep.recv(data, move.from, kTagMigration);
        ep.recv(st.exp_avg, move.from, kTagMigration);
        ep.recv(st.exp_avg_sq, move.from, kTagMigration);
      }
    }
  }
  par::wait_all(sends);
  for (const std::string& name : sent) optimizer.erase_state(name);
}

}  // namespace motley::train
