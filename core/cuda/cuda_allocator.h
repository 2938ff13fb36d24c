// CudaCachingAllocator: device memory for one CUDA device, with freed
// blocks kept for reuse instead of returned to the driver (cudaMalloc and
// cudaFree synchronise and cost tens of microseconds).
//
// Contract:
//   * Requests are rounded up to a size class (round_size) and served from
//     that class's free list when possible; otherwise from cudaMalloc.
//   * release() puts a block back on its free list at once. This is safe
//     because all work touching backend memory is ordered on the backend's
//     single stream: a later user of the block is enqueued after every
//     earlier user. Work on any other stream (NCCL, say) must be
//     synchronised with the backend stream before the memory it touches is
//     freed.
//   * When cudaMalloc fails, every cached block is freed (after a device
//     synchronize) and the request retried once; a second failure throws
//     kRuntime naming the request, the device's free/total memory and the
//     allocator's own usage.
//   * Thread-safe (one mutex).
#pragma once

#include <cstddef>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace motley {

struct MemoryStats;

class CudaCachingAllocator {
 public:
  explicit CudaCachingAllocator(int device);
  ~CudaCachingAllocator();
  CudaCachingAllocator(const CudaCachingAllocator&) = delete;
  CudaCachingAllocator& operator=(const CudaCachingAllocator&) = delete;

  // The size class of a request (caching_size_class, core/size_class.h).
  static std::size_t round_size(std::size_t nbytes);

  void* allocate(std::size_t nbytes);
  // nbytes must be the size passed to allocate(). Never throws (called
  // from Storage's destructor): a pointer this allocator did not hand out
  // is reported on stderr and otherwise ignored.
  void release(void* ptr, std::size_t nbytes) noexcept;
  // Returns every cached block to the driver.
  void empty_cache();

  std::size_t bytes_in_use() const;
  void stats(MemoryStats* out) const;

 private:
  // Frees the cached blocks; mu_ held; the device is current.
  void free_cached_locked();

  int device_;
  mutable std::mutex mu_;
  std::unordered_map<std::size_t, std::vector<void*>> free_blocks_;  // size class -> blocks
  std::unordered_map<void*, std::size_t> live_;                      // ptr -> size class
  std::size_t bytes_in_use_ = 0;  // sum of requested sizes of live blocks
  std::size_t bytes_live_ = 0;    // sum of size classes of live blocks
  std::size_t bytes_cached_ = 0;  // sum of size classes on free lists
  std::size_t num_device_allocs_ = 0;
  std::size_t num_cache_hits_ = 0;
  std::size_t peak_bytes_in_use_ = 0;
};

}  // namespace motley
