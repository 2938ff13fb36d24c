// Pure partitioning logic of parallel/, every rank simulated in one
// process (STYLE 11): group layout, validation, stage blocks, expert
// placement, the 1F1B schedule and the expert exchange plan.
#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include <gtest/gtest.h>

#include "core/config.h"
#include "layers/expert_sizes.h"
#include "parallel/expert_exchange.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/placement.h"
#include "parallel/process_groups.h"

namespace motley::parallel {
namespace {

TEST(GroupLayout, EveryRankInExactlyOneGroupOfEachKindWithSpecOrder) {
  for (int dp : {1, 2, 3, 4, 6, 8}) {
    for (int ep : {1, 2, 3, 4}) {
      if (dp % ep) continue;
      for (int pp : {1, 2, 3, 4}) {
        const GroupLayout g{dp, ep, pp};
        std::map<std::vector<int>, int> dp_groups, ep_groups, edp_groups, pp_groups;
        for (int r = 0; r < g.world(); ++r) {
          const RankCoords c = g.coords(r);
          EXPECT_EQ(r, c.pp_rank * dp + c.dp_rank);
          EXPECT_EQ(c.ep_rank, c.dp_rank % ep);
          const auto dg = g.dp_group(r), eg = g.ep_group(r), xg = g.expert_dp_group(r),
                     pg = g.pp_group(r);
          ASSERT_EQ(static_cast<int>(dg.size()), dp);
          ASSERT_EQ(static_cast<int>(eg.size()), ep);
          ASSERT_EQ(static_cast<int>(xg.size()), dp / ep);
          ASSERT_EQ(static_cast<int>(pg.size()), pp);
          for (int o : dg) EXPECT_EQ(g.coords(o).pp_rank, c.pp_rank);
          for (std::size_t i = 0; i < eg.size(); ++i) {  // consecutive block
            EXPECT_EQ(eg[i], eg[0] + static_cast<int>(i));
            EXPECT_EQ(g.coords(eg[i]).ep_rank, static_cast<int>(i));
          }
          for (int o : xg) EXPECT_EQ(g.coords(o).ep_rank, c.ep_rank);
          for (int o : pg) EXPECT_EQ(g.coords(o).dp_rank, c.dp_rank);
          for (const auto* grp : {&dg, &eg, &xg, &pg}) {
            EXPECT_TRUE(std::is_sorted(grp->begin(), grp->end()));
            EXPECT_NE(std::find(grp->begin(), grp->end(), r), grp->end());
          }
          ++dp_groups[dg];
          ++ep_groups[eg];
          ++edp_groups[xg];
          ++pp_groups[pg];
        }
        // Each group is shared by exactly its members.
        for (const auto& [grp, n] : dp_groups) EXPECT_EQ(n, static_cast<int>(grp.size()));
        for (const auto& [grp, n] : ep_groups) EXPECT_EQ(n, static_cast<int>(grp.size()));
        for (const auto& [grp, n] : edp_groups) EXPECT_EQ(n, static_cast<int>(grp.size()));
        for (const auto& [grp, n] : pp_groups) EXPECT_EQ(n, static_cast<int>(grp.size()));
        EXPECT_EQ(static_cast<int>(dp_groups.size()), pp);
        EXPECT_EQ(static_cast<int>(pp_groups.size()), dp);
      }
    }
  }
}

Config tiny(int dp, int ep, int pp) {
  Config c = Config::defaults();
  c.model.n_layers = 4;
  c.model.moe.n_experts = 8;
  c.train.batch_size = 16;
  c.train.micro_batches = 2;
  c.parallel.dp = dp;
  c.parallel.ep = ep;
  c.parallel.pp = pp;
  return c;
}

void expect_usage(const Config& c, int world, const std::string& part) {
  try {
    validate_layout(c, world);
    ADD_FAILURE() << "expected kUsage containing " << part;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(Validate, AcceptsGoodLayoutsAndNamesTheBrokenRule) {
  EXPECT_NO_THROW(validate_layout(tiny(2, 2, 2), 4));
  EXPECT_NO_THROW(validate_layout(tiny(4, 2, 1), 4));
  expect_usage(tiny(2, 1, 2), 2, "mpirun -np 4");
  expect_usage(tiny(3, 2, 1), 3, "must divide parallel.dp");
  Config c = tiny(3, 3, 1);
  expect_usage(c, 3, "n_experts");
  expect_usage(tiny(1, 1, 5), 5, "exceeds model.n_layers");
  Config b = tiny(4, 1, 1);
  b.train.batch_size = 12;
  expect_usage(b, 4, "divisible");
  // An unknown placement cannot reach validate_layout: reading it names the key.
  try {
    parse_config_name<PlacementKind>("random", "parallel.placement");
    ADD_FAILURE() << "expected kUsage";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    EXPECT_NE(std::string(e.what()).find("parallel.placement"), std::string::npos) << e.what();
  }
}

TEST(StageLayers, ContiguousCoverEveryLayerOnce) {
  for (int layers = 1; layers <= 9; ++layers) {
    for (int pp = 1; pp <= layers; ++pp) {
      std::int64_t next = 0;
      for (int s = 0; s < pp; ++s) {
        const StageLayers b = stage_layers(layers, pp, s);
        EXPECT_EQ(b.begin, next);
        EXPECT_GT(b.end, b.begin);
        for (std::int64_t l = b.begin; l < b.end; ++l) EXPECT_EQ(stage_of_layer(layers, pp, l), s);
        next = b.end;
      }
      EXPECT_EQ(next, layers);
    }
  }
}

void expect_valid_owner(const std::vector<int>& owner, int ep) {
  std::vector<int> per(ep, 0);
  for (int o : owner) {
    ASSERT_GE(o, 0);
    ASSERT_LT(o, ep);
    ++per[o];
  }
  for (int n : per) EXPECT_EQ(n, static_cast<int>(owner.size()) / ep);
}

TEST(Placement, ContiguousBlocks) {
  EXPECT_EQ(place_contiguous(8, 4), (std::vector<int>{0, 0, 1, 1, 2, 2, 3, 3}));
}

TEST(Placement, PairsGiveEqualExpertParametersForModse) {
  for (std::int64_t e : {4, 8, 16}) {
    MoEConfig m;
    m.n_experts = e;
    m.expert_hidden = 160;
    m.expert_sizes = ExpertSizing::kModse;
    const std::vector<std::int64_t> sizes = expert_hidden_sizes(m);
    for (int ep : {1, 2, 4}) {
      if (e % ep || (e / ep) % 2) continue;
      const std::vector<int> owner = place_pairs(sizes, ep);
      expect_valid_owner(owner, ep);
      const auto params = rank_expert_params(owner, sizes, 64, ep);
      for (std::int64_t p : params) EXPECT_EQ(p, params[0]) << "E " << e << " ep " << ep;
      // Contiguous is not balanced for modse (big and small alternate, but
      // the pair sizes are not sorted that way for every E); pairs is never worse.
      const auto contiguous = rank_expert_params(place_contiguous(e, ep), sizes, 64, ep);
      EXPECT_LE(*std::max_element(params.begin(), params.end()),
                *std::max_element(contiguous.begin(), contiguous.end()));
    }
  }
}

TEST(Placement, BalancedBeatsContiguousOnSkewedLoad) {
  // Experts 0 and 1 get most tokens: contiguous puts both on rank 0.
  const std::vector<double> load = {100, 90, 10, 10, 5, 5, 2, 1};
  const int ep = 4;
  const std::vector<int> balanced = place_balanced(load, ep);
  expect_valid_owner(balanced, ep);
  EXPECT_LT(max_rank_load(balanced, load, ep), max_rank_load(place_contiguous(8, ep), load, ep));
  EXPECT_DOUBLE_EQ(max_rank_load(balanced, load, ep), 101.0);
  // Through the dispatcher, with tokens * h_e.
  const std::vector<int> via =
      place_experts(PlacementKind::kBalanced, {8, 8, 8, 8, 8, 8, 8, 8}, ep, load);
  EXPECT_EQ(via, balanced);
}

// Note [Re-placement]: the cost is per layer. Two layers peak on different
// experts: layer 0 on experts 0 and 1, layer 1 on experts 2 and 3. Summed
// over layers all four look alike (110 each), so the summed load cannot
// tell {0,1 | 2,3} (each layer's two hot experts on one rank: cost
// 200 + 200) from {0,2 | 1,3} (cost 110 + 110).
TEST(Replacement, CostIsPerLayerAndSwapsFindTheBetterMap) {
  const std::vector<std::vector<double>> layers = {{100, 100, 10, 10}, {10, 10, 100, 100}};
  EXPECT_DOUBLE_EQ(layered_max_load({0, 0, 1, 1}, layers, 2), 200.0 + 200.0);
  EXPECT_DOUBLE_EQ(layered_max_load({0, 1, 0, 1}, layers, 2), 110.0 + 110.0);
  // A single layer: the largest per-rank load.
  EXPECT_DOUBLE_EQ(layered_max_load({0, 0, 1, 1}, {layers[0]}, 2), 200.0);

  const std::vector<int> improved = improve_by_swaps({0, 0, 1, 1}, layers, 2);
  expect_valid_owner(improved, 2);
  EXPECT_DOUBLE_EQ(layered_max_load(improved, layers, 2), 220.0);
  EXPECT_NE(improved[0], improved[1]);
  EXPECT_NE(improved[2], improved[3]);
  // A local minimum stays put.
  EXPECT_EQ(improve_by_swaps({0, 1, 0, 1}, layers, 2), (std::vector<int>{0, 1, 0, 1}));

  const ReplacementDecision d = decide_replacement({0, 0, 1, 1}, layers, {1, 1, 1, 1}, 2);
  EXPECT_TRUE(d.replace);
  EXPECT_DOUBLE_EQ(d.current_max, 400.0);
  EXPECT_DOUBLE_EQ(d.candidate_max, 220.0);
  EXPECT_EQ(d.load, (std::vector<double>{110, 110, 110, 110}));
  // Already at the optimum: nothing to gain, nothing moves.
  EXPECT_FALSE(decide_replacement({0, 1, 0, 1}, layers, {1, 1, 1, 1}, 2).replace);
}

TEST(Replacement, SwapSearchNeverWorseThanItsStartAndKeepsCounts) {
  // Random skewed loads over 3 layers, E = 16, ep = 4: the search from any
  // start ends at a cost <= the start's, with E/ep experts per rank.
  std::uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>((state >> 33) % 1000);
  };
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<std::vector<double>> layers(3, std::vector<double>(16));
    for (auto& layer : layers) {
      for (double& v : layer) v = next() * (next() < 200 ? 10 : 1);
    }
    for (const std::vector<int>& start :
         {place_contiguous(16, 4), place_balanced(layers[0], 4)}) {
      const std::vector<int> out = improve_by_swaps(start, layers, 4);
      expect_valid_owner(out, 4);
      EXPECT_LE(layered_max_load(out, layers, 4), layered_max_load(start, layers, 4));
    }
  }
}

// Note [Re-placement]: the hysteresis rule on hand-computed loads.
TEST(Replacement, ReplacesOnlyForAtLeastFivePercentLowerMaxLoad) {
  const std::vector<std::int64_t> sizes = {8, 8, 8, 8};
  const std::vector<int> current = {0, 0, 1, 1};
  // Experts 0 and 1 are hot: current max (100 + 90) * 8; LPT puts them on
  // different ranks: 100 + 5 | 90 + 10, max 105 * 8.
  ReplacementDecision d = decide_replacement(current, {100, 90, 10, 5}, sizes, 2);
  EXPECT_TRUE(d.replace);
  expect_valid_owner(d.candidate, 2);
  EXPECT_NE(d.candidate[0], d.candidate[1]);
  EXPECT_EQ(d.load, (std::vector<double>{800, 720, 80, 40}));
  EXPECT_DOUBLE_EQ(d.current_max, 190.0 * 8);
  EXPECT_DOUBLE_EQ(d.candidate_max, 105.0 * 8);

  // Better but not by 5 %: current 52 + 50 | 50 + 48 = 102 | 98; LPT
  // 52 + 48 | 50 + 50 = 100: a 2 % gain keeps the map.
  d = decide_replacement(current, {52, 50, 50, 48}, sizes, 2);
  EXPECT_DOUBLE_EQ(d.current_max, 102.0 * 8);
  EXPECT_DOUBLE_EQ(d.candidate_max, 100.0 * 8);
  EXPECT_FALSE(d.replace);

  // The threshold itself: 95 | 5 -> 50 | 50 is a 47.4 % gain.
  const std::vector<double> tokens = {50, 45, 5, 0};
  d = decide_replacement(current, tokens, {1, 1, 1, 1}, 2);
  EXPECT_DOUBLE_EQ(d.current_max, 95.0);
  EXPECT_DOUBLE_EQ(d.candidate_max, 50.0);
  EXPECT_TRUE(d.replace);
  EXPECT_TRUE(decide_replacement(current, tokens, {1, 1, 1, 1}, 2, 0.47).replace);
  EXPECT_FALSE(decide_replacement(current, tokens, {1, 1, 1, 1}, 2, 0.48).replace);

  // Sizes weigh the tokens: equal tokens, the two big experts together.
  d = decide_replacement({0, 1, 0, 1}, {10, 10, 10, 10}, {90, 10, 80, 20}, 2);
  EXPECT_TRUE(d.replace);
  EXPECT_DOUBLE_EQ(d.current_max, 1700.0);
  EXPECT_DOUBLE_EQ(d.candidate_max, 1000.0);  // 90 + 10 | 80 + 20
  EXPECT_NE(d.candidate[0], d.candidate[2]);

  // LPT's partition under other rank labels is no gain: 105 | 100 either way.
  d = decide_replacement({1, 0, 0, 1}, {100, 90, 10, 5}, sizes, 2);
  EXPECT_DOUBLE_EQ(d.current_max, d.candidate_max);
  EXPECT_FALSE(d.replace);
  // An empty window (no tokens) never moves anything.
  d = decide_replacement(current, {0, 0, 0, 0}, sizes, 2);
  EXPECT_FALSE(d.replace);
  EXPECT_EQ(d.current_max, 0.0);
}

TEST(Replacement, DecisionIsAPureFunctionOfTheCounts) {
  // Every rank computes the same decision from the same reduced counts;
  // the same inputs twice give the same map (no hidden state).
  const std::vector<double> tokens = {300, 10, 250, 40, 90, 90, 5, 200};
  MoEConfig m;
  m.n_experts = 8;
  m.expert_hidden = 160;
  m.expert_sizes = ExpertSizing::kModse;
  const std::vector<std::int64_t> sizes = expert_hidden_sizes(m);
  const std::vector<int> start = place_experts(PlacementKind::kBalanced, sizes, 4);
  const ReplacementDecision a = decide_replacement(start, tokens, sizes, 4);
  const ReplacementDecision b = decide_replacement(start, tokens, sizes, 4);
  EXPECT_EQ(a.candidate, b.candidate);
  EXPECT_EQ(a.replace, b.replace);
  expect_valid_owner(a.candidate, 4);
  // LPT never does worse than the size-only start on these counts here,
  // and the loads it reports are the per-rank sums.
  EXPECT_LE(a.candidate_max, a.current_max);
  const std::vector<double> per = rank_loads(a.candidate, a.load, 4);
  EXPECT_DOUBLE_EQ(*std::max_element(per.begin(), per.end()), a.candidate_max);
  double total = 0;
  for (double x : per) total += x;
  double want = 0;
  for (std::size_t e = 0; e < sizes.size(); ++e) want += tokens[e] * static_cast<double>(sizes[e]);
  EXPECT_DOUBLE_EQ(total, want);
}

TEST(Replacement, ReplaceEveryIsValidatedAndDefaultsTo100) {
  EXPECT_EQ(Config::defaults().parallel.replace_every, 100);
  EXPECT_EQ(Config::from_json(nlohmann::ordered_json::object(), {"parallel.replace_every=0"})
                .parallel.replace_every,
            0);
  try {
    Config::from_json(nlohmann::ordered_json::object(), {"parallel.replace_every=-1"});
    ADD_FAILURE() << "expected kUsage for parallel.replace_every = -1";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    EXPECT_NE(std::string(e.what()).find("parallel.replace_every"), std::string::npos) << e.what();
  }
}

TEST(Replacement, MovesListChangedExpertsInIdOrder) {
  EXPECT_TRUE(expert_moves({0, 0, 1, 1}, {0, 0, 1, 1}).empty());
  EXPECT_EQ(expert_moves({0, 0, 1, 1}, {0, 1, 0, 1}),
            (std::vector<ExpertMove>{{1, 0, 1}, {2, 1, 0}}));
  EXPECT_EQ(expert_moves({0, 1, 2, 0, 1, 2}, {2, 1, 0, 0, 2, 1}),
            (std::vector<ExpertMove>{{0, 0, 2}, {2, 2, 0}, {4, 1, 2}, {5, 2, 1}}));
}

TEST(Schedule, OneFOneBProperties) {
  for (int stages = 1; stages <= 5; ++stages) {
    for (std::int64_t n = 1; n <= 7; ++n) {
      for (int s = 0; s < stages; ++s) {
        const auto actions = one_f_one_b(s, stages, n);
        ASSERT_EQ(static_cast<std::int64_t>(actions.size()), 2 * n);
        std::set<std::int64_t> forwarded, done;
        std::int64_t next_f = 0, next_b = 0, max_in_flight = 0;
        for (const PipelineAction& a : actions) {
          if (a.kind == PipelineAction::kForward) {
            EXPECT_EQ(a.micro_batch, next_f++);
            forwarded.insert(a.micro_batch);
          } else {
            EXPECT_EQ(a.micro_batch, next_b++);
            EXPECT_TRUE(forwarded.count(a.micro_batch)) << "backward before forward";
            done.insert(a.micro_batch);
          }
          max_in_flight = std::max<std::int64_t>(
              max_in_flight, static_cast<std::int64_t>(forwarded.size() - done.size()));
        }
        EXPECT_EQ(static_cast<std::int64_t>(done.size()), n);
        EXPECT_LE(max_in_flight, stages - s);
        EXPECT_LE(max_in_flight, stages);
      }
    }
  }
  // One stage: the single-process loop F0 B0 F1 B1.
  const auto single = one_f_one_b(0, 1, 2);
  EXPECT_EQ(single, (std::vector<PipelineAction>{{PipelineAction::kForward, 0},
                                                 {PipelineAction::kBackward, 0},
                                                 {PipelineAction::kForward, 1},
                                                 {PipelineAction::kBackward, 1}}));
}

// Simulates the exchange on plain integers: every row carries (source
// rank, index); after dispatch each owner must see exactly the rows of its
// experts grouped by expert, and the mirrored plan must bring every row home.
TEST(ExchangePlan, DispatchGroupsByExpertAndMirrorReturnsEveryRow) {
  const std::vector<int> owner = {1, 0, 0, 1};  // pairs-like, not contiguous
  const std::vector<std::vector<std::int64_t>> counts = {{2, 0, 3, 1}, {0, 0, 0, 0}, };
  const int ranks = 2;
  std::vector<ExchangePlan> plans(ranks);
  std::vector<std::vector<std::int64_t>> local(ranks);
  for (int r = 0; r < ranks; ++r) plans[r] = dispatch_plan(r, counts, owner, &local[r]);
  // Simulated alltoallv of row ids (src * 1000 + row).
  auto simulate = [&](const std::vector<std::vector<std::int64_t>>& rows,
                      const std::vector<ExchangePlan>& p) {
    std::vector<std::vector<std::int64_t>> send(ranks), out(ranks);
    for (int r = 0; r < ranks; ++r) {
      for (std::int64_t i : p[r].send_index) send[r].push_back(rows[r][i]);
    }
    for (int r = 0; r < ranks; ++r) {
      std::vector<std::int64_t> recv;
      for (int src = 0; src < ranks; ++src) {
        std::int64_t off = 0;
        for (int k = 0; k < r; ++k) off += p[src].send_counts[k];
        EXPECT_EQ(p[src].send_counts[r], p[r].recv_counts[src]);
        for (std::int64_t k = 0; k < p[src].send_counts[r]; ++k) recv.push_back(send[src][off + k]);
      }
      for (std::int64_t i : p[r].recv_perm) out[r].push_back(recv[i]);
    }
    return out;
  };
  std::vector<std::vector<std::int64_t>> rows(ranks);
  for (int r = 0; r < ranks; ++r) {
    const std::int64_t n = std::accumulate(counts[r].begin(), counts[r].end(), std::int64_t{0});
    for (std::int64_t i = 0; i < n; ++i) rows[r].push_back(r * 1000 + i);
  }
  const auto dispatched = simulate(rows, plans);
  // Rank 0 owns experts 1 and 2: only rank 0's 3 rows of expert 2 (rows 2..4).
  EXPECT_EQ(dispatched[0], (std::vector<std::int64_t>{2, 3, 4}));
  EXPECT_EQ(local[0], (std::vector<std::int64_t>{0, 0, 3, 0}));
  // Rank 1 owns experts 0 and 3: rows 0, 1 (expert 0) then 5 (expert 3).
  EXPECT_EQ(dispatched[1], (std::vector<std::int64_t>{0, 1, 5}));
  std::vector<ExchangePlan> back(ranks);
  for (int r = 0; r < ranks; ++r) back[r] = plans[r].mirrored();
  EXPECT_EQ(simulate(dispatched, back), rows);  // rank 1 sent and gets nothing
}

}  // namespace
}  // namespace motley::parallel
