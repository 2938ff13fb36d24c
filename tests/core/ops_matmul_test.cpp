// matmul, linear, gemm_accumulate and the backend GEMMs against a triple
// loop, including transposed and sliced views (which must not be copied
// wrongly) and the batched paths.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/ops.h"
#include "core/philox.h"

namespace motley {
namespace {

template <typename T>
Tensor random_tensor(Shape shape, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<T> v(shape_numel(shape));
  for (T& x : v) x = static_cast<T>(dist(gen));
  return Tensor::from_vector(v, shape);
}

// Reference (batch, m, k) @ (batch or 1, k, n), on logical values.
std::vector<double> ref_matmul(const std::vector<double>& a, const std::vector<double>& b,
                               std::int64_t batch, std::int64_t m, std::int64_t k,
                               std::int64_t n, bool b_shared) {
  std::vector<double> c(batch * m * n, 0.0);
  for (std::int64_t z = 0; z < batch; ++z) {
    const double* bz = b.data() + (b_shared ? 0 : z * k * n);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t p = 0; p < k; ++p) s += a[(z * m + i) * k + p] * bz[p * n + j];
        c[(z * m + i) * n + j] = s;
      }
  }
  return c;
}

void expect_close(const Tensor& got, const std::vector<double>& want, double tol,
                  const std::string& what) {
  const auto g = got.to_vector<double>();
  ASSERT_EQ(g.size(), want.size()) << what;
  for (std::size_t i = 0; i < g.size(); ++i) {
    EXPECT_NEAR(g[i], want[i], tol * (1 + std::abs(want[i]))) << what << " at " << i;
  }
}

template <typename T>
class Matmul : public ::testing::Test {
 protected:
  static double tol() { return std::is_same_v<T, float> ? 1e-5 : 1e-12; }
};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Matmul, FloatTypes);

TYPED_TEST(Matmul, TwoDimensionalWithEveryTransposeCombination) {
  using T = TypeParam;
  const std::int64_t m = 7, k = 9, n = 5;
  const Tensor a = random_tensor<T>({m, k}, 1);
  const Tensor b = random_tensor<T>({k, n}, 2);
  const auto want = ref_matmul(a.to_vector<double>(), b.to_vector<double>(), 1, m, k, n, true);
  // Transposed views of contiguous storage: a^T^T etc.
  const Tensor at = a.transpose(0, 1).contiguous().transpose(0, 1);
  const Tensor bt = b.transpose(0, 1).contiguous().transpose(0, 1);
  ASSERT_FALSE(at.is_contiguous());
  for (const Tensor& aa : {a, at})
    for (const Tensor& bb : {b, bt}) {
      expect_close(ops::matmul(aa, bb), want, TestFixture::tol(), "matmul");
    }
  // A column slice: row stride larger than the row.
  const Tensor wide = random_tensor<T>({m, k + 4}, 3);
  const Tensor sliced = wide.narrow(1, 2, k);
  const auto sv = sliced.to_vector<double>();
  expect_close(ops::matmul(sliced, b), ref_matmul(sv, b.to_vector<double>(), 1, m, k, n, true),
               TestFixture::tol(), "matmul of a column slice");
  // A strided (every other column) view must be copied, not misread.
  const Tensor stepped = random_tensor<T>({m, 2 * k}, 4).slice(1, 0, 2 * k, 2);
  expect_close(ops::matmul(stepped, b),
               ref_matmul(stepped.to_vector<double>(), b.to_vector<double>(), 1, m, k, n, true),
               TestFixture::tol(), "matmul of a stepped view");
}

TYPED_TEST(Matmul, BatchedAndSharedWeight) {
  using T = TypeParam;
  const std::int64_t batch0 = 2, batch1 = 3, m = 4, k = 6, n = 5;
  const Tensor a = random_tensor<T>({batch0, batch1, m, k}, 5);
  const Tensor b = random_tensor<T>({batch0, batch1, k, n}, 6);
  const Tensor w = random_tensor<T>({k, n}, 7);
  const auto av = a.to_vector<double>();
  const Tensor c = ops::matmul(a, b);
  EXPECT_EQ(c.shape(), (Shape{batch0, batch1, m, n}));
  expect_close(c, ref_matmul(av, b.to_vector<double>(), 6, m, k, n, false), TestFixture::tol(),
               "batched");
  expect_close(ops::matmul(a, w), ref_matmul(av, w.to_vector<double>(), 6, m, k, n, true),
               TestFixture::tol(), "shared weight");
  // Batched with transposed operands: q @ k^T as attention would write it.
  const Tensor kk = random_tensor<T>({batch0, batch1, n, k}, 8);
  const Tensor kt = kk.transpose(2, 3);  // (.., k, n) view
  expect_close(ops::matmul(a, kt), ref_matmul(av, kt.to_vector<double>(), 6, m, k, n, false),
               TestFixture::tol(), "batched with transposed b");
  // A transposed batched a with a shared weight (no folding possible).
  const Tensor a_t = random_tensor<T>({batch0, batch1, k, m}, 9).transpose(2, 3);
  expect_close(ops::matmul(a_t, w),
               ref_matmul(a_t.to_vector<double>(), w.to_vector<double>(), 6, m, k, n, true),
               TestFixture::tol(), "transposed batch with shared weight");
  // Batch dims that are a permutation (not collapsible) are copied.
  const Tensor a_p = random_tensor<T>({batch1, batch0, m, k}, 10).transpose(0, 1);
  expect_close(ops::matmul(a_p, b),
               ref_matmul(a_p.to_vector<double>(), b.to_vector<double>(), 6, m, k, n, false),
               TestFixture::tol(), "permuted batch");
}

TYPED_TEST(Matmul, LinearAndGemmAccumulate) {
  using T = TypeParam;
  const std::int64_t rows = 6, in = 8, out = 3;
  const Tensor x = random_tensor<T>({2, 3, in}, 11);
  const Tensor w = random_tensor<T>({out, in}, 12);
  // Reference: x @ w^T.
  const auto wt = w.transpose(0, 1).contiguous().to_vector<double>();
  const auto want = ref_matmul(x.to_vector<double>(), wt, 1, rows, in, out, true);
  const Tensor y = ops::linear(x, w);
  EXPECT_EQ(y.shape(), (Shape{2, 3, out}));
  expect_close(y, want, TestFixture::tol(), "linear");
  // A transposed weight view gives the same result.
  const Tensor w_view = w.transpose(0, 1).contiguous().transpose(0, 1);
  expect_close(ops::linear(x, w_view), want, TestFixture::tol(), "linear, weight view");

  // dW += dy^T x (the weight gradient of linear), accumulated twice.
  const Tensor x2 = x.reshape({rows, in});
  const Tensor dy = random_tensor<T>({rows, out}, 13);
  Tensor dw = Tensor::ones({out, in}, x.dtype());
  ops::gemm_accumulate(dy, /*trans_a=*/true, x2, /*trans_b=*/false, 0.5, dw);
  ops::gemm_accumulate(dy.transpose(0, 1), false, x2.transpose(0, 1), true, 0.5, dw);
  const auto dyt = dy.transpose(0, 1).contiguous().to_vector<double>();
  auto g = ref_matmul(dyt, x2.to_vector<double>(), 1, out, rows, in, true);
  for (double& v : g) v = 1.0 + v;  // 1 + 0.5 g + 0.5 g
  expect_close(dw, g, TestFixture::tol(), "gemm_accumulate");
}

TEST(MatmulErrors, MismatchedShapesAreNamed) {
  const Tensor a = Tensor::zeros({2, 3});
  const Tensor b = Tensor::zeros({4, 5});
  try {
    ops::matmul(a, b);
    FAIL() << "expected kShape";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    const std::string msg = e.what();
    EXPECT_NE(msg.find("matmul"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(2, 3)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(4, 5)"), std::string::npos) << msg;
  }
  EXPECT_THROW(ops::matmul(Tensor::zeros({2, 2, 3}), Tensor::zeros({3, 3, 4})), Error);
  EXPECT_THROW(ops::linear(Tensor::zeros({2, 3}), Tensor::zeros({3, 2})), Error);
  Tensor c = Tensor::zeros({2, 2});
  EXPECT_THROW(ops::gemm_accumulate(a, false, a, false, 1.0, c), Error);
}

TEST(Matmul, EmptyInnerDimensionGivesZeros) {
  const Tensor a = Tensor::zeros({3, 0});
  const Tensor b = Tensor::zeros({0, 4});
  const Tensor c = ops::matmul(a, b);
  EXPECT_EQ(c.shape(), (Shape{3, 4}));
  EXPECT_EQ(c.to_vector<float>(), std::vector<float>(12, 0.0f));
}

TEST(BackendGemm, StridedBatchedWithViewsAndBeta) {
  // C_i = 2 A_i B_i^T + 0.5 C_i with explicit leading dimensions.
  Backend& be = backend_for(Device::cpu());
  const std::int64_t batch = 3, m = 4, n = 5, k = 6, lda = 8, ldb = 7, ldc = 9;
  const Tensor a = random_tensor<double>({batch, m, lda}, 20);
  const Tensor b = random_tensor<double>({batch, n, ldb}, 21);
  Tensor c = random_tensor<double>({batch, m, ldc}, 22);
  const auto av = a.to_vector<double>(), bv = b.to_vector<double>();
  auto want = c.to_vector<double>();
  for (std::int64_t z = 0; z < batch; ++z)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t p = 0; p < k; ++p) {
          s += av[(z * m + i) * lda + p] * bv[(z * n + j) * ldb + p];
        }
        double& cz = want[(z * m + i) * ldc + j];
        cz = 2 * s + 0.5 * cz;
      }
  be.gemm_strided_batched(false, true, m, n, k, 2.0, a, lda, m * lda, b, ldb, n * ldb, 0.5, c,
                          ldc, m * ldc, batch);
  expect_close(c, want, 1e-12, "gemm_strided_batched");
}

// Note [Matmul precision]: under kBf16Inputs an f32 product equals the f32
// product of the bf16-rounded operands (exact bf16 x bf16 products,
// accumulated in f32), differs from plain f32, and leaves f64 alone.
Tensor bf16_rounded(const Tensor& t) { return t.to(DType::kBF16).to(DType::kF32); }

TEST(MatmulPrecision, Bf16InputsRoundTheOperandsAndAccumulateInF32) {
  Tensor x = Tensor::empty({37, 64}), w = Tensor::empty({48, 64});
  fill_normal(x, philox_key(3, "mp/x"), 0.0, 1.0);
  fill_normal(w, philox_key(3, "mp/w"), 0.0, 1.0);
  const Tensor f32 = ops::linear(x, w);
  Tensor bf16, acc = Tensor::zeros({37, 48}), mm;
  {
    const ops::MatmulPrecisionGuard guard(ops::MatmulPrecision::kBf16Inputs);
    EXPECT_EQ(ops::matmul_precision(), ops::MatmulPrecision::kBf16Inputs);
    bf16 = ops::linear(x, w);
    mm = ops::matmul(x, w.transpose(0, 1));
    ops::gemm_accumulate(x, false, w, true, 1.0, acc);
  }
  EXPECT_EQ(ops::matmul_precision(), ops::MatmulPrecision::kF32);  // restored
  EXPECT_EQ(bf16.dtype(), DType::kF32);
  const Tensor want = ops::linear(bf16_rounded(x), bf16_rounded(w));
  EXPECT_EQ(bf16.to_vector<float>(), want.to_vector<float>());
  EXPECT_EQ(mm.to_vector<float>(),
            ops::matmul(bf16_rounded(x), bf16_rounded(w).transpose(0, 1)).to_vector<float>());
  EXPECT_LT(ops::nmse(acc, want), 1e-12);
  // bf16 rounding is visible (about 2^-9 relative per operand) but small.
  const double err = ops::nmse(bf16, f32);
  EXPECT_GT(err, 1e-8);
  EXPECT_LT(err, 1e-4);
  // f64 is not touched.
  const Tensor x64 = x.to(DType::kF64), w64 = w.to(DType::kF64);
  const ops::MatmulPrecisionGuard guard(ops::MatmulPrecision::kBf16Inputs);
  EXPECT_EQ(ops::linear(x64, w64).to_vector<double>(), [&] {
    const ops::MatmulPrecisionGuard f32_again(ops::MatmulPrecision::kF32);
    return ops::linear(x64, w64).to_vector<double>();
  }());
}

}  // namespace
}  // namespace motley
