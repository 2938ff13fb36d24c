// Reductions (reduce, argmax, cumsum, all_finite) and GEMMs against the
// CPU backend.
#include <cmath>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace motley::cuda_test {
namespace {

using CudaReduce = CudaTest;
using CudaGemm = CudaTest;

struct ReduceShape {
  std::int64_t outer, n, inner;
};

// Shapes chosen to hit every path of the reduce kernels: short and long
// rows with inner == 1 (block per row, split or not), inner > 1 with and
// without splits of n, and a full reduction to one value.
const ReduceShape kReduceShapes[] = {
    {1, 1000003, 1}, {3, 1000, 1}, {5, 100000, 1}, {1000, 8, 1},  {7, 33, 5},
    {2, 100000, 3},  {1, 4, 1},    {64, 1, 64},    {4, 700, 300},
};

TEST_F(CudaReduce, AllOpsAllPathsF32) {
  for (const ReduceShape& s : kReduceShapes) {
    Tensor xc = randn({s.outer * s.n * s.inner}, 100 + s.n, 1.0);
    Tensor xg = on_gpu(xc);
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kSumSquares}) {
      Tensor oc = Tensor::empty({s.outer, s.inner}),
             og = Tensor::empty({s.outer, s.inner}, DType::kF32, gpu());
      cpu_backend_ref().reduce(op, xc, s.outer, s.n, s.inner, oc);
      gpu_backend().reduce(op, xg, s.outer, s.n, s.inner, og);
      const double err = nmse(og, oc);
      // Both sides sum in f64: only the final rounding to f32 remains.
      EXPECT_LT(err, 1e-12) << "op " << static_cast<int>(op) << " shape (" << s.outer << ", " << s.n
                            << ", " << s.inner << ")";
      if (op == ReduceOp::kMax || op == ReduceOp::kMin) {
        EXPECT_TRUE(same_bits(og, oc)) << "max/min are exact";
      }
    }
  }
}

TEST_F(CudaReduce, IntegersAndBf16) {
  for (DType dt : {DType::kI32, DType::kI64}) {
    Tensor xc = randint({6, 500, 3}, 110, -1000, 1000, dt);
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kSumSquares}) {
      Tensor oc = Tensor::empty({6, 3}, dt), og = Tensor::empty({6, 3}, dt, gpu());
      cpu_backend_ref().reduce(op, xc, 6, 500, 3, oc);
      gpu_backend().reduce(op, on_gpu(xc), 6, 500, 3, og);
      EXPECT_TRUE(same_bits(og, oc)) << dtype_name(dt) << " op " << static_cast<int>(op);
    }
  }
  Tensor xb = randn({8, 3000}, 111, 1.0, DType::kBF16);
  Tensor oc = Tensor::empty({8, 1});
  cpu_backend_ref().reduce(ReduceOp::kSum, xb.to(DType::kF32), 8, 3000, 1, oc);
  Tensor og = Tensor::empty({8, 1}, DType::kBF16, gpu());
  gpu_backend().reduce(ReduceOp::kSum, on_gpu(xb), 8, 3000, 1, og);
  EXPECT_LT(nmse(og, oc), kBf16Tol);
}

TEST_F(CudaReduce, SumIsDeterministic) {
  Tensor xg = on_gpu(randn({3, 2000000}, 120));
  Tensor a = Tensor::empty({3, 1}, DType::kF32, gpu()),
         b = Tensor::empty({3, 1}, DType::kF32, gpu());
  gpu_backend().reduce(ReduceOp::kSum, xg, 3, 2000000, 1, a);
  gpu_backend().reduce(ReduceOp::kSum, xg, 3, 2000000, 1, b);
  EXPECT_TRUE(same_bits(a, b));
}

TEST_F(CudaReduce, EmptyMaxIsAShapeError) {
  Tensor x = Tensor::empty({3, 0}, DType::kF32, gpu());
  Tensor o = Tensor::empty({3, 1}, DType::kF32, gpu());
  expect_error(ErrorKind::kShape, [&] { gpu_backend().reduce(ReduceOp::kMax, x, 3, 0, 1, o); });
  gpu_backend().reduce(ReduceOp::kSum, x, 3, 0, 1, o);
  EXPECT_EQ(o.to_vector<float>(), std::vector<float>(3, 0.0f));
}

TEST_F(CudaReduce, ArgmaxFirstMaximumWins) {
  // Small integers make ties common; rows short (warp per row) and long
  // (block per row, 256 and 1024 threads).
  for (std::int64_t n : {1, 5, 32, 1000, 3000, 20000}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      Tensor xc = randint({37, n}, 130 + n, -4, 5, dt);
      Tensor oc = Tensor::empty({37}, DType::kI64), og = Tensor::empty({37}, DType::kI64, gpu());
      cpu_backend_ref().argmax(xc.to(DType::kF32), oc);
      gpu_backend().argmax(on_gpu(xc), og);
      EXPECT_TRUE(same_bits(og, oc)) << "n " << n << " " << dtype_name(dt);
    }
  }
}

TEST_F(CudaReduce, CumsumFloatAndIntegers) {
  for (std::int64_t n : {1, 7, 1024, 1025, 5000, 40000}) {
    Tensor xc = randn({9, n}, 140 + n);
    Tensor oc = Tensor::empty({9, n}), og = Tensor::empty({9, n}, DType::kF32, gpu());
    cpu_backend_ref().cumsum(xc, oc);
    gpu_backend().cumsum(on_gpu(xc), og);
    EXPECT_LT(nmse(og, oc), 1e-12) << "n " << n;
    for (DType dt : {DType::kI32, DType::kI64}) {
      Tensor ic = randint({9, n}, 150 + n, -100, 100, dt);
      Tensor ioc = Tensor::empty({9, n}, dt), iog = Tensor::empty({9, n}, dt, gpu());
      cpu_backend_ref().cumsum(ic, ioc);
      gpu_backend().cumsum(on_gpu(ic), iog);
      EXPECT_TRUE(same_bits(iog, ioc)) << "n " << n << " " << dtype_name(dt);
    }
  }
}

TEST_F(CudaReduce, AllFinite) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF64}) {
    Tensor xc = randn({1000, 37}, 160, 1.0, dt);
    EXPECT_TRUE(gpu_backend().all_finite(on_gpu(xc))) << dtype_name(dt);
    for (double bad : {static_cast<double>(INFINITY), static_cast<double>(-INFINITY),
                       static_cast<double>(NAN)}) {
      std::vector<double> v = xc.to_vector<double>();
      v[12345] = bad;
      Tensor yc = Tensor::from_vector(v, xc.shape()).to(dt);
      EXPECT_FALSE(gpu_backend().all_finite(on_gpu(yc))) << dtype_name(dt) << " " << bad;
      // Through a strided view that still contains the bad element.
      EXPECT_FALSE(gpu_backend().all_finite(on_gpu(yc).transpose(0, 1)));
    }
  }
  EXPECT_TRUE(gpu_backend().all_finite(Tensor::ones({5}, DType::kI64, gpu())));
}

// ---- GEMM -----------------------------------------------------------------------------

// Runs gemm on both backends. A, B and C are views into wider buffers, so
// that the leading dimensions exceed the matrix widths.
void check_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, double alpha,
                double beta, DType dtype, DType c_dtype, double tol) {
  const std::int64_t pad = 3;
  const std::int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const std::int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  Tensor a_full = randn({a_rows, a_cols + pad}, 200 + m, 1.0, dtype);
  Tensor b_full = randn({b_rows, b_cols + pad}, 201 + n, 1.0, dtype);
  Tensor c_full = randn({m, n + pad}, 202 + k, 1.0, c_dtype);
  // Reference in f32 on the CPU from the same (rounded) values.
  Tensor a32 = a_full.to(DType::kF32), b32 = b_full.to(DType::kF32);
  Tensor c32 = c_full.to(DType::kF32).clone();
  cpu_backend_ref().gemm(ta, tb, m, n, k, alpha, a32, a_cols + pad, b32, b_cols + pad, beta, c32,
                         n + pad);
  Tensor cg = on_gpu(c_full);
  gpu_backend().gemm(ta, tb, m, n, k, alpha, on_gpu(a_full), a_cols + pad, on_gpu(b_full),
                     b_cols + pad, beta, cg, n + pad);
  EXPECT_LT(nmse(cg, c32), tol) << "ta " << ta << " tb " << tb << " (" << m << ", " << n << ", "
                                << k << ") " << dtype_name(dtype) << " -> " << dtype_name(c_dtype);
  // The padding columns of C are untouched.
  EXPECT_TRUE(same_bits(cg.narrow(1, n, pad), c_full.narrow(1, n, pad)));
}

TEST_F(CudaGemm, F32AllTransposesMatchCpuWithTf32Off) {
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      check_gemm(ta, tb, 37, 53, 29, 1.0, 0.0, DType::kF32, DType::kF32, kF32Tol);
      check_gemm(ta, tb, 128, 96, 512, 0.5, 1.25, DType::kF32, DType::kF32, kF32Tol);
      check_gemm(ta, tb, 1, 300, 77, -2.0, 0.5, DType::kF32, DType::kF32, kF32Tol);
    }
  }
  // A product whose TF32 error (10-bit mantissa inputs, ~1e-6 nmse) would
  // fail a tighter bound: f32 must be exact to ~1e-12 here.
  Tensor a = randn({256, 1024}, 210), b = randn({1024, 256}, 211);
  Tensor cc = Tensor::empty({256, 256}), cg = Tensor::empty({256, 256}, DType::kF32, gpu());
  cpu_backend_ref().gemm(false, false, 256, 256, 1024, 1.0, a, 1024, b, 256, 0.0, cc, 256);
  gpu_backend().gemm(false, false, 256, 256, 1024, 1.0, on_gpu(a), 1024, on_gpu(b), 256, 0.0, cg,
                     256);
  EXPECT_LT(nmse(cg, cc), 1e-10) << "TF32 must be off for f32 GEMMs";
}

TEST_F(CudaGemm, Bf16WithF32AndBf16Outputs) {
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      check_gemm(ta, tb, 64, 48, 96, 1.0, 0.0, DType::kBF16, DType::kF32, 1e-9);
      check_gemm(ta, tb, 33, 65, 17, 1.0, 0.5, DType::kBF16, DType::kBF16, kBf16Tol);
    }
  }
}

TEST_F(CudaGemm, ZeroKScalesC) {
  Tensor c0 = randn({4, 5}, 220);
  for (double beta : {0.0, 0.5}) {
    Tensor cc = c0.clone(), cg = on_gpu(c0);
    Tensor a = Tensor::empty({4, 0}), b = Tensor::empty({0, 5});
    cpu_backend_ref().gemm(false, false, 4, 5, 0, 1.0, a, 1, b, 5, beta, cc, 5);
    gpu_backend().gemm(false, false, 4, 5, 0, 1.0, on_gpu(a), 1, on_gpu(b), 5, beta, cg, 5);
    EXPECT_TRUE(same_bits(cg, cc)) << "beta " << beta;
  }
  // beta == 0 overwrites NaN (BLAS: C is not read).
  Tensor cn = Tensor::full({2, 2}, NAN, DType::kF32, gpu());
  Tensor a = Tensor::empty({2, 0}, DType::kF32, gpu()),
         b = Tensor::empty({0, 2}, DType::kF32, gpu());
  gpu_backend().gemm(false, false, 2, 2, 0, 1.0, a, 1, b, 2, 0.0, cn, 2);
  EXPECT_EQ(cn.to_vector<float>(), std::vector<float>(4, 0.0f));
  Tensor an = on_gpu(randn({2, 3}, 221)), bn = on_gpu(randn({3, 2}, 222));
  Tensor cn2 = Tensor::full({2, 2}, NAN, DType::kF32, gpu());
  gpu_backend().gemm(false, false, 2, 2, 3, 1.0, an, 3, bn, 2, 0.0, cn2, 2);
  EXPECT_TRUE(gpu_backend().all_finite(cn2)) << "beta 0 must not propagate NaN from C";
}

TEST_F(CudaGemm, StridedBatchedIncludingSharedB) {
  const std::int64_t batch = 5, m = 19, n = 23, k = 31;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (bool shared_b : {false, true}) {
        Tensor a = randn({batch, m * k}, 230), b = randn({batch, k * n}, 231);
        Tensor c0 = randn({batch, m * n}, 232);
        const std::int64_t lda = ta ? m : k, ldb = tb ? k : n;
        const std::int64_t sb = shared_b ? 0 : k * n;
        Tensor cc = c0.clone(), cg = on_gpu(c0);
        cpu_backend_ref().gemm_strided_batched(ta, tb, m, n, k, 0.7, a, lda, m * k, b, ldb, sb, 0.3,
                                               cc, n, m * n, batch);
        gpu_backend().gemm_strided_batched(ta, tb, m, n, k, 0.7, on_gpu(a), lda, m * k, on_gpu(b),
                                           ldb, sb, 0.3, cg, n, m * n, batch);
        EXPECT_LT(nmse(cg, cc), kF32Tol) << ta << tb << shared_b;
      }
    }
  }
}

TEST_F(CudaGemm, BadLeadingDimensionsAndShortBuffersAreShapeErrors) {
  Tensor a = Tensor::zeros({4, 6}, DType::kF32, gpu()),
         b = Tensor::zeros({6, 5}, DType::kF32, gpu());
  Tensor c = Tensor::zeros({4, 5}, DType::kF32, gpu());
  expect_error(ErrorKind::kShape, [&] {
    gpu_backend().gemm(false, false, 4, 5, 6, 1.0, a, 5, b, 5, 0.0, c, 5);  // lda < k
  });
  expect_error(ErrorKind::kShape, [&] {
    gpu_backend().gemm(false, false, 5, 5, 6, 1.0, a, 6, b, 5, 0.0, c, 5);  // A too short
  });
  Tensor f64 = Tensor::zeros({4, 6}, DType::kF64, gpu());
  expect_error(ErrorKind::kShape,
               [&] { gpu_backend().gemm(false, false, 4, 5, 6, 1.0, f64, 6, b, 5, 0.0, c, 5); });
}

}  // namespace
}  // namespace motley::cuda_test
