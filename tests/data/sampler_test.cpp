#include "data/sampler.h"

#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "core/philox.h"
#include "tests/data/data_test_util.h"

namespace motley {
namespace {

using testing::expect_error;
using testing::TempDir;

// A token file whose token at offset o is o (vocab 65536 > N), so every
// row of a batch reveals the offset it was read from.
TokenFile identity_file(const TempDir& dir, std::int64_t n) {
  std::vector<std::uint32_t> tokens(n);
  for (std::int64_t i = 0; i < n; ++i) tokens[i] = static_cast<std::uint32_t>(i);
  write_token_file(dir.file("ids.h5"), tokens, 65536);
  return TokenFile::open(dir.file("ids.h5"));
}

TEST(Sampler, OffsetFollowsTheSpecRule) {
  const std::int64_t n = 5000, t = 64;
  for (std::int64_t s : {0, 1, 17, 100000}) {
    for (std::int64_t j : {0, 1, 31}) {
      const std::uint64_t expected =
          philox_u64(philox_key(42, "data/sample"), s, j) % static_cast<std::uint64_t>(n - t - 1);
      EXPECT_EQ(sample_offset(42, s, j, n, t), static_cast<std::int64_t>(expected));
    }
  }
}

TEST(Sampler, OffsetsStayInRangeAndVary) {
  const std::int64_t n = 300, t = 16;
  std::set<std::int64_t> seen;
  for (std::int64_t s = 0; s < 50; ++s) {
    for (std::int64_t j = 0; j < 20; ++j) {
      const std::int64_t o = sample_offset(7, s, j, n, t);
      ASSERT_GE(o, 0);
      ASSERT_LE(o + t, n - 1);  // the last target exists
      seen.insert(o);
    }
  }
  EXPECT_GT(seen.size(), 200u);  // 283 possible offsets, 1000 draws
  EXPECT_NE(sample_offset(7, 0, 0, n, t), sample_offset(8, 0, 0, n, t));
  // The smallest file that holds one sequence: a single possible offset.
  EXPECT_EQ(sample_offset(7, 3, 4, t + 2, t), 0);
  expect_error([] { sample_offset(7, 0, 0, 17, 16); }, ErrorKind::kData,
               {"17 tokens", "seq_len 16", "at least 18"});
}

TEST(Sampler, BatchRowsAreWindowsWithShiftedTargets) {
  TempDir dir;
  const TokenFile file = identity_file(dir, 2000);
  const std::int64_t t = 32, b = 8, step = 5;
  const Batch batch = sample_batch(file, 99, step, 0, b, t);
  ASSERT_EQ(batch.tokens.shape(), (Shape{b, t}));
  ASSERT_EQ(batch.targets.shape(), (Shape{b, t}));
  EXPECT_EQ(batch.tokens.dtype(), DType::kI64);
  EXPECT_EQ(batch.targets.dtype(), DType::kI64);
  const auto tokens = batch.tokens.to_vector<std::int64_t>();
  const auto targets = batch.targets.to_vector<std::int64_t>();
  for (std::int64_t r = 0; r < b; ++r) {
    const std::int64_t o = sample_offset(99, step, r, 2000, t);
    for (std::int64_t k = 0; k < t; ++k) {
      ASSERT_EQ(tokens[r * t + k], o + k);
      ASSERT_EQ(targets[r * t + k], o + k + 1);
    }
  }
}

// Any split of the global batch into [first, first + count) slices (ranks,
// micro-batches) yields the same rows.
TEST(Sampler, BatchIsIndependentOfHowItIsSplit) {
  TempDir dir;
  const TokenFile file = identity_file(dir, 3000);
  const std::int64_t t = 20, b = 12;
  for (std::int64_t step : {0, 1, 1000}) {
    const auto whole = sample_batch(file, 3, step, 0, b, t).tokens.to_vector<std::int64_t>();
    for (std::int64_t parts : {2, 3, 4, 6, 12}) {
      std::vector<std::int64_t> joined;
      for (std::int64_t p = 0; p < parts; ++p) {
        const std::int64_t count = b / parts;
        const auto slice =
            sample_batch(file, 3, step, p * count, count, t).tokens.to_vector<std::int64_t>();
        joined.insert(joined.end(), slice.begin(), slice.end());
      }
      EXPECT_EQ(joined, whole) << "step " << step << ", " << parts << " parts";
    }
    // Uneven slices too.
    std::vector<std::int64_t> joined;
    for (auto [first, count] : {std::pair<std::int64_t, std::int64_t>{0, 5}, {5, 0}, {5, 7}}) {
      const auto slice = sample_batch(file, 3, step, first, count, t).tokens.to_vector<std::int64_t>();
      joined.insert(joined.end(), slice.begin(), slice.end());
    }
    EXPECT_EQ(joined, whole);
  }
  EXPECT_NE(sample_batch(file, 3, 0, 0, b, t).tokens.to_vector<std::int64_t>(),
            sample_batch(file, 3, 1, 0, b, t).tokens.to_vector<std::int64_t>());
}

TEST(Sampler, TooShortFileIsADataError) {
  TempDir dir;
  const TokenFile file = identity_file(dir, 10);
  expect_error([&] { sample_batch(file, 1, 0, 0, 2, 9); }, ErrorKind::kData, {"10 tokens"});
  expect_error([&] { sample_batch(file, 1, 0, 0, 0, 9); }, ErrorKind::kData, {"10 tokens"});
  EXPECT_EQ(sample_batch(file, 1, 0, 0, 2, 8).tokens.shape(), (Shape{2, 8}));
}

TEST(EvalWindows, CountIsNMinusOneOverT) {
  EXPECT_EQ(eval_window_count(1001, 10), 100);
  EXPECT_EQ(eval_window_count(1000, 10), 99);
  EXPECT_EQ(eval_window_count(11, 10), 1);
  EXPECT_EQ(eval_window_count(10, 10), 0);
  EXPECT_EQ(eval_window_count(1, 10), 0);
  EXPECT_EQ(eval_window_count(0, 10), 0);
}

TEST(EvalWindows, WindowICoversITimesTToITimesTPlusT) {
  TempDir dir;
  const TokenFile file = identity_file(dir, 1000);
  const std::int64_t t = 10;
  const std::int64_t windows = eval_window_count(1000, t);
  ASSERT_EQ(windows, 99);
  const Batch all = eval_batch(file, 0, windows, t);
  ASSERT_EQ(all.tokens.shape(), (Shape{windows, t}));
  const auto tokens = all.tokens.to_vector<std::int64_t>();
  const auto targets = all.targets.to_vector<std::int64_t>();
  for (std::int64_t i = 0; i < windows; ++i) {
    for (std::int64_t k = 0; k < t; ++k) {
      ASSERT_EQ(tokens[i * t + k], i * t + k);
      ASSERT_EQ(targets[i * t + k], i * t + k + 1);
    }
  }
  // Every token but the first is predicted exactly once, up to the tail.
  EXPECT_EQ(targets.back(), windows * t);
  // A slice matches the same rows of the whole.
  const auto slice = eval_batch(file, 40, 3, t).tokens.to_vector<std::int64_t>();
  EXPECT_EQ(slice, std::vector<std::int64_t>(tokens.begin() + 40 * t, tokens.begin() + 43 * t));
  expect_error([&] { eval_batch(file, 98, 2, t); }, ErrorKind::kData,
               {"[98, 100)", "99 windows", dir.file("ids.h5")});
}

}  // namespace
}  // namespace motley
