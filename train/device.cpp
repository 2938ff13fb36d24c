#include "train/device.h"

#include "core/backend.h"
#include "core/check.h"
#if defined(MOTLEY_HAS_NCCL)
#include "parallel/nccl_communicator.h"
#endif

namespace motley::train {

Device compute_device(const TrainConfig& train, int local_rank) {
  if (train.device == DeviceType::kCPU) return Device::cpu();
#if !defined(MOTLEY_WITH_CUDA)
  MOTLEY_FAIL(kUsage,
              "train.device = cuda, but this motley was built without CUDA (nvcc was not found "
              "or MOTLEY_CUDA=OFF; the configure summary says which): use train.device=cpu or "
              "rebuild on a machine with the CUDA toolkit");
#endif
  const int count = cuda_device_count();
  MOTLEY_CHECK_KIND(kUsage, count > 0,
                    "train.device = cuda, but no CUDA device is usable here (this build has "
                    "CUDA; the driver reports 0 devices, CUDA_VISIBLE_DEVICES may hide them): use "
                    "train.device=cpu or run on a GPU machine");
  return Device::cuda(local_rank % count);
}

ops::MatmulPrecision matmul_precision_of(const TrainConfig& train) {
  return train.precision == Precision::kBF16 ? ops::MatmulPrecision::kBf16Inputs
                                             : ops::MatmulPrecision::kF32;
}

void check_precision(const TrainConfig& train, Device device) {
  if (train.precision == Precision::kF32) return;
  // cuda: bf16 x bf16 -> f32 GEMMs (Note [Matmul precision]).
  if (!device.is_cpu()) return;
  MOTLEY_FAIL(kUsage,
              "train.precision = bf16 is only emulated on the CPU (bf16-rounded operands in the "
              "fp32 sgemm: bf16's numbers, slower than f32). oneDNN's bf16 matmuls measured "
              "1.8-2.1x the fp32 sgemm on AVX512_BF16 CPUs (docs/perf.md, \"bf16 matmuls on the "
              "CPU\") and are the planned path, not called yet; use train.precision=f32");
}

std::shared_ptr<parallel::ProcessGroups> make_process_groups(
    std::shared_ptr<parallel::Communicator> host_world, const parallel::GroupLayout& layout,
    Device device) {
  if (device.is_cpu() || host_world->size() == 1) {
    return std::make_shared<parallel::ProcessGroups>(std::move(host_world), layout);
  }
#if defined(MOTLEY_HAS_NCCL)
  std::shared_ptr<parallel::Communicator> nccl =
      parallel::NcclCommunicator::create(*host_world, device.index);
  return std::make_shared<parallel::ProcessGroups>(std::move(nccl), layout, host_world);
#else
  MOTLEY_FAIL(kUsage, "train.device = cuda with ", host_world->size(),
              " ranks needs NCCL, which this build did not find (configure summary: NCCL); "
              "install NCCL next to the CUDA toolkit or set NCCL_HOME, and rebuild");
#endif
}

}  // namespace motley::train
