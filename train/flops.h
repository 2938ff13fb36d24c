// FLOP accounting for MFU: the model FLOPs of a training step, and the
// rate the device actually reaches on a large float32 GEMM (the
// denominator, measured beside the run rather than taken from a data sheet).
#pragma once

#include <cstdint>
#include <vector>

#include "core/config.h"
#include "core/device.h"
#include "layers/moe.h"

namespace motley::train {

// Model FLOPs of one training step of the whole model (all ranks): 6 per
// active parameter per token (forward and backward) plus attention's
// 12 * L * T * d per token (scores and values, forward and backward), as
// in the PaLM paper's MFU. Active parameters: everything but the embedding
// lookup, with each MoE layer counting the expert parameters its tokens
// actually used (`moe`, world-reduced stats: active_params_per_token).
//   total_parameters  Transformer::total_parameters() (the whole model)
//   expert_sizes      (E) hidden sizes of the experts
//   tokens            tokens in the step's global batch (batch_size * seq_len)
double step_model_flops(const ModelConfig& model, std::int64_t total_parameters,
                        const std::vector<std::int64_t>& expert_sizes, std::int64_t tokens,
                        std::int64_t seq_len, const std::vector<MoELayerStats>& moe);

// FLOP/s of a float32 n^3 GEMM through motley's backend for `device`
// (n = 1024 on the CPU, 4096 on a GPU), best of a few; measured once per
// device per process. On the CPU it uses the BLAS threads this process was
// given (Note [BLAS threads]).
double measured_peak_flops(Device device = Device::cpu());

}  // namespace motley::train
