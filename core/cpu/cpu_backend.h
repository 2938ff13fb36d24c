// The CPU backend: the reference implementation of every kernel.
// GEMM goes to OpenBLAS (cblas); elementwise and fused kernels are written
// here with Eigen maps or plain loops that the compiler vectorises.
#pragma once

#include "core/backend.h"

namespace motley {

// The process-wide CPU backend (stateless apart from allocation counters).
Backend& cpu_backend();

}  // namespace motley
