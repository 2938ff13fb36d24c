// Training batches and eval windows (SPEC section 4).
//
// Note [Sampling rule]: sequence j (global index 0 .. B-1) of step s starts
// at offset
//     philox_u64(philox_key(seed, "data/sample"), s, j) mod (N - T - 1)
// of the N-token train split and covers tokens [o, o + T] (T inputs, T
// targets shifted by one). The offset depends only on (seed, s, j, N, T),
// never on how the batch is split over ranks or micro-batches, nor on
// whether the run was resumed: any layout sees the same global batch.
//
// Eval: window i covers tokens [i*T, i*T + T], consecutive and
// non-overlapping in their predicted tokens; there are (N - 1) / T whole
// windows and the tail shorter than a window is not evaluated.
//
// All functions are pure and need no MPI: a rank computes its own slice
// [first, first + count) of the global batch.
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "data/token_file.h"

namespace motley {

// Start offset of sequence j of step s (Note [Sampling rule]), in
// [0, N - T - 2]. kData if n_tokens < seq_len + 2 (the file is too short for
// one sequence and its targets); kInternal for seq_len < 1, step < 0, j < 0.
std::int64_t sample_offset(std::uint64_t seed, std::int64_t step, std::int64_t j,
                           std::int64_t n_tokens, std::int64_t seq_len);

struct Batch {
  Tensor tokens;   // (count, T) i64, cpu
  Tensor targets;  // (count, T) i64, cpu: the token after each of `tokens`
};

// Sequences [first, first + count) of step s's global batch, row r holding
// sequence first + r. count may be 0.
Batch sample_batch(const TokenFile& file, std::uint64_t seed, std::int64_t step,
                   std::int64_t first, std::int64_t count, std::int64_t seq_len);

// Number of whole eval windows of seq_len predicted tokens: (N - 1) / T
// (0 when N < 2).
std::int64_t eval_window_count(std::int64_t n_tokens, std::int64_t seq_len);

// Windows [first_window, first_window + count): row r holds tokens
// [(first_window + r) * T, ... + T) and targets shifted by one. kData if
// the windows run past eval_window_count(file.size(), seq_len).
Batch eval_batch(const TokenFile& file, std::int64_t first_window, std::int64_t count,
                 std::int64_t seq_len);

}  // namespace motley
