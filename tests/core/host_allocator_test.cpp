// HostAllocator (core/cpu/host_allocator.h): aligned blocks, exact
// counters, empty_cache. What it is for (no page faults in a steady
// training step) is a benchmark figure, not a unit test: `motley bench`
// prints minor page faults per step (docs/perf.md).
#include "core/cpu/host_allocator.h"

#include <cstdint>
#include <cstring>

#include <gtest/gtest.h>

#include "core/size_class.h"

namespace motley {
namespace {

TEST(HostAllocator, AlignedBlocksAndExactCounters) {
  HostAllocator a(/*keep_freed=*/true);
  const MemoryStats before = a.stats();
  void* p = a.allocate(1000);
  void* q = a.allocate(3 << 20);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(q) % 64, 0u);
  EXPECT_EQ(a.bytes_in_use(), before.bytes_in_use + 1000 + (3 << 20));
  a.release(p, 1000);
  EXPECT_EQ(a.bytes_in_use(), before.bytes_in_use + (3 << 20));
  a.release(q, 3 << 20);
  const MemoryStats after = a.stats();
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use);
  EXPECT_GE(after.peak_bytes_in_use, 1000u + (3 << 20));
  EXPECT_EQ(after.num_device_allocs, before.num_device_allocs + 2);
  a.release(nullptr, 0);  // no-op
}

TEST(HostAllocator, EmptyCacheKeepsLiveBlocks) {
  HostAllocator a(true);
  void* p = a.allocate(16 << 20);
  std::memset(p, 7, 16 << 20);
  a.empty_cache();
  EXPECT_EQ(static_cast<unsigned char*>(p)[(16 << 20) - 1], 7);
  a.release(p, 16 << 20);
}

TEST(SizeClass, AtMostAQuarterOfSlack) {
  for (std::size_t n : {std::size_t{1}, std::size_t{513}, std::size_t{1} << 20,
                        (std::size_t{1} << 20) + 1, std::size_t{3} << 20, std::size_t{100} << 20}) {
    const std::size_t c = caching_size_class(n);
    EXPECT_GE(c, n);
    EXPECT_LE(c, n + n / 4 + 512) << n;
  }
  EXPECT_EQ(caching_size_class(0), 512u);
}

}  // namespace
}  // namespace motley
