// Fused kernels: softmax, cross-entropy, RMSNorm, SwiGLU, RoPE, row
// gather/scatter, top-k, sort and AdamW, each against a reference loop,
// and their backward passes against analytic formulas or float64 central
// differences.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
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

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << what << " at " << i;
  }
}

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

// Central differences of scalar f at x (f64), step h.
std::vector<double> numeric_grad(const std::function<double(const Tensor&)>& f, const Tensor& x,
                                 double h = 1e-6) {
  std::vector<double> xv = values(x);
  std::vector<double> g(xv.size());
  for (std::size_t i = 0; i < xv.size(); ++i) {
    const double keep = xv[i];
    xv[i] = keep + h;
    const double fp = f(Tensor::from_vector(xv, x.shape()));
    xv[i] = keep - h;
    const double fm = f(Tensor::from_vector(xv, x.shape()));
    xv[i] = keep;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

// sum(t * w) in double: a scalar loss whose gradient with respect to t is w.
double weighted_sum(const Tensor& t, const std::vector<double>& w) {
  const auto v = values(t);
  double s = 0;
  for (std::size_t i = 0; i < v.size(); ++i) s += v[i] * w[i];
  return s;
}

template <typename T>
class Fused : public ::testing::Test {
 protected:
  static double tol() { return std::is_same_v<T, float> ? 3e-6 : 1e-12; }
};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Fused, FloatTypes);

// ---- softmax --------------------------------------------------------------------

TYPED_TEST(Fused, SoftmaxAndLogSoftmax) {
  using T = TypeParam;
  const std::int64_t rows = 5, n = 67;
  Tensor x = random_tensor<T>({rows, n}, 1, -8, 8);
  const auto xv = values(x);
  std::vector<double> sm(xv.size()), lsm(xv.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double m = -1e300, s = 0;
    for (std::int64_t j = 0; j < n; ++j) m = std::max(m, xv[r * n + j]);
    for (std::int64_t j = 0; j < n; ++j) s += std::exp(xv[r * n + j] - m);
    for (std::int64_t j = 0; j < n; ++j) {
      sm[r * n + j] = std::exp(xv[r * n + j] - m) / s;
      lsm[r * n + j] = xv[r * n + j] - m - std::log(s);
    }
  }
  expect_close(values(ops::softmax(x)), sm, TestFixture::tol(), "softmax");
  expect_close(values(ops::log_softmax(x)), lsm, TestFixture::tol(), "log_softmax");
  // Large logits do not overflow; a non-contiguous input is handled.
  const Tensor big = ops::add_scalar(x, 1000.0);
  expect_close(values(ops::softmax(big)), sm, 1e-4, "softmax of shifted logits");
  expect_close(values(ops::softmax(x.transpose(0, 1).contiguous().transpose(0, 1))), sm,
               TestFixture::tol(), "softmax of a view");
}

TYPED_TEST(Fused, SoftmaxBackwardMatchesAnalyticJacobian) {
  using T = TypeParam;
  const std::int64_t rows = 3, n = 11;
  const Tensor x = random_tensor<T>({rows, n}, 2);
  const Tensor dy = random_tensor<T>({rows, n}, 3);
  const auto dyv = values(dy);
  for (bool log : {false, true}) {
    const Tensor y = log ? ops::log_softmax(x) : ops::softmax(x);
    const auto p = values(ops::softmax(x));
    std::vector<double> want(rows * n);
    for (std::int64_t r = 0; r < rows; ++r) {
      double dot = 0, sum = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        dot += dyv[r * n + j] * p[r * n + j];
        sum += dyv[r * n + j];
      }
      for (std::int64_t i = 0; i < n; ++i) {
        // J_softmax = diag(p) - p p^T; J_log_softmax = I - 1 p^T.
        want[r * n + i] =
            log ? dyv[r * n + i] - p[r * n + i] * sum : p[r * n + i] * (dyv[r * n + i] - dot);
      }
    }
    expect_close(values(ops::softmax_backward(y, dy, log)), want, 4 * TestFixture::tol(),
                 log ? "log_softmax backward" : "softmax backward");
  }
}

TEST(FusedGrad, SoftmaxBackwardFiniteDifferencesF64) {
  const Tensor x = random_tensor<double>({2, 7}, 4);
  const std::vector<double> w = values(random_tensor<double>({2, 7}, 5));
  for (bool log : {false, true}) {
    auto f = [&](const Tensor& t) {
      return weighted_sum(log ? ops::log_softmax(t) : ops::softmax(t), w);
    };
    const Tensor y = log ? ops::log_softmax(x) : ops::softmax(x);
    const Tensor dx = ops::softmax_backward(y, Tensor::from_vector(w, {2, 7}), log);
    expect_close(values(dx), numeric_grad(f, x), 1e-7, "softmax FD");
  }
}

// ---- cross-entropy -----------------------------------------------------------------

TYPED_TEST(Fused, CrossEntropyForwardBackwardAndIgnore) {
  using T = TypeParam;
  const std::int64_t rows = 6, v = 50;
  const Tensor logits = random_tensor<T>({rows, v}, 6, -5, 5);
  const std::vector<std::int64_t> tv = {3, 0, 49, -100, 17, 3};
  const Tensor targets = Tensor::from_vector(tv, {rows});
  const auto xv = values(logits);
  auto [loss, lse] = ops::cross_entropy(logits, targets);
  std::vector<double> want_loss(rows), want_lse(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    double m = -1e300, s = 0;
    for (std::int64_t j = 0; j < v; ++j) m = std::max(m, xv[r * v + j]);
    for (std::int64_t j = 0; j < v; ++j) s += std::exp(xv[r * v + j] - m);
    want_lse[r] = m + std::log(s);
    want_loss[r] = tv[r] == -100 ? 0.0 : want_lse[r] - xv[r * v + tv[r]];
  }
  expect_close(values(loss), want_loss, TestFixture::tol(), "cross_entropy loss");
  expect_close(values(lse), want_lse, TestFixture::tol(), "cross_entropy lse");

  const Tensor dloss = random_tensor<T>({rows}, 7);
  const auto dl = values(dloss);
  const Tensor dx = ops::cross_entropy_backward(logits, targets, -100, lse, dloss);
  std::vector<double> want(rows * v);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < v; ++j) {
      want[r * v + j] =
          tv[r] == -100
              ? 0.0
              : dl[r] * (std::exp(xv[r * v + j] - want_lse[r]) - (j == tv[r] ? 1.0 : 0.0));
    }
  expect_close(values(dx), want, 2 * TestFixture::tol(), "cross_entropy backward");
  // i32 targets give the same answer.
  auto [loss32, lse32] = ops::cross_entropy(logits, targets.to(DType::kI32));
  expect_close(values(loss32), want_loss, TestFixture::tol(), "cross_entropy i32 targets");
}

// Long f32 rows exercise the vectorised shifted exp (Note [Shifted exp] in
// core/cpu/cpu_common.h): full vectors, the masked or scalar tail, and
// arguments from 0 down past the float underflow (-120), against double.
TEST(FusedF32, SoftmaxAndCrossEntropyLongRowsMatchDouble) {
  const std::int64_t rows = 5, n = 1037;  // 1037 = 64 * 16 + 13
  const Tensor x = random_tensor<float>({rows, n}, 11, -120.0, 8.0);
  const auto xv = values(x);
  const Tensor targets = Tensor::from_vector<std::int64_t>({0, 5, 1036, 17, 1000}, {rows});
  const auto sm = values(ops::softmax(x));
  const auto lsm = values(ops::log_softmax(x));
  auto [loss, lse] = ops::cross_entropy(x, targets);
  const auto lv = values(lse);
  const Tensor dloss = Tensor::from_vector<float>({1.0f, -0.5f, 2.0f, 0.25f, 3.0f}, {rows});
  const auto dx = values(ops::cross_entropy_backward(x, targets, -100, lse, dloss));
  const std::vector<double> dl = {1.0, -0.5, 2.0, 0.25, 3.0};
  for (std::int64_t r = 0; r < rows; ++r) {
    double m = -1e300, s = 0;
    for (std::int64_t j = 0; j < n; ++j) m = std::max(m, xv[r * n + j]);
    for (std::int64_t j = 0; j < n; ++j) s += std::exp(xv[r * n + j] - m);
    const double want_lse = m + std::log(s);
    EXPECT_NEAR(lv[r], want_lse, 2e-6 * std::abs(want_lse)) << "lse row " << r;
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t i = r * n + j;
      const double p = std::exp(xv[i] - want_lse);
      // Where the probability is a normal float: relative 1e-6 plus the
      // rounding of the f32 argument x - lse (half an ulp of |x - lse|,
      // which exp turns into that relative error); below the smallest
      // normal float, absolute (exactly 0 is allowed there).
      const double tol = p > 1e-37 ? p * (1e-6 + 6e-8 * std::abs(xv[i] - want_lse)) : p + 1.2e-38;
      ASSERT_NEAR(sm[i], p, tol) << "softmax row " << r << " col " << j << " x " << xv[i];
      ASSERT_NEAR(lsm[i], xv[i] - want_lse, 2e-6 * (1 + std::abs(xv[i] - want_lse)));
      const double want_dx = dl[r] * (p - (j == values(targets)[r] ? 1.0 : 0.0));
      ASSERT_NEAR(dx[i], want_dx, std::abs(dl[r]) * tol + 1e-7 * std::abs(want_dx))
          << "cross_entropy backward row " << r << " col " << j;
    }
  }
}

// A softmax output of 64 MiB goes out through streaming stores
// (core/cpu/kernels_fused.cpp); sampled rows against double.
TEST(FusedF32, SoftmaxLargeOutputStreams) {
  const std::int64_t rows = 4096, n = 4096;
  const Tensor x = random_tensor<float>({rows, n}, 21, -30.0, 10.0);
  const Tensor y = ops::softmax(x);
  const float* px = static_cast<const float*>(x.raw_data());
  const float* py = static_cast<const float*>(y.raw_data());
  for (std::int64_t r : {0L, 1L, 777L, 2048L, 4095L}) {
    double m = -1e300, s = 0;
    for (std::int64_t j = 0; j < n; ++j) m = std::max(m, double(px[r * n + j]));
    for (std::int64_t j = 0; j < n; ++j) s += std::exp(px[r * n + j] - m);
    for (std::int64_t j = 0; j < n; ++j) {
      const double p = std::exp(px[r * n + j] - m) / s;
      ASSERT_NEAR(py[r * n + j], p, 5e-6 * p + 1e-37) << "row " << r << " col " << j;
    }
  }
}

// Non-finite logits take the general path and propagate: a NaN makes its
// row NaN, -inf entries get probability 0, an all -inf or +inf row is NaN.
TEST(FusedF32, SoftmaxNonFiniteRows) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> v(4 * 40, 0.5f);
  v[0 * 40 + 33] = nan;
  v[1 * 40 + 7] = -inf;
  for (int j = 0; j < 40; ++j) v[2 * 40 + j] = -inf;
  v[3 * 40 + 39] = inf;
  const auto sm = values(ops::softmax(Tensor::from_vector(v, {4, 40})));
  for (int j = 0; j < 40; ++j) {
    EXPECT_TRUE(std::isnan(sm[0 * 40 + j])) << j;
    EXPECT_TRUE(std::isnan(sm[2 * 40 + j])) << j;
    EXPECT_TRUE(std::isnan(sm[3 * 40 + j])) << j;
    EXPECT_NEAR(sm[1 * 40 + j], j == 7 ? 0.0 : 1.0 / 39.0, 1e-7) << j;
  }
  auto [loss, lse] = ops::cross_entropy(Tensor::from_vector(v, {4, 40}),
                                        Tensor::from_vector<std::int64_t>({1, 1, 1, 1}, {4}));
  const auto lv = values(loss);
  EXPECT_TRUE(std::isnan(lv[0]));
  EXPECT_NEAR(lv[1], std::log(39.0), 1e-6);
}

TEST(FusedGrad, CrossEntropyBackwardFiniteDifferencesF64) {
  const Tensor logits = random_tensor<double>({3, 9}, 8);
  const Tensor targets = Tensor::from_vector<std::int64_t>({2, 8, 0}, {3});
  const std::vector<double> w = {0.5, -1.25, 2.0};
  auto f = [&](const Tensor& t) { return weighted_sum(ops::cross_entropy(t, targets).first, w); };
  auto [loss, lse] = ops::cross_entropy(logits, targets);
  const Tensor dx =
      ops::cross_entropy_backward(logits, targets, -100, lse, Tensor::from_vector(w, {3}));
  expect_close(values(dx), numeric_grad(f, logits), 1e-7, "cross_entropy FD");
}

TEST(FusedErrors, CrossEntropyTargetOutOfRange) {
  const Tensor logits = Tensor::zeros({2, 5});
  expect_shape_error(
      [&] {
        ops::cross_entropy(logits, Tensor::from_vector<std::int64_t>({1, 5}, {2}));
      },
      {"cross_entropy", "target 5", "row 1", "[0, 5)"});
  expect_shape_error(
      [&] {
        ops::cross_entropy(logits, Tensor::from_vector<std::int32_t>({-1, 0}, {2}));
      },
      {"target -1"});
  expect_shape_error([&] { ops::cross_entropy(logits, Tensor::zeros({3}, DType::kI64)); },
                     {"cross_entropy", "(2, 5)", "(3,)"});
  expect_shape_error([&] { ops::cross_entropy(logits, Tensor::zeros({2}, DType::kF32)); },
                     {"cross_entropy", "targets"});
}

// ---- RMSNorm ---------------------------------------------------------------------------

TYPED_TEST(Fused, RmsNormForwardAndBackward) {
  using T = TypeParam;
  // (2, 3) rows: fewer than one row group; (3, 50): several groups and
  // dg blocks (core/cpu/kernels_fused.cpp); d = 40 and 48: with and
  // without a tail after the 16-float vectors; d = 501: 31 vectors, every
  // column-tile width of the backward (16, 8, 4, 2, 1 vectors) and a
  // tail; d = 512: two full tiles.
  for (const auto& [lead, d] : std::vector<std::pair<Shape, std::int64_t>>{
           {{2, 3}, 40}, {{3, 50}, 48}, {{3, 50}, 40}, {{3, 50}, 501}, {{2, 3}, 512}}) {
    const std::int64_t rows = shape_numel(lead);
    const double eps = 1e-5;
    Shape shape = lead;
    shape.push_back(d);
    const Tensor x = random_tensor<T>(shape, 9);
    const Tensor g = random_tensor<T>({d}, 10, 0.5, 1.5);
    const auto xv = values(x), gv = values(g);
    auto [y, rstd] = ops::rmsnorm(x, g, eps);
    EXPECT_EQ(rstd.shape(), lead);
    std::vector<double> want_y(rows * d), want_r(rows);
    for (std::int64_t r = 0; r < rows; ++r) {
      double ms = 0;
      for (std::int64_t j = 0; j < d; ++j) ms += xv[r * d + j] * xv[r * d + j];
      want_r[r] = 1 / std::sqrt(ms / d + eps);
      for (std::int64_t j = 0; j < d; ++j) want_y[r * d + j] = xv[r * d + j] * want_r[r] * gv[j];
    }
    expect_close(values(y), want_y, TestFixture::tol(), "rmsnorm y");
    expect_close(values(rstd), want_r, TestFixture::tol(), "rmsnorm rstd");

    const Tensor dy = random_tensor<T>(shape, 11);
    const auto dyv = values(dy);
    auto [dx, dg] = ops::rmsnorm_backward(x, g, rstd, dy);
    std::vector<double> want_dx(rows * d), want_dg(d, 0.0);
    for (std::int64_t r = 0; r < rows; ++r) {
      const double rs = want_r[r];
      double dot = 0;
      for (std::int64_t j = 0; j < d; ++j) dot += dyv[r * d + j] * gv[j] * xv[r * d + j];
      for (std::int64_t j = 0; j < d; ++j) {
        want_dx[r * d + j] = rs * gv[j] * dyv[r * d + j] - xv[r * d + j] * rs * rs * rs * dot / d;
        want_dg[j] += dyv[r * d + j] * xv[r * d + j] * rs;
      }
    }
    expect_close(values(dx), want_dx, 4 * TestFixture::tol(), "rmsnorm dx");
    expect_close(values(dg), want_dg, 4 * TestFixture::tol(), "rmsnorm dg");
  }
}

TEST(FusedGrad, RmsNormFiniteDifferencesF64) {
  const Tensor x = random_tensor<double>({3, 8}, 12);
  const Tensor g = random_tensor<double>({8}, 13);
  const std::vector<double> w = values(random_tensor<double>({3, 8}, 14));
  const Tensor dy = Tensor::from_vector(w, {3, 8});
  auto [y, rstd] = ops::rmsnorm(x, g, 1e-5);
  auto [dx, dg] = ops::rmsnorm_backward(x, g, rstd, dy);
  expect_close(
      values(dx),
      numeric_grad([&](const Tensor& t) { return weighted_sum(ops::rmsnorm(t, g, 1e-5).first, w); },
                   x),
      1e-7, "rmsnorm dx FD");
  expect_close(
      values(dg),
      numeric_grad([&](const Tensor& t) { return weighted_sum(ops::rmsnorm(x, t, 1e-5).first, w); },
                   g),
      1e-7, "rmsnorm dg FD");
}

TEST(FusedGrad, RmsNormBackendAccumulatesDg) {
  Backend& be = backend_for(Device::cpu());
  const Tensor x = random_tensor<double>({4, 6}, 15);
  const Tensor g = random_tensor<double>({6}, 16);
  const Tensor dy = random_tensor<double>({4, 6}, 17);
  auto [y, rstd] = ops::rmsnorm(x, g, 1e-5);
  auto [dx_ref, dg_ref] = ops::rmsnorm_backward(x, g, rstd, dy);
  Tensor dx = Tensor::empty({4, 6}, DType::kF64);
  Tensor dg = Tensor::ones({6}, DType::kF64);
  be.rmsnorm_backward(x, g, rstd, dy, dx, dg);
  auto want = values(dg_ref);
  for (double& v : want) v += 1.0;
  expect_close(values(dg), want, 1e-12, "dg accumulated onto ones");
}

TEST(FusedErrors, RmsNormGainMismatch) {
  expect_shape_error(
      [] {
        ops::rmsnorm(Tensor::zeros({2, 4}), Tensor::ones({5}), 1e-5);
      },
      {"rmsnorm", "(2, 4)", "(5,)"});
}

// ---- SwiGLU ----------------------------------------------------------------------------

TYPED_TEST(Fused, SwigluForwardBackward) {
  using T = TypeParam;
  const Tensor a = random_tensor<T>({5, 33}, 18, -6, 6);
  const Tensor b = random_tensor<T>({5, 33}, 19);
  const Tensor dout = random_tensor<T>({5, 33}, 20);
  const auto av = values(a), bv = values(b), gv = values(dout);
  std::vector<double> want(av.size()), want_da(av.size()), want_db(av.size());
  for (std::size_t i = 0; i < av.size(); ++i) {
    const double s = 1 / (1 + std::exp(-av[i]));
    want[i] = av[i] * s * bv[i];
    want_db[i] = gv[i] * av[i] * s;
    want_da[i] = gv[i] * bv[i] * s * (1 + av[i] * (1 - s));
  }
  expect_close(values(ops::swiglu(a, b)), want, 4 * TestFixture::tol(), "swiglu");
  auto [da, db] = ops::swiglu_backward(a, b, dout);
  expect_close(values(da), want_da, 4 * TestFixture::tol(), "swiglu da");
  expect_close(values(db), want_db, 4 * TestFixture::tol(), "swiglu db");
  expect_shape_error([&] { ops::swiglu(a, b.narrow(1, 0, 32)); }, {"swiglu", "(5, 32)"});
}

TEST(FusedF32, SwigluAndSigmoidAcrossTheFloatRange) {
  // The float kernels take sigmoid without a division (Note [Vector
  // sigmoid]): hold SwiGLU forward/backward, sigmoid and silu to a few ulp
  // of double over [-86, 88] (both signs of the reciprocal trick, vector
  // bodies and masked tails), and check the special values.
  std::vector<float> xs;
  for (int i = 0; i <= 17400; ++i) xs.push_back(-86.0f + 0.01f * static_cast<float>(i));
  for (float v : {-1000.0f, -88.0f, 1000.0f, std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f}) {
    xs.push_back(v);
  }
  const std::int64_t n = static_cast<std::int64_t>(xs.size());  // not a multiple of 16
  std::vector<float> ys(n), gs(n);
  for (std::int64_t i = 0; i < n; ++i) {
    ys[i] = 0.5f + 0.001f * static_cast<float>(i % 1000);
    gs[i] = -1.25f + 0.002f * static_cast<float>(i % 997);
  }
  const Tensor a = Tensor::from_vector(xs, {n}), b = Tensor::from_vector(ys, {n});
  const Tensor dout = Tensor::from_vector(gs, {n});
  const auto out = values(ops::swiglu(a, b));
  auto [da_t, db_t] = ops::swiglu_backward(a, b, dout);
  const auto da = values(da_t), db = values(db_t);
  const auto sig = values(ops::sigmoid(a)), silu = values(ops::silu(a));
  auto rel = [](double got, double want) {
    return std::abs(got - want) / std::max(std::abs(want), 1e-30);
  };
  double worst = 0, worst_sigmoid = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = xs[i], y = ys[i], g = gs[i];
    if (!std::isfinite(x) || std::abs(x) > 100) continue;
    const double s = 1 / (1 + std::exp(-x));
    worst_sigmoid = std::max(worst_sigmoid, rel(sig[i], s));
    for (const auto& [got, want] : {std::pair{sig[i], s}, std::pair{silu[i], x * s},
                                    std::pair{out[i], x * s * y}, std::pair{db[i], g * x * s}}) {
      worst = std::max(worst, rel(got, want));
    }
    // da = g y s (1 + x (1 - s)): its own rounding where 1 + x (1 - s) cancels (x near -1.28).
    const double want_da = g * y * s * (1 + x * (1 - s));
    EXPECT_NEAR(da[i], want_da, 4e-7 * (std::abs(g * y * s) * (1 + std::abs(x)) + 1e-30)) << x;
  }
  EXPECT_LT(worst_sigmoid, 3e-7);  // 1 ulp is 6e-8 to 1.2e-7 relative
  EXPECT_LT(worst, 8e-7);          // products of up to four rounded factors
  for (std::int64_t i = 0; i < n; ++i) {
    const float x = xs[i];
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(out[i]) && std::isnan(sig[i]) && std::isnan(silu[i]) &&
                  std::isnan(da[i]) && std::isnan(db[i]));
    } else if (x == 1000.0f || std::isinf(x)) {
      EXPECT_EQ(sig[i], 1.0);
      EXPECT_EQ(out[i], static_cast<double>(x * ys[i]));
    } else if (x <= -88.0f) {
      EXPECT_EQ(sig[i], 0.0);
      EXPECT_EQ(out[i], 0.0);
      EXPECT_EQ(db[i], 0.0);
    } else if (x == 0.0f) {
      EXPECT_EQ(sig[i], 0.5);
      EXPECT_EQ(out[i], 0.0);
    }
  }
}

// ---- RoPE ---------------------------------------------------------------------------------

TYPED_TEST(Fused, RopeMatchesFormulaAndInverts) {
  using T = TypeParam;
  const double theta = 10000.0;
  const std::int64_t offset = 7;
  // The rotation of x (B, H, T, hd) at positions offset + t, in double.
  auto reference = [&](const Tensor& x, std::int64_t pos0) {
    const Shape& shape = x.shape();
    const std::int64_t Tn = shape[2], hd = shape[3], half = hd / 2;
    const auto xv = values(x);
    std::vector<double> want(xv.size());
    for (std::int64_t bh = 0; bh < shape[0] * shape[1]; ++bh)
      for (std::int64_t t = 0; t < Tn; ++t)
        for (std::int64_t i = 0; i < half; ++i) {
          const double inv_freq = std::pow(theta, -2.0 * i / hd);
          const double ang = (pos0 + t) * inv_freq;
          const double* r = xv.data() + (bh * Tn + t) * hd;
          double* w = want.data() + (bh * Tn + t) * hd;
          w[i] = r[i] * std::cos(ang) - r[i + half] * std::sin(ang);
          w[i + half] = r[i + half] * std::cos(ang) + r[i] * std::sin(ang);
        }
    return want;
  };
  // Head counts around the CPU kernel's group of four (Note [RoPE head
  // groups]) and hd/2 below, at and past one 16-lane vector.
  for (const Shape& shape : {Shape{2, 3, 5, 8}, Shape{1, 5, 3, 40}, Shape{3, 3, 2, 32}}) {
    const std::string name = "rope " + shape_str(shape);
    const Tensor x = random_tensor<T>(shape, 21);
    const Tensor y = ops::rope(x, theta, offset);
    expect_close(values(y), reference(x, offset), TestFixture::tol(), name);
    // The inverse rotation undoes it; it is also the backward (transpose).
    expect_close(values(ops::rope(y, theta, offset, /*inverse=*/true)), values(x),
                 4 * TestFixture::tol(), name + " inverse");
  }
  // Same shape, other offset (the backend caches its cos/sin table): at
  // offset 0 position t = 0 is the identity; then offset 7 again.
  const std::int64_t hd = 8;
  const Tensor x = random_tensor<T>({2, 3, 5, hd}, 21);
  const auto xv = values(x);
  const auto y0 = values(ops::rope(x, theta, 0));
  for (std::int64_t i = 0; i < hd; ++i) EXPECT_EQ(y0[i], xv[i]) << i;
  expect_close(values(ops::rope(x, theta, offset)), reference(x, offset), TestFixture::tol(),
               "rope again");
  // Position 0 is the identity.
  const Tensor x1 = random_tensor<T>({1, 1, 1, hd}, 22);
  expect_close(values(ops::rope(x1, theta, 0)), values(x1), 0, "rope at position 0");
  expect_shape_error(
      [&] {
        ops::rope(random_tensor<T>({1, 1, 2, 5}, 23), theta);
      },
      {"rope", "(1, 1, 2, 5)"});
}

// ---- row gather / scatter -----------------------------------------------------------------

TYPED_TEST(Fused, IndexSelectAndIndexAddRows) {
  using T = TypeParam;
  const Tensor src = random_tensor<T>({5, 2, 3}, 24);  // (R, d...) with d = (2, 3)
  const std::vector<std::int32_t> idx = {4, 0, 4, 2};
  const Tensor index = Tensor::from_vector(idx, {4});
  const Tensor out = ops::index_select_rows(src, index);
  EXPECT_EQ(out.shape(), (Shape{4, 2, 3}));
  const auto sv = values(src), ov = values(out);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) EXPECT_EQ(ov[i * 6 + j], sv[idx[i] * 6 + j]);
  // Gather of i64 rows (non-floating) also works: it is a copy.
  const Tensor ints = Tensor::arange(10).reshape({5, 2});
  EXPECT_EQ(ops::index_select_rows(ints, index).to_vector<std::int64_t>(),
            (std::vector<std::int64_t>{8, 9, 0, 1, 8, 9, 4, 5}));

  // Scatter-add with and without scale; duplicates accumulate in order.
  const Tensor scale = Tensor::from_vector<T>({T(0.5), T(2), T(-1), T(3)}, {4});
  const Tensor added = ops::index_add_rows(out, index, scale, 6);
  EXPECT_EQ(added.shape(), (Shape{6, 2, 3}));
  std::vector<double> want(6 * 6, 0.0);
  const double sc[4] = {0.5, 2, -1, 3};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) want[idx[i] * 6 + j] += sc[i] * ov[i * 6 + j];
  expect_close(values(added), want, TestFixture::tol(), "index_add_rows");
  Tensor acc = Tensor::ones({6, 2, 3}, src.dtype());
  ops::index_add_rows_(acc, out, index);
  std::vector<double> want1(36, 1.0);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) want1[idx[i] * 6 + j] += ov[i * 6 + j];
  expect_close(values(acc), want1, TestFixture::tol(), "index_add_rows_ without scale");
}

TEST(FusedErrors, IndexOutOfRange) {
  const Tensor src = Tensor::zeros({4, 3});
  expect_shape_error(
      [&] {
        ops::index_select_rows(src, Tensor::from_vector<std::int64_t>({0, 4}, {2}));
      },
      {"index_select_rows", "index 4", "position 1", "[0, 4)"});
  expect_shape_error(
      [&] { ops::index_select_rows(src, Tensor::from_vector<std::int32_t>({-1}, {1})); },
      {"index -1"});
  Tensor out = Tensor::zeros({2, 3});
  expect_shape_error(
      [&] {
        ops::index_add_rows_(out, Tensor::ones({2, 3}),
                             Tensor::from_vector<std::int64_t>({1, 2}, {2}));
      },
      {"index_add_rows", "index 2"});
  // The failed call left `out` untouched.
  EXPECT_EQ(out.to_vector<float>(), std::vector<float>(6, 0.0f));
  expect_shape_error([&] { ops::index_select_rows(src, Tensor::zeros({2}, DType::kF32)); },
                     {"index_select_rows", "i32 or i64"});
}

// ---- top-k and sort --------------------------------------------------------------------------

TYPED_TEST(Fused, TopkTiesPreferLowerIndex) {
  using T = TypeParam;
  const Tensor x = Tensor::from_vector<T>({1, 5, 3, 5, 2, 3,  //
                                           0, 0, 0, 0, 0, 0,  //
                                           -1, 4, 4, 9, 4, -2},
                                          {3, 6});
  auto [v, i] = ops::topk(x, 3);
  EXPECT_EQ(v.shape(), (Shape{3, 3}));
  EXPECT_EQ(values(v), (std::vector<double>{5, 5, 3, 0, 0, 0, 9, 4, 4}));
  EXPECT_EQ(i.to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, 3, 2, 0, 1, 2, 3, 1, 2}));
  auto [v1, i1] = ops::topk(x, 1);
  EXPECT_EQ(i1.to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, 0, 3}));
  expect_shape_error([&] { ops::topk(x, 7); }, {"topk", "k = 7"});
}

TYPED_TEST(Fused, TopkAgreesWithFullSortOnRandomRows) {
  using T = TypeParam;
  // Values from a small set so that ties are frequent.
  std::mt19937 gen(25);
  std::uniform_int_distribution<int> dist(0, 4);
  std::vector<T> xv(20 * 16);
  for (T& x : xv) x = static_cast<T>(dist(gen));
  const Tensor x = Tensor::from_vector(xv, {20, 16});
  auto [v, i] = ops::topk(x, 5);
  auto [sv, si] = ops::sort_desc(x);
  const auto iv = i.to_vector<std::int64_t>(), siv = si.to_vector<std::int64_t>();
  for (int r = 0; r < 20; ++r) {
    for (int j = 0; j < 5; ++j) EXPECT_EQ(iv[r * 5 + j], siv[r * 16 + j]) << r << "," << j;
  }
}

TYPED_TEST(Fused, SortDescIsStable) {
  using T = TypeParam;
  const Tensor x = Tensor::from_vector<T>({2, 1, 2, 3, 1, 2}, {6});
  auto [v, i] = ops::sort_desc(x);
  EXPECT_EQ(values(v), (std::vector<double>{3, 2, 2, 2, 1, 1}));
  EXPECT_EQ(i.to_vector<std::int64_t>(), (std::vector<std::int64_t>{3, 0, 2, 5, 1, 4}));
  // Rows are independent; a non-contiguous input is sorted by its logical rows.
  const Tensor m = Tensor::from_vector<T>({1, 4, 2, 3}, {2, 2}).transpose(0, 1);  // [[1,2],[4,3]]
  auto [mv, mi] = ops::sort_desc(m);
  EXPECT_EQ(values(mv), (std::vector<double>{2, 1, 4, 3}));
  EXPECT_EQ(mi.to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, 0, 0, 1}));
}

// ---- AdamW --------------------------------------------------------------------------------------

TYPED_TEST(Fused, AdamWMatchesHandComputedTorchSteps) {
  using T = TypeParam;
  // One element through three torch.optim.AdamW steps (lr 0.1, betas (0.9,
  // 0.999), eps 1e-8, weight_decay 0.01), computed by hand:
  //   p *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2
  //   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  // step 1, g = 0.5: p = 0.999 - 0.05 / (0.5 + 1e-8) = 0.899000002.
  Tensor p = Tensor::from_vector<T>({T(1), T(1)}, {2});
  Tensor m = Tensor::zeros({2}, p.dtype());
  Tensor v = Tensor::zeros({2}, p.dtype());
  const double grads[3] = {0.5, -0.25, 2.0};
  const double want_p[3] = {0.899000002, 0.8714672987058463, 0.8035310672284472};
  const double want_m[3] = {0.05, 0.02, 0.218};
  const double want_v[3] = {0.00025, 0.00031225, 0.00431193775};
  const double tol = std::is_same_v<T, float> ? 2e-6 : 1e-14;
  for (int s = 0; s < 3; ++s) {
    const Tensor g = Tensor::from_vector<T>({T(grads[s]), T(grads[s])}, {2});
    ops::adamw_step(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.01, s + 1);
    EXPECT_NEAR(values(p)[0], want_p[s], tol) << "step " << s + 1;
    EXPECT_NEAR(values(m)[1], want_m[s], tol) << "step " << s + 1;
    EXPECT_NEAR(values(v)[1], want_v[s], tol * 1e-2) << "step " << s + 1;
  }
  // No decay with weight_decay 0: the first step moves by exactly lr
  // (m / sqrt(v) = sign(g) after bias correction, up to eps).
  Tensor q = Tensor::from_vector<T>({T(3)}, {1});
  Tensor mq = Tensor::zeros({1}, q.dtype()), vq = Tensor::zeros({1}, q.dtype());
  ops::adamw_step(q, Tensor::from_vector<T>({T(-7)}, {1}), mq, vq, 0.01, 0.9, 0.95, 1e-12, 0.0, 1);
  EXPECT_NEAR(values(q)[0], 3.01, tol);
  expect_shape_error(
      [&] { ops::adamw_step(p, Tensor::zeros({3}, p.dtype()), m, v, 0.1, 0.9, 0.999, 1e-8, 0, 1); },
      {"adamw_step", "(3,)"});
}

}  // namespace
}  // namespace motley
