// What `motley train` prints and logs about a run: the model and layout
// summary, one line and one metrics.jsonl row per logged step (SPEC
// section 7), re-placements, evaluations. World rank 0 calls these; they
// talk to no communicator.
#pragma once

#include <cstdint>

#include "apps/evaluate.h"
#include "apps/train_support.h"
#include "train/trainer.h"

namespace motley::apps {

void print_model_summary(const train::Trainer& trainer);

// Throughput of the interval the row covers.
struct StepRates {
  double tokens_per_s = 0, mfu = 0, eta_s = 0;
};

// Prints the step line and appends the metrics row (with "placement" when
// the step re-placed experts, which it also prints).
void log_step(MetricsLog& metrics, const train::Trainer& trainer, const train::StepResult& r,
              const StepRates& rates);

void log_eval(MetricsLog& metrics, std::int64_t step, const EvalResult& e, bool final);

}  // namespace motley::apps
