// motley train: the command around the training step (train/trainer.h).
// This file keeps what belongs to the command: flags, the run directory,
// stop signals, the cadence of logging, evaluation and checkpoints, and
// the MPI job's start and end. The step itself, for every layout and
// device, is train::Trainer::step().
//
// Under mpirun / srun the same loop runs on every rank of a (dp, ep, pp)
// layout (SPEC section 3, docs/parallel.md). Rank 0 alone prints and
// writes metrics.jsonl; checkpoints are written by every rank into one
// file without gathering, and resumed under any layout. A single process
// (no MPI launcher) is a world of one LocalCommunicator, without MPI.
#include <signal.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>

#include "absl/strings/str_join.h"
#include "apps/cli.h"
#include "apps/evaluate.h"
#include "apps/progress.h"
#include "apps/subcommands.h"
#include "apps/train_report.h"
#include "apps/train_support.h"
#include "parallel/launcher.h"
#include "train/device.h"
#include "train/flops.h"
#include "train/trainer.h"

namespace motley::apps {
namespace {

namespace fs = std::filesystem;
namespace par = parallel;
using Clock = std::chrono::steady_clock;

constexpr int kExitResumeMe = 75;

volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signal) {
  g_stop_signal = signal;
  // A second Ctrl-C at the terminal ends the process at once (the previous
  // checkpoint stays intact: see Note [Atomic checkpoints]).
  if (signal == SIGINT) std::signal(SIGINT, SIG_DFL);
}

// Handler that persists after delivery (no SA_RESETHAND) and restarts
// interrupted system calls, so a signal never aborts file or MPI I/O.
void install_stop_handler(int signal) {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  MOTLEY_CHECK_KIND(kRuntime, sigaction(signal, &action, nullptr) == 0,
                    "cannot install the handler for signal ", signal);
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The loop of one rank: steps, and on schedule logs, evaluations and
// checkpoints; a stop signal on any rank saves and returns 75.
int run(train::Trainer& trainer, const TrainData& data, const std::string& run_dir) {
  const TrainConfig& tc = trainer.config().train;
  const bool root = trainer.groups().rank() == 0;
  const std::string tokenizer_json = data.tokenizer ? data.tokenizer->to_json() : std::string();
  std::optional<MetricsLog> metrics;
  if (root) metrics.emplace(run_dir + "/metrics.jsonl", trainer.step_count());
  // MFU: the step's model FLOPs (all ranks) over world x one rank's
  // measured GEMM rate. Ranks sharing cores (mpirun --oversubscribe) make
  // this an underestimate of what the hardware gives.
  const int world = trainer.groups().layout().world();
  const double peak = (root ? train::measured_peak_flops(trainer.device()) : 1.0) * world;
  if (root) {
    print_model_summary(trainer);
    std::printf(
        "peak (measured sgemm on %s): %.1f GFLOP/s per rank x %d rank(s); MFU is model "
        "FLOPs over this peak\n",
        trainer.device().str().c_str(), peak / world / 1e9, world);
    if (trainer.step_count() >= tc.steps) {
      std::printf("run already complete: step %lld of %lld\n",
                  static_cast<long long>(trainer.step_count()), static_cast<long long>(tc.steps));
    }
  }
  auto evaluate_now = [&](std::int64_t step, bool final) {
    Transformer* model = trainer.eval_model();  // collective
    if (model != nullptr) {
      const ops::MatmulPrecisionGuard precision(train::matmul_precision_of(tc));
      ProgressBar bar("eval", eval_window_count(data.valid->size(), tc.seq_len));
      const EvalResult e = evaluate(*model, *data.valid, tc.seq_len,
                                    std::max<std::int64_t>(1, tc.batch_size / tc.micro_batches),
                                    data.tokenizer ? &*data.tokenizer : nullptr,
                                    [&](std::int64_t done, std::int64_t) { bar.update(done); });
      bar.finish();
      log_eval(*metrics, step, e, final);
    }
    if (world > 1) trainer.groups().host().barrier();
  };
  auto save_now = [&]() {
    const std::string path = checkpoint_path(run_dir, trainer.step_count());
    trainer.save(path, tokenizer_json);  // collective; the file is complete on return
    if (root) {
      write_latest(run_dir, fs::path(path).filename().string());
      prune_checkpoints(run_dir, tc.keep_last);
      std::printf("saved checkpoint %s\n", path.c_str());
      std::fflush(stdout);
    }
    if (world > 1) trainer.groups().host().barrier();  // LATEST names the new file everywhere
  };

  const std::int64_t first_step = trainer.step_count();
  const auto run_start = Clock::now();
  auto interval_start = run_start;
  std::int64_t interval_tokens = 0;
  double interval_flops = 0;
  while (trainer.step_count() < tc.steps) {
    const train::StepResult r = trainer.step();
    interval_tokens += tc.batch_size * tc.seq_len;
    interval_flops += r.model_flops;
    if (r.step % tc.log_every == 0 || r.step == tc.steps || r.replacement) {
      const double secs = std::max(seconds_since(interval_start), 1e-9);
      StepRates rates;
      rates.tokens_per_s = static_cast<double>(interval_tokens) / secs;
      rates.mfu = interval_flops / secs / peak;
      rates.eta_s = seconds_since(run_start) / static_cast<double>(r.step - first_step) *
                    static_cast<double>(tc.steps - r.step);
      if (root) log_step(*metrics, trainer, r, rates);
      interval_start = Clock::now();
      interval_tokens = 0;
      interval_flops = 0;
    }
    const auto side_work_start = Clock::now();
    if (data.valid && tc.eval_every > 0 && r.step % tc.eval_every == 0 && r.step != tc.steps) {
      evaluate_now(r.step, /*final=*/false);
    }
    const bool stop = trainer.any_rank(g_stop_signal != 0);
    if ((tc.ckpt_every > 0 && r.step % tc.ckpt_every == 0) || r.step == tc.steps || stop) {
      save_now();
    }
    // Evaluation and checkpoints do not count against training throughput.
    interval_start += Clock::now() - side_work_start;
    if (stop) {
      if (root) {
        std::printf(
            "received signal %d: saved a checkpoint at step %lld; exiting with %d so the "
            "job can be resumed\n",
            static_cast<int>(g_stop_signal), static_cast<long long>(r.step), kExitResumeMe);
      }
      return kExitResumeMe;
    }
  }
  if (data.valid) evaluate_now(trainer.step_count(), /*final=*/true);
  if (root) {
    std::printf("done: %lld steps, %s tokens, run directory %s\n",
                static_cast<long long>(trainer.step_count()),
                format_count(static_cast<double>(trainer.tokens_seen())).c_str(), run_dir.c_str());
  }
  return 0;
}

// The training command of one process of the job: parses the command
// line, builds the process groups over `world` and runs the loop.
int train_rank_main(int argc, char** argv, std::shared_ptr<par::Communicator> world,
                    int local_rank) {
  CommandLine cli("train", "Train a model from a JSON config (docs/config.md lists the keys).");
  cli.flag("config", "FILE", "the JSON config (configs/ holds presets)");
  cli.repeated("set", "KEY=VALUE",
               "override a config key, e.g. --set train.lr=3e-4 or --set train.device=cuda");
  cli.flag("run", "DIR", "run directory for config.json, metrics.jsonl and checkpoints/",
           std::string("runs/<config name>"));
  cli.flag("resume", "auto|PATH|none",
           "auto: continue from RUN/checkpoints/LATEST if there is one; PATH: from that "
           "checkpoint; none: start fresh",
           std::string("auto"));
  if (!cli.parse(argc, argv)) return 0;
  const std::string config_path = cli.get("config");
  const Config config = Config::load(config_path, cli.all("set"));
  const std::string run_dir =
      cli.has("run") ? cli.get("run") : "runs/" + fs::path(config_path).stem().string();
  const std::string resume = cli.get("resume");
  // Before any work, identical on every rank (docs/parallel.md).
  par::validate_layout(config, world->size());
  const Device device = train::compute_device(config.train, local_rank);
  train::check_precision(config.train, device);
  const bool root = world->rank() == 0;

  const TrainData data = open_train_data(config);
  check_vocab(config, data);
  if (root) {
    fs::create_directories(run_dir + "/checkpoints");
    std::ofstream out(run_dir + "/config.json");
    out << config.resolved_json().dump(2) << "\n";
    std::printf("config (resolved):\n%s\n", config.resolved_json().dump(2).c_str());
  }
  // SIGTERM / SIGUSR1 stay caught for the whole run, saves included: a
  // second signal during a save only sets the flag again, so the save
  // completes (Note [Atomic checkpoints] covers SIGKILL).
  install_stop_handler(SIGTERM);
  install_stop_handler(SIGUSR1);
  install_stop_handler(SIGINT);

  par::GroupLayout layout;
  layout.dp = static_cast<int>(config.parallel.dp);
  layout.ep = static_cast<int>(config.parallel.ep);
  layout.pp = static_cast<int>(config.parallel.pp);
  train::Trainer trainer(config, train::make_process_groups(world, layout, device),
                         train::sampled_batches(*data.train, config.train), device);
  if (layout.world() > 1) world->barrier();  // the run directory exists
  std::optional<std::string> from;
  if (resume == "auto") {
    from = latest_checkpoint(run_dir);
  } else if (resume != "none") {
    from = resume;
  }
  if (from) {
    const std::vector<std::string> changed = trainer.resume(*from);
    if (root && !changed.empty()) {
      std::printf(
          "resume: keys that differ from the checkpoint's config (the new values "
          "apply): %s\n",
          absl::StrJoin(changed, ", ").c_str());
    }
    if (root) {
      std::printf("resumed from %s at step %lld\n", from->c_str(),
                  static_cast<long long>(trainer.step_count()));
    }
  }
  return run(trainer, data, run_dir);
}

}  // namespace

int train_main(int argc, char** argv) {
  // Without an MPI launcher this is one process with a LocalCommunicator:
  // no MPI calls at all.
  if (!par::launched_by_mpi()) {
    return train_rank_main(argc, argv, std::make_shared<par::LocalCommunicator>(), 0);
  }
  // MPI_Init with the launcher cross-checks (Note [Launcher cross-check] in
  // parallel/launcher.h): a mismatch, e.g. srun without PMIx, is kUsage (exit 2).
  par::MpiJob job = par::start_mpi_job();
  std::shared_ptr<par::Communicator> world = job.world;
  int code = 0;
  try {
    code = train_rank_main(argc, argv, world, job.info.mpi.local_rank);
  } catch (const Error& e) {
    // Usage errors from validation are raised identically by every rank
    // before any communication: report once and leave cleanly (exit 2).
    // Anything else may have happened on this rank alone: bring the whole
    // job down now rather than leave the others waiting forever.
    if (e.kind() == ErrorKind::kUsage) {
      if (world->rank() == 0) {
        std::fprintf(stderr, "motley train: %s: %s\n", error_kind_name(e.kind()), e.what());
      }
      world.reset();
      job.world.reset();
      par::mpi_finalize();
      return exit_code_for(e.kind());
    }
    std::fprintf(stderr, "motley train (rank %d): %s: %s\n", world->rank(),
                 error_kind_name(e.kind()), e.what());
    std::fflush(stderr);
    par::mpi_abort(exit_code_for(e.kind()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "motley train (rank %d): internal error: %s\n", world->rank(), e.what());
    std::fflush(stderr);
    par::mpi_abort(1);
  }
  world.reset();
  job.world.reset();
  par::mpi_finalize();
  return code;
}

}  // namespace motley::apps
