// train::Trainer on CUDA devices (label gpu; every test skips without a
// device, so CPU-only CI compiles and skips them).
//
// - 20 steps on cuda:0 against the same 20 steps on the CPU: f32 losses
//   within 1e-4 relative, parameters close; bf16 within 2 %;
// - dp 2 x ep 2 with one GPU per rank (ranks on threads, NCCL for every
//   group, the ThreadCommunicator as host communicator): equal to one CPU
//   process; skips below 2 devices;
// - a checkpoint saved on the GPU resumes on the CPU and the reverse, and
//   the resumed losses follow the uninterrupted run.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cpu/cpu_backend.h"
#include "core/ops.h"
#include "tests/train/train_test_util.h"

namespace motley::train {
namespace {

namespace fs = std::filesystem;
using namespace testing;  // NOLINT: the shared fixtures

class TrainerGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) {
      GTEST_SKIP() << "no CUDA device (cuda_device_count() == " << cuda_device_count() << ")";
    }
  }
};

std::vector<double> losses_of(Trainer& trainer, int steps) {
  std::vector<double> out;
  for (int s = 0; s < steps; ++s) out.push_back(trainer.step().loss);
  return out;
}

TEST_F(TrainerGpu, TwentyStepsOnCudaMatchTheCpuInF32) {
  for (const std::string router : {"linear", "gru"}) {
    SCOPED_TRACE(router);
    const Config config = tiny_config(router, 1, 1, 1, 2);
    const BatchSource batches = synthetic_batches(64, 8);
    Trainer cpu(config, single_groups(), batches);
    Trainer gpu(config, single_groups(Device::cuda(0)), batches, Device::cuda(0));
    const std::vector<double> want = losses_of(cpu, 20), got = losses_of(gpu, 20);
    for (int s = 0; s < 20; ++s) {
      EXPECT_NEAR(got[s], want[s], 1e-4 * std::abs(want[s])) << "step " << s + 1;
    }
    for (const Variable& p : cpu.model().params().all()) {
      const Tensor g = gpu.model().params().get(p.name()).data().to(Device::cpu());
      EXPECT_LT(ops::nmse(g, p.data()), 1e-6) << p.name();
    }
  }
}

TEST_F(TrainerGpu, Bf16OnCudaStaysWithinTwoPercentOfF32) {
  // SPEC 8.1: bf16 x bf16 -> f32 GEMMs (Note [Matmul precision]) over 20
  // steps stay within 2 % of the f32 run on the CPU.
  Config f32 = tiny_config("linear", 1, 1, 1, 2);
  Config bf16 = f32;
  bf16.train.precision = Precision::kBF16;
  check_precision(bf16.train, Device::cuda(0));
  const BatchSource batches = synthetic_batches(64, 8);
  Trainer cpu(f32, single_groups(), batches);
  Trainer gpu(bf16, single_groups(Device::cuda(0)), batches, Device::cuda(0));
  const std::vector<double> want = losses_of(cpu, 20), got = losses_of(gpu, 20);
  for (int s = 0; s < 20; ++s) {
    EXPECT_NEAR(got[s], want[s], 0.02 * std::abs(want[s])) << "step " << s + 1;
  }
}

TEST_F(TrainerGpu, DataAndExpertParallelOneGpuPerRank) {
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  set_blas_threads(1);
  const RankRecord single = run_layout(tiny_config("linear", 1, 1, 1, 4), 3);
  const RankRecord gpus =
      run_layout(tiny_config("linear", 2, 2, 1, 2), 3, [](int rank) { return Device::cuda(rank); });
  for (int s = 0; s < 3; ++s) {
    EXPECT_NEAR(gpus.losses[s], single.losses[s], 1e-4 * std::abs(single.losses[s]));
  }
  expect_params_near(gpus, single, 1e-4);
}

TEST_F(TrainerGpu, CheckpointsMoveBetweenGpuAndCpu) {
  const fs::path dir = fs::temp_directory_path() / "motley-trainer-gpu";
  fs::create_directories(dir);
  const Config config = tiny_config("gru", 1, 1, 1, 2);
  const BatchSource batches = synthetic_batches(64, 8);
  Trainer reference(config, single_groups(), batches);
  const std::vector<double> want = losses_of(reference, 6);
  for (const bool gpu_first : {true, false}) {
    SCOPED_TRACE(gpu_first ? "gpu -> cpu" : "cpu -> gpu");
    const Device first = gpu_first ? Device::cuda(0) : Device::cpu();
    const Device second = gpu_first ? Device::cpu() : Device::cuda(0);
    const std::string path = (dir / (gpu_first ? "from_gpu.h5" : "from_cpu.h5")).string();
    {
      Trainer a(config, single_groups(first), batches, first);
      losses_of(a, 3);
      a.save(path, "");
    }
    Trainer b(config, single_groups(second), batches, second);
    b.resume(path);
    EXPECT_EQ(b.step_count(), 3);
    const std::vector<double> got = losses_of(b, 3);
    for (int s = 0; s < 3; ++s) {
      EXPECT_NEAR(got[s], want[3 + s], 1e-4 * std::abs(want[3 + s])) << "step " << 4 + s;
    }
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace motley::train
