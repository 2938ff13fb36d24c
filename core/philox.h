// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC'11): a counter-based generator. Every draw is a pure
// function of (key, counter), so any rank, layout or resume reproduces the
// same numbers without carrying generator state.
//
// motley derives keys from (seed, purpose) and uses the counter for the
// indices of the draw, e.g. parameter init: key = philox_key(seed,
// "init/" + name), counter = element index.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "core/tensor.h"

namespace motley {

using PhiloxCounter = std::array<std::uint32_t, 4>;
using PhiloxKey = std::array<std::uint32_t, 2>;

// The raw block function: 10 rounds.
PhiloxCounter philox4x32_10(PhiloxCounter counter, PhiloxKey key);

// Key from a seed and a purpose string (FNV-1a of the string mixed with the
// seed by SplitMix64). Different purposes give unrelated streams.
PhiloxKey philox_key(std::uint64_t seed, std::string_view purpose);
PhiloxKey philox_key(std::uint64_t seed);

// Counter from two 64-bit indices (e.g. step and sequence index).
inline PhiloxCounter philox_counter(std::uint64_t a, std::uint64_t b = 0) {
  return {static_cast<std::uint32_t>(a), static_cast<std::uint32_t>(a >> 32),
          static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(b >> 32)};
}

// 64 random bits for (key, a, b).
std::uint64_t philox_u64(PhiloxKey key, std::uint64_t a, std::uint64_t b = 0);
// Uniform in [0, 1) with 53 random bits.
double philox_uniform(PhiloxKey key, std::uint64_t a, std::uint64_t b = 0);
// Standard normal (Box-Muller on one 128-bit block).
double philox_normal(PhiloxKey key, std::uint64_t a, std::uint64_t b = 0);

// Fill a floating tensor (any device) so that logical element i (row-major)
// is philox_normal(key, i, stream) * std + mean. Computed on the host.
void fill_normal(Tensor& t, PhiloxKey key, double mean, double std,
                 std::uint64_t stream = 0);
// Element i = lo + (hi - lo) * philox_uniform(key, i, stream).
void fill_uniform(Tensor& t, PhiloxKey key, double lo, double hi,
                  std::uint64_t stream = 0);

}  // namespace motley
