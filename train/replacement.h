// Expert re-placement during training (Note [Re-placement] in
// parallel/placement.h): the window of measured routing, the decision
// every parallel.replace_every steps, and the migration of expert weights
// and AdamW moments between EP ranks.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "layers/moe.h"
#include "layers/optimizer.h"
#include "layers/transformer.h"
#include "parallel/process_groups.h"

namespace motley::train {

// A re-placement that happened: the maps and the loads the decision saw.
struct ReplacementReport {
  std::int64_t window_steps = 0;                          // steps of routing the decision used
  std::vector<int> before, after;                         // owner maps (E)
  std::vector<int> moved;                                 // experts whose owner changed
  std::vector<double> rank_load_before, rank_load_after;  // (ep) tokens * h_e
  std::vector<std::int64_t> rank_expert_params;           // (ep) after the move
  double cost_before = 0, cost_after = 0;  // sum over MoE layers of the busiest rank's load
};

// Routed tokens per (MoE layer, expert) since the last decision.
class ReplacementWindow {
 public:
  explicit ReplacementWindow(std::int64_t every) : every_(every) {}
  std::int64_t every() const { return every_; }  // 0: never decides

  // Adds a step's world-reduced routing statistics (every MoE layer of the
  // model, in order) and, when step % every == 0, decides. The decision is
  // world rank 0's, broadcast over `host_world` (collective: every rank
  // calls this every step), so ranks cannot diverge. Returns the new owner
  // map when it changes, else nullopt.
  std::optional<ReplacementReport> observe(std::int64_t step, const std::vector<MoELayerStats>& moe,
                                           const std::vector<int>& owner,
                                           const std::vector<std::int64_t>& expert_sizes,
                                           std::int64_t d_model, int ep,
                                           parallel::Communicator& host_world);

 private:
  std::int64_t every_;
  std::vector<std::vector<double>> tokens_;  // (MoE layers, E)
};

// Moves every expert whose owner changes from `owner` to `next`, in every
// EP group: the old owner sends each of this stage's MoE layers' w1, w2, w3
// of the expert (registration order) and their AdamW moments; the new
// owner receives them into `next_model` (built for the new shard), which
// takes every other tensor from `model`. The optimizer's moved entries are
// erased on the sender (the step count is global and stays). No value
// changes. Point-to-point over groups.ep(); sends are non-blocking, so a
// swap between two ranks cannot deadlock.
void migrate_experts(const Transformer& model, Transformer& next_model, AdamW& optimizer,
                     const parallel::ProcessGroups& groups, const std::vector<int>& owner,
                     const std::vector<int>& next);

// Global expert ids held by EP rank `rank` under `owner`, increasing.
std::vector<std::int64_t> experts_of(const std::vector<int>& owner, int rank);

}  // namespace motley::train
