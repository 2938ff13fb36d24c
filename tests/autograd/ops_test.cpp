// Tier (a) of STYLE.md: every differentiable op against float64 central
// differences, plus forward values for the ops autograd composes itself.

#include "autograd/ops.h"

#include <cmath>
#include <vector>

#include "autograd/engine.h"
#include "core/ops.h"
#include "core/philox.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace motley::autograd {
namespace {

using testing::check_op;
using testing::ids;
using testing::randn;
using testing::randn_away_from_zero;
using testing::values;
using V = std::vector<Variable>;

#define EXPECT_GRADCHECK(...)                   \
  do {                                          \
    GradcheckResult r_ = check_op(__VA_ARGS__); \
    EXPECT_TRUE(r_.ok) << r_.message;           \
    EXPECT_GT(r_.checked, 0);                   \
  } while (0)

// ---- elementwise binary, with broadcasting -----------------------------------------

TEST(AutogradOpsGrad, AddBroadcasting) {
  auto f = [](const V& in) { return add(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 1), randn({3, 1}, 2)});
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 1), randn({4}, 3)});
  EXPECT_GRADCHECK(f, {randn({1, 4}, 4), randn({3, 1}, 5)});  // both broadcast
  EXPECT_GRADCHECK(f, {randn({2, 3}, 6), randn({}, 7)});      // 0-d
}

TEST(AutogradOpsGrad, SubBroadcasting) {
  auto f = [](const V& in) { return sub(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 1), randn({3, 1}, 2)});
  EXPECT_GRADCHECK(f, {randn({3, 1}, 2), randn({2, 3, 4}, 1)});
}

TEST(AutogradOpsGrad, MulBroadcasting) {
  auto f = [](const V& in) { return mul(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 1), randn({3, 1}, 2)});
  EXPECT_GRADCHECK(f, {randn({4}, 3), randn({2, 3, 4}, 4)});
}

TEST(AutogradOpsGrad, DivBroadcasting) {
  auto f = [](const V& in) { return div(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 1), randn({3, 1}, 2, /*mean=*/2.0, 0.3)});
  EXPECT_GRADCHECK(f, {randn({4}, 3), randn({2, 3, 4}, 4, -2.0, 0.3)});
}

TEST(AutogradOpsGrad, SameVariableTwice) {
  // Both inputs are one leaf: gradients from the two uses are summed.
  EXPECT_GRADCHECK([](const V& in) { return mul(in[0], in[0]); }, {randn({3, 4}, 1)});
  EXPECT_GRADCHECK([](const V& in) { return add(in[0], in[0]); }, {randn({3, 4}, 2)});
}

TEST(AutogradOpsGrad, NonContiguousInputs) {
  // Transposed and strided-slice views feeding elementwise ops and matmul.
  EXPECT_GRADCHECK([](const V& in) { return mul(transpose(in[0], 0, 1), in[1]); },
                   {randn({4, 3}, 1), randn({3, 4}, 2)});
  EXPECT_GRADCHECK([](const V& in) { return exp(slice(in[0], 1, 0, 6, 2)); },
                   {randn({3, 6}, 3, 0.0, 0.5)});
  EXPECT_GRADCHECK(
      [](const V& in) { return matmul(transpose(in[0], 0, 1), transpose(in[1], 0, 1)); },
      {randn({4, 3}, 4), randn({5, 4}, 5)});
}

TEST(AutogradOpsGrad, Where) {
  Tensor mask = Tensor::from_vector(std::vector<double>{1, 0, 1, 0, 0, 1}, {2, 3});
  EXPECT_GRADCHECK([&](const V& in) { return where(mask, in[0], in[1]); },
                   {randn({2, 3}, 1), randn({2, 3}, 2)});
  // Broadcast mask (column) and b (row).
  Tensor column = Tensor::from_vector(std::vector<double>{0, 1}, {2, 1});
  EXPECT_GRADCHECK([&](const V& in) { return where(column, in[0], in[1]); },
                   {randn({2, 3}, 3), randn({3}, 4)});
}

TEST(AutogradOpsValue, WhereRoutesGradients) {
  Tensor mask = Tensor::from_vector(std::vector<double>{1, 0, 0}, {3});
  Variable a(randn({3}, 1), true), b(randn({3}, 2), true);
  sum(where(mask, a, b)).backward();
  EXPECT_EQ(values(a.grad()), (std::vector<double>{1, 0, 0}));
  EXPECT_EQ(values(b.grad()), (std::vector<double>{0, 1, 1}));
}

// ---- elementwise unary ------------------------------------------------------------------

TEST(AutogradOpsGrad, UnarySmooth) {
  Tensor x = randn({3, 4}, 11, 0.0, 0.8);
  EXPECT_GRADCHECK([](const V& in) { return neg(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return scale(in[0], -2.5); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return add_scalar(in[0], 3.0); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return exp(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return square(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return silu(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return sigmoid(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return tanh(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return softplus(in[0]); }, {x});
}

TEST(AutogradOpsGrad, UnaryPositiveDomain) {
  Tensor x = exp(Variable(randn({3, 4}, 12, 0.0, 0.5))).data();  // in (0.2, 5)
  EXPECT_GRADCHECK([](const V& in) { return log(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return sqrt(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return rsqrt(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return pow_scalar(in[0], 2.5); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return pow_scalar(in[0], -1.5); }, {x});
}

TEST(AutogradOpsGrad, Relu) {
  EXPECT_GRADCHECK([](const V& in) { return relu(in[0]); }, {randn_away_from_zero({3, 5}, 13)});
}

TEST(AutogradOpsGrad, UnaryOnNonContiguous) {
  Tensor x = randn({4, 3}, 14, 0.0, 0.8);
  EXPECT_GRADCHECK([](const V& in) { return silu(transpose(in[0], 0, 1)); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return sigmoid(transpose(in[0], 0, 1)); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return softplus(transpose(in[0], 0, 1)); }, {x});
}

TEST(AutogradOpsValue, ToDtypeCastsGradientBack) {
  Variable x(randn({2, 3}, 15), true);
  Variable y = to_dtype(x, DType::kF32);
  EXPECT_EQ(y.dtype(), DType::kF32);
  sum(scale(y, 3.0)).backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().dtype(), DType::kF64);
  EXPECT_EQ(values(x.grad()), std::vector<double>(6, 3.0));
}

// ---- reductions -------------------------------------------------------------------------------

TEST(AutogradOpsGrad, Reductions) {
  Tensor x = randn({2, 3, 4}, 21);
  EXPECT_GRADCHECK([](const V& in) { return sum(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return sum(in[0], 1); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return sum(in[0], -1, /*keepdim=*/true); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return mean(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return mean(in[0], 0); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return mean(in[0], 2, /*keepdim=*/true); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return logsumexp(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return logsumexp(transpose(in[0], 1, 2)); }, {x});
}

TEST(AutogradOpsValue, LogsumexpMatchesDefinition) {
  Tensor x = Tensor::from_vector(std::vector<double>{1, 2, 3, 1000, 1000, 1000}, {2, 3});
  std::vector<double> lse = values(logsumexp(Variable(x)).data());
  ASSERT_EQ(lse.size(), 2u);
  EXPECT_NEAR(lse[0], std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)), 1e-12);
  EXPECT_NEAR(lse[1], 1000.0 + std::log(3.0), 1e-9);  // no overflow
}

TEST(AutogradOpsValue, MeanGradientIsUniform) {
  Variable x(randn({2, 5}, 22), true);
  mean(x).backward();
  for (double g : values(x.grad())) EXPECT_DOUBLE_EQ(g, 0.1);
}

// ---- shape
// ------------------------------------------------------------------------------------------

TEST(AutogradOpsGrad, Views) {
  Tensor x = randn({2, 3, 4}, 31);
  EXPECT_GRADCHECK([](const V& in) { return reshape(in[0], {4, -1}); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return view(in[0], {6, 4}); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return reshape(transpose(in[0], 0, 2), {-1}); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return transpose(in[0], 0, 2); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return permute(in[0], {2, 0, 1}); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return narrow(in[0], 2, 1, 2); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return slice(in[0], 1, 0, 3, 2); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return select(in[0], 1, -1); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return unsqueeze(in[0], 1); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return squeeze(in[0], 1); }, {randn({3, 1, 2}, 32)});
  EXPECT_GRADCHECK([](const V& in) { return expand(in[0], {2, 3, 4}); }, {randn({3, 1}, 33)});
  EXPECT_GRADCHECK([](const V& in) { return contiguous(permute(in[0], {1, 2, 0})); }, {x});
}

TEST(AutogradOpsValue, ViewsShareStorage) {
  Variable x(randn({2, 3}, 34), true);
  Variable t = transpose(x, 0, 1);
  EXPECT_TRUE(t.data().shares_storage(x.data()));
  EXPECT_TRUE(contiguous(x).id() == x.id());  // already contiguous: no op
  EXPECT_FALSE(contiguous(t).data().shares_storage(x.data()));
}

TEST(AutogradOpsGrad, Cat) {
  auto f0 = [](const V& in) { return cat({in[0], in[1], in[2]}, 0); };
  EXPECT_GRADCHECK(f0, {randn({1, 3}, 41), randn({2, 3}, 42), randn({3, 3}, 43)});
  auto f1 = [](const V& in) { return cat({in[0], transpose(in[1], 0, 1)}, -1); };
  EXPECT_GRADCHECK(f1, {randn({2, 2}, 44), randn({3, 2}, 45)});
}

TEST(AutogradOpsValue, CatOnlyGradsInputsThatNeedThem) {
  Variable a(randn({2}, 46), true), b(randn({3}, 47), false);
  Variable y = cat({a, b}, 0);
  EXPECT_EQ(y.shape(), (Shape{5}));
  Variable w(Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5}, {5}));
  sum(mul(y, w)).backward();
  EXPECT_EQ(values(a.grad()), (std::vector<double>{1, 2}));
  EXPECT_FALSE(b.grad().defined());
}

// ---- matrix products
// ----------------------------------------------------------------------------------

TEST(AutogradOpsGrad, Matmul) {
  auto f = [](const V& in) { return matmul(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({3, 4}, 51), randn({4, 2}, 52)});
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 53), randn({2, 4, 5}, 54)});        // batched
  EXPECT_GRADCHECK(f, {randn({2, 2, 3, 4}, 55), randn({2, 2, 4, 3}, 56)});  // 4-D
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 57), randn({4, 5}, 58)});           // shared 2-D b
}

TEST(AutogradOpsGrad, MatmulOneSideOnly) {
  Tensor b = randn({4, 5}, 59);
  EXPECT_GRADCHECK([&](const V& in) { return matmul(in[0], Variable(b)); }, {randn({2, 3, 4}, 60)});
  Tensor a = randn({2, 3, 4}, 61);
  EXPECT_GRADCHECK([&](const V& in) { return matmul(Variable(a), in[0]); }, {randn({4, 5}, 62)});
}

TEST(AutogradOpsGrad, Linear) {
  auto f = [](const V& in) { return linear(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({2, 3, 4}, 63), randn({5, 4}, 64)});  // x (B, T, in), w (out, in)
  EXPECT_GRADCHECK(f, {randn({4}, 65), randn({3, 4}, 66)});        // 1-D x
  EXPECT_GRADCHECK([](const V& in) { return linear(transpose(in[0], 0, 1), in[1]); },
                   {randn({4, 3}, 67), randn({2, 4}, 68)});
}

TEST(AutogradOpsError, MatmulShapeMismatchNamesOp) {
  Variable a(randn({2, 3}, 1), true), b(randn({4, 5}, 2), true);
  try {
    matmul(a, b);
    FAIL() << "matmul of (2, 3) and (4, 5) did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("matmul"), std::string::npos) << e.what();
  }
  try {
    linear(Variable(randn({2, 3}, 3)), Variable(randn({3, 4}, 4)));
    FAIL() << "linear of (2, 3) and weight (3, 4) did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("linear"), std::string::npos) << e.what();
  }
}

// ---- model ops
// -----------------------------------------------------------------------------------------

TEST(AutogradOpsGrad, SoftmaxAndLogSoftmax) {
  Tensor x = randn({3, 5}, 71);
  EXPECT_GRADCHECK([](const V& in) { return softmax(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return log_softmax(in[0]); }, {x});
  EXPECT_GRADCHECK([](const V& in) { return softmax(transpose(in[0], 0, 1)); }, {x});
}

TEST(AutogradOpsGrad, CrossEntropyWithIgnoredRow) {
  Tensor targets = ids({2, -100, 0, 4}, {4});
  EXPECT_GRADCHECK([&](const V& in) { return cross_entropy(in[0], targets); }, {randn({4, 5}, 72)});
  EXPECT_GRADCHECK([&](const V& in) { return cross_entropy_rows(in[0], targets); },
                   {randn({4, 5}, 73)});
  Tensor custom_ignore = ids({1, 3, 3, 0}, {4});
  EXPECT_GRADCHECK([&](const V& in) { return cross_entropy(in[0], custom_ignore, 3); },
                   {randn({4, 5}, 74)});
}

TEST(AutogradOpsValue, CrossEntropyIsMeanOverCountedRows) {
  Tensor logits = randn({3, 4}, 75);
  Tensor targets = ids({1, -100, 3}, {3});
  std::vector<double> x = values(logits);
  auto row_loss = [&](int r, int t) {
    double s = 0;
    for (int j = 0; j < 4; ++j) s += std::exp(x[r * 4 + j]);
    return std::log(s) - x[r * 4 + t];
  };
  const double expected = (row_loss(0, 1) + row_loss(2, 3)) / 2.0;
  Variable l(logits, true);
  Variable loss = cross_entropy(l, targets);
  EXPECT_EQ(loss.dim(), 0);
  EXPECT_NEAR(loss.data().item(), expected, 1e-12);
  std::vector<double> rows = values(cross_entropy_rows(Variable(logits), targets).data());
  EXPECT_NEAR(rows[0], row_loss(0, 1), 1e-12);
  EXPECT_EQ(rows[1], 0.0);
  loss.backward();
  std::vector<double> g = values(l.grad());
  for (int j = 0; j < 4; ++j) EXPECT_EQ(g[4 + j], 0.0) << "ignored row got gradient";
  // Row 0: (softmax - onehot) / 2.
  double s = 0;
  for (int j = 0; j < 4; ++j) s += std::exp(x[j]);
  EXPECT_NEAR(g[1], (std::exp(x[1]) / s - 1.0) / 2.0, 1e-12);
}

TEST(AutogradOpsValue, CrossEntropyAllIgnoredIsZero) {
  Variable l(randn({2, 3}, 76), true);
  Variable loss = cross_entropy(l, ids({-100, -100}, {2}));
  EXPECT_EQ(loss.data().item(), 0.0);
  loss.backward();
  for (double g : values(l.grad())) EXPECT_EQ(g, 0.0);
}

TEST(AutogradOpsGrad, RmsNorm) {
  auto f = [](const V& in) { return rmsnorm(in[0], in[1], 1e-5); };
  EXPECT_GRADCHECK(f, {randn({2, 3, 8}, 81), randn({8}, 82, 1.0, 0.2)});
  EXPECT_GRADCHECK([](const V& in) { return rmsnorm(transpose(in[0], 0, 1), in[1], 1e-5); },
                   {randn({3, 2, 8}, 83), randn({8}, 84, 1.0, 0.2)});
}

TEST(AutogradOpsGrad, SwiGLU) {
  auto f = [](const V& in) { return swiglu(in[0], in[1]); };
  EXPECT_GRADCHECK(f, {randn({3, 6}, 85), randn({3, 6}, 86)});
}

TEST(AutogradOpsValue, SwiGLUIsSiluTimesB) {
  Tensor a = randn({4}, 87), b = randn({4}, 88);
  std::vector<double> y = values(swiglu(Variable(a), Variable(b)).data());
  std::vector<double> av = values(a), bv = values(b);
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(y[i], av[i] / (1 + std::exp(-av[i])) * bv[i], 1e-12);
  }
}

TEST(AutogradOpsGrad, Rope) {
  EXPECT_GRADCHECK([](const V& in) { return rope(in[0], 10000.0, 0); }, {randn({1, 2, 5, 4}, 91)});
  EXPECT_GRADCHECK([](const V& in) { return rope(in[0], 500.0, 3); }, {randn({2, 1, 3, 6}, 92)});
  // Non-contiguous: heads split from (B, T, H, hd) by a transpose, as in attention.
  EXPECT_GRADCHECK([](const V& in) { return rope(transpose(in[0], 1, 2), 10000.0, 1); },
                   {randn({1, 5, 2, 4}, 93)});
}

TEST(AutogradOpsGrad, AttentionCausal) {
  auto f = [](const V& in) { return attention(in[0], in[1], in[2], 0.5); };
  // Tq == Tk, T = 7 (not a multiple of any tile size).
  EXPECT_GRADCHECK(f,
                   {randn({1, 2, 7, 4}, 101), randn({1, 2, 7, 4}, 102), randn({1, 2, 7, 4}, 103)});
  // Tq < Tk (decoding with a prefix): query i sees keys j <= i + 2.
  EXPECT_GRADCHECK(f,
                   {randn({2, 1, 3, 4}, 104), randn({2, 1, 5, 4}, 105), randn({2, 1, 5, 4}, 106)});
  // Non-contiguous q, k, v from a (B, T, H, hd) layout.
  auto g = [](const V& in) {
    return attention(transpose(in[0], 1, 2), transpose(in[1], 1, 2), transpose(in[2], 1, 2),
                     1.0 / std::sqrt(4.0));
  };
  EXPECT_GRADCHECK(g,
                   {randn({1, 5, 2, 4}, 107), randn({1, 5, 2, 4}, 108), randn({1, 5, 2, 4}, 109)});
}

TEST(AutogradOpsValue, AttentionFirstQueryCopiesFirstValue) {
  // Causal with Tq == Tk: query 0 sees only key 0, so out[0] = v[0].
  Tensor q = randn({1, 1, 3, 2}, 110), k = randn({1, 1, 3, 2}, 111), v = randn({1, 1, 3, 2}, 112);
  std::vector<double> out = values(attention(Variable(q), Variable(k), Variable(v), 1.0).data());
  std::vector<double> vv = values(v);
  EXPECT_NEAR(out[0], vv[0], 1e-12);
  EXPECT_NEAR(out[1], vv[1], 1e-12);
}

TEST(AutogradOpsGrad, EmbeddingRepeatedIds) {
  Tensor token_ids = ids({3, 1, 3, 0, 3, 1}, {2, 3});
  EXPECT_GRADCHECK([&](const V& in) { return embedding(in[0], token_ids); }, {randn({5, 4}, 121)});
}

TEST(AutogradOpsValue, EmbeddingForwardAndRepeatedIdGradient) {
  Tensor w = randn({4, 2}, 122);
  Variable weight = Variable::parameter(w, "embed.weight");
  Variable y = embedding(weight, ids({2, 2, 0}, {1, 3}));
  EXPECT_EQ(y.shape(), (Shape{1, 3, 2}));
  std::vector<double> wv = values(w), yv = values(y.data());
  EXPECT_EQ(yv[0], wv[4]);
  EXPECT_EQ(yv[5], wv[1]);
  sum(y).backward();
  EXPECT_EQ(values(weight.grad()), (std::vector<double>{1, 1, 0, 0, 2, 2, 0, 0}));
}

TEST(AutogradOpsGrad, IndexSelectRows) {
  Tensor index = ids({2, 0, 2, 2}, {4});
  EXPECT_GRADCHECK([&](const V& in) { return index_select_rows(in[0], index); },
                   {randn({3, 2, 2}, 131)});
}

TEST(AutogradOpsGrad, IndexAddRowsWithScale) {
  Tensor index = ids({1, 3, 1, 0, 1}, {5});  // repeated destination rows
  auto f = [&](const V& in) { return index_add_rows(in[0], index, in[1], 4); };
  EXPECT_GRADCHECK(f, {randn({5, 3}, 132), randn({5}, 133)});
  // Without a scale; and 3-D rows.
  EXPECT_GRADCHECK([&](const V& in) { return index_add_rows(in[0], index, Variable(), 4); },
                   {randn({5, 2, 2}, 134)});
  EXPECT_GRADCHECK([&](const V& in) { return index_add_rows(in[0], index, in[1], 4); },
                   {randn({5, 2, 2}, 135), randn({5}, 136)});
}

TEST(AutogradOpsValue, IndexAddRowsCombine) {
  // Expert combine: out[index[i]] += scale[i] * src[i].
  Tensor src = Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {3, 2});
  Variable s(src, true);
  Variable gate(Tensor::from_vector(std::vector<double>{0.5, 2.0, -1.0}, {3}), true);
  Variable out = index_add_rows(s, ids({1, 1, 0}, {3}), gate, 2);
  EXPECT_EQ(values(out.data()), (std::vector<double>{-5, -6, 0.5 + 6, 1 + 8}));
  Variable w(Tensor::from_vector(std::vector<double>{1, 10, 100, 1000}, {2, 2}));
  sum(mul(out, w)).backward();
  // d/dgate[i] = <src[i], w[index[i]]>
  EXPECT_EQ(values(gate.grad()), (std::vector<double>{100 + 2000, 300 + 4000, 5 + 60}));
  EXPECT_EQ(values(s.grad()), (std::vector<double>{50, 500, 200, 2000, -1, -10}));
}

TEST(AutogradOpsValue, ExpertWithNoTokensGetsZeroGradients) {
  // Dispatch 0 rows to an expert, run it, combine: every parameter and the
  // (empty) gate weights still get defined gradients.
  Variable m(randn({3, 4}, 137), true);
  Variable w1 = Variable::parameter(randn({5, 4}, 138), "w1");
  Variable gate(Tensor::zeros({0}, DType::kF64), true);
  Tensor none = Tensor::zeros({0}, DType::kI64);
  Variable h = linear(index_select_rows(m, none), w1);  // (0, 5)
  EXPECT_EQ(h.shape(), (Shape{0, 5}));
  Variable out = index_add_rows(h, none, gate, 3);  // (3, 5) of zeros
  EXPECT_EQ(values(out.data()), std::vector<double>(15, 0.0));
  sum(out).backward();
  EXPECT_EQ(values(w1.grad()), std::vector<double>(20, 0.0));
  EXPECT_EQ(values(m.grad()), std::vector<double>(12, 0.0));
  ASSERT_TRUE(gate.grad().defined());
  EXPECT_EQ(gate.grad().numel(), 0);
}

TEST(AutogradOpsGrad, TakeAlongLast) {
  Tensor idx = ids({2, 0, 1, 1, 3, 0}, {3, 2});
  EXPECT_GRADCHECK([&](const V& in) { return take_along_last(in[0], idx); }, {randn({3, 4}, 141)});
  // Of a softmax, as when picking the gate probabilities of selected experts.
  EXPECT_GRADCHECK([&](const V& in) { return take_along_last(softmax(in[0]), idx); },
                   {randn({3, 4}, 142)});
}

TEST(AutogradOpsValue, TakeAlongLastPicks) {
  Tensor x = Tensor::from_vector(std::vector<double>{0, 1, 2, 10, 11, 12}, {2, 3});
  Variable y = take_along_last(Variable(x), ids({2, 0, 1, 1}, {2, 2}));
  EXPECT_EQ(values(y.data()), (std::vector<double>{2, 0, 11, 11}));
  EXPECT_THROW(take_along_last(Variable(x), ids({3, 0}, {2, 1})), Error);
}

TEST(AutogradOpsGrad, GruCellComposition) {
  // PyTorch GRUCell (gates r, z, n) from the op set the router uses.
  auto gru = [](const V& in) {
    const Variable &x = in[0], &h = in[1], &w_ih = in[2], &w_hh = in[3];
    Variable gi = linear(x, w_ih), gh = linear(h, w_hh);  // (N, 3p)
    const std::int64_t p = h.size(-1);
    Variable r = sigmoid(add(narrow(gi, 1, 0, p), narrow(gh, 1, 0, p)));
    Variable z = sigmoid(add(narrow(gi, 1, p, p), narrow(gh, 1, p, p)));
    Variable n = tanh(add(narrow(gi, 1, 2 * p, p), mul(r, narrow(gh, 1, 2 * p, p))));
    return add(mul(add_scalar(neg(z), 1.0), n), mul(z, h));
  };
  EXPECT_GRADCHECK(gru, {randn({2, 3}, 151), randn({2, 2}, 152), randn({6, 3}, 153, 0, 0.5),
                         randn({6, 2}, 154, 0, 0.5)});
}


// ---- grouped experts (Note [Grouped experts]) ----------------------------------------------


// Three experts of hidden sizes 3, 5 and 2 on d = 4; the middle one gets no
// rows in the second case.
Variable grouped_of(const V& in, const std::vector<std::int64_t>& counts) {
  return grouped_swiglu_ffn(in[0], counts, {in[1], in[4], in[7]}, {in[2], in[5], in[8]},
                            {in[3], in[6], in[9]});
}

std::vector<Tensor> grouped_inputs(std::int64_t rows) {
  std::vector<Tensor> t = {randn({rows, 4}, 501)};
  const std::int64_t hs[3] = {3, 5, 2};
  for (int e = 0; e < 3; ++e) {
    t.push_back(randn({hs[e], 4}, 510 + e, 0.0, 0.5));
    t.push_back(randn({hs[e], 4}, 520 + e, 0.0, 0.5));
    t.push_back(randn({4, hs[e]}, 530 + e, 0.0, 0.5));
  }
  return t;
}

TEST(AutogradOpsGrad, GroupedSwiGluFfn) {
  EXPECT_GRADCHECK([](const V& in) { return grouped_of(in, {2, 3, 1}); }, grouped_inputs(6));
  // An expert without rows: its weights get no gradient, the others do.
  EXPECT_GRADCHECK([](const V& in) { return grouped_of(in, {4, 0, 1}); }, grouped_inputs(5));
}

TEST(AutogradOpsValue, GroupedSwiGluFfnEqualsPerExpertOps) {
  const std::vector<Tensor> t = grouped_inputs(7);
  const std::vector<std::int64_t> counts = {3, 0, 4};
  V a, b;
  for (const Tensor& x : t) {
    a.emplace_back(x, true);
    b.emplace_back(x, true);
  }
  Variable ya = grouped_of(a, counts);
  std::vector<Variable> parts;
  std::int64_t offset = 0;
  for (int e = 0; e < 3; ++e) {
    if (counts[e] == 0) continue;
    Variable xe = narrow(b[0], 0, offset, counts[e]);
    parts.push_back(linear(swiglu(linear(xe, b[1 + 3 * e]), linear(xe, b[2 + 3 * e])),
                           b[3 + 3 * e]));
    offset += counts[e];
  }
  Variable yb = cat(parts, 0);
  const std::vector<double> va = values(ya.data()), vb = values(yb.data());
  ASSERT_EQ(va.size(), vb.size());
  for (std::size_t i = 0; i < va.size(); ++i) EXPECT_NEAR(va[i], vb[i], 1e-12);
  testing::weighted_sum(ya).backward();
  testing::weighted_sum(yb).backward();
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (i >= 4 && i <= 6) {  // expert 1 had no rows: no gradient (zero where defined)
      if (a[i].grad().defined()) {
        for (double g : values(a[i].grad())) EXPECT_EQ(g, 0.0) << "input " << i;
      }
      continue;
    }
    const std::vector<double> ga = values(a[i].grad()), gb = values(b[i].grad());
    for (std::size_t j = 0; j < ga.size(); ++j) EXPECT_NEAR(ga[j], gb[j], 1e-12) << i << "," << j;
  }
}

TEST(AutogradOpsErrors, GroupedSwiGluFfnChecksCounts) {
  const std::vector<Tensor> t = grouped_inputs(5);
  V in;
  for (const Tensor& x : t) in.emplace_back(x, true);
  try {
    grouped_of(in, {2, 2, 2});
    ADD_FAILURE() << "expected kShape";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("counts sum to 6 but x has 5 rows"), std::string::npos)
        << e.what();
  }
}

// Note [Matmul precision]: backward products run in the precision the
// forward had, even when backward runs outside the guard.
TEST(AutogradMatmulPrecision, BackwardUsesTheForwardsPrecision) {
  Tensor xd = Tensor::empty({5, 16}), wd = Tensor::empty({7, 16}), gd = Tensor::empty({5, 7});
  fill_normal(xd, philox_key(4, "amp/x"), 0.0, 1.0);
  fill_normal(wd, philox_key(4, "amp/w"), 0.0, 1.0);
  fill_normal(gd, philox_key(4, "amp/g"), 0.0, 1.0);
  auto rounded = [](const Tensor& t) { return t.to(DType::kBF16).to(DType::kF32); };
  Variable x(xd, true), w(wd, true);
  Variable y;
  {
    const ops::MatmulPrecisionGuard guard(ops::MatmulPrecision::kBf16Inputs);
    y = linear(x, w);
  }
  backward({y}, {gd});
  EXPECT_EQ(x.grad().to_vector<float>(), ops::matmul(rounded(gd), rounded(wd)).to_vector<float>());
  Tensor gw = Tensor::zeros({7, 16});
  ops::gemm_accumulate(rounded(gd), true, rounded(xd), false, 1.0, gw);
  EXPECT_LT(ops::nmse(w.grad(), gw), 1e-12);
  // The same graph in f32 gives other gradients: the guard had an effect.
  Variable x2(xd, true), w2(wd, true);
  backward({linear(x2, w2)}, {gd});
  EXPECT_GT(ops::nmse(x2.grad(), x.grad()), 1e-9);
}

}  // namespace
}  // namespace motley::autograd
