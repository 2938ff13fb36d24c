#include "layers/expert_sizes.h"

#include <numeric>

#include <gtest/gtest.h>

#include "core/check.h"

namespace motley {
namespace {

MoEConfig moe(std::int64_t e, std::int64_t hidden, const std::string& scheme,
              std::int64_t multiple = 8) {
  MoEConfig c;
  c.n_experts = e;
  c.expert_hidden = hidden;
  c.expert_sizes = parse_config_name<ExpertSizing>(scheme, "model.moe.expert_sizes");
  c.size_multiple = multiple;
  return c;
}

std::int64_t total(const std::vector<std::int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), std::int64_t{0});
}

TEST(ExpertSizes, ModdsePaperSizes) {
  // MoDSE 300M x 8: d = 1536, expert_hidden = 2.5 d = 3840.
  EXPECT_EQ(expert_hidden_sizes(moe(8, 3840, "modse")),
            (std::vector<std::int64_t>{6912, 768, 6144, 1536, 4608, 3072, 3840, 3840}));
  // d = 256: (4.5, 0.5), (4.0, 1.0), (3.0, 2.0), (2.5, 2.5) times d.
  EXPECT_EQ(expert_hidden_sizes(moe(8, 640, "modse")),
            (std::vector<std::int64_t>{1152, 128, 1024, 256, 768, 512, 640, 640}));
}

TEST(ExpertSizes, HmoeArithmeticPaperSizes) {
  // HMoE 0.4B: d = 768, sizes 864 ... 2208 summing to 12288.
  EXPECT_EQ(expert_hidden_sizes(moe(8, 1536, "arithmetic")),
            (std::vector<std::int64_t>{864, 1056, 1248, 1440, 1632, 1824, 2016, 2208}));
}

TEST(ExpertSizes, EveryShemeSumsExactlyForFourEightSixteen) {
  for (std::int64_t e : {4, 8, 16}) {
    for (const char* scheme : {"uniform", "modse", "arithmetic"}) {
      for (std::int64_t hidden : {64, 200, 640, 1000}) {
        const auto sizes = expert_hidden_sizes(moe(e, hidden, scheme));
        ASSERT_EQ(static_cast<std::int64_t>(sizes.size()), e);
        EXPECT_EQ(total(sizes), e * hidden) << scheme << " E=" << e << " h=" << hidden;
        for (std::int64_t s : sizes) {
          EXPECT_EQ(s % 8, 0) << scheme;
          EXPECT_GE(s, 8) << scheme;
        }
      }
    }
  }
}

TEST(ExpertSizes, ModsePairsAreComplementaryAndDescend) {
  const auto sizes = expert_hidden_sizes(moe(16, 640, "modse"));
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(sizes[2 * i] + sizes[2 * i + 1], 2 * 640) << "pair " << i;
    EXPECT_GE(sizes[2 * i], sizes[2 * i + 1]);
    if (i > 0) {
      EXPECT_LE(sizes[2 * i], sizes[2 * i - 2]);
    }
  }
  EXPECT_EQ(sizes[0], 1152);   // 1.8 * 640
  EXPECT_EQ(sizes[14], 640);   // (1, 1)
}

TEST(ExpertSizes, ExplicitListIsUsedAsGiven) {
  MoEConfig c = moe(3, 100, "list");
  c.expert_size_list = {10, 20, 33};
  EXPECT_EQ(expert_hidden_sizes(c), (std::vector<std::int64_t>{10, 20, 33}));
}

TEST(ExpertSizes, TotalNotAMultipleIsAUsageError) {
  try {
    expert_hidden_sizes(moe(3, 100, "arithmetic", 8));  // 300 % 8 != 0
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    EXPECT_NE(std::string(e.what()).find("size_multiple"), std::string::npos) << e.what();
  }
}

TEST(ExpertSizes, RoundingKeepsEveryExpertAtLeastOneMultiple) {
  const auto sizes = round_sizes_keeping_total({100.0, 0.001, 0.001}, 48, 8);
  EXPECT_EQ(sizes, (std::vector<std::int64_t>{32, 8, 8}));
}

}  // namespace
}  // namespace motley
