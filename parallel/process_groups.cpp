#include "parallel/process_groups.h"

#include "core/check.h"

namespace motley::parallel {

RankCoords GroupLayout::coords(int rank) const {
  MOTLEY_CHECK(rank >= 0 && rank < world(), "rank ", rank, " of ", world());
  RankCoords c;
  c.pp_rank = rank / dp;
  c.dp_rank = rank % dp;
  c.ep_rank = c.dp_rank % ep;
  c.ep_block = c.dp_rank / ep;
  return c;
}

std::vector<int> GroupLayout::dp_group(int rank) const {
  const RankCoords c = coords(rank);
  std::vector<int> g;
  for (int d = 0; d < dp; ++d) g.push_back(rank_of(c.pp_rank, d));
  return g;
}

std::vector<int> GroupLayout::ep_group(int rank) const {
  const RankCoords c = coords(rank);
  std::vector<int> g;
  for (int e = 0; e < ep; ++e) g.push_back(rank_of(c.pp_rank, c.ep_block * ep + e));
  return g;
}

std::vector<int> GroupLayout::expert_dp_group(int rank) const {
  const RankCoords c = coords(rank);
  std::vector<int> g;
  for (int b = 0; b < dp / ep; ++b) g.push_back(rank_of(c.pp_rank, b * ep + c.ep_rank));
  return g;
}

std::vector<int> GroupLayout::pp_group(int rank) const {
  const RankCoords c = coords(rank);
  std::vector<int> g;
  for (int p = 0; p < pp; ++p) g.push_back(rank_of(p, c.dp_rank));
  return g;
}

void validate_layout(const Config& config, int world_size) {
  const ParallelConfig& p = config.parallel;
  MOTLEY_CHECK_KIND(kUsage, p.dp >= 1 && p.ep >= 1 && p.pp >= 1, "parallel.dp, parallel.ep and "
                    "parallel.pp must be >= 1 (got dp ", p.dp, ", ep ", p.ep, ", pp ", p.pp, ")");
  MOTLEY_CHECK_KIND(kUsage, p.dp * p.pp == world_size, "the job has ", world_size,
                    " ranks but parallel.dp * parallel.pp = ", p.dp, " * ", p.pp, " = ",
                    p.dp * p.pp, ": launch with mpirun -np ", p.dp * p.pp,
                    " or change parallel.dp / parallel.pp");
  MOTLEY_CHECK_KIND(kUsage, p.dp % p.ep == 0, "parallel.ep = ", p.ep,
                    " must divide parallel.dp = ", p.dp,
                    " (expert-parallel groups are blocks of ep ranks of a data-parallel group)");
  const std::int64_t experts = config.model.moe.n_experts;
  if (experts == 0) {
    MOTLEY_CHECK_KIND(kUsage, p.ep == 1, "parallel.ep = ", p.ep,
                      " but the model is dense (model.moe.n_experts = 0): set parallel.ep=1");
  } else {
    MOTLEY_CHECK_KIND(kUsage, experts % p.ep == 0, "parallel.ep = ", p.ep,
                      " must divide model.moe.n_experts = ", experts);
  }
  MOTLEY_CHECK_KIND(kUsage, p.pp <= config.model.n_layers, "parallel.pp = ", p.pp,
                    " exceeds model.n_layers = ", config.model.n_layers,
                    ": every pipeline stage needs at least one layer");
  const std::int64_t shards = p.dp * config.train.micro_batches;
  MOTLEY_CHECK_KIND(kUsage, config.train.batch_size % shards == 0,
                    "train.batch_size = ", config.train.batch_size,
                    " must be divisible by parallel.dp * "
                    "train.micro_batches = ",
                    p.dp, " * ", config.train.micro_batches, " = ", shards);
}

StageLayers stage_layers(std::int64_t n_layers, int pp, int stage) {
  MOTLEY_CHECK(pp >= 1 && pp <= n_layers && stage >= 0 && stage < pp, "stage ", stage, " of ",
               pp, " for ", n_layers, " layers");
  const std::int64_t base = n_layers / pp, extra = n_layers % pp;
  StageLayers s;
  s.begin = stage * base + std::min<std::int64_t>(stage, extra);
  s.end = s.begin + base + (stage < extra ? 1 : 0);
  return s;
}

int stage_of_layer(std::int64_t n_layers, int pp, std::int64_t layer) {
  for (int s = 0; s < pp; ++s) {
    const StageLayers b = stage_layers(n_layers, pp, s);
    if (layer >= b.begin && layer < b.end) return s;
  }
  MOTLEY_FAIL(kInternal, "layer ", layer, " outside ", n_layers, " layers");
}

ProcessGroups::ProcessGroups(std::shared_ptr<Communicator> world, const GroupLayout& layout,
                             std::shared_ptr<Communicator> host)
    : layout_(layout), world_(std::move(world)), host_(std::move(host)) {
  MOTLEY_CHECK(world_->size() == layout_.world(), "world of ", world_->size(),
               " ranks for layout dp ", layout_.dp, " pp ", layout_.pp);
  MOTLEY_CHECK(!host_ || (host_->size() == world_->size() && host_->rank() == world_->rank()),
               "host communicator does not match the world");
  coords_ = layout_.coords(world_->rank());
  const RankCoords& c = coords_;
  const int rank = world_->rank();
  // Every split is collective over the world, in this order on every rank.
  // Keys are world ranks, so ranks inside a group follow Note [Rank order].
  dp_ = world_->split(c.pp_rank, rank);
  ep_ = world_->split(c.pp_rank * layout_.dp + c.ep_block, rank);
  expert_dp_ = world_->split(c.pp_rank * layout_.ep + c.ep_rank, rank);
  pp_ = world_->split(c.dp_rank, rank);
}

}  // namespace motley::parallel
