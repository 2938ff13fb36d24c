// Elementwise ops, broadcasting, casts, reductions and cat on the CPU
// backend, each against a reference loop over std::vector<double>.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/ops.h"

namespace motley {
namespace {

template <typename T>
Tensor random_tensor(Shape shape, std::uint32_t seed, double lo = -2.0, double hi = 2.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(shape_numel(shape));
  for (T& x : v) x = static_cast<T>(dist(gen));
  return Tensor::from_vector(v, shape);
}

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double rtol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double tol = rtol * (1.0 + std::abs(want[i]));
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << what << " at " << i;
    } else {
      EXPECT_NEAR(got[i], want[i], tol) << what << " at " << i;
    }
  }
}

// Expects kShape with a message containing every fragment.
template <typename F>
void expect_shape_error(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
    ADD_FAILURE() << "expected a kShape error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape) << e.what();
    for (const char* frag : fragments) {
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos)
          << "message '" << e.what() << "' lacks '" << frag << "'";
    }
  }
}

template <typename T>
class Elementwise : public ::testing::Test {
 protected:
  static double rtol() { return std::is_same_v<T, float> ? 2e-6 : 1e-13; }
};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Elementwise, FloatTypes);

double sigmoid_ref(double x) { return 1.0 / (1.0 + std::exp(-x)); }

TYPED_TEST(Elementwise, UnaryOpsMatchReference) {
  using T = TypeParam;
  const Tensor a = random_tensor<T>({3, 37}, 1);
  const Tensor pos = random_tensor<T>({3, 37}, 2, 0.1, 3.0);
  const auto av = values(a), pv = values(pos);
  struct Case {
    UnaryOp op;
    bool positive;
    double alpha;
    double (*f)(double, double);
  };
  const Case cases[] = {
      {UnaryOp::kNeg, false, 0, [](double x, double) { return -x; }},
      {UnaryOp::kExp, false, 0, [](double x, double) { return std::exp(x); }},
      {UnaryOp::kLog, true, 0, [](double x, double) { return std::log(x); }},
      {UnaryOp::kSqrt, true, 0, [](double x, double) { return std::sqrt(x); }},
      {UnaryOp::kRsqrt, true, 0, [](double x, double) { return 1 / std::sqrt(x); }},
      {UnaryOp::kSquare, false, 0, [](double x, double) { return x * x; }},
      {UnaryOp::kAbs, false, 0, [](double x, double) { return std::abs(x); }},
      {UnaryOp::kSilu, false, 0, [](double x, double) { return x * sigmoid_ref(x); }},
      {UnaryOp::kSigmoid, false, 0, [](double x, double) { return sigmoid_ref(x); }},
      {UnaryOp::kTanh, false, 0, [](double x, double) { return std::tanh(x); }},
      {UnaryOp::kSoftplus, false, 0, [](double x, double) { return std::log1p(std::exp(x)); }},
      {UnaryOp::kRelu, false, 0, [](double x, double) { return x > 0 ? x : 0.0; }},
      {UnaryOp::kScale, false, -1.5, [](double x, double a) { return a * x; }},
      {UnaryOp::kAddScalar, false, 0.25, [](double x, double a) { return x + a; }},
      {UnaryOp::kPowScalar, true, 1.7, [](double x, double a) { return std::pow(x, a); }},
      {UnaryOp::kPowScalar, false, 2.0, [](double x, double a) { return std::pow(x, a); }},
      {UnaryOp::kReciprocal, true, 0, [](double x, double) { return 1 / x; }},
  };
  for (const Case& c : cases) {
    const Tensor& in = c.positive ? pos : a;
    const auto& iv = c.positive ? pv : av;
    std::vector<double> want(iv.size());
    for (std::size_t i = 0; i < iv.size(); ++i) want[i] = c.f(iv[i], c.alpha);
    const Tensor out = ops::unary(c.op, in, c.alpha);
    EXPECT_EQ(out.dtype(), in.dtype());
    expect_close(values(out), want, 4 * TestFixture::rtol(),
                 "unary op " + std::to_string(static_cast<int>(c.op)));
  }
}

TYPED_TEST(Elementwise, ExpAndSoftplusExtremes) {
  using T = TypeParam;
  const std::vector<T> x = {T(-1000), T(-90), T(-80), T(0), T(20), T(80),
                            T(1000),  std::numeric_limits<T>::quiet_NaN()};
  const Tensor t = Tensor::from_vector(x, {8});
  const auto e = values(ops::exp(t));
  const auto sp = values(ops::softplus(t));
  for (std::size_t i = 0; i + 1 < x.size(); ++i) {
    const double want_e = static_cast<double>(static_cast<T>(std::exp(double(x[i]))));
    if (std::isinf(want_e)) {
      EXPECT_TRUE(std::isinf(e[i])) << i;
    } else {
      EXPECT_NEAR(e[i], want_e, 1e-6 * want_e + 1e-37) << "exp " << double(x[i]);
    }
    const double xd = double(x[i]);
    const double want_sp = std::max(xd, 0.0) + std::log1p(std::exp(-std::abs(xd)));
    EXPECT_NEAR(sp[i], want_sp, 1e-6 * (1 + std::abs(want_sp))) << "softplus " << xd;
  }
  EXPECT_TRUE(std::isnan(e.back()));
  EXPECT_TRUE(std::isnan(sp.back()));
}

TEST(ElementwiseF32, VectorisedExpIsAccurateOverTheFloatRange) {
  // The CPU backend's float exp is its own polynomial: hold it to a few
  // ulp against double exp across the normal range, and make the
  // contiguous (vectorised) and strided (libm) paths agree.
  const int n = 20001;
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = -87.0f + 175.7f * static_cast<float>(i) / (n - 1);  // up to 88.7
  const Tensor t = Tensor::from_vector(x, {n});
  const auto e = ops::exp(t).to_vector<float>();
  double worst = 0;
  for (int i = 0; i < n; ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::abs(e[i] - want) / want);
  }
  EXPECT_LT(worst, 4e-7);
  const Tensor strided = Tensor::from_vector(x, {n, 1}).expand({n, 2}).transpose(0, 1);
  for (UnaryOp op : {UnaryOp::kSigmoid, UnaryOp::kSilu}) {
    const auto fast = ops::unary(op, t).to_vector<double>();
    const auto slow = ops::unary(op, strided).to_vector<double>();
    for (int i = 0; i < n; i += 7) {
      EXPECT_NEAR(fast[i], slow[n + i], 4e-7 * (1 + std::abs(slow[n + i]))) << x[i];
    }
  }
}

TYPED_TEST(Elementwise, BinaryOpsBroadcast) {
  using T = TypeParam;
  // (2, 1, 5) against (3, 1): result (2, 3, 5).
  const Tensor a = random_tensor<T>({2, 1, 5}, 3);
  const Tensor b = random_tensor<T>({3, 1}, 4, 0.5, 2.0);
  const auto av = values(a), bv = values(b);
  auto ref = [&](auto f) {
    std::vector<double> out(2 * 3 * 5);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j)
        for (int k = 0; k < 5; ++k) out[(i * 3 + j) * 5 + k] = f(av[i * 5 + k], bv[j]);
    return out;
  };
  const double tol = TestFixture::rtol();
  Tensor out = ops::add(a, b);
  EXPECT_EQ(out.shape(), (Shape{2, 3, 5}));
  expect_close(values(out), ref([](double x, double y) { return x + y; }), tol, "add");
  expect_close(values(ops::sub(a, b)), ref([](double x, double y) { return x - y; }), tol, "sub");
  expect_close(values(ops::mul(a, b)), ref([](double x, double y) { return x * y; }), tol, "mul");
  expect_close(values(ops::div(a, b)), ref([](double x, double y) { return x / y; }), tol, "div");
  expect_close(values(ops::maximum(a, b)),
               ref([](double x, double y) { return std::max(x, y); }), tol, "maximum");
  expect_close(values(ops::minimum(a, b)),
               ref([](double x, double y) { return std::min(x, y); }), tol, "minimum");
  expect_close(values(ops::silu_backward(a, b)), ref([](double x, double dy) {
                 const double s = sigmoid_ref(x);
                 return dy * s * (1 + x * (1 - s));
               }),
               4 * tol, "silu_backward");
  // Broadcasting the other way round (b first) and against a 0-d scalar.
  expect_close(values(ops::sub(b, a)), ref([](double x, double y) { return y - x; }), tol,
               "sub reversed");
  const Tensor s = Tensor::scalar(3.0, a.dtype());
  const Tensor as = ops::mul(a, s);
  EXPECT_EQ(as.shape(), a.shape());
  std::vector<double> want(av);
  for (double& x : want) x *= 3;
  expect_close(values(as), want, tol, "mul by 0-d");
}

TYPED_TEST(Elementwise, NonContiguousInputs) {
  using T = TypeParam;
  const Tensor base = random_tensor<T>({4, 6}, 5);
  const Tensor at = base.transpose(0, 1);           // (6, 4), strides (1, 6)
  const Tensor bs = random_tensor<T>({6, 8}, 6).slice(1, 0, 8, 2);  // (6, 4), stride 2
  ASSERT_FALSE(at.is_contiguous());
  ASSERT_FALSE(bs.is_contiguous());
  const auto av = values(at), bv = values(bs);  // logical order
  std::vector<double> want(av.size());
  for (std::size_t i = 0; i < av.size(); ++i) want[i] = av[i] * bv[i];
  expect_close(values(ops::mul(at, bs)), want, TestFixture::rtol(), "mul of views");
  std::vector<double> want_exp(av.size());
  for (std::size_t i = 0; i < av.size(); ++i) want_exp[i] = std::exp(av[i]);
  expect_close(values(ops::exp(at)), want_exp, 4 * TestFixture::rtol(), "exp of a transpose");
}

TYPED_TEST(Elementwise, IntegerArithmeticAndEq) {
  const Tensor a = Tensor::from_vector<std::int64_t>({1, 5, 3, 7}, {4});
  const Tensor b = Tensor::from_vector<std::int64_t>({1, 2, 3, 4}, {4});
  EXPECT_EQ(ops::add(a, b).to_vector<std::int64_t>(), (std::vector<std::int64_t>{2, 7, 6, 11}));
  EXPECT_EQ(ops::eq(a, b).to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, 0, 1, 0}));
  using T = TypeParam;
  const Tensor x = Tensor::from_vector<T>({1, 2, 3}, {3});
  const Tensor y = Tensor::from_vector<T>({1, 0, 3}, {3});
  const Tensor e = ops::eq(x, y);
  EXPECT_EQ(e.dtype(), x.dtype());
  EXPECT_EQ(values(e), (std::vector<double>{1, 0, 1}));
}

TYPED_TEST(Elementwise, WhereAxpbyAndInPlace) {
  using T = TypeParam;
  const Tensor mask = Tensor::from_vector<std::int32_t>({1, 0, 0, 1}, {4, 1});  // (4, 1)
  const Tensor a = random_tensor<T>({4, 3}, 7);
  const Tensor b = random_tensor<T>({3}, 8);
  const auto av = values(a), bv = values(b);
  std::vector<double> want(12);
  const int m[4] = {1, 0, 0, 1};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) want[i * 3 + j] = m[i] ? av[i * 3 + j] : bv[j];
  expect_close(values(ops::where(mask, a, b)), want, 0, "where");

  const Tensor c = random_tensor<T>({4, 3}, 9);
  const auto cv = values(c);
  std::vector<double> want_ax(12);
  for (int i = 0; i < 12; ++i) want_ax[i] = 0.5 * av[i] - 2.0 * cv[i];
  expect_close(values(ops::axpby(0.5, a, -2.0, c)), want_ax, TestFixture::rtol(), "axpby");

  Tensor acc = a.clone();
  ops::add_(acc, c);
  std::vector<double> want_add(12);
  for (int i = 0; i < 12; ++i) want_add[i] = av[i] + cv[i];
  expect_close(values(acc), want_add, TestFixture::rtol(), "add_");
  ops::add_(acc, b);  // broadcast source
  for (int i = 0; i < 12; ++i) want_add[i] += bv[i % 3];
  expect_close(values(acc), want_add, TestFixture::rtol(), "add_ broadcast");
  ops::scale_(acc, -3.0);
  for (double& x : want_add) x *= -3.0;
  expect_close(values(acc), want_add, TestFixture::rtol(), "scale_");
  // scale_ of a non-contiguous view writes through the view only.
  Tensor big = Tensor::ones({4, 4}, a.dtype());
  Tensor col = big.narrow(1, 1, 1);
  ops::scale_(col, 5.0);
  EXPECT_EQ(values(big), (std::vector<double>{1, 5, 1, 1, 1, 5, 1, 1, 1, 5, 1, 1, 1, 5, 1, 1}));
  // add_ into a non-contiguous destination is refused.
  Tensor t = a.transpose(0, 1);
  expect_shape_error([&] { ops::add_(t, a.transpose(0, 1)); }, {"add_", "contiguous"});
}

TEST(ElementwiseErrors, ShapeMismatchNamesOpAndShapes) {
  const Tensor a = Tensor::zeros({2, 3});
  const Tensor b = Tensor::zeros({4, 3});
  expect_shape_error([&] { ops::add(a, b); }, {"add", "(2, 3)", "(4, 3)"});
  expect_shape_error([&] { ops::mul(a, Tensor::zeros({2})); }, {"mul", "(2, 3)", "(2,)"});
  expect_shape_error([&] { ops::add(a, Tensor::zeros({2, 3}, DType::kF64)); }, {"add", "f64"});
  expect_shape_error([&] { ops::axpby(1, a, 1, Tensor::zeros({3, 2})); }, {"axpby", "(3, 2)"});
  expect_shape_error([&] { ops::broadcast_shape(Shape{2, 3}, Shape{3, 3}); },
                     {"broadcast", "(2, 3)", "(3, 3)"});
  expect_shape_error([&] { ops::exp(Tensor::zeros({2}, DType::kI64)); }, {"unary"});
}

TEST(Broadcast, ShapeRules) {
  EXPECT_EQ(ops::broadcast_shape(Shape{2, 1, 4}, Shape{3, 1}), (Shape{2, 3, 4}));
  EXPECT_EQ(ops::broadcast_shape(Shape{}, Shape{5}), (Shape{5}));
  EXPECT_EQ(ops::broadcast_shape(Shape{0, 1}, Shape{1, 7}), (Shape{0, 7}));
}

TYPED_TEST(Elementwise, SumToReversesBroadcast) {
  using T = TypeParam;
  const Tensor g = random_tensor<T>({2, 3, 4, 5}, 10);
  const auto gv = values(g);
  // Target (3, 1, 5): sum over dim 0 (leading) and dim 2.
  const Tensor s = ops::sum_to(g, Shape{3, 1, 5});
  EXPECT_EQ(s.shape(), (Shape{3, 1, 5}));
  std::vector<double> want(15, 0.0);
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 3; ++b)
      for (int c = 0; c < 4; ++c)
        for (int d = 0; d < 5; ++d) want[b * 5 + d] += gv[((a * 3 + b) * 4 + c) * 5 + d];
  expect_close(values(s), want, 4 * TestFixture::rtol(), "sum_to (3, 1, 5)");
  // To a scalar shape and to the same shape.
  double total = 0;
  for (double x : gv) total += x;
  const Tensor s0 = ops::sum_to(g, Shape{});
  EXPECT_EQ(s0.dim(), 0);
  EXPECT_NEAR(s0.item(), total, 1e-4);
  EXPECT_TRUE(ops::sum_to(g, g.shape()).shares_storage(g));
  expect_shape_error([&] { ops::sum_to(g, Shape{3, 2, 5}); }, {"sum_to"});
}

TYPED_TEST(Elementwise, Reductions) {
  using T = TypeParam;
  const Tensor a = random_tensor<T>({3, 4, 5}, 11);
  const auto av = values(a);
  for (std::int64_t dim = 0; dim < 3; ++dim) {
    const Tensor s = ops::sum(a, dim);
    const Tensor mx = ops::amax(a, dim, /*keepdim=*/true);
    const Tensor mn = ops::mean(a, dim);
    Shape kept = a.shape();
    kept[dim] = 1;
    EXPECT_EQ(mx.shape(), kept);
    const std::int64_t sizes[3] = {3, 4, 5};
    std::vector<double> want_s, want_m, want_mean;
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 5; ++k) {
          const int idx[3] = {i, j, k};
          if (idx[dim] != 0) continue;
          double acc = 0, best = -1e300;
          for (int r = 0; r < sizes[dim]; ++r) {
            int p[3] = {i, j, k};
            p[dim] = r;
            const double v = av[(p[0] * 4 + p[1]) * 5 + p[2]];
            acc += v;
            best = std::max(best, v);
          }
          want_s.push_back(acc);
          want_m.push_back(best);
          want_mean.push_back(acc / sizes[dim]);
        }
    expect_close(values(s), want_s, 4 * TestFixture::rtol(), "sum dim");
    expect_close(values(mx), want_m, 0, "amax dim");
    expect_close(values(mn), want_mean, 4 * TestFixture::rtol(), "mean dim");
  }
  double total = 0, squares = 0;
  for (double x : av) {
    total += x;
    squares += x * x;
  }
  EXPECT_NEAR(ops::sum(a).item(), total, 1e-5);
  EXPECT_NEAR(ops::mean(a).item(), total / av.size(), 1e-6);
  EXPECT_NEAR(ops::sum_squares(a).item(), squares, 1e-4);
  // Sums of a non-contiguous view.
  EXPECT_NEAR(ops::sum(a.transpose(0, 2)).item(), total, 1e-5);
}

TEST(Reductions, FloatSumAccumulatesInDouble) {
  // 2^24 + 1 ones: a float accumulator would stop at 2^24.
  const std::int64_t n = (1 << 24) + 8;
  const Tensor ones = Tensor::ones({n});
  EXPECT_EQ(ops::sum(ones).item(), static_cast<double>(static_cast<float>(n)));
  const Tensor big = Tensor::full({1000}, 1e4);
  EXPECT_NEAR(ops::sum_squares(big).item(), 1e11, 1e4);
}

TYPED_TEST(Elementwise, ArgmaxCumsumAllFinite) {
  using T = TypeParam;
  const Tensor a = Tensor::from_vector<T>({1, 3, 3, 2, -1, -5, -1, -2}, {2, 4});
  EXPECT_EQ(ops::argmax(a).to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, 0}));
  EXPECT_EQ(values(ops::cumsum(a)), (std::vector<double>{1, 4, 7, 9, -1, -6, -7, -9}));
  const Tensor ia = Tensor::from_vector<std::int32_t>({1, 2, 3}, {3});
  EXPECT_EQ(ops::cumsum(ia).to_vector<std::int32_t>(), (std::vector<std::int32_t>{1, 3, 6}));
  EXPECT_TRUE(ops::all_finite(a));
  for (T bad : {std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
                std::numeric_limits<T>::quiet_NaN()}) {
    std::vector<T> v(100, T(1));
    v[77] = bad;
    EXPECT_FALSE(ops::all_finite(Tensor::from_vector(v, {10, 10})));
    EXPECT_FALSE(ops::all_finite(Tensor::from_vector(v, {10, 10}).transpose(0, 1)));
  }
}

TEST(Copy, CastsBetweenAllDtypes) {
  const std::vector<double> src = {-3, -1, 0, 1, 2.5, 100};
  const Tensor d = Tensor::from_vector(src, {2, 3});
  for (DType to : {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64}) {
    const Tensor c = d.to(to);
    EXPECT_EQ(c.dtype(), to);
    const auto back = c.to(DType::kF64).to_vector<double>();
    for (std::size_t i = 0; i < src.size(); ++i) {
      const double want = (to == DType::kI32 || to == DType::kI64) ? std::trunc(src[i]) : src[i];
      EXPECT_EQ(back[i], want) << dtype_name(to) << " " << i;
    }
    // And back from each dtype to every other.
    for (DType to2 : {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64}) {
      EXPECT_EQ(c.to(to2).to(DType::kI64).to_vector<std::int64_t>(),
                d.to(DType::kI64).to_vector<std::int64_t>());
    }
  }
  // bf16 rounds to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7.
  const Tensor t = Tensor::from_vector<float>({1.0f + 1.0f / 256, 1.0f + 3.0f / 256}, {2});
  EXPECT_EQ(t.to(DType::kBF16).to(DType::kF32).to_vector<float>(),
            (std::vector<float>{1.0f, 1.0f + 4.0f / 256}));
}

TEST(Copy, StridedDestinationAndFill) {
  Tensor dst = Tensor::zeros({3, 4}, DType::kI64);
  Tensor col = dst.narrow(1, 2, 1);  // (3, 1) non-contiguous
  col.copy_(Tensor::from_vector<float>({7.9f, 8.0f, -9.5f}, {3, 1}));
  EXPECT_EQ(dst.to_vector<std::int64_t>(),
            (std::vector<std::int64_t>{0, 0, 7, 0, 0, 0, 8, 0, 0, 0, -9, 0}));
  Tensor f = Tensor::full({2, 2}, 0.5, DType::kBF16);
  EXPECT_EQ(f.to_vector<float>(), (std::vector<float>(4, 0.5f)));
  Tensor g = Tensor::zeros({4, 4}, DType::kF64);
  g.transpose(0, 1).narrow(0, 1, 2).fill_(2.0);  // columns 1 and 2
  const auto gv = g.to_vector<double>();
  for (int i = 0; i < 16; ++i) EXPECT_EQ(gv[i], (i % 4 == 1 || i % 4 == 2) ? 2.0 : 0.0) << i;
  // copy from an expanded (stride 0) source.
  Tensor e = Tensor::empty({3, 2});
  e.copy_(Tensor::from_vector<float>({1, 2}, {2}).expand({3, 2}));
  EXPECT_EQ(e.to_vector<float>(), (std::vector<float>{1, 2, 1, 2, 1, 2}));
}

TEST(Cat, AlongEachDimension) {
  const Tensor a = Tensor::from_vector<float>({1, 2, 3, 4}, {2, 2});
  const Tensor b = Tensor::from_vector<float>({5, 6}, {2, 1});
  EXPECT_EQ(ops::cat(std::vector<Tensor>{a, b}, 1).to_vector<float>(),
            (std::vector<float>{1, 2, 5, 3, 4, 6}));
  const Tensor c = Tensor::from_vector<float>({7, 8}, {1, 2});
  EXPECT_EQ(ops::cat(std::vector<Tensor>{a, c, a.transpose(0, 1)}, 0).to_vector<float>(),
            (std::vector<float>{1, 2, 3, 4, 7, 8, 1, 3, 2, 4}));
  expect_shape_error([&] { ops::cat(std::vector<Tensor>{a, b}, 0); }, {"cat", "(2, 1)"});
}

}  // namespace
}  // namespace motley
