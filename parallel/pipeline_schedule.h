// The 1F1B pipeline schedule (SPEC section 3), a pure function.
//
// Stage s of S with n micro-batches runs min(S - s - 1, n) warm-up
// forwards, then alternates one forward and one backward, then drains the
// remaining backwards. Properties (tested): every micro-batch is forwarded
// and then backwarded exactly once, forwards and backwards each in
// increasing micro-batch order, and at most S - s micro-batches are in
// flight (forwarded, not yet backwarded) on stage s. With S = 1 it is
// F0 B0 F1 B1 ..., the single-process loop.
//
// Note [Pipeline messages]: stage s sends the activations of micro-batch j
// to s + 1 after F(j) and receives their gradient before B(j); the sends
// are non-blocking and waited at the end of the step, the receives
// blocking. Because each stage receives in micro-batch order what its
// neighbour sends in the same order, no cycle of waits exists.
#pragma once

#include <cstdint>
#include <vector>

namespace motley::parallel {

struct PipelineAction {
  enum Kind { kForward, kBackward } kind;
  std::int64_t micro_batch;
  bool operator==(const PipelineAction& o) const {
    return kind == o.kind && micro_batch == o.micro_batch;
  }
};

std::vector<PipelineAction> one_f_one_b(int stage, int n_stages, std::int64_t n_micro);

}  // namespace motley::parallel
