// Every parameter of the model of SPEC section 1, described once.
//
// Note [Parameter layout]
// parameter_layout(config) lists each parameter of the whole model (all
// stages, all experts) with its global name (SPEC section 5), shape,
// initialisation, and the part of the model it belongs to, in the order a
// single process registers them: embedding, the shared GRU cell, layer 0
// (norms, attention, then the dense FFN or the router and experts 0..E-1),
// ..., final norm and LM head. Everything that needs the list reads it
// here: the Transformer registers the entries its shard holds (in this
// order), checkpoints derive their global tensors from it, parameter
// counts sum it, and the pipeline's GRU reduction takes the cell's
// entries from it. Adding a parameter means adding it here (and wiring it
// into the Transformer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "layers/parameters.h"

namespace motley {

struct ParameterSpec {
  enum class Part { kEmbedding, kGruCell, kLayer, kHead };
  std::string name;
  Shape shape;
  Init init;
  Part part = Part::kLayer;
  std::int64_t layer = -1;   // kLayer: the layer index
  std::int64_t expert = -1;  // global expert id for expert weights; -1 otherwise
};

// The whole model's parameters, in registration order (Note [Parameter layout]).
std::vector<ParameterSpec> parameter_layout(const ModelConfig& config);

// The shared GRU cell's entries (moe_gru.*; Part::kGruCell), as
// parameter_layout lists them when the model has a gru router and an MoE
// layer; the pipeline's GRU reduction reads them without building the rest.
std::vector<ParameterSpec> gru_cell_layout(const ModelConfig& config);

// Whether a shard holding layers [layer_begin, layer_end) and the experts
// with hold_expert[e] (empty: all) holds `spec`: the embedding on the
// first block, the head on the last, the GRU cell on every block with an
// MoE layer, a layer's tensors on its block (expert weights only where
// held).
bool shard_holds(const ParameterSpec& spec, const ModelConfig& config, std::int64_t layer_begin,
                 std::int64_t layer_end, const std::vector<bool>& hold_expert);

}  // namespace motley
