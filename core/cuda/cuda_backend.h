// The CUDA backend: cuBLAS GEMMs and .cu kernels, device memory from a
// caching allocator. Declared here so that core/backend.cpp can route
// cuda:N devices to it; compiled only when MOTLEY_CUDA is ON.
//
// Each device has one backend, created on first use and kept until the
// process exits (deliberately never destroyed: tensors in static objects
// may outlive any destruction order, and the CUDA runtime may already be
// torn down at exit). A backend owns one CUDA stream; every kernel, copy
// and cuBLAS call of that backend is enqueued on it, in issue order.
// copy_from_host, copy_to_host, all_finite and synchronize wait for the
// stream; cross_entropy, index_select_rows and index_add_rows also wait, to
// report out-of-range indices as kShape errors from the call that got them
// (Note [Index checks] in cuda_backend.cpp).
#pragma once

#include <cstddef>

#include "core/backend.h"

namespace motley {

// Backend of CUDA device `index`; throws kRuntime when it does not exist.
Backend& cuda_backend(int index);
// Number of visible CUDA devices; 0 when the driver or devices are missing
// (never throws).
int cuda_backend_device_count();

// The stream of device `index`'s backend, as a cudaStream_t cast to void*
// (so that this header needs no CUDA include). Code that issues its own
// work on device memory (NCCL) orders it against this stream.
void* cuda_backend_stream(int index);

// Memory counters of device `index`'s caching allocator (MemoryStats in
// core/backend.h; num_device_allocs counts cudaMalloc calls).
using CudaMemoryStats = MemoryStats;
CudaMemoryStats cuda_memory_stats(int index);
// Returns device `index`'s cached free blocks to the driver.
void cuda_empty_cache(int index);

}  // namespace motley
