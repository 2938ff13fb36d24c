// The CPU backend: the reference implementation of every kernel.
// GEMM goes to OpenBLAS (cblas); elementwise and fused kernels are written
// here with Eigen maps or plain loops that the compiler vectorises.
#pragma once

#include "core/backend.h"

namespace motley {

// The process-wide CPU backend (stateless apart from allocation counters).
Backend& cpu_backend();

// Threads of the BLAS library's GEMM pool (OpenBLAS). motley's own kernels
// are single-threaded; see Note [BLAS threads] in cpu_backend.cpp.
int blas_threads();
void set_blas_threads(int n);

// The thread count a process should give its BLAS when `ranks_per_node`
// processes share this node's cores: OPENBLAS_NUM_THREADS (else
// OMP_NUM_THREADS) when set, else max(1, hardware threads / ranks_per_node).
// Returns 0 when the environment sets it (the library already honours it).
int default_blas_threads(int ranks_per_node);

}  // namespace motley
