// Error wrappers for CUDA runtime and cuBLAS calls (host code only).
//
//   MOTLEY_CUDA_CHECK(cudaMemcpyAsync(...));
//   MOTLEY_CUBLAS_CHECK(cublasGemmEx(...));
//
// A failing call throws motley::Error of kind kRuntime whose message holds
// the call's text, the library's error name and description, and (added by
// the error machinery) file and line. MOTLEY_CUDA_CHECK also clears the
// runtime's last-error state so that a later check does not report the
// same failure again. Sticky errors (an illegal address in a kernel) make
// every later CUDA call fail too: the process has to restart, and the
// message says so.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "core/check.h"

namespace motley::detail {

inline const char* cuda_error_hint(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorHardwareStackError:
      return " (a kernel faulted earlier on this device; the CUDA context is unusable and the "
             "process must restart; rerun with CUDA_LAUNCH_BLOCKING=1 to find the kernel)";
    case cudaErrorMemoryAllocation:
      return " (out of GPU memory)";
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return " (no usable CUDA driver or device: check nvidia-smi and CUDA_VISIBLE_DEVICES)";
    default:
      return "";
  }
}

}  // namespace motley::detail

#define MOTLEY_CUDA_CHECK(call)                                                                   \
  do {                                                                                            \
    const cudaError_t motley_cuda_err_ = (call);                                                  \
    if (motley_cuda_err_ != cudaSuccess) {                                                        \
      (void)cudaGetLastError();                                                                   \
      MOTLEY_FAIL(kRuntime, "CUDA call ", #call, " failed: ", cudaGetErrorName(motley_cuda_err_), \
                  ": ", cudaGetErrorString(motley_cuda_err_),                                     \
                  ::motley::detail::cuda_error_hint(motley_cuda_err_));                           \
    }                                                                                             \
  } while (0)

#define MOTLEY_CUBLAS_CHECK(call)                                                \
  do {                                                                           \
    const cublasStatus_t motley_cublas_status_ = (call);                         \
    if (motley_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                        \
      MOTLEY_FAIL(kRuntime, "cuBLAS call ", #call,                               \
                  " failed: ", cublasGetStatusName(motley_cublas_status_), ": ", \
                  cublasGetStatusString(motley_cublas_status_));                 \
    }                                                                            \
  } while (0)
