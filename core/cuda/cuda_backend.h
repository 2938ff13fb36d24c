// The CUDA backend: cuBLAS GEMMs and .cu kernels, device memory from a
// caching allocator. Declared here so that core/backend.cpp can route
// cuda:N devices to it; compiled only when MOTLEY_CUDA is ON.
#pragma once

#include "core/backend.h"

namespace motley {

// Backend of CUDA device `index`; throws kRuntime when it does not exist.
Backend& cuda_backend(int index);
// Number of visible CUDA devices; 0 when the driver or devices are missing
// (never throws).
int cuda_backend_device_count();

}  // namespace motley
