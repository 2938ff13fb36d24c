// Process groups of a (dp, ep, pp) layout (SPEC section 3).
//
// Note [Rank order]
// world = pp * dp ranks; rank = pp_rank * dp + dp_rank. Within a stage's
// data-parallel group, expert-parallel groups are blocks of ep consecutive
// ranks: ep_rank = dp_rank % ep, ep_block = dp_rank / ep. Groups:
//   dp         the dp ranks of one stage (same pp_rank)
//   ep         one block of ep consecutive ranks of a dp group: the ranks
//              that exchange rows in every MoE layer
//   expert_dp  the ranks of a dp group with the same ep_rank: they hold
//              the same experts, whose gradients they average
//   pp         the ranks with the same dp_rank across stages (a pipeline)
// Every rank in a group is listed in increasing world rank, which is also
// its rank inside the group's communicator.
//
// The layout math (GroupLayout) is pure and tested by simulating every
// rank in one process; ProcessGroups builds the communicators from it.
#pragma once

#include <memory>
#include <vector>

#include "core/config.h"
#include "parallel/communicator.h"

namespace motley::parallel {

struct RankCoords {
  int pp_rank = 0, dp_rank = 0, ep_rank = 0, ep_block = 0;
};

struct GroupLayout {
  int dp = 1, ep = 1, pp = 1;

  int world() const { return dp * pp; }
  RankCoords coords(int rank) const;
  int rank_of(int pp_rank, int dp_rank) const { return pp_rank * dp + dp_rank; }
  // World ranks of each group containing `rank`, increasing.
  std::vector<int> dp_group(int rank) const;
  std::vector<int> ep_group(int rank) const;
  std::vector<int> expert_dp_group(int rank) const;
  std::vector<int> pp_group(int rank) const;
};

// Start-up validation, before any work, identical on every rank (a pure
// function of the config and the world size, so every rank throws the
// same kUsage error, exit 2): world == dp * pp, ep | dp, ep | E (ep == 1
// for a dense model), pp <= n_layers, batch_size divisible by
// dp * micro_batches, a known placement.
void validate_layout(const Config& config, int world_size);

// Contiguous layer blocks per stage: stage s of pp holds
// [layer_begin, layer_end), the first n_layers % pp stages one layer more.
struct StageLayers {
  std::int64_t begin = 0, end = 0;
};
StageLayers stage_layers(std::int64_t n_layers, int pp, int stage);
// The stage holding layer l.
int stage_of_layer(std::int64_t n_layers, int pp, std::int64_t layer);

// The communicators of one rank. Built once (collective over `world`) and
// passed by reference to whatever needs a group.
class ProcessGroups {
 public:
  // Collective over `world`: every rank calls it with the same layout.
  // `host`: the communicator for host-side agreement (scalars, flags,
  // statistics: CPU tensors) when `world` carries device tensors only
  // (NCCL, SPEC section 8.1); null: `world` serves both. It must span the
  // same ranks in the same order.
  ProcessGroups(std::shared_ptr<Communicator> world, const GroupLayout& layout,
                std::shared_ptr<Communicator> host = nullptr);

  const GroupLayout& layout() const { return layout_; }
  const RankCoords& coords() const { return coords_; }
  int rank() const { return world_->rank(); }
  int pp_rank() const { return coords_.pp_rank; }
  int dp_rank() const { return coords_.dp_rank; }
  int ep_rank() const { return coords_.ep_rank; }
  bool first_stage() const { return coords_.pp_rank == 0; }
  bool last_stage() const { return coords_.pp_rank == layout_.pp - 1; }
  // Rank inside pp() of the previous / next stage (-1 when none).
  int prev_stage() const { return first_stage() ? -1 : coords_.pp_rank - 1; }
  int next_stage() const { return last_stage() ? -1 : coords_.pp_rank + 1; }

  Communicator& world() const { return *world_; }
  // Host tensors over the whole job (see the constructor).
  Communicator& host() const { return host_ ? *host_ : *world_; }
  Communicator& dp() const { return *dp_; }
  Communicator& ep() const { return *ep_; }
  Communicator& expert_dp() const { return *expert_dp_; }
  Communicator& pp() const { return *pp_; }

 private:
  GroupLayout layout_;
  RankCoords coords_;
  std::shared_ptr<Communicator> world_;
  std::shared_ptr<Communicator> host_;
  std::unique_ptr<Communicator> dp_, ep_, expert_dp_, pp_;
};

}  // namespace motley::parallel
