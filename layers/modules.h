// The dense building blocks of the transformer (SPEC section 1), as free
// functions of their parameters so that each can be gradient-checked on
// its own. Linear weights use PyTorch's (out, in) layout.
#pragma once

#include <cstdint>

#include "autograd/variable.h"

namespace motley {

using autograd::Variable;

struct AttentionWeights {
  Variable wq, wk, wv, wo;  // each (d, d)
};

// x (B, T, d) -> (B, T, d): causal multi-head self-attention with RoPE
// (rotate-half, inv_freq_i = theta^(-2i/hd), position = index in the
// sequence) on q and k, softmax scale 1/sqrt(hd).
Variable attention_block(const AttentionWeights& w, const Variable& x, std::int64_t n_heads,
                         double rope_theta);

struct SwiGluWeights {
  Variable w1, w3;  // (h, d)
  Variable w2;      // (d, h)
};

// x (..., d) -> (..., d): W2 (silu(W1 x) * (W3 x)).
Variable swiglu_ffn(const SwiGluWeights& w, const Variable& x);

struct GruWeights {
  Variable weight_ih, weight_hh;  // (3p, p), gates stacked r, z, n
  Variable bias_ih, bias_hh;      // (3p)
};

// PyTorch GRUCell: x, h (N, p) -> h' (N, p).
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
Variable gru_cell(const GruWeights& w, const Variable& x, const Variable& h);

}  // namespace motley
