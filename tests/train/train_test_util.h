// What the trainer tests share: a tiny MoE config of any layout, batches
// that depend on (step, global sequence index) alone, and a runner that
// trains a layout with one thread per rank.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "core/philox.h"
#include "parallel/thread_communicator.h"
#include "train/device.h"
#include "train/trainer.h"

namespace motley::train::testing {

namespace par = parallel;

// Tokens of sequence j of step s depend on (s, j) alone, as the sampler's
// (Note [Sampling rule]), so every split of the batch sees the same data.
inline BatchSource synthetic_batches(std::int64_t vocab, std::int64_t seq_len) {
  return [vocab, seq_len](std::int64_t step, std::int64_t first, std::int64_t count) {
    std::vector<std::int64_t> tokens, targets;
    const PhiloxKey key = philox_key(11, "trainer_test/tokens");
    for (std::int64_t r = 0; r < count; ++r) {
      std::vector<std::int64_t> seq(seq_len + 1);
      for (std::int64_t i = 0; i <= seq_len; ++i) {
        seq[i] = static_cast<std::int64_t>(
            philox_u64(key, static_cast<std::uint64_t>(step * 100000 + first + r),
                       static_cast<std::uint64_t>(i)) %
            static_cast<std::uint64_t>(vocab));
      }
      tokens.insert(tokens.end(), seq.begin(), seq.end() - 1);
      targets.insert(targets.end(), seq.begin() + 1, seq.end());
    }
    return Batch{Tensor::from_vector(tokens, {count, seq_len}),
                 Tensor::from_vector(targets, {count, seq_len})};
  };
}

// 4 layers of d 32, 4 experts with MoDSE sizes, batch 8 of 8 tokens.
inline Config tiny_config(const std::string& router, std::int64_t dp, std::int64_t ep,
                          std::int64_t pp, std::int64_t micro) {
  nlohmann::ordered_json j = {{"model",
                               {{"vocab_size", 64},
                                {"d_model", 32},
                                {"n_layers", 4},
                                {"n_heads", 4},
                                {"max_seq_len", 16},
                                {"ffn_hidden", 48},
                                {"moe",
                                 {{"n_experts", 4},
                                  {"top_k", 2},
                                  {"expert_hidden", 48},
                                  {"expert_sizes", "modse"},
                                  {"router", router},
                                  {"gru_dim", 16},
                                  {"aux", {{"balance", 0.01}, {"z_loss", 0.001}}}}}}},
                              {"train",
                               {{"batch_size", 8},
                                {"micro_batches", micro},
                                {"seq_len", 8},
                                {"steps", 10},
                                {"lr", 3e-3},
                                {"warmup", 2},
                                {"seed", 5},
                                {"grad_clip", 0.5}}},
                              {"parallel", {{"dp", dp}, {"ep", ep}, {"pp", pp}}}};
  return Config::from_json(j);
}

inline std::shared_ptr<par::ProcessGroups> single_groups(Device device = Device::cpu()) {
  return make_process_groups(std::make_shared<par::LocalCommunicator>(), par::GroupLayout{},
                             device);
}

struct RankRecord {
  std::vector<double> losses, norms;
  std::map<std::string, std::vector<float>> params;  // every rank's, by name
};

// Runs `steps` steps of `config`'s layout, one thread per rank, rank r on
// device(r); returns world rank 0's losses and norms and every rank's
// parameters (replicas must agree bitwise).
template <typename DeviceOf, typename OnStep = void (*)(const StepResult&)>
RankRecord run_layout(
    const Config& config, int steps, DeviceOf device_of,
    OnStep on_rank0_step = [](const StepResult&) {}) {
  const int world = static_cast<int>(config.parallel.dp * config.parallel.pp);
  par::GroupLayout layout;
  layout.dp = static_cast<int>(config.parallel.dp);
  layout.ep = static_cast<int>(config.parallel.ep);
  layout.pp = static_cast<int>(config.parallel.pp);
  RankRecord record;
  std::mutex mutex;
  par::run_ranks(world, [&](std::shared_ptr<par::Communicator> comm) {
    const Device device = device_of(comm->rank());
    Trainer trainer(config, make_process_groups(comm, layout, device),
                    synthetic_batches(config.model.vocab_size, config.train.seq_len), device);
    std::vector<double> losses, norms;
    for (int s = 0; s < steps; ++s) {
      const StepResult r = trainer.step();
      if (comm->rank() == 0) on_rank0_step(r);
      losses.push_back(r.loss);
      norms.push_back(r.grad_norm);
    }
    const std::lock_guard<std::mutex> lock(mutex);
    if (comm->rank() == 0) {
      record.losses = losses;
      record.norms = norms;
    }
    for (const Variable& p : trainer.model().params().all()) {
      auto [it, fresh] = record.params.emplace(p.name(), p.data().to_vector<float>());
      if (!fresh) {
        EXPECT_EQ(it->second, p.data().to_vector<float>()) << p.name();
      }
    }
  });
  return record;
}

inline RankRecord run_layout(const Config& config, int steps) {
  return run_layout(config, steps, [](int) { return Device::cpu(); });
}

// Largest |a - b| over two parameter maps with the same names and sizes.
inline void expect_params_near(const RankRecord& got, const RankRecord& want, double tol) {
  ASSERT_EQ(got.params.size(), want.params.size());
  for (const auto& [name, w] : want.params) {
    const auto it = got.params.find(name);
    ASSERT_NE(it, got.params.end()) << name;
    ASSERT_EQ(it->second.size(), w.size()) << name;
    double worst = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::abs(it->second[i] - w[i])));
    }
    EXPECT_LT(worst, tol) << name;
  }
}

}  // namespace motley::train::testing
