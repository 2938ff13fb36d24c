#include "parallel/placement.h"

#include <algorithm>
#include <numeric>

#include "core/check.h"

namespace motley::parallel {

namespace {

void check_divides(std::int64_t n_experts, int ep) {
  MOTLEY_CHECK_KIND(kUsage, ep >= 1 && n_experts % ep == 0, "parallel.ep = ", ep,
                    " must divide the number of experts ", n_experts);
}

// Greedy: items in order of decreasing weight (stable by index) onto the
// least loaded rank with room; each item occupies `slots` slots of the
// rank's `capacity`.
std::vector<int> greedy(const std::vector<double>& weight, int ep, std::int64_t capacity) {
  std::vector<std::size_t> order(weight.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return weight[a] > weight[b]; });
  std::vector<double> load(ep, 0.0);
  std::vector<std::int64_t> used(ep, 0);
  std::vector<int> rank_of(weight.size(), -1);
  for (std::size_t i : order) {
    int best = -1;
    for (int r = 0; r < ep; ++r) {
      if (used[r] >= capacity) continue;
      if (best < 0 || load[r] < load[best]) best = r;
    }
    MOTLEY_CHECK(best >= 0, "no rank with room");
    rank_of[i] = best;
    load[best] += weight[i];
    ++used[best];
  }
  return rank_of;
}

}  // namespace

std::vector<int> place_contiguous(std::int64_t n_experts, int ep) {
  check_divides(n_experts, ep);
  const std::int64_t per = n_experts / ep;
  std::vector<int> owner(n_experts);
  for (std::int64_t e = 0; e < n_experts; ++e) owner[e] = static_cast<int>(e / per);
  return owner;
}

std::vector<int> place_pairs(const std::vector<std::int64_t>& sizes, int ep) {
  const auto n = static_cast<std::int64_t>(sizes.size());
  check_divides(n, ep);
  const std::int64_t per = n / ep;
  if (per % 2 != 0) {
    std::vector<double> load(sizes.begin(), sizes.end());
    return place_balanced(load, ep);
  }
  std::vector<std::size_t> desc(sizes.size());
  std::iota(desc.begin(), desc.end(), 0);
  std::stable_sort(desc.begin(), desc.end(),
                   [&](std::size_t a, std::size_t b) { return sizes[a] > sizes[b]; });
  // Pair i: the i-th largest with the i-th smallest.
  std::vector<std::pair<std::size_t, std::size_t>> pairs;
  std::vector<double> pair_weight;
  for (std::int64_t i = 0; i < n / 2; ++i) {
    const std::size_t big = desc[i], small = desc[n - 1 - i];
    pairs.emplace_back(big, small);
    pair_weight.push_back(static_cast<double>(sizes[big] + sizes[small]));
  }
  const std::vector<int> pair_rank = greedy(pair_weight, ep, per / 2);
  std::vector<int> owner(n, -1);
  for (std::size_t p = 0; p < pairs.size(); ++p) {
    owner[pairs[p].first] = pair_rank[p];
    owner[pairs[p].second] = pair_rank[p];
  }
  return owner;
}

std::vector<int> place_balanced(const std::vector<double>& load, int ep) {
  check_divides(static_cast<std::int64_t>(load.size()), ep);
  return greedy(load, ep, static_cast<std::int64_t>(load.size()) / ep);
}

std::vector<int> place_experts(const std::string& method, const std::vector<std::int64_t>& sizes,
                               int ep, const std::vector<double>& tokens) {
  const auto n = static_cast<std::int64_t>(sizes.size());
  if (method == "contiguous") return place_contiguous(n, ep);
  if (method == "pairs") return place_pairs(sizes, ep);
  MOTLEY_CHECK_KIND(kUsage, method == "balanced", "unknown parallel.placement '", method, "'");
  std::vector<double> load(sizes.size());
  for (std::size_t e = 0; e < sizes.size(); ++e) {
    load[e] = (tokens.empty() ? 1.0 : tokens[e]) * static_cast<double>(sizes[e]);
  }
  return place_balanced(load, ep);
}

std::vector<std::int64_t> rank_expert_params(const std::vector<int>& owner,
                                             const std::vector<std::int64_t>& sizes,
                                             std::int64_t d_model, int ep) {
  std::vector<std::int64_t> out(ep, 0);
  for (std::size_t e = 0; e < owner.size(); ++e) out[owner[e]] += 3 * d_model * sizes[e];
  return out;
}

std::vector<double> rank_loads(const std::vector<int>& owner, const std::vector<double>& load,
                               int ep) {
  MOTLEY_CHECK(owner.size() == load.size(), "placement for ", owner.size(), " experts, load for ",
               load.size());
  std::vector<double> sum(ep, 0.0);
  for (std::size_t e = 0; e < owner.size(); ++e) sum[owner[e]] += load[e];
  return sum;
}

double max_rank_load(const std::vector<int>& owner, const std::vector<double>& load, int ep) {
  const std::vector<double> sum = rank_loads(owner, load, ep);
  return *std::max_element(sum.begin(), sum.end());
}

ReplacementDecision decide_replacement(const std::vector<int>& current,
                                       const std::vector<double>& tokens,
                                       const std::vector<std::int64_t>& sizes, int ep,
                                       double min_gain) {
  MOTLEY_CHECK(current.size() == tokens.size() && tokens.size() == sizes.size(), "placement for ",
               current.size(), " experts, tokens for ", tokens.size(), ", sizes for ",
               sizes.size());
  ReplacementDecision d;
  d.load.resize(sizes.size());
  for (std::size_t e = 0; e < sizes.size(); ++e) {
    d.load[e] = tokens[e] * static_cast<double>(sizes[e]);
  }
  d.candidate = place_balanced(d.load, ep);
  d.current_max = max_rank_load(current, d.load, ep);
  d.candidate_max = max_rank_load(d.candidate, d.load, ep);
  // Note [Re-placement]: only a clear gain pays for the migration.
  d.replace = d.current_max > 0 && d.candidate_max <= (1.0 - min_gain) * d.current_max;
  return d;
}

std::vector<ExpertMove> expert_moves(const std::vector<int>& from, const std::vector<int>& to) {
  MOTLEY_CHECK(from.size() == to.size(), "placements for ", from.size(), " and ", to.size(),
               " experts");
  std::vector<ExpertMove> moves;
  for (std::size_t e = 0; e < from.size(); ++e) {
    if (from[e] != to[e]) moves.push_back({static_cast<int>(e), from[e], to[e]});
  }
  return moves;
}

}  // namespace motley::parallel
