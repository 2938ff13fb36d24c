// Expert selection and the dispatch plan of an MoE layer (SPEC 1.3).
//
// These are pure host-side functions of the router probabilities, so they
// are tested without tensors and behave identically on every backend.
#pragma once

#include <cstdint>
#include <vector>

namespace motley {

// The experts each token selected, in slot order (most probable first).
struct Selection {
  std::int64_t n_tokens = 0;
  std::int64_t n_experts = 0;
  std::vector<std::int64_t> offsets;  // (n_tokens + 1): token n owns [offsets[n], offsets[n+1])
  std::vector<std::int64_t> experts;  // (pairs) expert id per (token, slot)

  std::int64_t n_pairs() const { return static_cast<std::int64_t>(experts.size()); }
  // n_e: how many tokens selected each expert.
  std::vector<std::int64_t> counts() const;
};

// probs (n_tokens, n_experts) row-major.
// top-k: the k largest probabilities per token, ties to the lower index.
Selection select_topk(const std::vector<double>& probs, std::int64_t n_tokens,
                      std::int64_t n_experts, std::int64_t k);
// top-p (HMoE): probabilities sorted descending (ties: lower index first);
// the shortest prefix whose sum is >= top_p (the crossing expert
// included), at most max_k experts (max_k <= 0: n_experts).
Selection select_topp(const std::vector<double>& probs, std::int64_t n_tokens,
                      std::int64_t n_experts, double top_p, std::int64_t max_k);

// Capacity per expert for GShard-style dropping: ceil(capacity_factor *
// pairs / n_experts); -1 (no limit) when capacity_factor <= 0.
std::int64_t expert_capacity(double capacity_factor, std::int64_t n_pairs,
                             std::int64_t n_experts);

// Rows of the MoE computation, grouped by expert: for each kept pair, the
// token it comes from and its position in the Selection (to pick its gate
// weight). Experts are contiguous blocks in increasing expert id; inside a
// block, tokens increase.
//
// Dropping (capacity >= 0): an expert keeps at most `capacity` pairs,
// chosen slot by slot (every token's first choice before any second
// choice), then by token index; dropped pairs contribute 0.
struct DispatchPlan {
  std::vector<std::int64_t> token;      // (rows) source token of each row
  std::vector<std::int64_t> pair;       // (rows) index into Selection::experts
  std::vector<std::int64_t> counts;     // (n_experts) rows per expert after dropping
  std::vector<std::int64_t> offsets;    // (n_experts + 1) block starts
  std::int64_t dropped = 0;             // pairs dropped by capacity

  std::int64_t rows() const { return static_cast<std::int64_t>(token.size()); }
};

DispatchPlan plan_dispatch(const Selection& selection, std::int64_t capacity);

}  // namespace motley
