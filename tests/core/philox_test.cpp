#include "core/philox.h"

#include <cmath>
#include <set>

#include <gtest/gtest.h>

namespace motley {
namespace {

// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
TEST(Philox, MatchesRandom123KnownAnswers) {
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (PhiloxCounter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                          {0xffffffffu, 0xffffffffu}),
            (PhiloxCounter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                          {0xa4093822u, 0x299f31d0u}),
            (PhiloxCounter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(Philox, KeysDependOnSeedAndPurpose) {
  EXPECT_EQ(philox_key(1, "init/embed.weight"), philox_key(1, "init/embed.weight"));
  EXPECT_NE(philox_key(1, "init/embed.weight"), philox_key(2, "init/embed.weight"));
  EXPECT_NE(philox_key(1, "init/embed.weight"), philox_key(1, "init/lm_head.weight"));
}

TEST(Philox, UniformInRangeAndNormalMoments) {
  const PhiloxKey key = philox_key(7, "moments");
  const int n = 200000;
  double sum = 0, sum_sq = 0;
  for (int i = 0; i < n; ++i) {
    const double u = philox_uniform(key, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    const double z = philox_normal(key, i, 1);
    ASSERT_TRUE(std::isfinite(z));
    sum += z;
    sum_sq += z * z;
  }
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  // Standard errors: mean ~ 1/sqrt(n) = 0.0022, var ~ sqrt(2/n) = 0.0032.
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(var, 1.0, 0.015);
}

TEST(Philox, FillIsAPureFunctionOfKeyAndIndex) {
  const PhiloxKey key = philox_key(3, "init/w");
  Tensor a = Tensor::empty({4, 5});
  Tensor b = Tensor::empty({20}, DType::kF64);
  fill_normal(a, key, 0.0, 0.02);
  fill_normal(b, key, 0.0, 0.02);
  const auto va = a.to_vector<float>();
  const auto vb = b.to_vector<double>();
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(va[i], static_cast<float>(vb[i]));
    EXPECT_DOUBLE_EQ(vb[i], 0.02 * philox_normal(key, i));
  }
  // A different stream gives different values.
  Tensor c = Tensor::empty({20}, DType::kF64);
  fill_normal(c, key, 0.0, 0.02, /*stream=*/1);
  EXPECT_NE(c.to_vector<double>()[0], vb[0]);
}

TEST(Philox, FillUniformBounds) {
  Tensor t = Tensor::empty({1000}, DType::kF64);
  fill_uniform(t, philox_key(5, "u"), -0.25, 0.25);
  std::set<double> distinct;
  for (double v : t.to_vector<double>()) {
    EXPECT_GE(v, -0.25);
    EXPECT_LT(v, 0.25);
    distinct.insert(v);
  }
  EXPECT_GT(distinct.size(), 990u);
}

}  // namespace
}  // namespace motley
