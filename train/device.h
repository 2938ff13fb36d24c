// Where a rank computes, from train.device and train.precision (SPEC
// section 8.1), and the process groups that carry its tensors.
#pragma once

#include <memory>

#include "core/config.h"
#include "core/device.h"
#include "core/ops.h"
#include "parallel/process_groups.h"

namespace motley::train {

// The device this rank computes on. cpu: Device::cpu(). cuda: the GPU of
// ordinal local_rank % (devices CUDA reports), local_rank being the
// launcher's (parallel/launcher.h; 0 for a single process). A cuda request
// in a build without CUDA, or where no device is visible, is kUsage naming
// train.device and saying what was found.
Device compute_device(const TrainConfig& train, int local_rank = 0);

// The matmul precision (Note [Matmul precision] in core/ops.h) of
// train.precision: kBf16Inputs for bf16.
ops::MatmulPrecision matmul_precision_of(const TrainConfig& train);

// kUsage naming train.precision when the precision cannot be honoured on
// `device` (docs/perf.md, "bf16 matmuls on the CPU", says why for the CPU).
void check_precision(const TrainConfig& train, Device device);

// The process groups of a run on `device` over `host_world` (MPI, or a
// local / in-process communicator). On the CPU every group runs over
// `host_world`. On a GPU with more than one rank every group runs over
// NCCL (bootstrapped over `host_world`, which stays the groups' host()
// communicator for host-side agreement); a build without NCCL is kUsage.
// Collective over `host_world`.
std::shared_ptr<parallel::ProcessGroups> make_process_groups(
    std::shared_ptr<parallel::Communicator> host_world, const parallel::GroupLayout& layout,
    Device device);

}  // namespace motley::train
