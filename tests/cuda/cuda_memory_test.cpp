// The CUDA backend's plumbing: device discovery, the caching allocator,
// host/device copies, stream ordering and argument errors.
#include <cstring>
#include <numeric>
#include <vector>

#include "core/cuda/cuda_allocator.h"
#include "tests/cuda/cuda_test_util.h"

namespace motley::cuda_test {
namespace {

// Runs everywhere: with no device the count is 0 and asking for cuda:0
// fails with a kRuntime error that says why (and does not crash).
TEST(CudaDiscovery, CountNeverThrowsAndMissingDevicesAreRuntimeErrors) {
  const int count = cuda_device_count();
  EXPECT_GE(count, 0);
  EXPECT_EQ(count, cuda_backend_device_count());
  EXPECT_EQ(cuda_available(), count > 0);
  const std::string msg =
      expect_error(ErrorKind::kRuntime, [&] { backend_for(Device::cuda(count)); });
  EXPECT_NE(msg.find("cuda:" + std::to_string(count)), std::string::npos) << msg;
  EXPECT_NE(msg.find("visible"), std::string::npos) << msg;
  expect_error(ErrorKind::kRuntime, [&] { cuda_backend(-1); });
}

using CudaMemory = CudaTest;

TEST_F(CudaMemory, BackendIdentity) {
  Backend& b = gpu_backend();
  EXPECT_STREQ(b.name(), "cuda");
  EXPECT_EQ(b.device(), gpu());
  EXPECT_EQ(&b, &cuda_backend(0)) << "one backend per device";
  EXPECT_NE(cuda_backend_stream(0), nullptr);
}

TEST_F(CudaMemory, AllocatorReusesFreedBlocksOfTheSameClass) {
  Backend& b = gpu_backend();
  b.synchronize();
  const std::size_t baseline = b.bytes_in_use();
  void* p = b.allocate(1000);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(b.bytes_in_use(), baseline + 1000);
  const CudaMemoryStats before = cuda_memory_stats(0);
  b.deallocate(p, 1000);
  EXPECT_EQ(b.bytes_in_use(), baseline);
  EXPECT_GE(cuda_memory_stats(0).bytes_cached, 1024u) << "freed block kept in the cache";

  void* q = b.allocate(1000);
  EXPECT_EQ(q, p) << "same size: the cached block comes back";
  const CudaMemoryStats after = cuda_memory_stats(0);
  EXPECT_EQ(after.num_cache_hits, before.num_cache_hits + 1);
  EXPECT_EQ(after.num_device_allocs, before.num_device_allocs) << "no new cudaMalloc";
  // A different request size in the same 512-byte class reuses it too.
  b.deallocate(q, 1000);
  void* r = b.allocate(900);
  EXPECT_EQ(r, p);
  // Two live blocks are distinct.
  void* s = b.allocate(900);
  EXPECT_NE(s, r);
  b.deallocate(r, 900);
  b.deallocate(s, 900);
  EXPECT_EQ(b.bytes_in_use(), baseline);
}

// Pure arithmetic: runs without a GPU.
TEST(CudaAllocator, SizeClasses) {
  using A = CudaCachingAllocator;
  EXPECT_EQ(A::round_size(0), 512u);
  EXPECT_EQ(A::round_size(1), 512u);
  EXPECT_EQ(A::round_size(512), 512u);
  EXPECT_EQ(A::round_size(513), 1024u);
  EXPECT_EQ(A::round_size(std::size_t{1} << 20), std::size_t{1} << 20);
  // Above 1 MiB: quarter steps of the power of two below.
  EXPECT_EQ(A::round_size((std::size_t{1} << 20) + 1), (std::size_t{5} << 18));
  EXPECT_EQ(A::round_size(std::size_t{3} << 20), std::size_t{3} << 20);
  for (std::size_t n : {std::size_t{1} << 21, (std::size_t{1} << 21) + 12345,
                        std::size_t{123456789}, std::size_t{3} << 30}) {
    EXPECT_GE(A::round_size(n), n);
    EXPECT_LE(A::round_size(n), n + n / 4 + (std::size_t{64} << 20)) << n;
  }
}

TEST_F(CudaMemory, TensorsReturnBytesToBaseline) {
  Backend& b = gpu_backend();
  const std::size_t baseline = b.bytes_in_use();
  {
    Tensor t = Tensor::empty({1000, 3}, DType::kF32, gpu());
    Tensor u = Tensor::zeros({17}, DType::kBF16, gpu());
    EXPECT_EQ(b.bytes_in_use(), baseline + 12000 + 34);
  }
  EXPECT_EQ(b.bytes_in_use(), baseline);
}

TEST_F(CudaMemory, EmptyCacheReleasesFreeBlocks) {
  Backend& b = gpu_backend();
  void* p = b.allocate(std::size_t{8} << 20);
  b.deallocate(p, std::size_t{8} << 20);
  EXPECT_GE(cuda_memory_stats(0).bytes_cached, std::size_t{8} << 20);
  cuda_empty_cache(0);
  EXPECT_EQ(cuda_memory_stats(0).bytes_cached, 0u);
  // The cache refills on the next request of that size (a fresh cudaMalloc).
  const std::size_t allocs = cuda_memory_stats(0).num_device_allocs;
  void* q = b.allocate(std::size_t{8} << 20);
  EXPECT_EQ(cuda_memory_stats(0).num_device_allocs, allocs + 1);
  b.deallocate(q, std::size_t{8} << 20);
}

TEST_F(CudaMemory, OutOfMemoryIsAClearRuntimeError) {
  Backend& b = gpu_backend();
  const std::size_t baseline = b.bytes_in_use();
  const std::string msg =
      expect_error(ErrorKind::kRuntime, [&] { b.allocate(std::size_t{1} << 50); });
  EXPECT_NE(msg.find("out of memory"), std::string::npos) << msg;
  EXPECT_NE(msg.find("free"), std::string::npos) << msg;
  EXPECT_NE(msg.find("total"), std::string::npos) << msg;
  EXPECT_EQ(b.bytes_in_use(), baseline);
  // The backend still works afterwards.
  Tensor t = Tensor::full({4}, 2.5, DType::kF32, gpu());
  EXPECT_EQ(t.to_vector<float>(), std::vector<float>(4, 2.5f));
}

TEST_F(CudaMemory, HostDeviceRoundTripAndDeviceCopy) {
  Backend& b = gpu_backend();
  std::vector<std::uint8_t> host(100003);
  std::iota(host.begin(), host.end(), 0);
  void* d1 = b.allocate(host.size());
  void* d2 = b.allocate(host.size());
  b.copy_from_host(d1, host.data(), host.size());
  b.copy_device(d2, d1, host.size());
  std::vector<std::uint8_t> back(host.size(), 0);
  b.copy_to_host(back.data(), d2, back.size());
  EXPECT_EQ(back, host);
  b.copy_from_host(d1, host.data(), 0);  // zero bytes: a no-op
  // Overlapping ranges behave like memmove, both directions.
  for (std::size_t shift : {std::size_t{1}, std::size_t{4096}}) {
    b.copy_from_host(d1, host.data(), host.size());
    b.copy_device(static_cast<char*>(d1) + shift, d1, host.size() - shift);
    std::vector<std::uint8_t> expect = host;
    std::memmove(expect.data() + shift, expect.data(), host.size() - shift);
    b.copy_to_host(back.data(), d1, back.size());
    EXPECT_EQ(back, expect) << "forward shift " << shift;
    b.copy_from_host(d1, host.data(), host.size());
    b.copy_device(d1, static_cast<char*>(d1) + shift, host.size() - shift);
    expect = host;
    std::memmove(expect.data(), expect.data() + shift, host.size() - shift);
    b.copy_to_host(back.data(), d1, back.size());
    EXPECT_EQ(back, expect) << "backward shift " << shift;
  }
  b.deallocate(d1, host.size());
  b.deallocate(d2, host.size());
}

// Many dependent kernels queued back to back, then one read: the stream
// keeps them in order, and freeing inputs while work is queued is safe.
TEST_F(CudaMemory, StreamOrderingOfQueuedWork) {
  Tensor x = Tensor::zeros({1 << 16}, DType::kF32, gpu());
  for (int i = 0; i < 200; ++i) {
    Tensor one = Tensor::ones({1 << 16}, DType::kF32, gpu());
    gpu_backend().binary(BinaryOp::kAdd, x, one, x);
  }  // `one` freed to the cache each iteration while its add is queued
  gpu_backend().synchronize();
  const std::vector<float> v = x.to_vector<float>();
  EXPECT_EQ(v.front(), 200.0f);
  EXPECT_EQ(v.back(), 200.0f);
}

TEST_F(CudaMemory, ArgumentErrorsAreShapeErrors) {
  Backend& b = gpu_backend();
  Tensor cpu_t = Tensor::ones({4});
  Tensor out = Tensor::empty({4}, DType::kF32, gpu());
  const std::string msg =
      expect_error(ErrorKind::kShape, [&] { b.unary(UnaryOp::kExp, cpu_t, out, 0.0); });
  EXPECT_NE(msg.find("not on cuda:0"), std::string::npos) << msg;
  Tensor f64 = Tensor::ones({4}, DType::kF64, gpu());
  Tensor f64_out = Tensor::empty({4}, DType::kF64, gpu());
  expect_error(ErrorKind::kShape, [&] { b.unary(UnaryOp::kExp, f64, f64_out, 0.0); });
  Tensor wrong = Tensor::empty({5}, DType::kF32, gpu());
  Tensor a = Tensor::ones({4}, DType::kF32, gpu());
  expect_error(ErrorKind::kShape, [&] { b.unary(UnaryOp::kExp, a, wrong, 0.0); });
  Tensor i32 = Tensor::ones({4}, DType::kI32, gpu());
  expect_error(ErrorKind::kShape, [&] { b.binary(BinaryOp::kSiluBackward, i32, i32, i32); });
}

}  // namespace
}  // namespace motley::cuda_test
