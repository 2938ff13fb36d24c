// A float64 central-difference gradient checker for differentiable code.
//
//   GradcheckResult r = gradcheck(
//       [&](const std::vector<Variable>& in) { return sum(mul(in[0], in[1])); },
//       {x, y});                      // x, y: f64 CPU tensors
//   EXPECT_TRUE(r.ok) << r.message;
//
// For every element j of every input i, the analytic gradient (one
// backward pass of f at the inputs) is compared with the numeric one,
//   (f(x + h e_j) - f(x - h e_j)) / 2h,
// and the element passes when |analytic - numeric| <= atol + rtol |numeric|.
// The result reports the worst element (largest error relative to its
// tolerance) whether or not the check passed.
//
// Contract:
//   * inputs are floating f64 tensors on the CPU (kShape otherwise); they
//     are copied into fresh contiguous leaves that require grad, so the
//     caller's tensors are never modified. Integer arguments (targets,
//     indices) and fixed weights belong in f's captures.
//   * f must return a one-element Variable and be deterministic; it is
//     evaluated 2 * (total input elements) + 1 times, the numeric ones
//     under NoGradGuard.
//   * Non-contiguous inputs to the op under test are made inside f (e.g.
//     transpose(in[0], 0, 1)), since the leaves themselves are contiguous.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "autograd/variable.h"
#include "core/tensor.h"

namespace motley::autograd {

struct GradcheckOptions {
  double step = 1e-6;  // h
  double atol = 1e-6;
  double rtol = 1e-6;
};

struct GradcheckResult {
  bool ok = true;
  std::string message;      // summary; names the worst element on failure
  std::int64_t input = -1;  // worst element: which input
  std::int64_t index = -1;  //   flat (row-major) index within it
  double analytic = 0.0;
  double numeric = 0.0;
  double error = 0.0;        //   |analytic - numeric|
  std::int64_t checked = 0;  // elements compared
};

using GradcheckFn = std::function<Variable(const std::vector<Variable>&)>;

GradcheckResult gradcheck(const GradcheckFn& f, const std::vector<Tensor>& inputs,
                          const GradcheckOptions& options = {});

}  // namespace motley::autograd
