// Flash-style causal attention against a naive softmax(Q K^T * scale) V
// with the full score matrix, for Tq == Tk and Tq < Tk, with sequence
// lengths that cross several key/query blocks; backward against the naive
// analytic gradients and float64 central differences.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/ops.h"

namespace motley {
namespace {

template <typename T>
Tensor random_tensor(Shape shape, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<T> v(shape_numel(shape));
  for (T& x : v) x = static_cast<T>(dist(gen));
  return Tensor::from_vector(v, shape);
}

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

struct NaiveAttention {
  std::vector<double> out, lse, dq, dk, dv;
};

// Full (Tq, Tk) scores per head; key j visible to query i iff j <= i + Tk - Tq.
NaiveAttention naive_attention(const std::vector<double>& q, const std::vector<double>& k,
                               const std::vector<double>& v, const std::vector<double>* dout,
                               std::int64_t bh, std::int64_t tq, std::int64_t tk,
                               std::int64_t hd, double scale) {
  NaiveAttention r;
  r.out.assign(bh * tq * hd, 0.0);
  r.lse.assign(bh * tq, 0.0);
  r.dq.assign(bh * tq * hd, 0.0);
  r.dk.assign(bh * tk * hd, 0.0);
  r.dv.assign(bh * tk * hd, 0.0);
  const std::int64_t off = tk - tq;
  for (std::int64_t h = 0; h < bh; ++h) {
    const double* Q = q.data() + h * tq * hd;
    const double* K = k.data() + h * tk * hd;
    const double* V = v.data() + h * tk * hd;
    std::vector<double> P(tq * tk, 0.0);
    for (std::int64_t i = 0; i < tq; ++i) {
      double m = -1e300;
      for (std::int64_t j = 0; j <= i + off; ++j) {
        double s = 0;
        for (std::int64_t c = 0; c < hd; ++c) s += Q[i * hd + c] * K[j * hd + c];
        P[i * tk + j] = s * scale;
        m = std::max(m, s * scale);
      }
      double sum = 0;
      for (std::int64_t j = 0; j <= i + off; ++j) sum += std::exp(P[i * tk + j] - m);
      r.lse[h * tq + i] = m + std::log(sum);
      for (std::int64_t j = 0; j < tk; ++j) {
        P[i * tk + j] = j <= i + off ? std::exp(P[i * tk + j] - r.lse[h * tq + i]) : 0.0;
      }
      for (std::int64_t c = 0; c < hd; ++c) {
        double o = 0;
        for (std::int64_t j = 0; j < tk; ++j) o += P[i * tk + j] * V[j * hd + c];
        r.out[(h * tq + i) * hd + c] = o;
      }
    }
    if (!dout) continue;
    const double* dO = dout->data() + h * tq * hd;
    for (std::int64_t i = 0; i < tq; ++i) {
      std::vector<double> dP(tk);
      double rowdot = 0;
      for (std::int64_t j = 0; j < tk; ++j) {
        double s = 0;
        for (std::int64_t c = 0; c < hd; ++c) s += dO[i * hd + c] * V[j * hd + c];
        dP[j] = s;
        rowdot += s * P[i * tk + j];
      }
      for (std::int64_t j = 0; j < tk; ++j) {
        const double p = P[i * tk + j];
        const double ds = p * (dP[j] - rowdot) * scale;
        for (std::int64_t c = 0; c < hd; ++c) {
          r.dq[(h * tq + i) * hd + c] += ds * K[j * hd + c];
          r.dk[(h * tk + j) * hd + c] += ds * Q[i * hd + c];
          r.dv[(h * tk + j) * hd + c] += p * dO[i * hd + c];
        }
      }
    }
  }
  return r;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double e = std::abs(got[i] - want[i]) / (1 + std::abs(want[i]));
    if (!(e <= worst)) {
      worst = e;
      at = i;
    }
  }
  EXPECT_LE(worst, tol) << what << ": worst relative error at " << at << " (got " << got[at]
                        << ", want " << want[at] << ")";
}

template <typename T>
class Attention : public ::testing::Test {
 protected:
  static double tol() { return std::is_same_v<T, float> ? 2e-5 : 1e-11; }
};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Attention, FloatTypes);

TYPED_TEST(Attention, ForwardAndBackwardMatchNaive) {
  using T = TypeParam;
  struct Case {
    std::int64_t B, H, tq, tk, hd;
  };
  // Lengths crossing the 64-wide blocks, partial last blocks, Tq < Tk.
  for (const Case& c : {Case{1, 2, 150, 150, 16}, Case{2, 1, 70, 130, 8}, Case{1, 1, 1, 65, 4},
                        Case{1, 3, 5, 5, 6}}) {
    const std::string name = "B" + std::to_string(c.B) + " H" + std::to_string(c.H) + " Tq" +
                             std::to_string(c.tq) + " Tk" + std::to_string(c.tk);
    const Tensor q = random_tensor<T>({c.B, c.H, c.tq, c.hd}, 1, 1.5);
    const Tensor k = random_tensor<T>({c.B, c.H, c.tk, c.hd}, 2, 1.5);
    const Tensor v = random_tensor<T>({c.B, c.H, c.tk, c.hd}, 3);
    const Tensor dout = random_tensor<T>({c.B, c.H, c.tq, c.hd}, 4);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
    const auto dov = values(dout);
    const NaiveAttention ref = naive_attention(values(q), values(k), values(v), &dov,
                                               c.B * c.H, c.tq, c.tk, c.hd, scale);
    auto [out, lse] = ops::attention(q, k, v, scale);
    EXPECT_EQ(lse.shape(), (Shape{c.B, c.H, c.tq}));
    EXPECT_EQ(lse.dtype(), q.dtype());
    expect_close(values(out), ref.out, TestFixture::tol(), name + " out");
    expect_close(values(lse), ref.lse, TestFixture::tol(), name + " lse");
    const ops::AttentionGrads g = ops::attention_backward(q, k, v, out, lse, dout, scale);
    expect_close(values(g.dq), ref.dq, 2 * TestFixture::tol(), name + " dq");
    expect_close(values(g.dk), ref.dk, 2 * TestFixture::tol(), name + " dk");
    expect_close(values(g.dv), ref.dv, 2 * TestFixture::tol(), name + " dv");
  }
}

TEST(AttentionGrad, FiniteDifferencesF64) {
  const std::int64_t tq = 3, tk = 5, hd = 4;
  const Tensor q = random_tensor<double>({1, 1, tq, hd}, 5);
  const Tensor k = random_tensor<double>({1, 1, tk, hd}, 6);
  const Tensor v = random_tensor<double>({1, 1, tk, hd}, 7);
  const std::vector<double> w = values(random_tensor<double>({1, 1, tq, hd}, 8));
  const double scale = 0.7;
  auto loss = [&](const Tensor& qq, const Tensor& kk, const Tensor& vv) {
    const auto o = values(ops::attention(qq, kk, vv, scale).first);
    double s = 0;
    for (std::size_t i = 0; i < o.size(); ++i) s += o[i] * w[i];
    return s;
  };
  auto [out, lse] = ops::attention(q, k, v, scale);
  const auto g = ops::attention_backward(q, k, v, out, lse, Tensor::from_vector(w, q.shape()), scale);
  const double h = 1e-6;
  auto check = [&](const Tensor& x, const Tensor& grad, int which, const char* name) {
    std::vector<double> xv = values(x);
    const auto gv = values(grad);
    for (std::size_t i = 0; i < xv.size(); ++i) {
      const double keep = xv[i];
      auto eval = [&](double val) {
        xv[i] = val;
        const Tensor t = Tensor::from_vector(xv, x.shape());
        return loss(which == 0 ? t : q, which == 1 ? t : k, which == 2 ? t : v);
      };
      const double num = (eval(keep + h) - eval(keep - h)) / (2 * h);
      xv[i] = keep;
      EXPECT_NEAR(gv[i], num, 1e-7 * (1 + std::abs(num))) << name << " " << i;
    }
  };
  check(q, g.dq, 0, "dq");
  check(k, g.dk, 1, "dk");
  check(v, g.dv, 2, "dv");
}

TEST(AttentionErrors, ShapesAreChecked) {
  const Tensor q = Tensor::zeros({1, 2, 8, 4});
  const Tensor k = Tensor::zeros({1, 2, 6, 4});
  try {
    ops::attention(q, k, k, 0.5);  // Tq > Tk
    FAIL() << "expected kShape";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("attention"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("(1, 2, 8, 4)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ops::attention(q, q, Tensor::zeros({1, 2, 8, 5}), 0.5), Error);
  EXPECT_THROW(ops::attention(q, q.to(DType::kF64), q, 0.5), Error);
}

TEST(Attention, NonContiguousInputsFromHeadSplit) {
  // q as produced by splitting heads: (B, T, H, hd) -> transpose(1, 2).
  const Tensor x = random_tensor<float>({2, 9, 3, 4}, 9);
  const Tensor q = x.transpose(1, 2);
  ASSERT_FALSE(q.is_contiguous());
  auto [o1, l1] = ops::attention(q, q, q, 0.5);
  auto [o2, l2] = ops::attention(q.contiguous(), q.contiguous(), q.contiguous(), 0.5);
  EXPECT_EQ(ops::max_abs_diff(o1, o2), 0.0);
}

}  // namespace
}  // namespace motley
