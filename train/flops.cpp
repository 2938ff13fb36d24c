#include "train/flops.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>

#include "core/backend.h"
#include "core/ops.h"
#include "core/philox.h"

namespace motley::train {

double step_model_flops(const ModelConfig& m, std::int64_t total_parameters,
                        const std::vector<std::int64_t>& expert_sizes, std::int64_t tokens,
                        std::int64_t seq_len, const std::vector<MoELayerStats>& moe) {
  double active =
      static_cast<double>(total_parameters) - static_cast<double>(m.vocab_size * m.d_model);
  for (std::int64_t l = 0; l < m.n_layers; ++l) {
    if (!m.is_moe_layer(l)) continue;
    for (std::int64_t s : expert_sizes) active -= 3.0 * static_cast<double>(m.d_model * s);
  }
  for (const MoELayerStats& s : moe) active += s.active_params_per_token;
  const double attention = 12.0 * static_cast<double>(m.n_layers * seq_len * m.d_model);
  return static_cast<double>(tokens) * (6.0 * active + attention);
}

double measured_peak_flops(Device device) {
  static std::mutex mutex;
  static std::map<std::string, double> measured;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = measured.find(device.str());
  if (it != measured.end()) return it->second;
  const std::int64_t n = device.is_cpu() ? 1024 : 4096;
  Tensor a = Tensor::empty({n, n}), b = Tensor::empty({n, n});
  fill_uniform(a, philox_key(0, "peak/a"), -1, 1);
  fill_uniform(b, philox_key(0, "peak/b"), -1, 1);
  a = a.to(device);
  b = b.to(device);
  Backend& backend = backend_for(device);
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    backend.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    Tensor c = ops::matmul(a, b);
    backend.synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  const double peak = 2.0 * static_cast<double>(n * n * n) / best;
  measured[device.str()] = peak;
  return peak;
}

}  // namespace motley::train
