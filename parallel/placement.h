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
// (apps/train.cpp, Trainer::replace_experts).
//
// Note [Re-placement]
// `balanced` starts from the sizes alone (tokens_e = 1). Every
// parallel.replace_every steps the trainer sums the world-reduced routed
// tokens per expert over all MoE layers since the last decision (the
// window), sets load_e = tokens_e * h_e, and computes the LPT candidate
// place_balanced(load, ep). It re-places only when the candidate lowers
// the largest per-rank load of the window by at least kReplaceMinGain
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
// Per-rank sums of load (max_rank_load is their maximum).
std::vector<double> rank_loads(const std::vector<int>& owner, const std::vector<double>& load,
                               int ep);

// ---- re-placement during training (Note [Re-placement]) ---------------------------
// Smallest relative reduction of the largest per-rank load that justifies
// moving experts.
inline constexpr double kReplaceMinGain = 0.05;

struct ReplacementDecision {
  bool replace = false;           // adopt `candidate`
  std::vector<int> candidate;     // place_balanced(load, ep)
  std::vector<double> load;       // load_e = tokens_e * h_e of the window
  double current_max = 0.0;       // max_rank_load(current, load, ep)
  double candidate_max = 0.0;     // max_rank_load(candidate, load, ep)
};

// Whether to leave `current` for the LPT map of the window's measured
// load: replace iff candidate_max <= (1 - min_gain) * current_max (and
// current_max > 0; an empty window keeps the map). `tokens` (E) are routed
// tokens per expert, `sizes` (E) the hidden sizes h_e.
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
