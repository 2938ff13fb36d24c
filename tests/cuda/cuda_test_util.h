// Helpers for the CUDA backend tests: every kernel is run on the CPU
// backend (the reference) and on cuda:0 with the same inputs, and the
// results compared by normalised MSE (ops::nmse) or exactly.
//
// Tolerances (nmse = sum (gpu - cpu)^2 / sum cpu^2):
//   kF32Tol   1e-6   f32 kernels (GEMM with TF32 off included). Both
//                    backends compute in f32 with f64 row sums; the
//                    observed error is ~1e-13, so the bound has margin
//                    for libm differences (expf, tanhf) without hiding
//                    a wrong index or a missing term, which give >= 1e-3.
//   kBf16Tol  1e-4   bf16 outputs: rounding to bf16 alone gives ~1e-6.
// bf16 references are computed on the CPU in f32 from the same
// bf16-rounded inputs (the CPU backend stores bf16 but has no bf16 math).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "core/ops.h"
#include "core/philox.h"
#include "core/tensor.h"

namespace motley::cuda_test {

constexpr double kF32Tol = 1e-6;
constexpr double kBf16Tol = 1e-4;

// Every CUDA test derives from this: it skips (and so passes) on machines
// without a CUDA device, such as CI builders that only compile.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() == 0, so the CUDA backend "
                      "cannot run here (the tests compile and skip)";
    }
  }
};

inline Device gpu() { return Device::cuda(0); }
inline Backend& gpu_backend() { return backend_for(Device::cuda(0)); }
inline Backend& cpu_backend_ref() { return backend_for(Device::cpu()); }

// Normal(0, std) values from a Philox stream, on the CPU, in `dtype`
// (rounded once from f64).
inline Tensor randn(Shape shape, std::uint64_t seed, double std = 1.0, DType dtype = DType::kF32) {
  Tensor t = Tensor::empty(std::move(shape), DType::kF32);
  fill_normal(t, philox_key(seed, "cuda_test"), 0.0, std);
  return t.to(dtype);
}

// Uniform in [lo, hi).
inline Tensor randu(Shape shape, std::uint64_t seed, double lo, double hi,
                    DType dtype = DType::kF32) {
  Tensor t = Tensor::empty(std::move(shape), DType::kF32);
  fill_uniform(t, philox_key(seed, "cuda_test_u"), lo, hi);
  return t.to(dtype);
}

// Integers in [lo, hi) as `dtype` (i32, i64, or a float dtype holding
// small integers, which makes ties likely).
inline Tensor randint(Shape shape, std::uint64_t seed, std::int64_t lo, std::int64_t hi,
                      DType dtype = DType::kI64) {
  const std::int64_t n = shape_numel(shape);
  std::vector<std::int64_t> v(n);
  const PhiloxKey key = philox_key(seed, "cuda_test_int");
  for (std::int64_t i = 0; i < n; ++i) {
    v[i] = lo + static_cast<std::int64_t>(philox_u64(key, static_cast<std::uint64_t>(i)) %
                                          static_cast<std::uint64_t>(hi - lo));
  }
  return Tensor::from_vector(v, std::move(shape)).to(dtype);
}

// A copy on cuda:0 / on the CPU (f32 unless asked otherwise).
inline Tensor on_gpu(const Tensor& t) { return t.to(Device::cuda(0)); }
inline Tensor on_cpu(const Tensor& t) { return t.to(Device::cpu()); }
inline Tensor cpu_f32(const Tensor& t) { return t.to(Device::cpu()).to(DType::kF32); }

// nmse of a (any device, any floating dtype) against the CPU reference b.
inline double nmse(const Tensor& a, const Tensor& b) { return ops::nmse(cpu_f32(a), cpu_f32(b)); }

// Exact equality of values (after conversion to f64 on the host).
inline bool same_values(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  const std::vector<double> x = on_cpu(a).to_vector<double>();
  const std::vector<double> y = on_cpu(b).to_vector<double>();
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (!(x[i] == y[i] || (x[i] != x[i] && y[i] != y[i]))) return false;
  }
  return true;
}

// Bitwise equality of two tensors' bytes (same dtype and shape).
inline bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor x = on_cpu(a).contiguous();
  const Tensor y = on_cpu(b).contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

inline Tensor empty_like(const Tensor& t, Device device) {
  return Tensor::empty(t.shape(), t.dtype(), device);
}

// Runs `f` expecting a motley::Error of `kind`; returns its message.
template <typename F>
std::string expect_error(ErrorKind kind, F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind))
        << "wrong error kind for: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a motley::Error of kind " << error_kind_name(kind);
  return "";
}

}  // namespace motley::cuda_test
