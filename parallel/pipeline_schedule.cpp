#include "parallel/pipeline_schedule.h"

#include <algorithm>

#include "core/check.h"

namespace motley::parallel {

std::vector<PipelineAction> one_f_one_b(int stage, int n_stages, std::int64_t n_micro) {
  MOTLEY_CHECK(n_stages >= 1 && stage >= 0 && stage < n_stages && n_micro >= 1, "stage ", stage,
               " of ", n_stages, ", ", n_micro, " micro-batches");
  const std::int64_t warmup = std::min<std::int64_t>(n_stages - stage - 1, n_micro);
  std::vector<PipelineAction> actions;
  for (std::int64_t j = 0; j < warmup; ++j) actions.push_back({PipelineAction::kForward, j});
  for (std::int64_t j = 0; j < n_micro - warmup; ++j) {
    actions.push_back({PipelineAction::kForward, warmup + j});
    actions.push_back({PipelineAction::kBackward, j});
  }
  for (std::int64_t j = n_micro - warmup; j < n_micro; ++j) {
    actions.push_back({PipelineAction::kBackward, j});
  }
  return actions;
}

}  // namespace motley::parallel
