// Fused model kernels (softmax, cross-entropy, RMSNorm, SwiGLU, RoPE,
// AdamW) against the CPU backend, in f32 and, where the CUDA backend
// supports it, bf16.
#include <cmath>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace motley::cuda_test {
namespace {

using CudaFused = CudaTest;

// Row lengths covering warp-per-row (<= 1024), block-per-row with 256
// threads (<= 8192) and with 1024 threads.
const std::int64_t kRowLengths[] = {1, 7, 64, 1000, 1025, 5000, 50257};

TEST_F(CudaFused, SoftmaxAndLogSoftmaxForwardBackward) {
  for (std::int64_t n : kRowLengths) {
    const std::int64_t rows = n > 10000 ? 3 : 37;
    Tensor xc = randn({rows, n}, 300 + n, 3.0);
    Tensor dyc = randn({rows, n}, 301 + n);
    for (bool log : {false, true}) {
      Tensor yc = Tensor::empty({rows, n}), yg = Tensor::empty({rows, n}, DType::kF32, gpu());
      cpu_backend_ref().softmax(xc, yc, log);
      gpu_backend().softmax(on_gpu(xc), yg, log);
      EXPECT_LT(nmse(yg, yc), kF32Tol) << "n " << n << " log " << log;
      Tensor dxc = Tensor::empty({rows, n}), dxg = Tensor::empty({rows, n}, DType::kF32, gpu());
      cpu_backend_ref().softmax_backward(yc, dyc, dxc, log);
      gpu_backend().softmax_backward(on_gpu(yc), on_gpu(dyc), dxg, log);
      EXPECT_LT(nmse(dxg, dxc), kF32Tol) << "backward n " << n << " log " << log;

      // bf16 in and out.
      Tensor xb = xc.to(DType::kBF16), dyb = dyc.to(DType::kBF16);
      Tensor ybg = Tensor::empty({rows, n}, DType::kBF16, gpu());
      gpu_backend().softmax(on_gpu(xb), ybg, log);
      Tensor yref = Tensor::empty({rows, n});
      cpu_backend_ref().softmax(xb.to(DType::kF32), yref, log);
      EXPECT_LT(nmse(ybg, yref), kBf16Tol) << "bf16 n " << n << " log " << log;
      Tensor yb = yref.to(DType::kBF16);
      Tensor dxbg = Tensor::empty({rows, n}, DType::kBF16, gpu());
      gpu_backend().softmax_backward(on_gpu(yb), on_gpu(dyb), dxbg, log);
      Tensor dxref = Tensor::empty({rows, n});
      cpu_backend_ref().softmax_backward(yb.to(DType::kF32), dyb.to(DType::kF32), dxref, log);
      EXPECT_LT(nmse(dxbg, dxref), kBf16Tol) << "bf16 backward n " << n << " log " << log;
    }
  }
}

TEST_F(CudaFused, CrossEntropyWithIgnoredRows) {
  const std::int64_t ignore = -100;
  for (std::int64_t v : {2, 10, 1000, 3000, 50257}) {
    const std::int64_t rows = 45;
    Tensor logits = randn({rows, v}, 310 + v, 2.0);
    for (DType tdt : {DType::kI32, DType::kI64}) {
      std::vector<std::int64_t> t = randint({rows}, 311 + v, 0, v).to_vector<std::int64_t>();
      t[3] = ignore;
      t[17] = ignore;
      Tensor targets = Tensor::from_vector(t, {rows}).to(tdt);
      Tensor loss_c = Tensor::empty({rows}), lse_c = Tensor::empty({rows});
      cpu_backend_ref().cross_entropy(logits, targets, ignore, loss_c, lse_c);
      Tensor loss_g = Tensor::empty({rows}, DType::kF32, gpu());
      Tensor lse_g = Tensor::empty({rows}, DType::kF32, gpu());
      const Tensor logits_g = on_gpu(logits), targets_g = on_gpu(targets);
      gpu_backend().cross_entropy(logits_g, targets_g, ignore, loss_g, lse_g);
      EXPECT_LT(nmse(loss_g, loss_c), kF32Tol) << "V " << v;
      EXPECT_LT(nmse(lse_g, lse_c), kF32Tol) << "V " << v;
      EXPECT_EQ(on_cpu(loss_g).to_vector<float>()[3], 0.0f);

      Tensor dloss = randn({rows}, 312 + v);
      Tensor dx_c = Tensor::empty({rows, v});
      cpu_backend_ref().cross_entropy_backward(logits, targets, ignore, lse_c, dloss, dx_c);
      Tensor dx_g = Tensor::empty({rows, v}, DType::kF32, gpu());
      gpu_backend().cross_entropy_backward(logits_g, targets_g, ignore, on_gpu(lse_c),
                                           on_gpu(dloss), dx_g);
      EXPECT_LT(nmse(dx_g, dx_c), kF32Tol) << "backward V " << v;
      const std::vector<float> row17 = on_cpu(dx_g).select(0, 17).to_vector<float>();
      EXPECT_EQ(row17, std::vector<float>(v, 0.0f)) << "ignored row has zero gradient";
    }
  }
}

TEST_F(CudaFused, CrossEntropyBf16LogitsWithBf16Statistics) {
  const std::int64_t rows = 20, v = 777;
  Tensor logits = randn({rows, v}, 320, 2.0, DType::kBF16);
  Tensor targets = randint({rows}, 321, 0, v);
  Tensor loss_c = Tensor::empty({rows}), lse_c = Tensor::empty({rows});
  cpu_backend_ref().cross_entropy(logits.to(DType::kF32), targets, -1, loss_c, lse_c);
  // As ops allocates them: statistics in the logits' dtype.
  Tensor loss_g = Tensor::empty({rows}, DType::kBF16, gpu());
  Tensor lse_g = Tensor::empty({rows}, DType::kBF16, gpu());
  gpu_backend().cross_entropy(on_gpu(logits), on_gpu(targets), -1, loss_g, lse_g);
  EXPECT_LT(nmse(loss_g, loss_c), kBf16Tol);
  EXPECT_LT(nmse(lse_g, lse_c), kBf16Tol);
  Tensor dloss = Tensor::ones({rows}, DType::kBF16);
  Tensor dx_c = Tensor::empty({rows, v});
  cpu_backend_ref().cross_entropy_backward(logits.to(DType::kF32), targets, -1, lse_c,
                                           dloss.to(DType::kF32), dx_c);
  Tensor dx_g = Tensor::empty({rows, v}, DType::kBF16, gpu());
  gpu_backend().cross_entropy_backward(on_gpu(logits), on_gpu(targets), -1, lse_g, on_gpu(dloss),
                                       dx_g);
  EXPECT_LT(nmse(dx_g, dx_c), 1e-3) << "bf16 lse adds ~1e-3 relative error to p";
}

TEST_F(CudaFused, CrossEntropyBadTargetIsAShapeError) {
  Tensor logits = on_gpu(randn({4, 10}, 330));
  Tensor loss = Tensor::empty({4}, DType::kF32, gpu()),
         lse = Tensor::empty({4}, DType::kF32, gpu());
  for (std::int64_t bad : {10, -1, 1000}) {
    Tensor targets = on_gpu(Tensor::from_vector(std::vector<std::int64_t>{1, 2, bad, 3}, {4}));
    const std::string msg = expect_error(
        ErrorKind::kShape, [&] { gpu_backend().cross_entropy(logits, targets, -100, loss, lse); });
    EXPECT_NE(msg.find("row 2"), std::string::npos) << msg;
  }
  // ignore_index itself may lie outside [0, V).
  Tensor targets = on_gpu(Tensor::from_vector(std::vector<std::int32_t>{1, -7, 9, 0}, {4}));
  gpu_backend().cross_entropy(logits, targets, -7, loss, lse);
  EXPECT_EQ(on_cpu(loss).to_vector<float>()[1], 0.0f);
}

TEST_F(CudaFused, RmsNormForwardBackwardAndDgAccumulates) {
  // d >= 3: with d = 1 the gradient is eps-sized and pure cancellation noise.
  for (std::int64_t d : {3, 64, 1000, 2048, 5000}) {
    for (std::int64_t rows : {1, 300, 5000}) {
      if (rows * d > 5000000) continue;
      Tensor x = randn({rows, d}, 340 + d, 2.0);
      Tensor g = randu({d}, 341 + d, 0.5, 1.5);
      Tensor yc = Tensor::empty({rows, d}), rc = Tensor::empty({rows});
      cpu_backend_ref().rmsnorm(x, g, 1e-5, yc, rc);
      Tensor yg = Tensor::empty({rows, d}, DType::kF32, gpu());
      Tensor rg = Tensor::empty({rows}, DType::kF32, gpu());
      gpu_backend().rmsnorm(on_gpu(x), on_gpu(g), 1e-5, yg, rg);
      EXPECT_LT(nmse(yg, yc), kF32Tol) << rows << "x" << d;
      EXPECT_LT(nmse(rg, rc), kF32Tol) << rows << "x" << d;

      Tensor dy = randn({rows, d}, 342 + d);
      Tensor dg0 = randn({d}, 343 + d);  // dg accumulates into existing values
      Tensor dxc = Tensor::empty({rows, d}), dgc = dg0.clone();
      cpu_backend_ref().rmsnorm_backward(x, g, rc, dy, dxc, dgc);
      Tensor dxg = Tensor::empty({rows, d}, DType::kF32, gpu()), dgg = on_gpu(dg0);
      gpu_backend().rmsnorm_backward(on_gpu(x), on_gpu(g), on_gpu(rc), on_gpu(dy), dxg, dgg);
      EXPECT_LT(nmse(dxg, dxc), kF32Tol) << rows << "x" << d;
      EXPECT_LT(nmse(dgg, dgc), kF32Tol) << rows << "x" << d;
      // Deterministic: a second run gives the same bits.
      Tensor dgg2 = on_gpu(dg0), dxg2 = Tensor::empty({rows, d}, DType::kF32, gpu());
      gpu_backend().rmsnorm_backward(on_gpu(x), on_gpu(g), on_gpu(rc), on_gpu(dy), dxg2, dgg2);
      EXPECT_TRUE(same_bits(dgg, dgg2)) << rows << "x" << d;
    }
  }
}

TEST_F(CudaFused, RmsNormBf16ActivationsWithF32AndBf16Gains) {
  const std::int64_t rows = 100, d = 768;
  Tensor x = randn({rows, d}, 350, 1.0, DType::kBF16);
  Tensor g = randu({d}, 351, 0.5, 1.5);
  Tensor dy = randn({rows, d}, 352, 1.0, DType::kBF16);
  for (DType gdt : {DType::kF32, DType::kBF16}) {
    Tensor gq = g.to(gdt);
    Tensor yc = Tensor::empty({rows, d}), rc = Tensor::empty({rows});
    cpu_backend_ref().rmsnorm(x.to(DType::kF32), gq.to(DType::kF32), 1e-5, yc, rc);
    Tensor yg = Tensor::empty({rows, d}, DType::kBF16, gpu());
    Tensor rg = Tensor::empty({rows}, DType::kF32, gpu());
    gpu_backend().rmsnorm(on_gpu(x), on_gpu(gq), 1e-5, yg, rg);
    EXPECT_LT(nmse(yg, yc), kBf16Tol) << dtype_name(gdt);
    EXPECT_LT(nmse(rg, rc), kF32Tol) << dtype_name(gdt);
    Tensor dxc = Tensor::empty({rows, d}), dgc = Tensor::zeros({d});
    cpu_backend_ref().rmsnorm_backward(x.to(DType::kF32), gq.to(DType::kF32), rc,
                                       dy.to(DType::kF32), dxc, dgc);
    Tensor dxg = Tensor::empty({rows, d}, DType::kBF16, gpu());
    Tensor dgg = Tensor::zeros({d}, gdt, gpu());
    gpu_backend().rmsnorm_backward(on_gpu(x), on_gpu(gq), rg, on_gpu(dy), dxg, dgg);
    EXPECT_LT(nmse(dxg, dxc), kBf16Tol) << dtype_name(gdt);
    EXPECT_LT(nmse(dgg, dgc), kBf16Tol) << dtype_name(gdt);
  }
}

TEST_F(CudaFused, SwiGluForwardBackward) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const double tol = dt == DType::kF32 ? kF32Tol : kBf16Tol;
    Tensor a = randn({129, 257}, 360, 3.0, dt), b = randn({129, 257}, 361, 1.0, dt);
    Tensor dout = randn({129, 257}, 362, 1.0, dt);
    Tensor a32 = a.to(DType::kF32), b32 = b.to(DType::kF32), d32 = dout.to(DType::kF32);
    Tensor oc = Tensor::empty(a.shape());
    cpu_backend_ref().swiglu(a32, b32, oc);
    Tensor og = Tensor::empty(a.shape(), dt, gpu());
    gpu_backend().swiglu(on_gpu(a), on_gpu(b), og);
    EXPECT_LT(nmse(og, oc), tol) << dtype_name(dt);
    Tensor dac = Tensor::empty(a.shape()), dbc = Tensor::empty(a.shape());
    cpu_backend_ref().swiglu_backward(a32, b32, d32, dac, dbc);
    Tensor dag = Tensor::empty(a.shape(), dt, gpu()), dbg = Tensor::empty(a.shape(), dt, gpu());
    gpu_backend().swiglu_backward(on_gpu(a), on_gpu(b), on_gpu(dout), dag, dbg);
    EXPECT_LT(nmse(dag, dac), tol) << dtype_name(dt);
    EXPECT_LT(nmse(dbg, dbc), tol) << dtype_name(dt);
  }
}

TEST_F(CudaFused, RopeForwardInverseAndOffsets) {
  for (std::int64_t hd : {2, 16, 64, 128}) {
    for (std::int64_t offset : {0, 7, 4000}) {
      Tensor x = randn({2, 3, 50, hd}, 370 + hd);
      for (bool inverse : {false, true}) {
        Tensor yc = Tensor::empty(x.shape()), yg = Tensor::empty(x.shape(), DType::kF32, gpu());
        cpu_backend_ref().rope(x, 10000.0, offset, inverse, yc);
        gpu_backend().rope(on_gpu(x), 10000.0, offset, inverse, yg);
        EXPECT_LT(nmse(yg, yc), kF32Tol) << "hd " << hd << " offset " << offset;
      }
      // The inverse undoes the rotation.
      Tensor y = Tensor::empty(x.shape(), DType::kF32, gpu());
      Tensor back = Tensor::empty(x.shape(), DType::kF32, gpu());
      gpu_backend().rope(on_gpu(x), 10000.0, offset, false, y);
      gpu_backend().rope(y, 10000.0, offset, true, back);
      EXPECT_LT(nmse(back, x), 1e-12) << "hd " << hd;
    }
  }
  Tensor xb = randn({1, 2, 9, 32}, 380, 1.0, DType::kBF16);
  Tensor yc = Tensor::empty(xb.shape());
  cpu_backend_ref().rope(xb.to(DType::kF32), 500000.0, 3, false, yc);
  Tensor yg = Tensor::empty(xb.shape(), DType::kBF16, gpu());
  gpu_backend().rope(on_gpu(xb), 500000.0, 3, false, yg);
  EXPECT_LT(nmse(yg, yc), kBf16Tol);
  Tensor odd = Tensor::empty({1, 1, 2, 5}, DType::kF32, gpu());
  Tensor odd_out = Tensor::empty({1, 1, 2, 5}, DType::kF32, gpu());
  expect_error(ErrorKind::kShape, [&] { gpu_backend().rope(odd, 10000.0, 0, false, odd_out); });
}

TEST_F(CudaFused, AdamWStepsMatchCpu) {
  const Shape shape = {1000, 37};
  Tensor pc = randn(shape, 390), mc = Tensor::zeros(shape), vc = Tensor::zeros(shape);
  Tensor pg = on_gpu(pc), mg = on_gpu(mc), vg = on_gpu(vc);
  for (std::int64_t step = 1; step <= 5; ++step) {
    Tensor grad = randn(shape, 391 + step, 0.1);
    const double wd = step == 3 ? 0.0 : 0.1;
    cpu_backend_ref().adamw(pc, grad, mc, vc, 1e-3, 0.9, 0.95, 1e-8, wd, step);
    gpu_backend().adamw(pg, on_gpu(grad), mg, vg, 1e-3, 0.9, 0.95, 1e-8, wd, step);
  }
  EXPECT_LT(nmse(pg, pc), 1e-12);
  EXPECT_LT(nmse(mg, mc), 1e-12);
  EXPECT_LT(nmse(vg, vc), 1e-12);
  // The parameters moved (the comparison above is not vacuous).
  EXPECT_GT(nmse(pg, randn(shape, 390)), 1e-9);
}

}  // namespace
}  // namespace motley::cuda_test
