// Named parameters and their initialisation (SPEC sections 1 and 5).
//
// Every parameter is a leaf Variable named by its global name
// ("layers.3.moe.experts.5.w1"). Initialisation draws from a Philox stream
// keyed by (seed, "init/" + name), element i of the full global tensor at
// counter i, so any process that builds a parameter, whatever the parallel
// layout, gets the identical values. See Note [Parameter identity].
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "autograd/variable.h"
#include "core/tensor.h"

namespace motley {

// Note [Parameter identity]
// A parameter's identity is its global name. Initialisation, checkpoints,
// expert placement and gradient reduction all key on the name (never on
// the order of registration), so two processes holding different subsets
// of the model agree on every tensor they share.

enum class InitKind {
  kNormal,   // N(0, std)
  kUniform,  // U(-bound, bound), bound = std field
  kOnes,     // norm gains
};

struct Init {
  InitKind kind = InitKind::kNormal;
  double scale = 0.02;  // std for kNormal, bound for kUniform

  static Init normal(double std) { return {InitKind::kNormal, std}; }
  static Init uniform(double bound) { return {InitKind::kUniform, bound}; }
  static Init ones() { return {InitKind::kOnes, 0.0}; }
};

// Fills `t` per `init` from the stream keyed by (seed, "init/" + name).
void initialize_parameter(Tensor& t, const std::string& name, const Init& init,
                          std::uint64_t seed);

// The parameters one process holds, in registration order (deterministic),
// addressable by name.
class ParameterSet {
 public:
  ParameterSet(std::uint64_t seed, DType dtype, Device device)
      : seed_(seed), dtype_(dtype), device_(device) {}

  // Creates, initialises and registers a parameter; kInternal if the name
  // exists already.
  autograd::Variable add(const std::string& name, Shape shape, const Init& init);

  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // kInternal naming the parameter when absent.
  const autograd::Variable& get(const std::string& name) const;
  const std::vector<autograd::Variable>& all() const { return params_; }
  std::int64_t numel() const;
  void zero_grad(bool set_to_none = false);

  std::uint64_t seed() const { return seed_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

 private:
  std::uint64_t seed_;
  DType dtype_;
  Device device_;
  std::vector<autograd::Variable> params_;
  std::map<std::string, std::size_t> index_;
};

// Whether AdamW applies weight decay to a parameter: SPEC section 1.5
// decays parameters of 2 or more dimensions only.
inline bool decays(const autograd::Variable& p) { return p.dim() >= 2; }

}  // namespace motley
