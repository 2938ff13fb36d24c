#include "core/cpu/host_allocator.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/check.h"

namespace motley {
namespace {

constexpr int kHeapLimit = 1 << 30;  // blocks up to 1 GiB from the heap; 1 GiB kept on free

void keep_freed_memory() {
#if defined(__GLIBC__)
  // Both return 1 on success; a C library that refuses keeps its defaults,
  // which costs page faults, not correctness.
  (void)mallopt(M_MMAP_THRESHOLD, kHeapLimit);
  (void)mallopt(M_TRIM_THRESHOLD, kHeapLimit);
#endif
}

}  // namespace

bool HostAllocator::keep_freed_by_default() {
  const char* env = std::getenv("MOTLEY_HOST_CACHE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

HostAllocator::HostAllocator(bool keep_freed) {
  static std::once_flag once;
  if (keep_freed) std::call_once(once, keep_freed_memory);
}

void* HostAllocator::allocate(std::size_t nbytes) {
  // aligned_alloc wants a multiple of the alignment.
  const std::size_t rounded = (nbytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  MOTLEY_CHECK_KIND(kRuntime, p != nullptr, "cpu: out of host memory allocating ", nbytes,
                    " bytes (", bytes_in_use(), " bytes in use)");
  allocations_.fetch_add(1, std::memory_order_relaxed);
  const std::size_t now = bytes_in_use_.fetch_add(nbytes, std::memory_order_relaxed) + nbytes;
  std::size_t peak = peak_bytes_in_use_.load(std::memory_order_relaxed);
  while (now > peak &&
         !peak_bytes_in_use_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  return p;
}

void HostAllocator::release(void* ptr, std::size_t nbytes) noexcept {
  if (ptr == nullptr) return;
  std::free(ptr);
  bytes_in_use_.fetch_sub(nbytes, std::memory_order_relaxed);
}

void HostAllocator::empty_cache() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

MemoryStats HostAllocator::stats() const {
  MemoryStats s;
  s.bytes_in_use = bytes_in_use();
  s.peak_bytes_in_use = peak_bytes_in_use_.load(std::memory_order_relaxed);
  s.num_device_allocs = allocations_.load(std::memory_order_relaxed);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 info = mallinfo2();
  s.bytes_cached = info.fordblks;                   // free bytes in the main heap
  s.bytes_reserved = info.arena + info.hblkhd;      // heap + mmapped blocks
#endif
  return s;
}

}  // namespace motley
