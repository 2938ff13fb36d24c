// Expert parallelism over a Communicator (Note [Expert exchange] in
// layers/moe.h, Note [Expert placement] in placement.h).
//
// For one MoE layer and micro-batch, on every rank of an EP group:
//   1. allgather the per-expert row counts (E per rank)
//   2. all-to-all: the rows of expert e go to owner[e]            (dispatch)
//   3. the owner runs each of its experts once on the rows of all ranks
//      (grouped by expert, then by source rank)
//   4. all-to-all back: each row's result returns to where it came from
// Steps 2 and 4 are one differentiable op (exchange_rows) whose backward
// is the reverse all-to-all, so backward mirrors the forward. Zero rows to
// or from any rank are fine. Collective over the EP communicator; every
// rank must call run() for every MoE layer in the same order (they run
// the same model on the same schedule).
#pragma once

#include <cstdint>
#include <vector>

#include "autograd/variable.h"
#include "layers/moe.h"
#include "parallel/communicator.h"

namespace motley::parallel {

// Which rows go where: a pure description, built and tested without MPI.
struct ExchangePlan {
  // Row j of the send buffer is input row send_index[j]; the send buffer
  // holds send_counts[r] rows for rank r, in rank order.
  std::vector<std::int64_t> send_index;
  std::vector<std::int64_t> send_counts;
  // recv_counts[r] rows arrive from rank r (in rank order); output row i
  // is receive-buffer row recv_perm[i].
  std::vector<std::int64_t> recv_counts;
  std::vector<std::int64_t> recv_perm;

  // The plan that undoes this one (results back to their sources).
  ExchangePlan mirrored() const;
};

// The dispatch plan of rank `me` given every rank's counts
// (all_counts[r][e]) and the owner map. `local_counts` receives, for each
// global expert, the rows this rank computes (0 for experts it does not own).
ExchangePlan dispatch_plan(int me, const std::vector<std::vector<std::int64_t>>& all_counts,
                           const std::vector<int>& owner,
                           std::vector<std::int64_t>* local_counts);

// The differentiable all-to-all: x (R, d) -> (sum(recv_counts), d) per the
// plan; backward is the mirrored exchange. Collective over `comm`, which
// must outlive the graph. `bytes_sent` (may be null; must outlive the
// graph) accumulates the bytes this rank sends to OTHER ranks, forward
// and backward (rows it keeps are a local copy, not counted).
autograd::Variable exchange_rows(const autograd::Variable& x, const ExchangePlan& plan,
                                 Communicator& comm, std::int64_t* bytes_sent = nullptr);

class CommExpertExchange final : public ExpertExchange {
 public:
  // `owner[e]` is the rank in `ep` holding expert e; `ep` must outlive this.
  CommExpertExchange(Communicator& ep, std::vector<int> owner)
      : ep_(ep), owner_(std::move(owner)) {}
  autograd::Variable run(const autograd::Variable& rows, const std::vector<std::int64_t>& counts,
                         const ExpertFn& expert) override;

  // Bytes this rank has sent to other EP ranks (both all-to-alls, forward
  // and backward) since construction or the last reset: for each routed
  // row held by another rank, d elements out and back in forward, and
  // again in backward (docs/perf.md, "Expert-parallel traffic").
  std::int64_t bytes_sent() const { return bytes_sent_; }
  void reset_bytes_sent() { bytes_sent_ = 0; }

 private:
  Communicator& ep_;
  std::vector<int> owner_;
  std::int64_t bytes_sent_ = 0;
};

}  // namespace motley::parallel
