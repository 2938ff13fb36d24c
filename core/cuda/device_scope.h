// DeviceScope: makes one CUDA device current for a scope and restores the
// previous one afterwards. Backend calls may come from any thread (Storage
// destructors run wherever the last reference dies), and the current
// device is per thread, so every entry point that touches the device opens
// one. Cheap when the device is already current (one cudaGetDevice).
// Never throws: a failure to switch surfaces in the CUDA call that follows.
#pragma once

#include <cuda_runtime_api.h>

namespace motley {

class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) {
      switched_ = cudaSetDevice(device) == cudaSuccess;
      if (!switched_) (void)cudaGetLastError();
    }
  }
  ~DeviceScope() {
    if (switched_ && previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace motley
