// Helpers shared by the layer tests: deterministic random f64 tensors and
// host-side reference arithmetic.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "autograd/variable.h"
#include "core/philox.h"
#include "core/tensor.h"

namespace motley::testing {

inline Tensor random_tensor(Shape shape, const std::string& key, double std = 1.0,
                            DType dtype = DType::kF64) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  fill_normal(t, philox_key(42, key), 0.0, std);
  return t;
}

inline autograd::Variable random_param(Shape shape, const std::string& key, double std = 0.5) {
  return autograd::Variable::parameter(random_tensor(std::move(shape), key, std), key);
}

// Row-major (rows, cols) matrix times vector: W x.
inline std::vector<double> matvec(const std::vector<double>& w, std::int64_t rows,
                                  std::int64_t cols, const double* x) {
  std::vector<double> y(rows, 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) y[r] += w[r * cols + c] * x[c];
  }
  return y;
}

inline double silu(double x) { return x / (1.0 + std::exp(-x)); }

}  // namespace motley::testing
