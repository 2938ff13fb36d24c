// Expert placement: which EP rank owns which experts (SPEC section 3).
//
// Note [Expert placement]
// Every EP rank owns exactly E / ep experts; owner[e] is the ep_rank that
// holds global expert e in every MoE layer (the same map for all layers).
// The ranks of an expert-dp group (same ep_rank) hold the same experts.
// Parameter names keep the global expert id, so the map changes nothing
// in checkpoints. The MoE exchange (expert_exchange.h) sends the rows of
// expert e to owner[e]; Transformer's ModelShard::hold_expert is
// owner[e] == ep_rank.
//
// Pure functions, tested without MPI.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace motley::parallel {

// contiguous: experts [r*E/ep, (r+1)*E/ep) on rank r.
std::vector<int> place_contiguous(std::int64_t n_experts, int ep);

// pairs (MoDSE expert-pair allocation): sizes sorted descending are paired
// with sizes sorted ascending (largest with smallest), and the pairs are
// dealt to ranks by largest-first greedy so every rank gets (E/ep)/2 pairs
// and, for complementary sizes (modse), equal expert parameters. When E/ep
// is odd pairs cannot be kept whole and this falls back to balanced on
// the sizes.
std::vector<int> place_pairs(const std::vector<std::int64_t>& sizes, int ep);

// balanced: minimise the largest per-rank load sum_e load[e] (load[e] =
// expected FLOPs, e.g. routed tokens * h_e) with E/ep experts per rank:
// longest-processing-time greedy (heaviest expert first, onto the least
// loaded rank that still has room; ties to the lower rank).
std::vector<int> place_balanced(const std::vector<double>& load, int ep);

// Dispatch on parallel.placement. `tokens` are measured routed tokens per
// expert (empty: assume uniform routing, so load = h_e).
std::vector<int> place_experts(const std::string& method, const std::vector<std::int64_t>& sizes,
                               int ep, const std::vector<double>& tokens = {});

// Per-rank sums: number of expert parameters per layer (3 * d * h_e) and
// load, for printing and tests.
std::vector<std::int64_t> rank_expert_params(const std::vector<int>& owner,
                                             const std::vector<std::int64_t>& sizes,
                                             std::int64_t d_model, int ep);
double max_rank_load(const std::vector<int>& owner, const std::vector<double>& load, int ep);

}  // namespace motley::parallel
