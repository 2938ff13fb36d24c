#include "core/cuda/cuda_allocator.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/device_scope.h"
#include "core/size_class.h"

namespace motley {
namespace {

std::string mib(std::size_t bytes) {
  return absl::StrCat(bytes / (1024 * 1024), ".", (bytes % (1024 * 1024)) * 10 / (1024 * 1024),
                      " MiB");
}

}  // namespace

CudaCachingAllocator::CudaCachingAllocator(int device) : device_(device) {}

// Never runs in practice (backends live until exit); frees what it can.
CudaCachingAllocator::~CudaCachingAllocator() {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope scope(device_);
  for (auto& [size, blocks] : free_blocks_) {
    for (void* p : blocks) (void)cudaFree(p);
  }
  free_blocks_.clear();
}

std::size_t CudaCachingAllocator::round_size(std::size_t nbytes) {
  return caching_size_class(nbytes);
}

void* CudaCachingAllocator::allocate(std::size_t nbytes) {
  const std::size_t size = round_size(nbytes);
  std::lock_guard<std::mutex> lock(mu_);
  void* ptr = nullptr;
  auto it = free_blocks_.find(size);
  if (it != free_blocks_.end() && !it->second.empty()) {
    ptr = it->second.back();
    it->second.pop_back();
    bytes_cached_ -= size;
    ++num_cache_hits_;
  } else {
    DeviceScope scope(device_);
    cudaError_t err = cudaMalloc(&ptr, size);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      free_cached_locked();
      err = cudaMalloc(&ptr, size);
    }
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      std::size_t free_bytes = 0, total_bytes = 0;
      if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) (void)cudaGetLastError();
      MOTLEY_FAIL(kRuntime, "CUDA out of memory on cuda:", device_, ": tried to allocate ",
                  mib(nbytes), " (", nbytes, " bytes, size class ", size, "); the device has ",
                  mib(free_bytes), " free of ", mib(total_bytes), " total; this process holds ",
                  mib(bytes_live_),
                  " in live tensors (cache emptied). Reduce "
                  "train.batch_size or model size, or raise train.micro_batches");
    }
    MOTLEY_CUDA_CHECK(err);
    ++num_device_allocs_;
  }
  live_.emplace(ptr, size);
  bytes_in_use_ += nbytes;
  bytes_live_ += size;
  if (bytes_in_use_ > peak_bytes_in_use_) peak_bytes_in_use_ = bytes_in_use_;
  return ptr;
}

void CudaCachingAllocator::release(void* ptr, std::size_t nbytes) noexcept {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(ptr);
  if (it == live_.end()) {
    std::fprintf(stderr,
                 "motley: internal error: cuda:%d deallocate of %p (%zu bytes), which this "
                 "allocator did not hand out or already took back; ignored\n",
                 device_, ptr, nbytes);
    return;
  }
  const std::size_t size = it->second;
  live_.erase(it);
  bytes_in_use_ -= nbytes <= bytes_in_use_ ? nbytes : bytes_in_use_;
  bytes_live_ -= size;
  try {
    free_blocks_[size].push_back(ptr);
    bytes_cached_ += size;
  } catch (...) {
    // Out of host memory for the free list: give the block back instead.
    DeviceScope scope(device_);
    (void)cudaFree(ptr);
  }
}

void CudaCachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope scope(device_);
  free_cached_locked();
}

void CudaCachingAllocator::free_cached_locked() {
  // Kernels still queued may use blocks freed to the cache moments ago
  // (see the header): wait for them before the driver reclaims the memory.
  MOTLEY_CUDA_CHECK(cudaDeviceSynchronize());
  auto blocks = std::move(free_blocks_);
  free_blocks_.clear();
  bytes_cached_ = 0;
  cudaError_t first_error = cudaSuccess;
  for (auto& [size, list] : blocks) {
    for (void* p : list) {
      const cudaError_t err = cudaFree(p);
      if (err != cudaSuccess && first_error == cudaSuccess) first_error = err;
    }
  }
  MOTLEY_CUDA_CHECK(first_error);
}

std::size_t CudaCachingAllocator::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_in_use_;
}

void CudaCachingAllocator::stats(MemoryStats* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  out->bytes_in_use = bytes_in_use_;
  out->peak_bytes_in_use = peak_bytes_in_use_;
  out->bytes_reserved = bytes_live_ + bytes_cached_;
  out->bytes_cached = bytes_cached_;
  out->num_device_allocs = num_device_allocs_;
  out->num_cache_hits = num_cache_hits_;
}

}  // namespace motley
