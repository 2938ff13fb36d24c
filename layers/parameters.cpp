#include "layers/parameters.h"

#include "core/philox.h"

namespace motley {

void initialize_parameter(Tensor& t, const std::string& name, const Init& init,
                          std::uint64_t seed) {
  const PhiloxKey key = philox_key(seed, "init/" + name);
  switch (init.kind) {
    case InitKind::kNormal: fill_normal(t, key, 0.0, init.scale); break;
    case InitKind::kUniform: fill_uniform(t, key, -init.scale, init.scale); break;
    case InitKind::kOnes: t.fill_(1.0); break;
  }
}

autograd::Variable ParameterSet::add(const std::string& name, Shape shape, const Init& init) {
  MOTLEY_CHECK(!contains(name), "parameter '", name, "' registered twice");
  Tensor t = Tensor::empty(std::move(shape), dtype_, device_);
  initialize_parameter(t, name, init, seed_);
  autograd::Variable v = autograd::Variable::parameter(t, name);
  index_[name] = params_.size();
  params_.push_back(v);
  return v;
}

const autograd::Variable& ParameterSet::get(const std::string& name) const {
  auto it = index_.find(name);
  MOTLEY_CHECK(it != index_.end(), "no parameter named '", name, "'");
  return params_[it->second];
}

std::int64_t ParameterSet::numel() const {
  std::int64_t n = 0;
  for (const auto& p : params_) n += p.numel();
  return n;
}

void ParameterSet::zero_grad(bool set_to_none) {
  for (auto& p : params_) p.zero_grad(set_to_none);
}

}  // namespace motley
