#include "layers/modules.h"

#include <cmath>

#include "autograd/ops.h"

namespace motley {

namespace ag = autograd;

Variable attention_block(const AttentionWeights& w, const Variable& x, std::int64_t n_heads,
                         double rope_theta) {
  const std::int64_t b = x.size(0), t = x.size(1), d = x.size(2);
  const std::int64_t hd = d / n_heads;
  // (B, T, d) -> (B, H, T, hd)
  auto heads = [&](const Variable& y) {
    return ag::contiguous(ag::transpose(ag::view(y, {b, t, n_heads, hd}), 1, 2));
  };
  Variable q = ag::rope(heads(ag::linear(x, w.wq)), rope_theta);
  Variable k = ag::rope(heads(ag::linear(x, w.wk)), rope_theta);
  Variable v = heads(ag::linear(x, w.wv));
  Variable o = ag::attention(q, k, v, 1.0 / std::sqrt(static_cast<double>(hd)));  // (B, H, T, hd)
  o = ag::reshape(ag::transpose(o, 1, 2), {b, t, d});
  return ag::linear(o, w.wo);
}

Variable swiglu_ffn(const SwiGluWeights& w, const Variable& x) {
  return ag::linear(ag::swiglu(ag::linear(x, w.w1), ag::linear(x, w.w3)), w.w2);
}

Variable gru_cell(const GruWeights& w, const Variable& x, const Variable& h) {
  const std::int64_t p = h.size(-1);
  Variable gi = ag::add(ag::linear(x, w.weight_ih), w.bias_ih);  // (N, 3p)
  Variable gh = ag::add(ag::linear(h, w.weight_hh), w.bias_hh);  // (N, 3p)
  auto gate = [&](const Variable& g, std::int64_t i) { return ag::narrow(g, -1, i * p, p); };
  Variable r = ag::sigmoid(ag::add(gate(gi, 0), gate(gh, 0)));
  Variable z = ag::sigmoid(ag::add(gate(gi, 1), gate(gh, 1)));
  Variable n = ag::tanh(ag::add(gate(gi, 2), ag::mul(r, gate(gh, 2))));
  // (1 - z) * n + z * h = n + z * (h - n)
  return ag::add(n, ag::mul(z, ag::sub(h, n)));
}

}  // namespace motley
