#include "core/backend.h"

#include "core/cpu/cpu_backend.h"
#ifdef MOTLEY_WITH_CUDA
#include "core/cuda/cuda_backend.h"
#endif

namespace motley {

Backend& backend_for(Device device) {
  if (device.is_cpu()) return cpu_backend();
#ifdef MOTLEY_WITH_CUDA
  return cuda_backend(device.index);
#else
  MOTLEY_FAIL(kRuntime, "device ", device.str(),
              " requested, but this motley was built without CUDA "
              "(configure with -DMOTLEY_CUDA=ON on a machine with nvcc)");
#endif
}

int cuda_device_count() {
#ifdef MOTLEY_WITH_CUDA
  return cuda_backend_device_count();
#else
  return 0;
#endif
}

bool cuda_available() { return cuda_device_count() > 0; }

}  // namespace motley
