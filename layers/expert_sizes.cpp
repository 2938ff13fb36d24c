#include "layers/expert_sizes.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/check.h"

namespace motley {

std::vector<std::int64_t> round_sizes_keeping_total(const std::vector<double>& raw,
                                                    std::int64_t total,
                                                    std::int64_t multiple) {
  const std::int64_t n = static_cast<std::int64_t>(raw.size());
  MOTLEY_CHECK(multiple >= 1 && total % multiple == 0, "total ", total,
               " is not a multiple of ", multiple);
  const std::int64_t units = total / multiple;
  MOTLEY_CHECK_KIND(kUsage, units >= n, "cannot give ", n, " experts at least ", multiple,
                    " hidden units each from a total of ", total,
                    ": raise model.moe.expert_hidden or lower model.moe.size_multiple");
  const double raw_sum = std::accumulate(raw.begin(), raw.end(), 0.0);
  std::vector<std::int64_t> out(n);
  std::vector<double> remainder(n);
  std::int64_t assigned = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double exact = raw[i] / raw_sum * static_cast<double>(units);
    out[i] = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::floor(exact)));
    remainder[i] = exact - static_cast<double>(out[i]);
    assigned += out[i];
  }
  // Largest remainders first (ties: lower index) get the units left over;
  // if the floor-of-1 rule over-assigned, the smallest remainders among
  // experts above one unit give units back.
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return remainder[a] > remainder[b]; });
  for (std::int64_t i = 0; assigned < units; i = (i + 1) % n) {
    ++out[order[i]];
    ++assigned;
  }
  for (std::int64_t i = n - 1; assigned > units; i = (i + n - 1) % n) {
    if (out[order[i]] > 1) {
      --out[order[i]];
      --assigned;
    }
  }
  for (std::int64_t& s : out) s *= multiple;
  return out;
}

std::vector<std::int64_t> expert_hidden_sizes(const MoEConfig& moe) {
  const std::int64_t e = moe.n_experts;
  if (e == 0) return {};
  if (moe.expert_sizes == ExpertSizing::kList) return moe.expert_size_list;
  if (moe.expert_sizes == ExpertSizing::kUniform) {
    return std::vector<std::int64_t>(e, moe.expert_hidden);
  }
  std::vector<double> raw(e);
  if (moe.expert_sizes == ExpertSizing::kModse) {
    MOTLEY_CHECK_KIND(kUsage, e % 2 == 0, "model.moe.expert_sizes = modse needs an even ",
                      "n_experts, got ", e);
    const std::int64_t pairs = e / 2;
    for (std::int64_t i = 0; i < pairs; ++i) {
      double big;
      if (e == 8) {
        big = std::vector<double>{1.8, 1.6, 1.2, 1.0}[i];
      } else {
        big = pairs == 1 ? 1.8 : 1.8 - 0.8 * static_cast<double>(i) / (pairs - 1);
      }
      raw[2 * i] = big;
      raw[2 * i + 1] = 2.0 - big;
    }
  } else if (moe.expert_sizes == ExpertSizing::kArithmetic) {
    for (std::int64_t i = 0; i < e; ++i) raw[i] = 9.0 + 2.0 * i;
  } else {
    MOTLEY_FAIL(kUsage, "unknown model.moe.expert_sizes '", moe.expert_sizes, "'");
  }
  const std::int64_t total = e * moe.expert_hidden;
  MOTLEY_CHECK_KIND(kUsage, total % moe.size_multiple == 0, "n_experts * expert_hidden = ",
                    total, " must be a multiple of model.moe.size_multiple = ",
                    moe.size_multiple, " to round ", moe.expert_sizes,
                    " sizes while keeping the total");
  return round_sizes_keeping_total(raw, total, moe.size_multiple);
}

}  // namespace motley
