// Element types a Tensor can hold.
//
//   kF32   float, the default for parameters, activations and optimizer state
//   kF64   double, for float64 gradient checks (CPU backend)
//   kBF16  bfloat16, compute type on GPUs (CPU: storage and casts only)
//   kI32, kI64  token ids, expert indices, counts
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace motley {

enum class DType : std::uint8_t { kF32, kF64, kBF16, kI32, kI64 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
bool is_floating(DType dtype);  // f32, f64, bf16

// bfloat16: the upper 16 bits of an IEEE float. Conversion from float
// rounds to nearest even; NaN stays NaN.
struct BFloat16 {
  std::uint16_t bits = 0;

  BFloat16() = default;
  explicit BFloat16(float value) : bits(round_from_float(value)) {}
  explicit operator float() const {
    std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }

  static std::uint16_t round_from_float(float value) {
    std::uint32_t u;
    std::memcpy(&u, &value, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
  }
};

// Maps a C++ type to its DType: dtype_of<float>() == DType::kF32.
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kF32; }
template <> constexpr DType dtype_of<double>() { return DType::kF64; }
template <> constexpr DType dtype_of<BFloat16>() { return DType::kBF16; }
template <> constexpr DType dtype_of<std::int32_t>() { return DType::kI32; }
template <> constexpr DType dtype_of<std::int64_t>() { return DType::kI64; }

}  // namespace motley
