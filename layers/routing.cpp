#include "layers/routing.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/check.h"

namespace motley {
namespace {

// Expert ids of one token sorted by probability, descending, ties to the
// lower index.
void sorted_experts(const double* row, std::int64_t n_experts, std::vector<std::int64_t>& order) {
  order.resize(n_experts);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [row](std::int64_t a, std::int64_t b) { return row[a] > row[b]; });
}

void check_probs(const std::vector<double>& probs, std::int64_t n_tokens, std::int64_t n_experts) {
  MOTLEY_CHECK(static_cast<std::int64_t>(probs.size()) == n_tokens * n_experts, "probs has ",
               probs.size(), " values for ", n_tokens, " tokens x ", n_experts, " experts");
}

}  // namespace

std::vector<std::int64_t> Selection::counts() const {
  std::vector<std::int64_t> c(n_experts, 0);
  for (std::int64_t e : experts) ++c[e];
  return c;
}

Selection select_topk(const std::vector<double>& probs, std::int64_t n_tokens,
                      std::int64_t n_experts, std::int64_t k) {
  check_probs(probs, n_tokens, n_experts);
  MOTLEY_CHECK(k >= 1 && k <= n_experts, "top_k ", k, " for ", n_experts, " experts");
  Selection s;
  s.n_tokens = n_tokens;
  s.n_experts = n_experts;
  s.offsets.resize(n_tokens + 1);
  s.experts.reserve(n_tokens * k);
  std::vector<std::int64_t> order;
  for (std::int64_t n = 0; n < n_tokens; ++n) {
    s.offsets[n] = static_cast<std::int64_t>(s.experts.size());
    sorted_experts(&probs[n * n_experts], n_experts, order);
    s.experts.insert(s.experts.end(), order.begin(), order.begin() + k);
  }
  s.offsets[n_tokens] = static_cast<std::int64_t>(s.experts.size());
  return s;
}

Selection select_topp(const std::vector<double>& probs, std::int64_t n_tokens,
                      std::int64_t n_experts, double top_p, std::int64_t max_k) {
  check_probs(probs, n_tokens, n_experts);
  if (max_k <= 0 || max_k > n_experts) max_k = n_experts;
  Selection s;
  s.n_tokens = n_tokens;
  s.n_experts = n_experts;
  s.offsets.resize(n_tokens + 1);
  std::vector<std::int64_t> order;
  for (std::int64_t n = 0; n < n_tokens; ++n) {
    s.offsets[n] = static_cast<std::int64_t>(s.experts.size());
    const double* row = &probs[n * n_experts];
    sorted_experts(row, n_experts, order);
    double mass = 0.0;
    for (std::int64_t j = 0; j < max_k; ++j) {
      s.experts.push_back(order[j]);
      mass += row[order[j]];
      if (mass >= top_p) break;
    }
  }
  s.offsets[n_tokens] = static_cast<std::int64_t>(s.experts.size());
  return s;
}

std::int64_t expert_capacity(double capacity_factor, std::int64_t n_pairs,
                             std::int64_t n_experts) {
  if (capacity_factor <= 0) return -1;
  return static_cast<std::int64_t>(
      std::ceil(capacity_factor * static_cast<double>(n_pairs) / static_cast<double>(n_experts)));
}

DispatchPlan plan_dispatch(const Selection& s, std::int64_t capacity) {
  const std::int64_t n_experts = s.n_experts;
  std::vector<char> keep(s.n_pairs(), 1);
  DispatchPlan plan;
  if (capacity >= 0) {
    std::vector<std::int64_t> used(n_experts, 0);
    std::int64_t max_slots = 0;
    for (std::int64_t n = 0; n < s.n_tokens; ++n) {
      max_slots = std::max(max_slots, s.offsets[n + 1] - s.offsets[n]);
    }
    for (std::int64_t slot = 0; slot < max_slots; ++slot) {
      for (std::int64_t n = 0; n < s.n_tokens; ++n) {
        const std::int64_t p = s.offsets[n] + slot;
        if (p >= s.offsets[n + 1]) continue;
        const std::int64_t e = s.experts[p];
        if (used[e] < capacity) {
          ++used[e];
        } else {
          keep[p] = 0;
          ++plan.dropped;
        }
      }
    }
  }
  plan.counts.assign(n_experts, 0);
  for (std::int64_t p = 0; p < s.n_pairs(); ++p) {
    if (keep[p]) ++plan.counts[s.experts[p]];
  }
  plan.offsets.assign(n_experts + 1, 0);
  for (std::int64_t e = 0; e < n_experts; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
  const std::int64_t rows = plan.offsets[n_experts];
  plan.token.resize(rows);
  plan.pair.resize(rows);
  std::vector<std::int64_t> cursor(plan.offsets.begin(), plan.offsets.end() - 1);
  // Counting sort by expert; visiting tokens in order keeps each block
  // sorted by token.
  for (std::int64_t n = 0; n < s.n_tokens; ++n) {
    for (std::int64_t p = s.offsets[n]; p < s.offsets[n + 1]; ++p) {
      if (!keep[p]) continue;
      const std::int64_t row = cursor[s.experts[p]]++;
      plan.token[row] = n;
      plan.pair[row] = p;
    }
  }
  return plan;
}

}  // namespace motley
