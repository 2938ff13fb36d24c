// fill, copy with casts over strided and broadcast views, and the
// elementwise kernels, against the CPU backend.
#include <cmath>
#include <functional>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace motley::cuda_test {
namespace {

using CudaElementwise = CudaTest;

const DType kAllDTypes[] = {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64};

TEST_F(CudaElementwise, FillEveryDTypeContiguousAndStrided) {
  for (DType dt : kAllDTypes) {
    for (double value : {0.0, -0.0, 1.0, -3.75, 1e10, 0.1}) {
      if (dt == DType::kI32 && std::abs(value) > 1e9) continue;  // out of range: UB
      Tensor g = Tensor::empty({3, 5, 7}, dt, gpu());
      gpu_backend().fill(g, value);
      Tensor c = Tensor::empty({3, 5, 7}, dt);
      cpu_backend_ref().fill(c, value);
      EXPECT_TRUE(same_bits(g, c)) << dtype_name(dt) << " " << value;
      // A strided view: every other column of a transposed tensor.
      Tensor base_g = Tensor::zeros({7, 10}, dt, gpu());
      Tensor base_c = Tensor::zeros({7, 10}, dt);
      Tensor vg = base_g.transpose(0, 1).slice(0, 0, 10, 2);
      Tensor vc = base_c.transpose(0, 1).slice(0, 0, 10, 2);
      gpu_backend().fill(vg, value);
      cpu_backend_ref().fill(vc, value);
      EXPECT_TRUE(same_bits(base_g, base_c)) << "strided fill " << dtype_name(dt) << " " << value;
    }
  }
}

// Values that survive every cast (small, with fractions to test float ->
// int truncation, negative to test its direction), then all 25 casts.
TEST_F(CudaElementwise, CopyCastsBetweenAllDTypes) {
  Tensor src_f64 = randu({4, 33}, 1, -100.0, 100.0, DType::kF64);
  for (DType from : kAllDTypes) {
    const Tensor src_c = src_f64.to(from);
    const Tensor src_g = on_gpu(src_c);
    for (DType to : kAllDTypes) {
      Tensor dst_g = Tensor::empty(src_c.shape(), to, gpu());
      Tensor dst_c = Tensor::empty(src_c.shape(), to);
      gpu_backend().copy(src_g, dst_g);
      cpu_backend_ref().copy(src_c, dst_c);
      EXPECT_TRUE(same_bits(dst_g, dst_c)) << dtype_name(from) << " -> " << dtype_name(to);
    }
  }
}

TEST_F(CudaElementwise, CopyBf16RoundingAndSpecials) {
  std::vector<float> v = {1.0f,
                          1.00390625f,
                          1.01171875f,
                          -2.5f,
                          3.3e38f,
                          1e-40f,
                          -0.0f,
                          INFINITY,
                          -INFINITY,
                          NAN,
                          65504.0f,
                          0.333333f,
                          1.0f + 1.0f / 256.0f};
  Tensor c = Tensor::from_vector(v, {static_cast<std::int64_t>(v.size())});
  Tensor g = on_gpu(c);
  Tensor out_g = Tensor::empty(c.shape(), DType::kBF16, gpu());
  Tensor out_c = Tensor::empty(c.shape(), DType::kBF16);
  gpu_backend().copy(g, out_g);
  cpu_backend_ref().copy(c, out_c);
  EXPECT_TRUE(same_bits(out_g, out_c)) << "round to nearest even, NaN canonical";
}

TEST_F(CudaElementwise, CopyStridedBroadcastAndHighRankViews) {
  Tensor base_c = randn({4, 6, 5}, 2);
  Tensor base_g = on_gpu(base_c);
  struct Case {
    const char* what;
    std::function<Tensor(const Tensor&)> view;
  };
  const std::vector<Case> cases = {
      {"transpose", [](const Tensor& t) { return t.transpose(0, 2); }},
      {"permute",
       [](const Tensor& t) {
         return t.permute({1, 2, 0});
       }},
      {"slice step", [](const Tensor& t) { return t.slice(1, 1, 6, 2); }},
      {"narrow", [](const Tensor& t) { return t.narrow(2, 1, 3); }},
      {"select", [](const Tensor& t) { return t.select(1, 3); }},
      {"expand",
       [](const Tensor& t) {
         return t.select(1, 0).unsqueeze(1).expand({4, 7, 5});
       }},
      {"expand lead",
       [](const Tensor& t) {
         return t.select(0, 2).expand({3, 6, 5});
       }},
      {"scalar broadcast",
       [](const Tensor& t) {
         return t.select(0, 1).select(0, 2).select(0, 3).expand({2, 3});
       }},
  };
  for (const Case& cs : cases) {
    for (DType to : {DType::kF32, DType::kBF16, DType::kF64}) {
      const Tensor vc = cs.view(base_c);
      const Tensor vg = cs.view(base_g);
      Tensor dc = Tensor::empty(vc.shape(), to);
      Tensor dg = Tensor::empty(vg.shape(), to, gpu());
      cpu_backend_ref().copy(vc, dc);
      gpu_backend().copy(vg, dg);
      EXPECT_TRUE(same_bits(dg, dc)) << cs.what << " -> " << dtype_name(to);
    }
  }
  // Rank 7, permuted so that no two dimensions merge: the strided path
  // with the deepest index computation.
  Tensor r7_c = randn({2, 3, 2, 3, 2, 3, 2}, 3);
  Tensor r7_g = on_gpu(r7_c);
  const std::vector<std::int64_t> order = {6, 0, 5, 1, 4, 2, 3};
  Tensor pc = r7_c.permute(order), pg = r7_g.permute(order);
  Tensor dc = Tensor::empty(pc.shape()), dg = Tensor::empty(pg.shape(), DType::kF32, gpu());
  cpu_backend_ref().copy(pc, dc);
  gpu_backend().copy(pg, dg);
  EXPECT_TRUE(same_bits(dg, dc)) << "rank 7 permuted";
  // A non-contiguous destination.
  Tensor wide_c = Tensor::zeros({5, 8}), wide_g = Tensor::zeros({5, 8}, DType::kF32, gpu());
  Tensor src_c = randn({8, 5}, 4), src_g = on_gpu(src_c);
  Tensor tc = wide_c.transpose(0, 1), tg = wide_g.transpose(0, 1);
  cpu_backend_ref().copy(src_c, tc);
  gpu_backend().copy(src_g, tg);
  EXPECT_TRUE(same_bits(wide_g, wide_c)) << "transposed destination";
}

TEST_F(CudaElementwise, UnaryF32MatchesCpu) {
  const std::vector<std::pair<UnaryOp, const char*>> ops_list = {
      {UnaryOp::kNeg, "neg"},           {UnaryOp::kExp, "exp"},
      {UnaryOp::kLog, "log"},           {UnaryOp::kSqrt, "sqrt"},
      {UnaryOp::kRsqrt, "rsqrt"},       {UnaryOp::kSquare, "square"},
      {UnaryOp::kAbs, "abs"},           {UnaryOp::kSilu, "silu"},
      {UnaryOp::kSigmoid, "sigmoid"},   {UnaryOp::kTanh, "tanh"},
      {UnaryOp::kSoftplus, "softplus"}, {UnaryOp::kRelu, "relu"},
      {UnaryOp::kScale, "scale"},       {UnaryOp::kAddScalar, "add_scalar"},
      {UnaryOp::kPowScalar, "pow"},     {UnaryOp::kReciprocal, "reciprocal"},
  };
  for (const auto& [op, name] : ops_list) {
    const bool positive = op == UnaryOp::kLog || op == UnaryOp::kSqrt || op == UnaryOp::kRsqrt ||
                          op == UnaryOp::kPowScalar || op == UnaryOp::kReciprocal;
    for (double alpha : {2.0, -0.75, 1.5}) {
      Tensor xc = positive ? randu({37, 41}, 10, 0.1, 5.0) : randn({37, 41}, 10, 3.0);
      // Through a transposed view, to use the strided path too.
      for (bool transposed : {false, true}) {
        const Tensor in_c = transposed ? xc.transpose(0, 1) : xc;
        const Tensor in_g = transposed ? on_gpu(xc).transpose(0, 1) : on_gpu(xc);
        Tensor oc = Tensor::empty(in_c.shape());
        Tensor og = Tensor::empty(in_g.shape(), DType::kF32, gpu());
        cpu_backend_ref().unary(op, in_c, oc, alpha);
        gpu_backend().unary(op, in_g, og, alpha);
        EXPECT_LT(nmse(og, oc), kF32Tol) << name << " alpha " << alpha << " t " << transposed;
      }
    }
  }
}

TEST_F(CudaElementwise, UnaryBf16MatchesCpuOnRoundedInputs) {
  for (UnaryOp op : {UnaryOp::kExp, UnaryOp::kSilu, UnaryOp::kTanh, UnaryOp::kScale,
                     UnaryOp::kSquare, UnaryOp::kSigmoid}) {
    Tensor xb = randn({64, 33}, 11, 1.5, DType::kBF16);
    Tensor oc = Tensor::empty(xb.shape());
    cpu_backend_ref().unary(op, xb.to(DType::kF32), oc, 0.5);
    Tensor og = Tensor::empty(xb.shape(), DType::kBF16, gpu());
    gpu_backend().unary(op, on_gpu(xb), og, 0.5);
    EXPECT_LT(nmse(og, oc), kBf16Tol) << static_cast<int>(op);
  }
}

TEST_F(CudaElementwise, BinaryWithBroadcastViewsMatchesCpu) {
  const std::vector<BinaryOp> ops_list = {BinaryOp::kAdd,          BinaryOp::kSub, BinaryOp::kMul,
                                          BinaryOp::kDiv,          BinaryOp::kMax, BinaryOp::kMin,
                                          BinaryOp::kSiluBackward, BinaryOp::kEq};
  // Quarters, so that kEq and kMax/kMin see equal values; b > 0 for kDiv.
  const Tensor ac = ops::scale(randint({4, 1, 5}, 20, -8, 9, DType::kF32), 0.25);
  const Tensor bc = ops::scale(randint({3, 1}, 21, 2, 9, DType::kF32), 0.25);
  const Shape shape = {4, 3, 5};
  for (BinaryOp op : ops_list) {
    const Tensor a_c = ac.expand(shape), b_c = bc.expand(shape);
    const Tensor a_g = on_gpu(ac).expand(shape), b_g = on_gpu(bc).expand(shape);
    Tensor oc = Tensor::empty(shape), og = Tensor::empty(shape, DType::kF32, gpu());
    cpu_backend_ref().binary(op, a_c, b_c, oc);
    gpu_backend().binary(op, a_g, b_g, og);
    EXPECT_LT(nmse(og, oc), kF32Tol) << static_cast<int>(op);
    // bf16
    Tensor ab = ac.to(DType::kBF16), bb = bc.to(DType::kBF16);
    Tensor oc2 = Tensor::empty(shape);
    cpu_backend_ref().binary(op, ab.to(DType::kF32).expand(shape), bb.to(DType::kF32).expand(shape),
                             oc2);
    Tensor og2 = Tensor::empty(shape, DType::kBF16, gpu());
    gpu_backend().binary(op, on_gpu(ab).expand(shape), on_gpu(bb).expand(shape), og2);
    EXPECT_LT(nmse(og2, oc2), kBf16Tol) << "bf16 " << static_cast<int>(op);
  }
  // kEq must have produced some ones and some zeros to mean anything.
  Tensor a_eq = on_gpu(Tensor::from_vector(std::vector<float>{1, 2, 3}, {3}));
  Tensor b_eq = on_gpu(Tensor::from_vector(std::vector<float>{1, 0, 3}, {3}));
  Tensor o_eq = Tensor::empty({3}, DType::kF32, gpu());
  gpu_backend().binary(BinaryOp::kEq, a_eq, b_eq, o_eq);
  EXPECT_EQ(o_eq.to_vector<float>(), (std::vector<float>{1, 0, 1}));
}

TEST_F(CudaElementwise, BinaryIntegers) {
  for (DType dt : {DType::kI32, DType::kI64}) {
    Tensor ac = randint({6, 7}, 30, -50, 50, dt);
    Tensor bc = randint({6, 7}, 31, 1, 9, dt);
    for (BinaryOp op : {BinaryOp::kAdd, BinaryOp::kSub, BinaryOp::kMul, BinaryOp::kDiv,
                        BinaryOp::kMax, BinaryOp::kMin, BinaryOp::kEq}) {
      Tensor oc = Tensor::empty({6, 7}, dt), og = Tensor::empty({6, 7}, dt, gpu());
      cpu_backend_ref().binary(op, ac, bc, oc);
      gpu_backend().binary(op, on_gpu(ac), on_gpu(bc), og);
      EXPECT_TRUE(same_bits(og, oc)) << dtype_name(dt) << " op " << static_cast<int>(op);
    }
  }
}

TEST_F(CudaElementwise, InPlaceBinaryAndAxpby) {
  Tensor ac = randn({1000}, 40), bc = randn({1000}, 41);
  Tensor ag = on_gpu(ac), bg = on_gpu(bc);
  Tensor expect = Tensor::empty({1000});
  cpu_backend_ref().binary(BinaryOp::kMul, ac, bc, expect);
  gpu_backend().binary(BinaryOp::kMul, ag, bg, ag);  // out aliases a
  EXPECT_LT(nmse(ag, expect), kF32Tol);

  Tensor xc = randn({33, 17}, 42), yc = randn({17, 33}, 43);
  Tensor oc = Tensor::empty({33, 17}), og = Tensor::empty({33, 17}, DType::kF32, gpu());
  cpu_backend_ref().axpby(0.75, xc, -1.25, yc.transpose(0, 1), oc);
  gpu_backend().axpby(0.75, on_gpu(xc), -1.25, on_gpu(yc).transpose(0, 1), og);
  EXPECT_LT(nmse(og, oc), kF32Tol);
  // out aliasing b
  Tensor yg = on_gpu(xc);
  Tensor y_expect = Tensor::empty({33, 17});
  cpu_backend_ref().axpby(2.0, xc, 0.5, xc, y_expect);
  gpu_backend().axpby(2.0, on_gpu(xc), 0.5, yg, yg);
  EXPECT_LT(nmse(yg, y_expect), kF32Tol);
}

TEST_F(CudaElementwise, WhereWithEveryMaskDType) {
  const Shape shape = {5, 6};
  Tensor mask_src = randint({5, 1}, 50, 0, 2, DType::kF32);
  Tensor ac = randn(shape, 51), bc = randn({6}, 52);
  for (DType mdt : kAllDTypes) {
    const Tensor mc = mask_src.to(mdt).expand(shape);
    const Tensor mg = on_gpu(mask_src.to(mdt)).expand(shape);
    for (DType vdt : {DType::kF32, DType::kBF16, DType::kI64}) {
      const Tensor a_c = ac.to(vdt), b_c = bc.to(vdt).expand(shape);
      const Tensor a_g = on_gpu(a_c), b_g = on_gpu(bc.to(vdt)).expand(shape);
      Tensor oc = Tensor::empty(shape, vdt), og = Tensor::empty(shape, vdt, gpu());
      cpu_backend_ref().where(mc, a_c, b_c, oc);
      gpu_backend().where(mg, a_g, b_g, og);
      EXPECT_TRUE(same_bits(og, oc)) << "mask " << dtype_name(mdt) << " values " << dtype_name(vdt);
    }
  }
  // -0.0 is false, NaN is true.
  Tensor m = on_gpu(Tensor::from_vector(std::vector<float>{-0.0f, NAN, 1.0f}, {3}));
  Tensor one = Tensor::ones({3}, DType::kF32, gpu()), zero = Tensor::zeros({3}, DType::kF32, gpu());
  Tensor o = Tensor::empty({3}, DType::kF32, gpu());
  gpu_backend().where(m, one, zero, o);
  EXPECT_EQ(o.to_vector<float>(), (std::vector<float>{0, 1, 1}));
}

}  // namespace
}  // namespace motley::cuda_test
