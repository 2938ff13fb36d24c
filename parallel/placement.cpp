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

std::vector<int> place_experts(PlacementKind method, const std::vector<std::int64_t>& sizes, int ep,
                               const std::vector<double>& tokens) {
  const auto n = static_cast<std::int64_t>(sizes.size());
  if (method == PlacementKind::kContiguous) return place_contiguous(n, ep);
  if (method == PlacementKind::kPairs) return place_pairs(sizes, ep);
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

double layered_max_load(const std::vector<int>& owner,
                        const std::vector<std::vector<double>>& layer_load, int ep) {
  double cost = 0.0;
  for (const std::vector<double>& load : layer_load) cost += max_rank_load(owner, load, ep);
  return cost;
}

std::vector<int> improve_by_swaps(std::vector<int> owner,
                                  const std::vector<std::vector<double>>& layer_load, int ep,
                                  int max_passes) {
  const std::size_t n = owner.size();
  const std::size_t layers = layer_load.size();
  for (const std::vector<double>& load : layer_load) {
    MOTLEY_CHECK(load.size() == n, "placement for ", n, " experts, a layer's load for ",
                 load.size());
  }
  // sums[l][r]: layer l's load on rank r, updated as swaps are applied. The
  // loads are integers times sizes, exact in double, so comparisons are
  // exact and every rank finds the same swaps.
  std::vector<std::vector<double>> sums(layers);
  for (std::size_t l = 0; l < layers; ++l) sums[l] = rank_loads(owner, layer_load[l], ep);
  auto layer_max = [&](std::size_t l, int ra, double va, int rb, double vb) {
    double m = 0.0;
    for (int r = 0; r < ep; ++r) {
      m = std::max(m, r == ra ? va : r == rb ? vb : sums[l][r]);
    }
    return m;
  };
  double cost = 0.0;
  for (std::size_t l = 0; l < layers; ++l) cost += layer_max(l, -1, 0, -1, 0);
  for (int pass = 0; pass < max_passes; ++pass) {
    double best = cost;
    std::size_t best_a = n, best_b = n;
    for (std::size_t a = 0; a < n; ++a) {
      for (std::size_t b = a + 1; b < n; ++b) {
        const int ra = owner[a], rb = owner[b];
        if (ra == rb) continue;
        double c = 0.0;
        for (std::size_t l = 0; l < layers && c < best; ++l) {
          const double d = layer_load[l][b] - layer_load[l][a];
          c += layer_max(l, ra, sums[l][ra] + d, rb, sums[l][rb] - d);
        }
        if (c < best) {
          best = c;
          best_a = a;
          best_b = b;
        }
      }
    }
    if (best_a == n) break;
    const int ra = owner[best_a], rb = owner[best_b];
    for (std::size_t l = 0; l < layers; ++l) {
      const double d = layer_load[l][best_b] - layer_load[l][best_a];
      sums[l][ra] += d;
      sums[l][rb] -= d;
    }
    std::swap(owner[best_a], owner[best_b]);
    cost = best;
  }
  return owner;
}

ReplacementDecision decide_replacement(const std::vector<int>& current,
                                       const std::vector<std::vector<double>>& layer_tokens,
                                       const std::vector<std::int64_t>& sizes, int ep,
                                       double min_gain) {
  const std::size_t n = sizes.size();
  MOTLEY_CHECK(current.size() == n, "placement for ", current.size(), " experts, sizes for ", n);
  std::vector<std::vector<double>> layer_load(layer_tokens.size(), std::vector<double>(n, 0.0));
  ReplacementDecision d;
  d.load.assign(n, 0.0);
  for (std::size_t l = 0; l < layer_tokens.size(); ++l) {
    MOTLEY_CHECK(layer_tokens[l].size() == n, "tokens for ", layer_tokens[l].size(),
                 " experts in a layer, sizes for ", n);
    for (std::size_t e = 0; e < n; ++e) {
      layer_load[l][e] = layer_tokens[l][e] * static_cast<double>(sizes[e]);
      d.load[e] += layer_load[l][e];
    }
  }
  // Note [Re-placement]: the cheaper of the two local searches (ties: the
  // one from the current map, which moves fewer experts).
  const std::vector<int> from_lpt = improve_by_swaps(place_balanced(d.load, ep), layer_load, ep);
  const std::vector<int> from_current = improve_by_swaps(current, layer_load, ep);
  const double cost_lpt = layered_max_load(from_lpt, layer_load, ep);
  const double cost_current = layered_max_load(from_current, layer_load, ep);
  d.candidate = cost_lpt < cost_current ? from_lpt : from_current;
  d.candidate_max = std::min(cost_lpt, cost_current);
  d.current_max = layered_max_load(current, layer_load, ep);
  // Only a clear gain pays for the migration.
  d.replace = d.current_max > 0 && d.candidate_max <= (1.0 - min_gain) * d.current_max;
  return d;
}

ReplacementDecision decide_replacement(const std::vector<int>& current,
                                       const std::vector<double>& tokens,
                                       const std::vector<std::int64_t>& sizes, int ep,
                                       double min_gain) {
  MOTLEY_CHECK(current.size() == tokens.size() && tokens.size() == sizes.size(), "placement for ",
               current.size(), " experts, tokens for ", tokens.size(), ", sizes for ",
               sizes.size());
  return decide_replacement(current, std::vector<std::vector<double>>{tokens}, sizes, ep,
                            min_gain);
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
