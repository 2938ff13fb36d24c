// The gradient checker itself must be able to fail: a deliberately wrong
// backward is caught and the worst element reported.

#include "autograd/gradcheck.h"

#include <string>
#include <vector>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "core/ops.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace motley::autograd {
namespace {

using testing::randn;
using V = std::vector<Variable>;

// y = x^3 with a backward that is correct except for element `bad`, whose
// gradient is scaled by `factor`.
Variable cube_with_bug(const Variable& x, std::int64_t bad, double factor) {
  Tensor out = mul(mul(x, x), x).data();
  return record_op(
      "cube_with_bug", out, {x}, [xd = x.data(), bad, factor](const Tensor& g) -> TensorList {
        std::vector<double> xs = xd.to_vector<double>();
        std::vector<double> gs = g.to_vector<double>();
        for (std::size_t i = 0; i < xs.size(); ++i) {
          gs[i] *= 3 * xs[i] * xs[i] * (static_cast<std::int64_t>(i) == bad ? factor : 1.0);
        }
        return {Tensor::from_vector(gs, xd.shape())};
      });
}

TEST(AutogradGradcheck, PassesACorrectBackward) {
  GradcheckResult r =
      gradcheck([](const V& in) { return testing::weighted_sum(cube_with_bug(in[0], -1, 1.0)); },
                {randn({2, 3}, 1)});
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.checked, 6);
  EXPECT_LT(r.error, 1e-7);
}

TEST(AutogradGradcheck, CatchesAWrongElementAndReportsIt) {
  GradcheckResult r = gradcheck(
      [](const V& in) {
        return add(sum(in[0]), testing::weighted_sum(cube_with_bug(in[1], 4, 1.001)));
      },
      {randn({3}, 2), randn({2, 3}, 3)});
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.input, 1);
  EXPECT_EQ(r.index, 4);
  EXPECT_GT(r.error, 1e-6);
  EXPECT_NE(r.message.find("FAILED"), std::string::npos) << r.message;
  EXPECT_NEAR(r.analytic, 1.001 * r.numeric, 1e-6 * std::abs(r.numeric) + 1e-9);
}

TEST(AutogradGradcheck, CatchesAMissingGradient) {
  // An op whose backward forgets one input.
  auto f = [](const V& in) {
    Variable y = record_op("forgets_b", mul(in[0], in[1]).data(), {in[0], in[1]},
                           [b = in[1].data()](const Tensor& g) -> TensorList {
                             return {motley::ops::mul(g, b), Tensor()};
                           });
    return sum(y);
  };
  GradcheckResult r = gradcheck(f, {randn({3}, 4), randn({3}, 5)});
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.input, 1);
  EXPECT_EQ(r.analytic, 0.0);
}

TEST(AutogradGradcheck, DoesNotModifyTheCallersInputs) {
  Tensor x = randn({4}, 6);
  std::vector<double> before = x.to_vector<double>();
  gradcheck([](const V& in) { return sum(exp(in[0])); }, {x});
  EXPECT_EQ(x.to_vector<double>(), before);
}

TEST(AutogradGradcheck, RejectsNonF64Inputs) {
  Tensor x = Tensor::ones({2}, DType::kF32);
  EXPECT_THROW(gradcheck([](const V& in) { return sum(in[0]); }, {x}), Error);
}

}  // namespace
}  // namespace motley::autograd
