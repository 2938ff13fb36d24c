#include "layers/routing.h"

#include <gtest/gtest.h>

namespace motley {
namespace {

TEST(Routing, TopkPicksLargestWithTiesToLowerIndex) {
  const std::vector<double> probs = {0.1, 0.4, 0.1, 0.4,   // tie between 1 and 3
                                     0.25, 0.25, 0.25, 0.25};
  const Selection s = select_topk(probs, 2, 4, 2);
  EXPECT_EQ(s.offsets, (std::vector<std::int64_t>{0, 2, 4}));
  EXPECT_EQ(s.experts, (std::vector<std::int64_t>{1, 3, 0, 1}));
  EXPECT_EQ(s.counts(), (std::vector<std::int64_t>{1, 2, 0, 1}));
}

TEST(Routing, ToppTakesShortestPrefixReachingP) {
  const std::vector<double> probs = {0.5, 0.3, 0.15, 0.05,   // 0.5 < 0.6 -> {0, 1}
                                     0.05, 0.7, 0.2, 0.05,   // 0.7 >= 0.6 -> {1}
                                     0.25, 0.25, 0.25, 0.25};  // ties -> {0, 1, 2}
  const Selection s = select_topp(probs, 3, 4, 0.6, 0);
  EXPECT_EQ(s.offsets, (std::vector<std::int64_t>{0, 2, 3, 6}));
  EXPECT_EQ(s.experts, (std::vector<std::int64_t>{0, 1, 1, 0, 1, 2}));
  // max_k caps the prefix.
  const Selection capped = select_topp(probs, 3, 4, 0.6, 2);
  EXPECT_EQ(capped.experts, (std::vector<std::int64_t>{0, 1, 1, 0, 1}));
  // p = 1 takes every expert with nonzero mass needed to reach 1.
  const Selection all = select_topp({0.5, 0.5, 0.0}, 1, 3, 1.0, 0);
  EXPECT_EQ(all.experts, (std::vector<std::int64_t>{0, 1}));
}

TEST(Routing, DispatchGroupsRowsByExpertThenToken) {
  Selection s;
  s.n_tokens = 3;
  s.n_experts = 3;
  s.offsets = {0, 2, 4, 6};
  s.experts = {2, 0, 0, 2, 2, 1};
  const DispatchPlan plan = plan_dispatch(s, -1);
  EXPECT_EQ(plan.counts, (std::vector<std::int64_t>{2, 1, 3}));
  EXPECT_EQ(plan.offsets, (std::vector<std::int64_t>{0, 2, 3, 6}));
  EXPECT_EQ(plan.token, (std::vector<std::int64_t>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(plan.pair, (std::vector<std::int64_t>{1, 2, 5, 0, 3, 4}));
  EXPECT_EQ(plan.dropped, 0);
}

TEST(Routing, CapacityDropsLaterSlotsFirst) {
  // Tokens 0 and 1 choose (0, 1), token 2 chooses (1, 0).
  Selection s;
  s.n_tokens = 3;
  s.n_experts = 2;
  s.offsets = {0, 2, 4, 6};
  s.experts = {0, 1, 0, 1, 1, 0};
  EXPECT_EQ(expert_capacity(1.0, 6, 2), 3);
  EXPECT_EQ(expert_capacity(0.5, 6, 2), 2);
  EXPECT_EQ(expert_capacity(0.0, 6, 2), -1);
  // Capacity 2: slot 0 gives expert 0 tokens {0, 1}, expert 1 token {2};
  // slot 1: token 0 -> expert 1 (kept, 2nd), token 1 -> expert 1 (dropped),
  // token 2 -> expert 0 (dropped).
  const DispatchPlan plan = plan_dispatch(s, 2);
  EXPECT_EQ(plan.dropped, 2);
  EXPECT_EQ(plan.counts, (std::vector<std::int64_t>{2, 2}));
  EXPECT_EQ(plan.token, (std::vector<std::int64_t>{0, 1, 0, 2}));
  EXPECT_EQ(plan.pair, (std::vector<std::int64_t>{0, 2, 1, 4}));
}

TEST(Routing, EmptyExpertsAndNoTokens) {
  const Selection s = select_topk({0.9, 0.1, 0.0}, 1, 3, 1);
  const DispatchPlan plan = plan_dispatch(s, -1);
  EXPECT_EQ(plan.counts, (std::vector<std::int64_t>{1, 0, 0}));
  const Selection none = select_topk({}, 0, 3, 1);
  EXPECT_EQ(plan_dispatch(none, -1).rows(), 0);
}

}  // namespace
}  // namespace motley
