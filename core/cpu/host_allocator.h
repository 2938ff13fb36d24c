// HostAllocator: host memory for the CPU backend, kept mapped between
// training steps.
//
// Why: a training step frees its large tensors and the next step asks for
// similar sizes again. By default glibc serves blocks above its mmap
// threshold (128 KiB, rising with use) with fresh mmap()s, returns them on
// free(), and trims the top of its heap, so every step faulted and zeroed
// the pages of its activations anew: 14,600 minor page faults per step on
// configs/bench.json (docs/perf.md, "Host memory: faults per step").
//
// What it does: once per process, before the first allocation, it tells
// glibc (mallopt) to serve blocks up to 1 GiB from its heap and to keep
// up to 1 GiB of freed memory at the heap's top instead of returning it.
// glibc's heap then is the cache: it reuses, splits and coalesces freed
// blocks, which suits MoE steps whose expert buffers change size every
// step (a size-class cache of whole blocks measured worse: it held 900
// MiB of blocks of the wrong sizes and faulted as much). Nobody sets an
// environment variable.
//
// Contract:
//   * Every block is 64-byte aligned; kRuntime when the host is out of
//     memory.
//   * empty_cache() returns the heap's free memory to the system
//     (malloc_trim); `motley` calls it where a phase ends (docs/perf.md).
//   * MOTLEY_HOST_CACHE=0 in the environment leaves glibc's defaults.
//   * Counters are exact for this allocator's blocks; bytes_cached is the
//     free memory glibc holds in its main heap (mallinfo2), which other
//     code's frees share.
//   * Thread-safe.
#pragma once

#include <atomic>
#include <cstddef>

#include "core/backend.h"

namespace motley {

class HostAllocator {
 public:
  // keep_freed: configure glibc as above (once per process).
  explicit HostAllocator(bool keep_freed);
  HostAllocator(const HostAllocator&) = delete;
  HostAllocator& operator=(const HostAllocator&) = delete;

  // False when MOTLEY_HOST_CACHE=0 is set.
  static bool keep_freed_by_default();

  void* allocate(std::size_t nbytes);
  // nbytes must be the size passed to allocate(). Never throws.
  void release(void* ptr, std::size_t nbytes) noexcept;
  // Returns the C library's free heap memory to the system.
  void empty_cache();

  std::size_t bytes_in_use() const { return bytes_in_use_.load(std::memory_order_relaxed); }
  MemoryStats stats() const;

 private:
  std::atomic<std::size_t> bytes_in_use_{0};
  std::atomic<std::size_t> peak_bytes_in_use_{0};
  std::atomic<std::size_t> allocations_{0};
};

}  // namespace motley
