// Routing statistics of a training step: summed over micro-batches on one
// rank, then over the ranks of the job.
#pragma once

#include <vector>

#include "core/config.h"
#include "layers/moe.h"
#include "parallel/communicator.h"

namespace motley::train {

// Adds one micro-batch's statistics (one entry per MoE layer it ran, in
// layer order) into `into`: counts summed, per-token values averaged
// weighted by tokens. `into` empty: a copy of `add`.
void accumulate_stats(std::vector<MoELayerStats>& into, const std::vector<MoELayerStats>& add);

// Replaces `moe` (this rank's layers, possibly a subset of the model's)
// by one entry per MoE layer of the whole model, summed over every rank of
// `world` (token-weighted means for the per-token values). Collective over
// `world` (host tensors: an MPI or in-process communicator). Exact for the
// counts: they travel as integers in doubles.
void reduce_stats(std::vector<MoELayerStats>& moe, const ModelConfig& model,
                  parallel::Communicator& world);

}  // namespace motley::train
