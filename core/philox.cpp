#include "core/philox.h"

#include <cmath>
#include <vector>

namespace motley {
namespace {

constexpr std::uint32_t kMul0 = 0xD2511F53u;
constexpr std::uint32_t kMul1 = 0xCD9E8D57u;
constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;
constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

PhiloxKey key_from_u64(std::uint64_t k) {
  return {static_cast<std::uint32_t>(k), static_cast<std::uint32_t>(k >> 32)};
}

}  // namespace

PhiloxCounter philox4x32_10(PhiloxCounter c, PhiloxKey k) {
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c[2];
    const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32);
    const std::uint32_t lo0 = static_cast<std::uint32_t>(p0);
    const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32);
    const std::uint32_t lo1 = static_cast<std::uint32_t>(p1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    k[0] += kWeyl0;
    k[1] += kWeyl1;
  }
  return c;
}

PhiloxKey philox_key(std::uint64_t seed, std::string_view purpose) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  for (unsigned char ch : purpose) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return key_from_u64(splitmix64(seed ^ splitmix64(h)));
}

PhiloxKey philox_key(std::uint64_t seed) { return key_from_u64(splitmix64(seed)); }

std::uint64_t philox_u64(PhiloxKey key, std::uint64_t a, std::uint64_t b) {
  const PhiloxCounter r = philox4x32_10(philox_counter(a, b), key);
  return (static_cast<std::uint64_t>(r[1]) << 32) | r[0];
}

double philox_uniform(PhiloxKey key, std::uint64_t a, std::uint64_t b) {
  return static_cast<double>(philox_u64(key, a, b) >> 11) * 0x1.0p-53;
}

double philox_normal(PhiloxKey key, std::uint64_t a, std::uint64_t b) {
  const PhiloxCounter r = philox4x32_10(philox_counter(a, b), key);
  const std::uint64_t w0 = (static_cast<std::uint64_t>(r[1]) << 32) | r[0];
  const std::uint64_t w1 = (static_cast<std::uint64_t>(r[3]) << 32) | r[2];
  // u1 in (0, 1] so log(u1) is finite; u2 in [0, 1).
  const double u1 = (static_cast<double>(w0 >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = static_cast<double>(w1 >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

namespace {

template <typename Draw>
void fill_with(Tensor& t, Draw draw) {
  MOTLEY_CHECK_KIND(kShape, is_floating(t.dtype()),
                    "random fill needs a floating tensor, got ",
                    dtype_name(t.dtype()));
  const std::int64_t n = t.numel();
  std::vector<double> values(n);
  for (std::int64_t i = 0; i < n; ++i) values[i] = draw(static_cast<std::uint64_t>(i));
  Tensor host = Tensor::from_vector(values, t.shape());
  t.copy_(host);
}

}  // namespace

void fill_normal(Tensor& t, PhiloxKey key, double mean, double std,
                 std::uint64_t stream) {
  fill_with(t, [&](std::uint64_t i) { return mean + std * philox_normal(key, i, stream); });
}

void fill_uniform(Tensor& t, PhiloxKey key, double lo, double hi,
                  std::uint64_t stream) {
  fill_with(t, [&](std::uint64_t i) {
    return lo + (hi - lo) * philox_uniform(key, i, stream);
  });
}

}  // namespace motley
