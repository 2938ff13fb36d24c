// The size classes of motley's caching allocators (host and CUDA): a
// request is rounded up to its class, and freed blocks are reused for
// requests of the same class.
#pragma once

#include <cstddef>

namespace motley {

// Multiples of 512 bytes up to 1 MiB, then four classes per power of two
// (2^p * {1, 1.25, 1.5, 1.75}: at most 25 % slack), then multiples of
// 64 MiB from 1 GiB on. 0 counts as 1.
inline std::size_t caching_size_class(std::size_t nbytes) {
  constexpr std::size_t kSmallQuantum = 512;
  constexpr std::size_t kSmallLimit = std::size_t{1} << 20;
  constexpr std::size_t kHugeLimit = std::size_t{1} << 30;
  constexpr std::size_t kHugeQuantum = std::size_t{64} << 20;
  auto round_up = [](std::size_t n, std::size_t q) { return (n + q - 1) / q * q; };
  if (nbytes == 0) nbytes = 1;
  if (nbytes <= kSmallLimit) return round_up(nbytes, kSmallQuantum);
  if (nbytes >= kHugeLimit) return round_up(nbytes, kHugeQuantum);
  std::size_t p = kSmallLimit;
  while (p * 2 < nbytes) p *= 2;  // p < nbytes <= 2p
  return round_up(nbytes, p / 4);
}

}  // namespace motley
