// Helpers shared by the autograd tests: seeded random f64 tensors and a
// weighted-sum reduction that turns any op output into a scalar whose
// gradient is not trivially uniform.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "autograd/engine.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "core/philox.h"
#include "core/tensor.h"
#include "gtest/gtest.h"

namespace motley::autograd::testing {

// N(mean, std^2) f64 on the cpu; the same seed always gives the same tensor.
inline Tensor randn(Shape shape, std::uint64_t seed, double mean = 0.0, double std = 1.0) {
  Tensor t = Tensor::empty(std::move(shape), DType::kF64);
  fill_normal(t, philox_key(seed, "autograd-test"), mean, std);
  return t;
}

// Like randn but every |value| >= margin (for ops with a kink or a pole at 0).
inline Tensor randn_away_from_zero(Shape shape, std::uint64_t seed, double margin = 0.1) {
  Tensor t = randn(shape, seed);
  std::vector<double> v = t.to_vector<double>();
  for (double& x : v) x = x >= 0 ? x + margin : x - margin;
  return Tensor::from_vector(v, shape);
}

inline Tensor ids(const std::vector<std::int64_t>& values, Shape shape) {
  return Tensor::from_vector(values, std::move(shape));
}

// sum(y * W) with fixed random W of y's shape: a scalar for gradcheck.
inline Variable weighted_sum(const Variable& y, std::uint64_t seed = 999) {
  Variable w(randn(y.shape(), seed));
  return sum(mul(y, w));
}

inline std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

// Gradcheck of weighted_sum(f(inputs)).
inline GradcheckResult check_op(const GradcheckFn& f, const std::vector<Tensor>& inputs,
                                GradcheckOptions options = {}) {
  return gradcheck([&](const std::vector<Variable>& in) { return weighted_sum(f(in)); }, inputs,
                   options);
}

}  // namespace motley::autograd::testing
