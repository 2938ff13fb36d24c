// The equivalence rule of SPEC section 3, end to end (label mpi): the
// motley binary trains the tiny config for a few steps under mpirun with
// a (dp, ep, pp, m) layout and must log the same per-step losses and
// gradient norms, and save the same final parameters and AdamW moments, as
// one process with micro_batches = dp * m, within 1e-5 (float32; relative
// for scalars, max-abs error over max-abs value for tensors).
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.h"
#include "core/ops.h"
#include "core/philox.h"
#include "data/token_file.h"
#include "nlohmann/json.hpp"

namespace motley {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  fs::path dir;
  std::string config;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    x.dir = fs::temp_directory_path() / ("motley-equivalence-" + std::to_string(::getpid()));
    fs::create_directories(x.dir);
    std::vector<std::uint32_t> tokens(20000);
    const PhiloxKey key = philox_key(7, "equivalence/tokens");
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = static_cast<std::uint32_t>(philox_u64(key, 0, i) % 256);
    }
    write_token_file((x.dir / "train.h5").string(), tokens, 256);
    x.config = (x.dir / "tiny.json").string();
    std::ofstream(x.config) << R"({
  "model": {"vocab_size": 256, "d_model": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 32,
            "ffn_hidden": 64,
            "moe": {"n_experts": 4, "top_k": 2, "expert_hidden": 32, "expert_sizes": "modse",
                    "router": "linear", "every": 1, "aux": {"balance": 0.01, "z_loss": 0.001}}},
  "train": {"batch_size": 8, "micro_batches": 1, "seq_len": 16, "steps": 3, "lr": 3e-3,
            "min_lr": 3e-4, "warmup": 2, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
            "keep_last": 1, "seed": 5, "grad_clip": 0.5},
  "data": {"train": "train.h5"}
})";
    return x;
  }();
  return f;
}

int run(const std::string& launcher, const std::string& run_dir, const std::string& sets) {
  const std::string cmd = "cd '" + fixture().dir.string() + "' && " + launcher + " '" +
                          MOTLEY_BINARY + "' train --config tiny.json --resume none --run '" +
                          run_dir + "' " + sets + " > '" + run_dir + ".log' 2>&1";
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::vector<nlohmann::json> metrics(const std::string& run_dir) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(fixture().dir / run_dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

std::string reference(std::int64_t total_micro, const std::string& extra) {
  const std::string name = "single_m" + std::to_string(total_micro) +
                           std::to_string(std::hash<std::string>{}(extra) % 1000);
  if (!fs::exists(fixture().dir / name / "metrics.jsonl")) {
    EXPECT_EQ(run("env -u OMPI_COMM_WORLD_SIZE", name,
                  "--set train.micro_batches=" + std::to_string(total_micro) + " " + extra),
              0);
  }
  return name;
}

void expect_close(double a, double b, const std::string& what) {
  EXPECT_LE(std::abs(a - b), 1e-5 * std::max(1.0, std::abs(b))) << what << ": " << a << " vs " << b;
}

void expect_same_run(const std::string& got, const std::string& want) {
  const auto a = metrics(got), b = metrics(want);
  ASSERT_EQ(a.size(), b.size()) << got;
  ASSERT_FALSE(a.empty());
  for (std::size_t i = 0; i < a.size(); ++i) {
    for (const char* key : {"loss", "lm_loss", "aux_loss", "grad_norm"}) {
      expect_close(a[i][key].get<double>(), b[i][key].get<double>(),
                   got + " step " + std::to_string(i + 1) + " " + key);
    }
    EXPECT_EQ(a[i]["expert_tokens"], b[i]["expert_tokens"]) << got;
  }
  const auto ra = CheckpointReader::open(*latest_checkpoint((fixture().dir / got).string()));
  const auto rb = CheckpointReader::open(*latest_checkpoint((fixture().dir / want).string()));
  for (const std::string group : {"model", "optim/exp_avg", "optim/exp_avg_sq"}) {
    const auto names = rb.names(group);
    EXPECT_EQ(ra.names(group), names) << group;
    for (const std::string& n : names) {
      const std::vector<float> x = ra.read(group, n).to_vector<float>();
      const std::vector<float> y = rb.read(group, n).to_vector<float>();
      ASSERT_EQ(x.size(), y.size()) << n;
      double err = 0, scale = 0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        err = std::max(err, static_cast<double>(std::abs(x[i] - y[i])));
        scale = std::max(scale, static_cast<double>(std::abs(y[i])));
      }
      EXPECT_LE(err, 1e-4 * std::max(scale, 1e-12)) << got << " " << group << "/" << n;
    }
  }
}

void check_layout(int dp, int ep, int pp, int m, const std::string& extra = "") {
  const std::string name = "dp" + std::to_string(dp) + "_ep" + std::to_string(ep) + "_pp" +
                           std::to_string(pp) + "_m" + std::to_string(m) +
                           std::to_string(std::hash<std::string>{}(extra) % 1000);
  const std::string launcher = std::string(MOTLEY_MPIEXEC) +
                               " --oversubscribe --allow-run-as-root -np " +
                               std::to_string(dp * pp);
  ASSERT_EQ(run(launcher, name,
                "--set parallel.dp=" + std::to_string(dp) + " --set parallel.ep=" +
                    std::to_string(ep) + " --set parallel.pp=" + std::to_string(pp) +
                    " --set train.micro_batches=" + std::to_string(m) + " " + extra),
            0)
      << "see " << (fixture().dir / (name + ".log"));
  expect_same_run(name, reference(dp * m, extra));
}

TEST(Equivalence, DataParallel) { check_layout(2, 1, 1, 2); }
TEST(Equivalence, DataAndExpertParallel) { check_layout(2, 2, 1, 2); }
TEST(Equivalence, DataAndExpertParallelPairs) {
  check_layout(2, 2, 1, 1, "--set parallel.placement=pairs");
}
TEST(Equivalence, Pipeline) { check_layout(1, 1, 2, 4); }
TEST(Equivalence, DataAndPipeline) { check_layout(2, 1, 2, 2); }
TEST(Equivalence, DataFourExpertTwo) { check_layout(4, 2, 1, 1); }
TEST(Equivalence, PipelineWithSharedGruRouter) {
  check_layout(1, 1, 2, 2, "--set model.moe.router=gru --set model.moe.gru_dim=8");
}

}  // namespace
}  // namespace motley
