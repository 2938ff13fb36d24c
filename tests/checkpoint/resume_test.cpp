// Checkpoints end to end with the motley binary (label mpi):
//  - a checkpoint saved under (dp=2, ep=2) resumes under pp=2 and under one
//    process, and the per-step losses match a straight single-process run
//    within 1e-5 relative (SPEC sections 3 and 5);
//  - SIGUSR1 mid-run (one process, and under mpirun -np 2) stops the run
//    with exit 75 and a complete checkpoint named by LATEST, and
//    `--resume auto` finishes with the final loss of an uninterrupted run;
//    a SIGTERM right behind the SIGUSR1 (best effort: during the save)
//    changes nothing;
//  - SIGKILL at several moments always leaves LATEST naming a loadable
//    checkpoint (Note [Atomic checkpoints]).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.h"
#include "nlohmann/json.hpp"
#include "tests/common/tiny_run.h"

namespace motley {
namespace {

namespace fs = std::filesystem;

const fs::path& fixture_dir() {
  static const fs::path dir = tiny_run::make_folder(
      "motley-resume",
      R"({"micro_batches": 2, "steps": 6, "ckpt_every": 3, "keep_last": 2})");
  return dir;
}

std::string mpirun(int np) { return tiny_run::mpiexec(np, fixture_dir()) + " "; }

// The shell command of one training run (in the fixture directory).
std::string train_command(const std::string& launcher, const std::string& run_dir,
                          const std::string& args) {
  return "cd '" + fixture_dir().string() + "' && exec " + launcher + "'" + MOTLEY_BINARY +
         "' train --config tiny.json --run '" + run_dir + "' " + args + " >> '" + run_dir +
         ".log' 2>&1";
}

using tiny_run::exit_code;

int run(const std::string& launcher, const std::string& run_dir, const std::string& args) {
  return exit_code(std::system(train_command(launcher, run_dir, args).c_str()));
}

// A run in the background: pid is the motley (or mpirun) process itself.
pid_t spawn(const std::string& launcher, const std::string& run_dir, const std::string& args) {
  const std::string cmd = train_command(launcher, run_dir, args);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

int wait_for(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return exit_code(status);
}

// The step rows of a run's metrics.jsonl.
std::vector<nlohmann::json> metrics(const std::string& run_dir) {
  std::vector<nlohmann::json> rows;
  for (nlohmann::json& row : tiny_run::read_metrics(fixture_dir() / run_dir / "metrics.jsonl")) {
    if (row.contains("loss")) rows.push_back(std::move(row));
  }
  return rows;
}

// Polls until the run has logged `rows` steps; false if it ended first
// (then `exited` holds its exit code).
bool wait_for_rows(pid_t pid, const std::string& run_dir, std::size_t rows, int& exited) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (metrics(run_dir).size() >= rows) return true;
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      exited = exit_code(status);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ::kill(pid, SIGKILL);
  exited = wait_for(pid);
  return false;
}

void expect_close(double a, double b, const std::string& what) {
  EXPECT_LE(std::abs(a - b), 1e-5 * std::max(1.0, std::abs(b))) << what << ": " << a << " vs " << b;
}

// LATEST names a checkpoint that opens and whose every tensor reads with
// its checksum verified; returns its step.
std::int64_t expect_latest_loadable(const std::string& run_dir) {
  const auto latest = latest_checkpoint((fixture_dir() / run_dir).string());
  if (!latest) {
    ADD_FAILURE() << run_dir << ": no LATEST";
    return -1;
  }
  const CheckpointReader reader = CheckpointReader::open(*latest);
  for (const std::string group : {"model", "optim/exp_avg", "optim/exp_avg_sq"}) {
    for (const std::string& name : reader.names(group)) reader.read(group, name);
  }
  EXPECT_FALSE(reader.names("model").empty());
  return reader.meta().step;
}

// The straight single-process reference of `steps` steps.
std::string reference(std::int64_t steps) {
  const std::string name = "straight_" + std::to_string(steps);
  if (!fs::exists(fixture_dir() / name / "metrics.jsonl")) {
    EXPECT_EQ(run("env -u OMPI_COMM_WORLD_SIZE ", name,
                  "--resume none --set train.steps=" + std::to_string(steps)),
              0);
  }
  return name;
}

TEST(Resume, SavedUnderDataAndExpertParallelResumesUnderAnyLayout) {
  const std::string straight = reference(6);
  // (dp=2, ep=2, m=1) is the single process's m=2; it saves at step 3.
  ASSERT_EQ(run(mpirun(2), "dp2_ep2",
                "--resume none --set parallel.dp=2 --set parallel.ep=2 "
                "--set train.micro_batches=1"),
            0);
  const std::string saved =
      (fixture_dir() / "dp2_ep2" / "checkpoints" / "step_00000003.h5").string();
  ASSERT_TRUE(fs::exists(saved));
  {
    const CheckpointReader reader = CheckpointReader::open(saved);
    EXPECT_EQ(reader.meta().dp, 2);
    EXPECT_EQ(reader.meta().ep, 2);
  }
  ASSERT_EQ(run(mpirun(2), "resumed_pp2", "--resume '" + saved + "' --set parallel.pp=2"), 0);
  ASSERT_EQ(run("env -u OMPI_COMM_WORLD_SIZE ", "resumed_one", "--resume '" + saved + "'"), 0);
  const auto want = metrics(straight);
  ASSERT_EQ(want.size(), 6u);
  for (const std::string got_run : {"dp2_ep2", "resumed_pp2", "resumed_one"}) {
    const auto got = metrics(got_run);
    ASSERT_FALSE(got.empty()) << got_run;
    for (const auto& row : got) {
      const std::int64_t step = row["step"].get<std::int64_t>();
      for (const char* key : {"loss", "lm_loss", "aux_loss", "grad_norm"}) {
        expect_close(row[key].get<double>(), want[step - 1][key].get<double>(),
                     got_run + " step " + std::to_string(step) + " " + key);
      }
    }
    EXPECT_EQ(got.back()["step"].get<std::int64_t>(), 6) << got_run;
  }
  EXPECT_EQ(metrics("resumed_pp2").front()["step"].get<std::int64_t>(), 4);
  EXPECT_EQ(expect_latest_loadable("resumed_pp2"), 6);
}

// Stops a run with SIGUSR1 (and, when `second`, a SIGTERM right behind it),
// checks exit 75 and LATEST, resumes it, and compares the final loss with
// the uninterrupted run.
void stop_and_resume(const std::string& launcher, const std::string& run_dir,
                     const std::string& sets, bool second) {
  const std::int64_t steps = 40;
  const std::string straight = reference(steps);
  const std::string args = "--set train.steps=" + std::to_string(steps) +
                           " --set train.ckpt_every=0 " + sets;
  const pid_t pid = spawn(launcher, run_dir, "--resume none " + args);
  int exited = -1;
  ASSERT_TRUE(wait_for_rows(pid, run_dir, 3, exited))
      << "the run ended (exit " << exited << ") before it could be signalled";
  ASSERT_EQ(::kill(pid, SIGUSR1), 0);
  if (second) {
    ASSERT_EQ(::kill(pid, SIGTERM), 0);
  }
  ASSERT_EQ(wait_for(pid), 75) << "see " << (fixture_dir() / (run_dir + ".log"));
  const std::int64_t stopped_at = expect_latest_loadable(run_dir);
  EXPECT_GE(stopped_at, 3);
  EXPECT_LT(stopped_at, steps) << "the signal arrived after the last step";
  EXPECT_EQ(metrics(run_dir).back()["step"].get<std::int64_t>(), stopped_at);
  ASSERT_EQ(run(launcher, run_dir, "--resume auto " + args), 0)
      << "see " << (fixture_dir() / (run_dir + ".log"));
  const auto got = metrics(run_dir), want = metrics(straight);
  ASSERT_EQ(got.size(), static_cast<std::size_t>(steps));
  expect_close(got.back()["loss"].get<double>(), want.back()["loss"].get<double>(),
               run_dir + " final loss");
  EXPECT_EQ(expect_latest_loadable(run_dir), steps);
}

TEST(Signals, UsrOneStopsOneProcessWithACheckpointAndResumeFinishes) {
  stop_and_resume("env -u OMPI_COMM_WORLD_SIZE ", "signal_one", "", false);
}

TEST(Signals, UsrOneStopsAnMpirunJobWithACheckpointAndResumeFinishes) {
  stop_and_resume(mpirun(2), "signal_mpi",
                  "--set parallel.dp=2 --set parallel.ep=2 --set train.micro_batches=1", false);
}

TEST(Signals, SecondSignalDuringTheSaveLeavesLatestLoadable) {
  stop_and_resume("env -u OMPI_COMM_WORLD_SIZE ", "signal_twice", "", true);
}

TEST(Signals, SigkillAtAnyMomentLeavesLatestLoadable) {
  const std::string run_dir = "killed";
  const std::string args = "--set train.steps=40 --set train.ckpt_every=1";
  std::int64_t last = 0;
  for (int round = 0; round < 4; ++round) {
    const pid_t pid = spawn("env -u OMPI_COMM_WORLD_SIZE ", run_dir,
                            (round == 0 ? "--resume none " : "--resume auto ") + args);
    int exited = -1;
    ASSERT_TRUE(wait_for_rows(pid, run_dir, static_cast<std::size_t>(last) + 2, exited))
        << "exit " << exited;
    // A different moment of the step each round: compute, save, rename.
    std::this_thread::sleep_for(std::chrono::microseconds(1500 * round + 300));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    EXPECT_EQ(wait_for(pid), 128 + SIGKILL);
    const std::int64_t step = expect_latest_loadable(run_dir);
    EXPECT_GE(step, last + 1) << "round " << round;
    last = step;
  }
  ASSERT_EQ(run("env -u OMPI_COMM_WORLD_SIZE ", run_dir, "--resume auto " + args), 0);
  expect_close(metrics(run_dir).back()["loss"].get<double>(),
               metrics(reference(40)).back()["loss"].get<double>(), "final loss after kills");
}

}  // namespace
}  // namespace motley
