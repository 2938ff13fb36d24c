// Expert placement: which EP rank owns which experts (SPEC section 3).
//
// Note [Expert placement]
// Every EP rank owns exactly E / ep experts; owner[e] is the ep_rank that
// holds global expert e in every MoE layer (the same map for all layers).
// The ranks of an expert-dp group (same ep_rank) hold the same experts.
// Parameter names keep the global expert id, so the map changes nothing
// in checkpoints. The MoE exchange (expert_exchange.h) sends the rows of
// expert e to owner[e]; Transformer's ModelShard::hold_expert is
// owner[e] == ep_rank. With `balanced` the map may change during training
// (Note [Re-placement]); everything built from it is rebuilt together
// (train/replacement.h, Trainer::replace_experts in train/trainer.cpp).
//
// Note [Re-placement]
// `balanced` starts from the sizes alone (tokens_e = 1). Every
// parallel.replace_every steps the trainer takes the world-reduced routed
// tokens per MoE layer and expert since the last decision (the window)
// and sets load_{l,e} = tokens_{l,e} * h_e. One owner map serves every
// layer, and each layer's exchange waits for that layer's busiest rank, so
// the cost of a map is the step's expert time up to a constant:
//   cost(map) = sum over layers l of max over ranks r of sum_{e on r} load_{l,e}
// (layered_max_load; for one layer it is the largest per-rank load). The
// candidate is the cheaper of two local searches by pairwise swaps
// (improve_by_swaps), one from the LPT map of the layer-summed load
// (place_balanced) and one from the current map; LPT on the summed load
// alone can be worse than the current map on this cost, because layers
// that peak on different experts cancel in the sum. The trainer re-places
// only when the candidate lowers the cost by at least kReplaceMinGain
// (5 %) of the current map's: a migration moves parameters and AdamW
// moments, so a marginal gain (or routing noise between windows) is not
// worth it, and the hysteresis keeps the map from flapping between two
// near-equal maps. The window is reset after every decision, kept or not.
// The decision is a pure function of exact integer counts, so every rank
// reaches the same one; world rank 0's is broadcast anyway. Experts that
// change owner move, in each EP group, from the old owner's rank to the
// new one's in the order of expert_moves (tensors per expert in
// registration order), with both AdamW moments; the step count is
// global. A resumed run starts again from the size-only map: checkpoints
// name experts by global id and do not record the map.
//
// Pure functions, tested without MPI.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

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
std::vector<int> place_experts(PlacementKind method, const std::vector<std::int64_t>& sizes, int ep,
                               const std::vector<double>& tokens = {});

// Per-rank sums: number of expert parameters per layer (3 * d * h_e) and
// load, for printing and tests.
std::vector<std::int64_t> rank_expert_params(const std::vector<int>& owner,
                                             const std::vector<std::int64_t>& sizes,
                                             std::int64_t d_model, int ep);
double max_rank_load(const std::vector<int>& owner, const std::vector<double>& load, int ep);
// Per-rank sums of load (max_rank_load is their maximum).
std::vector<double> rank_loads(const std::vector<int>& owner, const std::vector<double>& load,
                               int ep);

// ---- re-placement during training (Note [Re-placement]) ---------------------------
// Smallest relative reduction of the largest per-rank load that justifies
// moving experts.
inline constexpr double kReplaceMinGain = 0.05;

struct ReplacementDecision {
  bool replace = false;           // adopt `candidate`
  std::vector<int> candidate;     // the better local search (Note [Re-placement])
  std::vector<double> load;       // load_e = sum_l tokens_{l,e} * h_e of the window
  double current_max = 0.0;       // layered_max_load of the current map
  double candidate_max = 0.0;     // layered_max_load of the candidate
};

// cost(map) of Note [Re-placement]: the sum over layers of each layer's
// largest per-rank load. layer_load[l][e]; every row has E entries.
double layered_max_load(const std::vector<int>& owner,
                        const std::vector<std::vector<double>>& layer_load, int ep);

// Local search from `start`: repeatedly applies the swap of two experts on
// different ranks that lowers layered_max_load the most (ties: the first
// pair in (a, b) order), until no swap lowers it or after max_passes
// swaps. Keeps E/ep experts per rank. Deterministic.
std::vector<int> improve_by_swaps(std::vector<int> start,
                                  const std::vector<std::vector<double>>& layer_load, int ep,
                                  int max_passes = 64);

// Whether to leave `current` for the candidate of Note [Re-placement]:
// replace iff candidate_max <= (1 - min_gain) * current_max (and
// current_max > 0; an empty window keeps the map). `layer_tokens[l][e]`
// are routed tokens per MoE layer and expert, `sizes` (E) the hidden sizes.
ReplacementDecision decide_replacement(const std::vector<int>& current,
                                       const std::vector<std::vector<double>>& layer_tokens,
                                       const std::vector<std::int64_t>& sizes, int ep,
                                       double min_gain = kReplaceMinGain);
// One layer (or tokens already summed over layers): the cost is the
// largest per-rank load.
ReplacementDecision decide_replacement(const std::vector<int>& current,
                                       const std::vector<double>& tokens,
                                       const std::vector<std::int64_t>& sizes, int ep,
                                       double min_gain = kReplaceMinGain);

// One expert changing owner: from and to are ep_ranks.
struct ExpertMove {
  int expert = 0, from = 0, to = 0;
  bool operator==(const ExpertMove& o) const {
    return expert == o.expert && from == o.from && to == o.to;
  }
};
// The experts whose owner differs between two maps, by increasing expert
// id: the order in which every EP group migrates them.
std::vector<ExpertMove> expert_moves(const std::vector<int>& from, const std::vector<int>& to);

}  // namespace motley::parallel
