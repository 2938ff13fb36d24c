// train::Trainer without mpirun.
//
// 1. One process: Trainer::step() (the pipeline executor with one stage)
//    against a plain loop written here from the SPEC (forward, backward of
//    loss / M per micro-batch, global norm, clip, AdamW): parameters
//    bitwise equal after several steps.
// 2. Layouts (dp, ep, pp, m) simulated by ranks on threads over a
//    ThreadCommunicator: losses, grad norms and every parameter each rank
//    holds equal the single process with micro_batches = dp * m, up to
//    summation order (the equivalence rule of SPEC section 3).
// 3. train.device / train.precision: what cannot be honoured is a usage
//    error naming the key.
#include "train/trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "core/backend.h"
#include "core/check.h"
#include "core/cpu/cpu_backend.h"
#include "core/philox.h"
#include "parallel/thread_communicator.h"
#include "tests/train/train_test_util.h"
#include "train/device.h"
#include "train/flops.h"

namespace motley::train {
namespace {

namespace par = parallel;
namespace ag = autograd;
using namespace testing;  // NOLINT: the shared fixtures

TEST(Trainer, SingleProcessStepIsThePlainLoopBitwise) {
  for (const std::string router : {"linear", "gru"}) {
    SCOPED_TRACE(router);
    const Config config = tiny_config(router, 1, 1, 1, 2);
    const BatchSource batches = synthetic_batches(64, 8);
    Trainer trainer(config, single_groups(), batches);

    // The reference: SPEC sections 1.5 and 3 for one process, by hand.
    Transformer model(config.model, static_cast<std::uint64_t>(config.train.seed));
    AdamW optimizer(config.train);
    const std::int64_t micro = config.train.micro_batches;
    const std::int64_t per = config.train.batch_size / micro;
    for (std::int64_t step = 1; step <= 3; ++step) {
      model.params().zero_grad();
      double loss = 0;
      for (std::int64_t m = 0; m < micro; ++m) {
        const Batch b = batches(step, m * per, per);
        ForwardContext ctx;
        ctx.step = step;
        ctx.sequence_offset = m * per;
        ModelOutput out = model.forward(b.tokens, b.targets, ctx);
        loss += out.loss.data().item() / static_cast<double>(micro);
        ag::scale(out.loss, 1.0 / static_cast<double>(micro)).backward();
      }
      const double norm = std::sqrt(grad_sum_of_squares(model.params()));
      clip_gradients(model.params(), norm, config.train.grad_clip);
      optimizer.step(model.params(), learning_rate(config.train, step));

      const StepResult r = trainer.step();
      EXPECT_EQ(r.step, step);
      EXPECT_FALSE(r.skipped);
      // The reference adds lm + aux in f32 (the graph's loss); the trainer
      // reports lm + aux summed in double: equal to f32 rounding.
      EXPECT_NEAR(r.loss, loss, 1e-6 * std::abs(loss));
      EXPECT_EQ(r.grad_norm, norm);
      EXPECT_GT(r.model_flops, 0.0);
      ASSERT_EQ(r.moe.size(), 4u);
      for (const MoELayerStats& s : r.moe) {
        std::int64_t routed = 0;
        for (std::int64_t n : s.expert_tokens) routed += n;
        EXPECT_EQ(routed, 2 * config.train.batch_size * config.train.seq_len);  // top-2
      }
    }
    for (const Variable& p : model.params().all()) {
      const std::vector<float> want = p.data().to_vector<float>();
      const std::vector<float> got =
          trainer.model().params().get(p.name()).data().to_vector<float>();
      ASSERT_EQ(want, got) << p.name();
    }
    EXPECT_EQ(trainer.step_count(), 3);
    EXPECT_EQ(trainer.tokens_seen(), 3 * 8 * 8);
  }
}

struct Layout {
  std::int64_t dp, ep, pp, micro;
  const char* router;
};

void PrintTo(const Layout& l, std::ostream* os) {
  *os << "dp " << l.dp << " ep " << l.ep << " pp " << l.pp << " m " << l.micro << " " << l.router;
}

class TrainerLayouts : public ::testing::TestWithParam<Layout> {};

TEST_P(TrainerLayouts, ThreadRanksEqualOneProcess) {
  const Layout l = GetParam();
  set_blas_threads(1);  // ranks share this process's cores
  const int steps = 3;
  const RankRecord single = run_layout(tiny_config(l.router, 1, 1, 1, l.dp * l.micro), steps);
  const RankRecord parallel = run_layout(tiny_config(l.router, l.dp, l.ep, l.pp, l.micro), steps);
  ASSERT_EQ(parallel.losses.size(), single.losses.size());
  for (int s = 0; s < steps; ++s) {
    EXPECT_NEAR(parallel.losses[s], single.losses[s], 1e-5 * std::abs(single.losses[s]))
        << "step " << s + 1;
    EXPECT_NEAR(parallel.norms[s], single.norms[s], 1e-4 * std::abs(single.norms[s]))
        << "step " << s + 1;
  }
  // Every parameter of the model is held by some rank, and matches.
  expect_params_near(parallel, single, 2e-5);
}

INSTANTIATE_TEST_SUITE_P(Layouts, TrainerLayouts,
                         ::testing::Values(Layout{2, 1, 1, 1, "linear"},
                                           Layout{2, 2, 1, 2, "linear"}, Layout{1, 1, 2, 2, "gru"},
                                           Layout{2, 2, 2, 2, "gru"}, Layout{4, 4, 1, 1, "noisy"},
                                           Layout{1, 1, 4, 4, "gru"}),
                         [](const ::testing::TestParamInfo<Layout>& info) {
                           const Layout& l = info.param;
                           return "dp" + std::to_string(l.dp) + "ep" + std::to_string(l.ep) + "pp" +
                                  std::to_string(l.pp) + "m" + std::to_string(l.micro) + "_" +
                                  l.router;
                         });

TEST(Trainer, ReplacementMovesExpertsWithoutChangingTheRun) {
  // Balanced placement re-placed every 2 steps: experts (weights and
  // AdamW moments) migrate between EP ranks, and the run stays the single
  // process's.
  set_blas_threads(1);
  // One MoE layer with top-1 routing over 8 experts: uneven enough that
  // the balanced map changes (the equivalence test's setting).
  Config config = tiny_config("linear", 2, 2, 1, 1);
  config.parallel.placement = PlacementKind::kBalanced;
  config.parallel.replace_every = 2;
  config.model.moe.n_experts = 8;
  config.model.moe.every = 4;
  config.model.moe.top_k = 1;
  const int steps = 8;
  Config one = config;
  one.parallel.dp = one.parallel.ep = 1;
  one.parallel.placement = PlacementKind::kContiguous;
  one.train.micro_batches = 2;
  const RankRecord single = run_layout(one, steps);
  int moves = 0;
  const RankRecord parallel = run_layout(
      config, steps, [](int) { return Device::cpu(); },
      [&](const StepResult& r) { moves += r.replacement ? 1 : 0; });
  EXPECT_GT(moves, 0) << "no re-placement happened: the test would not exercise migration";
  for (int s = 0; s < steps; ++s) {
    EXPECT_NEAR(parallel.losses[s], single.losses[s], 1e-5 * std::abs(single.losses[s]));
  }
  expect_params_near(parallel, single, 2e-5);
}

// A checkpoint of step > 0 without /optim cannot resume: the AdamW moments
// would silently restart (it used to resume with exit 0).
TEST(Trainer, ResumeRefusesACheckpointWithoutOptimizerState) {
  const Config config = tiny_config("linear", 1, 1, 1, 1);
  const BatchSource batches = synthetic_batches(64, 8);
  Trainer a(config, single_groups(), batches);
  a.step();
  const std::string path = ::testing::TempDir() + "motley_no_optim.h5";
  CheckpointMeta meta;
  meta.step = 1;
  meta.config_json = config.resolved_json().dump();
  save_checkpoint(path, a.model().params(), /*optimizer=*/nullptr, meta, "");
  Trainer b(config, single_groups(), batches);
  try {
    b.resume(path);
    ADD_FAILURE() << "resumed without optimizer state";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kCheckpoint);
    EXPECT_NE(std::string(e.what()).find("no /optim group"), std::string::npos) << e.what();
  }
  std::remove(path.c_str());
}

TEST(Trainer, AnyRankDecidesTheStopForAll) {
  // The stop decision is any rank's flag: one rank set is enough.
  set_blas_threads(1);
  const Config config = tiny_config("linear", 2, 1, 1, 1);
  par::GroupLayout layout;
  layout.dp = 2;
  std::mutex mutex;
  std::vector<int> decisions;
  par::run_ranks(2, [&](std::shared_ptr<par::Communicator> comm) {
    Trainer trainer(config, make_process_groups(comm, layout, Device::cpu()),
                    synthetic_batches(64, 8));
    const bool none = trainer.any_rank(false);
    const bool one = trainer.any_rank(comm->rank() == 1);
    const std::lock_guard<std::mutex> lock(mutex);
    decisions.push_back(none ? 1 : 0);
    decisions.push_back(one ? 1 : 0);
  });
  ASSERT_EQ(decisions.size(), 4u);
  EXPECT_EQ(decisions[0] + decisions[2], 0);
  EXPECT_EQ(decisions[1] + decisions[3], 2);
}

std::string usage_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

TEST(TrainerDevice, CpuIsTheDefaultAndUnknownValuesAreConfigErrors) {
  Config config = tiny_config("linear", 1, 1, 1, 1);
  EXPECT_EQ(config.train.device, DeviceType::kCPU);
  EXPECT_EQ(config.train.precision, Precision::kF32);
  EXPECT_TRUE(compute_device(config.train).is_cpu());
  nlohmann::ordered_json j = config.resolved_json();
  j["train"]["device"] = "gpu";
  EXPECT_NE(usage_error([&] { Config::from_json(j); }).find("train.device"), std::string::npos);
  j["train"]["device"] = "cpu";
  j["train"]["precision"] = "fp16";
  EXPECT_NE(usage_error([&] { Config::from_json(j); }).find("train.precision"), std::string::npos);
}

TEST(TrainerDevice, CudaWithoutAUsableDeviceNamesTheKeyAndWhatWasFound) {
  if (cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  Config config = tiny_config("linear", 1, 1, 1, 1);
  config.train.device = DeviceType::kCUDA;
  const std::string message = usage_error([&] { compute_device(config.train); });
  EXPECT_NE(message.find("train.device"), std::string::npos) << message;
#if defined(MOTLEY_WITH_CUDA)
  EXPECT_NE(message.find("no CUDA device"), std::string::npos) << message;
#else
  EXPECT_NE(message.find("without CUDA"), std::string::npos) << message;
#endif
}

TEST(TrainerDevice, Bf16IsRefusedOnTheCpuWithTheReason) {
  Config config = tiny_config("linear", 1, 1, 1, 1);
  config.train.precision = Precision::kBF16;
  const std::string message = usage_error([&] { check_precision(config.train, Device::cpu()); });
  EXPECT_NE(message.find("train.precision"), std::string::npos) << message;
  EXPECT_NE(message.find("docs/perf.md"), std::string::npos) << message;
  check_precision(config.train, Device::cuda(0));  // cuda: bf16 GEMMs, no throw
  config.train.precision = Precision::kF32;
  check_precision(config.train, Device::cpu());  // no throw
}

// SPEC 8.1's bf16 through the trainer, on the CPU's emulation (the same
// numbers a GPU's bf16 x bf16 -> f32 GEMMs give, up to summation order):
// 20 steps stay within 2 % of f32 and differ from it.
TEST(Trainer, Bf16StaysWithinTwoPercentOfF32Over20Steps) {
  for (const std::string router : {"linear", "gru"}) {
    SCOPED_TRACE(router);
    Config f32 = tiny_config(router, 1, 1, 1, 2);
    Config bf16 = f32;
    bf16.train.precision = Precision::kBF16;
    const BatchSource batches = synthetic_batches(64, 8);
    Trainer a(f32, single_groups(), batches), b(bf16, single_groups(), batches);
    double worst = 0;
    bool differ = false;
    for (int s = 0; s < 20; ++s) {
      const StepResult ra = a.step(), rb = b.step();
      worst = std::max(worst, std::abs(rb.loss - ra.loss) / ra.loss);
      differ = differ || rb.loss != ra.loss;
    }
    EXPECT_LT(worst, 0.02);
    EXPECT_TRUE(differ) << "bf16 changed nothing: the precision did not reach the matmuls";
  }
}

TEST(TrainerFlops, StepFlopsCountActiveExpertsAndAttention) {
  // Dense model: 6 * (total - embedding) + 12 L T d per token.
  Config config = tiny_config("linear", 1, 1, 1, 1);
  config.model.moe.n_experts = 0;
  config.parallel.ep = 1;
  const Transformer model(config.model, 5);
  const ModelConfig& m = config.model;
  const double per_token =
      6.0 * static_cast<double>(model.total_parameters() - m.vocab_size * m.d_model) +
      12.0 * m.n_layers * 8 * m.d_model;
  EXPECT_DOUBLE_EQ(step_model_flops(m, model.total_parameters(), {}, 64, 8, {}), 64 * per_token);
  // MoE: the expert parameters count only as far as tokens used them.
  const Config moe = tiny_config("linear", 1, 1, 1, 1);
  const Transformer moe_model(moe.model, 5);
  std::vector<MoELayerStats> none(4), some(4);
  for (MoELayerStats& s : some) s.active_params_per_token = 1000;
  const double base = step_model_flops(moe.model, moe_model.total_parameters(),
                                       moe_model.expert_sizes(), 64, 8, none);
  const double with = step_model_flops(moe.model, moe_model.total_parameters(),
                                       moe_model.expert_sizes(), 64, 8, some);
  EXPECT_DOUBLE_EQ(with - base, 64 * 6.0 * 4 * 1000);
}

}  // namespace
}  // namespace motley::train
