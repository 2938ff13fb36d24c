// Hidden sizes of the experts of one MoE layer (SPEC section 1.1).
//
//   uniform     every expert has expert_hidden
//   modse       E/2 complementary pairs (big, small) whose sizes sum to
//               2 * expert_hidden. E = 8: fractions of expert_hidden
//               (1.8, 0.2), (1.6, 0.4), (1.2, 0.8), (1.0, 1.0) — the MoDSE
//               paper's (4.5, 0.5) ... (2.5, 2.5) times d with
//               expert_hidden = 2.5 d. Other E: the big fraction of pair i
//               of P = E/2 falls evenly from 1.8 (i = 0) to 1.0
//               (i = P - 1); P = 1 gives (1.8, 0.2). Experts are ordered
//               pair by pair: big_0, small_0, big_1, small_1, ...
//   arithmetic  HMoE: relative sizes 9, 11, ..., 9 + 2(E - 1) scaled to sum
//               to E * expert_hidden
//   list        the explicit sizes, used exactly as given
//
// Generated sizes are rounded to multiples of size_multiple by the largest
// remainder method, so they sum exactly to E * expert_hidden (which must
// then be a multiple of size_multiple; kUsage otherwise) and every expert
// keeps at least size_multiple.
#pragma once

#include <cstdint>
#include <vector>

#include "core/config.h"

namespace motley {

std::vector<std::int64_t> expert_hidden_sizes(const MoEConfig& moe);

// Rounds `raw` (positive reals) to multiples of `multiple` summing exactly
// to `total` (a multiple of `multiple`), each at least `multiple`.
std::vector<std::int64_t> round_sizes_keeping_total(const std::vector<double>& raw,
                                                    std::int64_t total,
                                                    std::int64_t multiple);

}  // namespace motley
