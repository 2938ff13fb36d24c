// The fixture of the end-to-end tests that drive the motley binary under
// mpirun (tests/parallel/equivalence_test.cpp,
// tests/checkpoint/resume_test.cpp): a folder with a token file and the tiny
// MoE config, the mpiexec command line, and the run's metrics.jsonl.
//
//   const fs::path dir = tiny_run::make_folder("motley-resume", R"({"steps": 6})");
//   std::system(("cd " + dir.string() + " && " + tiny_run::mpiexec(2, dir) +
//                " motley train --config tiny.json --run a").c_str());
//   tiny_run::read_metrics(dir / "a" / "metrics.jsonl");
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include <gtest/gtest.h>

#include "core/philox.h"
#include "data/token_file.h"
#include "nlohmann/json.hpp"

namespace motley::tiny_run {

namespace fs = std::filesystem;

// A fresh folder $TMPDIR/<prefix>-<pid> holding
//   train.h5   20,000 token ids uniform in [0, 256), a pure function of the
//              prefix (Philox), and
//   tiny.json  4 layers of d_model 32 with 4 MoDSE experts (top-2, linear
//              router) on every layer, batch 8 of 16 tokens, lr 3e-3 with 2
//              warm-up steps, seed 5, no eval, data.train = train.h5;
//              `train` (a JSON object) overrides keys of its train section.
// One process may call it once per prefix. The folder is removed when the
// process exits with every test passed, and kept (the failures point into
// it) otherwise.
inline fs::path make_folder(const std::string& prefix, const std::string& train = "{}") {
  // Destroyed at exit; GoogleTest's UnitTest singleton is never destroyed.
  struct RemoveIfPassed {
    std::vector<fs::path> dirs;
    ~RemoveIfPassed() {
      if (::testing::UnitTest::GetInstance()->Failed()) return;
      std::error_code ec;
      for (const fs::path& d : dirs) fs::remove_all(d, ec);
    }
  };
  static RemoveIfPassed folders;
  const fs::path dir = fs::temp_directory_path() / (prefix + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  folders.dirs.push_back(dir);
  std::vector<std::uint32_t> tokens(20000);
  const PhiloxKey key = philox_key(7, prefix + "/tokens");
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<std::uint32_t>(philox_u64(key, 0, i) % 256);
  }
  write_token_file((dir / "train.h5").string(), tokens, 256);
  nlohmann::json config = nlohmann::json::parse(R"({
    "model": {"vocab_size": 256, "d_model": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 32,
              "ffn_hidden": 64,
              "moe": {"n_experts": 4, "top_k": 2, "expert_hidden": 32, "expert_sizes": "modse",
                      "router": "linear", "every": 1,
                      "aux": {"balance": 0.01, "z_loss": 0.001}}},
    "train": {"batch_size": 8, "micro_batches": 1, "seq_len": 16, "steps": 3, "lr": 3e-3,
              "min_lr": 3e-4, "warmup": 2, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
              "keep_last": 1, "seed": 5, "grad_clip": 0.5},
    "data": {"train": "train.h5"}
  })");
  config["train"].update(nlohmann::json::parse(train));
  std::ofstream(dir / "tiny.json") << config.dump(2) << "\n";
  return dir;
}

// `env TMPDIR=<session_dir> mpiexec --oversubscribe --allow-run-as-root -np
// <np>`: Open MPI's session directory in a folder of the test's own (Note
// [Open MPI session directories] in tests/CMakeLists.txt). `env` execs
// mpiexec, so a spawned run's pid is still mpiexec's.
inline std::string mpiexec(int np, const fs::path& session_dir) {
  return "env TMPDIR='" + session_dir.string() + "' " + MOTLEY_MPIEXEC +
         " --oversubscribe --allow-run-as-root -np " + std::to_string(np);
}

// A wait status as a shell reports it: the exit code, or 128 + the signal.
inline int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

// The rows of a metrics.jsonl, in order; a torn last line (a run killed
// mid-write) is left out. No file: no rows.
inline std::vector<nlohmann::json> read_metrics(const fs::path& file) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    nlohmann::json row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!row.is_discarded()) rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace motley::tiny_run
