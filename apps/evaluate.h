// Evaluation over SPEC section 4's windows: consecutive non-overlapping
// windows of T + 1 tokens; window i covers tokens [i*T, i*T + T]. Reports
// the mean cross-entropy over every predicted token, perplexity, and bits
// per byte when a tokenizer says how many bytes each token stands for.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include "data/token_file.h"
#include "data/tokenizer.h"
#include "layers/transformer.h"

namespace motley::apps {

struct EvalResult {
  double loss = 0.0;                // mean CE in nats
  double perplexity = 0.0;
  std::optional<double> bits_per_byte;
  std::int64_t tokens = 0;          // predicted tokens
  std::int64_t bytes = 0;           // bytes those tokens decode to
};

// Runs the model (no graph) over every window of `file`, `batch` windows
// per forward. `progress(done, total)` is called after each batch.
EvalResult evaluate(Transformer& model, const TokenFile& file, std::int64_t seq_len,
                    std::int64_t batch, const Tokenizer* tokenizer,
                    const std::function<void(std::int64_t, std::int64_t)>& progress = nullptr);

}  // namespace motley::apps
