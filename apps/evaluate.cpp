#include "apps/evaluate.h"

#include <cmath>

#include "autograd/ops.h"
#include "core/ops.h"
#include "data/sampler.h"

namespace motley::apps {

EvalResult evaluate(Transformer& model, const TokenFile& file, std::int64_t seq_len,
                    std::int64_t batch, const Tokenizer* tokenizer,
                    const std::function<void(std::int64_t, std::int64_t)>& progress) {
  autograd::NoGradGuard no_grad;
  const std::int64_t windows = eval_window_count(file.size(), seq_len);
  MOTLEY_CHECK_KIND(kData, windows > 0, file.path(), " holds ", file.size(),
                    " tokens: too few for one evaluation window of ", seq_len + 1);
  const std::int64_t vocab = model.config().vocab_size;
  double nats = 0.0;
  EvalResult r;
  ForwardContext ctx;
  ctx.training = false;
  for (std::int64_t first = 0; first < windows; first += batch) {
    const std::int64_t count = std::min(batch, windows - first);
    const Batch b = eval_batch(file, first, count, seq_len);
    const Device device = model.params().device();
    const Tensor logits =
        model.logits(b.tokens.to(device), ctx).data().reshape({count * seq_len, vocab});
    const Tensor targets = b.targets.reshape({count * seq_len});
    const auto [loss_rows, lse] = ops::cross_entropy(logits, targets.to(device));
    nats += ops::sum(loss_rows.to(DType::kF64)).item();
    r.tokens += count * seq_len;
    if (tokenizer) {
      for (std::int64_t id : targets.to_vector<std::int64_t>()) {
        r.bytes += tokenizer->token_bytes(static_cast<std::int32_t>(id));
      }
    }
    if (progress) progress(first + count, windows);
  }
  r.loss = nats / static_cast<double>(r.tokens);
  r.perplexity = std::exp(r.loss);
  if (tokenizer && r.bytes > 0) r.bits_per_byte = nats / std::log(2.0) / static_cast<double>(r.bytes);
  return r;
}

}  // namespace motley::apps
