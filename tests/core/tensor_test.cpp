#include "core/tensor.h"

#include <gtest/gtest.h>

#include "core/backend.h"

namespace motley {
namespace {

Tensor iota_tensor(Shape shape) {
  std::vector<float> v(shape_numel(shape));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  return Tensor::from_vector(v, shape);
}

TEST(Tensor, FactoriesAndMetadata) {
  Tensor t = Tensor::zeros({2, 3, 4});
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.dim(), 3);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.size(-1), 4);
  EXPECT_EQ(t.strides(), (Shape{12, 4, 1}));
  EXPECT_EQ(t.dtype(), DType::kF32);
  EXPECT_TRUE(t.device().is_cpu());
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.str(), "Tensor(f32, cpu, (2, 3, 4))");
  for (float v : t.to_vector<float>()) EXPECT_EQ(v, 0.0f);
  EXPECT_FALSE(Tensor().defined());

  Tensor s = Tensor::scalar(2.5, DType::kF64);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.numel(), 1);
  EXPECT_DOUBLE_EQ(s.item(), 2.5);

  Tensor r = Tensor::arange(5, DType::kI32);
  EXPECT_EQ(r.to_vector<std::int32_t>(), (std::vector<std::int32_t>{0, 1, 2, 3, 4}));
}

TEST(Tensor, TransposeIsAViewAndContiguousCopies) {
  Tensor a = iota_tensor({2, 3});
  Tensor t = a.transpose(0, 1);
  EXPECT_TRUE(t.shares_storage(a));
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_EQ(t.shape(), (Shape{3, 2}));
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{0, 3, 1, 4, 2, 5}));
  Tensor c = t.contiguous();
  EXPECT_FALSE(c.shares_storage(a));
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.to_vector<float>(), (std::vector<float>{0, 3, 1, 4, 2, 5}));
  // contiguous() of a contiguous tensor is the same view.
  EXPECT_TRUE(a.contiguous().shares_storage(a));
}

TEST(Tensor, ReshapeViewsWhenContiguousAndCopiesOtherwise) {
  Tensor a = iota_tensor({2, 3, 4});
  Tensor v = a.reshape({6, -1});
  EXPECT_EQ(v.shape(), (Shape{6, 4}));
  EXPECT_TRUE(v.shares_storage(a));
  Tensor t = a.transpose(1, 2);
  EXPECT_THROW(t.view({24}), Error);
  Tensor r = t.reshape({24});
  EXPECT_FALSE(r.shares_storage(a));
  EXPECT_EQ(r.to_vector<float>()[1], 4.0f);
  try {
    a.reshape({5, 5});
    FAIL() << "reshape to a wrong element count must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("(2, 3, 4)"), std::string::npos) << e.what();
  }
}

TEST(Tensor, NarrowSliceSelect) {
  Tensor a = iota_tensor({4, 5});
  Tensor n = a.narrow(1, 1, 3);  // columns 1..3
  EXPECT_TRUE(n.shares_storage(a));
  EXPECT_EQ(n.shape(), (Shape{4, 3}));
  EXPECT_EQ(n.offset(), 1);
  EXPECT_EQ(n.to_vector<float>(),
            (std::vector<float>{1, 2, 3, 6, 7, 8, 11, 12, 13, 16, 17, 18}));
  Tensor s = a.slice(0, 0, 4, 2);  // rows 0 and 2
  EXPECT_EQ(s.shape(), (Shape{2, 5}));
  EXPECT_EQ(s.to_vector<float>(), (std::vector<float>{0, 1, 2, 3, 4, 10, 11, 12, 13, 14}));
  Tensor row = a.select(0, -1);
  EXPECT_EQ(row.shape(), (Shape{5}));
  EXPECT_EQ(row.to_vector<float>(), (std::vector<float>{15, 16, 17, 18, 19}));
  EXPECT_THROW(a.narrow(1, 3, 3), Error);
  EXPECT_THROW(a.select(0, 4), Error);
  EXPECT_THROW(a.size(2), Error);
}

TEST(Tensor, PermuteUnsqueezeSqueezeExpand) {
  Tensor a = iota_tensor({2, 3, 4});
  Tensor p = a.permute({2, 0, 1});
  EXPECT_EQ(p.shape(), (Shape{4, 2, 3}));
  EXPECT_EQ(p.contiguous().to_vector<float>()[1], 4.0f);  // p[0,0,1] = a[0,1,0]
  EXPECT_THROW(a.permute({0, 0, 1}), Error);

  Tensor u = a.unsqueeze(1);
  EXPECT_EQ(u.shape(), (Shape{2, 1, 3, 4}));
  EXPECT_TRUE(u.is_contiguous());
  EXPECT_EQ(u.squeeze(1).shape(), a.shape());
  EXPECT_THROW(a.squeeze(0), Error);

  Tensor col = iota_tensor({3, 1});
  Tensor e = col.expand({2, 3, 4});
  EXPECT_EQ(e.strides(), (Shape{0, 1, 0}));
  const auto v = e.contiguous().to_vector<float>();
  EXPECT_EQ(v[0], 0.0f);
  EXPECT_EQ(v[3], 0.0f);
  EXPECT_EQ(v[4], 1.0f);
  EXPECT_EQ(v[12 + 8], 2.0f);
  EXPECT_THROW(iota_tensor({3, 2}).expand({3, 4}), Error);
}

TEST(Tensor, CopyCastsBetweenDtypes) {
  Tensor a = Tensor::from_vector(std::vector<double>{1.5, -2.25, 3.0}, {3});
  EXPECT_EQ(a.to(DType::kF32).to_vector<float>(), (std::vector<float>{1.5f, -2.25f, 3.0f}));
  EXPECT_EQ(a.to(DType::kI64).to_vector<std::int64_t>(), (std::vector<std::int64_t>{1, -2, 3}));
  // bf16 keeps values exactly representable in 8 mantissa bits.
  Tensor b = a.to(DType::kBF16);
  EXPECT_EQ(b.dtype(), DType::kBF16);
  EXPECT_EQ(b.to_vector<double>(), (std::vector<double>{1.5, -2.25, 3.0}));
  // Copy into a strided destination.
  Tensor dst = Tensor::zeros({3, 2});
  Tensor col = dst.select(1, 1);
  col.copy_(a);
  EXPECT_EQ(dst.to_vector<float>(), (std::vector<float>{0, 1.5f, 0, -2.25f, 0, 3.0f}));
  EXPECT_THROW(col.copy_(Tensor::zeros({4})), Error);
}

TEST(BFloat16, RoundsToNearestEven) {
  EXPECT_EQ(static_cast<float>(BFloat16(1.0f)), 1.0f);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(static_cast<float>(BFloat16(1.0f + 0x1.0p-8f)), 1.0f);
  // Just above halfway rounds up.
  EXPECT_EQ(static_cast<float>(BFloat16(1.0f + 0x1.0p-8f + 0x1.0p-16f)), 1.0f + 0x1.0p-7f);
  EXPECT_TRUE(std::isnan(static_cast<float>(BFloat16(std::nanf("")))));
}

TEST(Tensor, StorageReturnsMemoryToTheBackend) {
  Backend& cpu = backend_for(Device::cpu());
  const std::size_t before = cpu.bytes_in_use();
  {
    Tensor t = Tensor::empty({1024, 1024});
    EXPECT_GE(cpu.bytes_in_use(), before + 4 * 1024 * 1024);
    Tensor view = t.narrow(0, 0, 10);
    t = Tensor();
    EXPECT_GE(cpu.bytes_in_use(), before + 4 * 1024 * 1024);  // the view keeps it
  }
  EXPECT_EQ(cpu.bytes_in_use(), before);
}

TEST(Device, ParseAndPrint) {
  EXPECT_EQ(Device::parse("cpu"), Device::cpu());
  EXPECT_EQ(Device::parse("cuda:1"), Device::cuda(1));
  EXPECT_EQ(Device::cuda(2).str(), "cuda:2");
  try {
    Device::parse("tpu");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    EXPECT_EQ(exit_code_for(e.kind()), 2);
  }
}

TEST(Device, CudaWithoutDeviceIsAClearError) {
  if (cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  try {
    Tensor::empty({2}, DType::kF32, Device::cuda(0));
    FAIL() << "allocating on a missing CUDA device must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace motley
