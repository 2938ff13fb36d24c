// Gradient reduction across data-parallel replicas (SPEC section 3).
//
// Note [Gradient scaling]
// A single process with M micro-batches runs backward(loss_m / M) for each
// and so ends with g = sum_m grad(loss_m) / M. A run with dp ranks and m
// micro-batches each runs backward(loss_j / (dp * m)) for each local
// micro-batch and then SUMS (not averages) over the replicas: the result is
// sum over all dp * m micro-batches of grad(loss) / (dp * m), the same g up
// to summation order. Dense parameters are summed over the stage's dp
// group; expert parameters over their expert_dp group (the dp / ep ranks
// holding the same experts: every token routed to expert e anywhere in
// the dp group reached one of them through the EP exchange, so their sum
// covers all dp * m micro-batches exactly once). The GRU cell shared by
// the MoE layers of several pipeline stages is then summed over the pp
// group as well.
//
// Note [Collective order]
// MPI matches collectives by issue order per communicator. Buckets are
// formed deterministically from the registration order (reversed, so the
// buckets of the last layers fill first in backward), separately for dense
// and expert parameters, and are launched strictly in bucket order: bucket
// k starts (non-blocking) once its gradients are complete and buckets
// 0..k-1 have started; finish() starts the rest. Ranks of one group hold
// the same parameters of that group's kind, so they issue the same
// allreduces in the same order, whatever the timing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "layers/parameters.h"
#include "parallel/process_groups.h"

namespace motley::parallel {

// Name classes for reduction and norm ownership.
bool is_expert_param(const std::string& name);  // layers.{l}.moe.experts.{e}.*
bool is_gru_param(const std::string& name);     // moe_gru.*

class GradReducer {
 public:
  // Installs every parameter's gradient as a view into a flat bucket
  // (zeroed) and registers a grad hook on each. `params` and `groups` must
  // outlive the reducer; the destructor removes the hooks.
  GradReducer(ParameterSet& params, const ProcessGroups& groups,
              std::int64_t bucket_elements = 1 << 20);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // The next backward pass is the step's last for these parameters: hooks
  // start bucket allreduces from now on.
  void arm();
  // Starts the buckets not started yet, waits for all, disarms. Collective
  // over the dp and expert_dp groups.
  void finish();

  std::size_t bucket_count() const { return buckets_.size(); }

 private:
  struct Bucket {
    Tensor flat;                  // (numel)
    Communicator* comm = nullptr;
    std::vector<std::size_t> params;
    std::size_t ready = 0;
  };
  void on_ready(std::size_t bucket);
  void launch_ready();

  ParameterSet& params_;
  std::vector<Bucket> buckets_;
  std::vector<Request> pending_;
  std::size_t next_launch_ = 0;
  bool armed_ = false;
};

// Sums the gradient of the shared GRU cell over the pp group (stages
// without the cell contribute zeros). Collective over groups.pp(); every
// rank calls it when the router is gru and pp > 1.
void reduce_shared_gru(ParameterSet& params, const ProcessGroups& groups,
                       const ModelConfig& config);

// The global sum of squares of all gradients with every parameter counted
// once: dense parameters by dp_rank 0 of their stage, experts by the first
// EP block (dp_rank < ep), the GRU cell by dp_rank 0 of `gru_stage` (the
// first stage holding it). Collective over groups.host().
double global_grad_sum_of_squares(const ParameterSet& params, const ProcessGroups& groups,
                                  int gru_stage);

}  // namespace motley::parallel
