#include "autograd/gradcheck.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_format.h"
#include "autograd/engine.h"

namespace motley::autograd {

namespace {

double evaluate(const GradcheckFn& f, const std::vector<Variable>& leaves) {
  Variable y = f(leaves);
  MOTLEY_CHECK_KIND(kShape, y.defined() && y.numel() == 1,
                    "gradcheck: f must return a one-element Variable, got ",
                    y.defined() ? y.data().str() : std::string("undefined"));
  return y.data().item();
}

}  // namespace

GradcheckResult gradcheck(const GradcheckFn& f, const std::vector<Tensor>& inputs,
                          const GradcheckOptions& options) {
  std::vector<Variable> leaves;
  leaves.reserve(inputs.size());
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    MOTLEY_CHECK_KIND(kShape, t.defined() && t.dtype() == DType::kF64 && t.device().is_cpu(),
                      "gradcheck: input ", i, " is ", t.str(), "; inputs must be f64 on the cpu");
    leaves.push_back(Variable(t.clone(), /*requires_grad=*/true, absl::StrCat("input", i)));
  }

  // Analytic: one backward pass.
  {
    Variable y = f(leaves);
    MOTLEY_CHECK_KIND(kShape, y.defined() && y.numel() == 1,
                      "gradcheck: f must return a one-element Variable, got ",
                      y.defined() ? y.data().str() : std::string("undefined"));
    MOTLEY_CHECK_KIND(kShape, y.requires_grad(),
                      "gradcheck: f's result does not depend on any input through ops "
                      "that record a graph");
    backward(y);
  }

  GradcheckResult result;
  double worst_ratio = -1.0;
  NoGradGuard no_grad;
  const double h = options.step;
  for (std::size_t i = 0; i < leaves.size(); ++i) {
    const Tensor& grad_tensor = leaves[i].grad();
    std::vector<double> analytic = grad_tensor.defined()
                                       ? grad_tensor.to_vector<double>()
                                       : std::vector<double>(leaves[i].numel(), 0.0);
    // The leaf's data is a contiguous f64 clone: perturb it in place.
    // (raw_data: the dtype was checked above.)
    double* x = static_cast<double*>(leaves[i].data().raw_data());
    for (std::int64_t j = 0; j < leaves[i].numel(); ++j) {
      const double saved = x[j];
      x[j] = saved + h;
      const double f_plus = evaluate(f, leaves);
      x[j] = saved - h;
      const double f_minus = evaluate(f, leaves);
      x[j] = saved;
      const double numeric = (f_plus - f_minus) / (2.0 * h);
      const double error = std::abs(analytic[j] - numeric);
      const double tolerance = options.atol + options.rtol * std::abs(numeric);
      const double ratio = std::isnan(error) ? INFINITY : error / tolerance;
      ++result.checked;
      if (ratio > worst_ratio) {
        worst_ratio = ratio;
        result.input = static_cast<std::int64_t>(i);
        result.index = j;
        result.analytic = analytic[j];
        result.numeric = numeric;
        result.error = error;
      }
    }
  }
  result.ok = worst_ratio <= 1.0;
  if (result.checked == 0) {
    result.message = "gradcheck: no elements to check";
  } else {
    const Shape& shape = inputs[result.input].shape();
    result.message = absl::StrFormat(
        "gradcheck %s: worst element is input %d %s flat index %d: analytic %.12g vs numeric "
        "%.12g (|diff| %.3g, tolerance %.3g = atol %.1g + rtol %.1g * |numeric|), %d elements "
        "checked",
        result.ok ? "passed" : "FAILED", result.input, shape_str(shape), result.index,
        result.analytic, result.numeric, result.error,
        options.atol + options.rtol * std::abs(result.numeric), options.atol, options.rtol,
        result.checked);
  }
  return result;
}

}  // namespace motley::autograd
