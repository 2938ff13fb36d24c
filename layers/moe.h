// The Mixture-of-Experts FFN of one layer (SPEC sections 1.2 - 1.4).
//
//   m (N, d) --router--> logits (N, E) --softmax (fp32)--> probs
//     --select (topk | topp)--> pairs --dispatch plan (by expert)-->
//     rows (R, d) --experts, one contiguous block each--> (R, d)
//     --combine with gate weights--> out (N, d)
//
// Experts have their own hidden sizes; each runs once on its block of rows
// (a grouped GEMM over experts of different sizes, nothing padded). An
// expert that receives no rows is skipped in forward and gets a zero
// gradient. Selection and the dispatch plan are computed on the host from
// the probabilities (see layers/routing.h), so index tensors are built once
// per layer.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "autograd/variable.h"
#include "core/config.h"
#include "layers/modules.h"
#include "layers/routing.h"

namespace motley {

struct MoEWeights {
  Variable router;  // (E, d): linear, noisy
  Variable noise;   // (E, d): noisy
  Variable proj;    // (p, d): gru
  Variable gate;    // (E, p): gru
  // By global expert id; an expert this process does not hold has
  // undefined weights (expert parallelism).
  std::vector<SwiGluWeights> experts;
};

// Note [Expert exchange]
// The seam through which expert parallelism enters the MoE layer without
// layers/ depending on parallel/. moe_forward hands the exchange the
// dispatched rows grouped by global expert id (counts[e] rows of expert e,
// in id order, possibly 0) and a function computing experts on rows
// grouped the same way (its own counts: rows of expert e, 0 for experts
// it is not given; one grouped op, Note [Grouped experts] in
// autograd/ops.cpp); run() returns the expert outputs for exactly the
// given rows, in the same order. The default (no exchange) computes every expert locally.
// An implementation may send rows to the process holding the expert and
// bring the results back (parallel/expert_exchange.h); it must be
// differentiable (its backward mirrors the forward), and every process of
// an exchange group calls run() once per MoE layer per micro-batch, in
// the same order, even with zero rows.
class ExpertExchange {
 public:
  using ExpertFn =
      std::function<Variable(const Variable& rows, const std::vector<std::int64_t>& counts)>;
  virtual ~ExpertExchange() = default;
  virtual Variable run(const Variable& rows, const std::vector<std::int64_t>& counts,
                       const ExpertFn& expert) = 0;
};

// Note [MoE observer]
// Analysis tools (motley route) need each layer's router probabilities and
// selection per token. When MoEContext::observer is set, moe_forward
// appends one record per call; it changes nothing else. Null by default.
struct MoELayerRecord {
  std::int64_t layer = 0;
  std::int64_t n_tokens = 0;
  std::int64_t n_experts = 0;
  std::vector<double> probs;  // (n_tokens, n_experts) row-major router probabilities
  Selection selection;        // the experts each token selected (before dropping)
};
struct MoEObserver {
  std::vector<MoELayerRecord> records;  // in call order
};

struct MoEContext {
  bool training = true;
  std::int64_t step = 0;             // update number (noise stream)
  std::int64_t layer = 0;            // global layer index
  std::uint64_t seed = 0;
  std::int64_t sequence_offset = 0;  // global index of the batch's first sequence
  std::int64_t seq_len = 1;          // tokens per sequence (N = sequences * seq_len)
  // When set, these experts are used instead of selecting from the
  // probabilities: gradient checks hold the piecewise-constant selection
  // fixed while perturbing the inputs.
  const Selection* fixed_selection = nullptr;
  // Expert parallelism (Note [Expert exchange]); null: all experts local.
  ExpertExchange* exchange = nullptr;
  // Records probabilities and selections (Note [MoE observer]); null: none.
  MoEObserver* observer = nullptr;
};

// Routing statistics of one layer for one forward pass (metrics).
struct MoELayerStats {
  std::int64_t layer = 0;
  std::int64_t tokens = 0;
  std::vector<std::int64_t> expert_tokens;  // (E) rows computed by each expert
  std::int64_t dropped = 0;                 // pairs dropped by capacity
  double active_params_per_token = 0.0;     // expert parameters used per token
  double gate_entropy = 0.0;                // mean over tokens of -sum p log p
  double experts_per_token = 0.0;
};

struct MoEResult {
  Variable out;           // (N, d)
  Variable aux_loss;      // 0-d: the weighted sum of the enabled aux terms
  Variable router_state;  // gru: s_l (N, p); undefined otherwise
  Selection selection;    // the experts each token selected
  MoELayerStats stats;
};

// `sizes` are the hidden sizes of all E experts (expert_hidden_sizes()).
// For the gru router, `gru` is the shared cell and `prev_state` s_{l-1}
// (undefined: zeros); gru_state decides how it enters (SPEC 1.2).
MoEResult moe_forward(const MoEConfig& config, const std::vector<std::int64_t>& sizes,
                      const MoEWeights& weights, const GruWeights* gru, const Variable& m,
                      const Variable& prev_state, const MoEContext& ctx);

// Router logits (N, E) in m's dtype (noise included for noisy in training).
Variable router_logits(const MoEConfig& config, const MoEWeights& weights, const GruWeights* gru,
                       const Variable& m, const Variable& prev_state, const MoEContext& ctx,
                       Variable* new_state);

}  // namespace motley
