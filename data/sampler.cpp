// Sampling and eval windows: both read one window of T + 1 tokens per row
// and split it into inputs [0, T) and targets [1, T + 1).
#include "data/sampler.h"

#include <vector>

#include "core/check.h"
#include "core/philox.h"

namespace motley {
namespace {

constexpr const char* kSamplePurpose = "data/sample";

// Row r of the batch is the window starting at start(r).
template <typename StartFn>
Batch read_windows(const TokenFile& file, std::int64_t count, std::int64_t seq_len,
                   StartFn start) {
  Batch batch;
  batch.tokens = Tensor::empty({count, seq_len}, DType::kI64);
  batch.targets = Tensor::empty({count, seq_len}, DType::kI64);
  std::int64_t* tokens = batch.tokens.data<std::int64_t>();
  std::int64_t* targets = batch.targets.data<std::int64_t>();
  std::vector<std::int64_t> window(seq_len + 1);
  for (std::int64_t r = 0; r < count; ++r) {
    file.read(start(r), seq_len + 1, window.data());
    for (std::int64_t t = 0; t < seq_len; ++t) {
      tokens[r * seq_len + t] = window[t];
      targets[r * seq_len + t] = window[t + 1];
    }
  }
  return batch;
}

}  // namespace

std::int64_t sample_offset(std::uint64_t seed, std::int64_t step, std::int64_t j,
                           std::int64_t n_tokens, std::int64_t seq_len) {
  MOTLEY_CHECK(seq_len >= 1 && step >= 0 && j >= 0, "seq_len ", seq_len, ", step ", step,
               ", j ", j);
  MOTLEY_CHECK_KIND(kData, n_tokens >= seq_len + 2, "the train split has ", n_tokens,
                    " tokens; sequences of seq_len ", seq_len, " need at least ", seq_len + 2,
                    " (use a shorter train.seq_len or more data)");
  const std::uint64_t bits = philox_u64(philox_key(seed, kSamplePurpose),
                                        static_cast<std::uint64_t>(step),
                                        static_cast<std::uint64_t>(j));
  return static_cast<std::int64_t>(bits % static_cast<std::uint64_t>(n_tokens - seq_len - 1));
}

Batch sample_batch(const TokenFile& file, std::uint64_t seed, std::int64_t step,
                   std::int64_t first, std::int64_t count, std::int64_t seq_len) {
  MOTLEY_CHECK(first >= 0 && count >= 0, "first ", first, ", count ", count);
  const std::int64_t n = file.size();
  // Validate once, even for count == 0, so a too-short file fails early.
  sample_offset(seed, step, 0, n, seq_len);
  return read_windows(file, count, seq_len, [&](std::int64_t r) {
    return sample_offset(seed, step, first + r, n, seq_len);
  });
}

std::int64_t eval_window_count(std::int64_t n_tokens, std::int64_t seq_len) {
  MOTLEY_CHECK(seq_len >= 1 && n_tokens >= 0, "n_tokens ", n_tokens, ", seq_len ", seq_len);
  return n_tokens < 2 ? 0 : (n_tokens - 1) / seq_len;
}

Batch eval_batch(const TokenFile& file, std::int64_t first_window, std::int64_t count,
                 std::int64_t seq_len) {
  const std::int64_t windows = eval_window_count(file.size(), seq_len);
  MOTLEY_CHECK_KIND(kData, first_window >= 0 && count >= 0 && first_window + count <= windows,
                    "eval windows [", first_window, ", ", first_window + count, ") of seq_len ",
                    seq_len, " are outside the ", windows, " windows of ", file.path(), " (",
                    file.size(), " tokens)");
  return read_windows(file, count, seq_len,
                      [&](std::int64_t r) { return (first_window + r) * seq_len; });
}

}  // namespace motley
