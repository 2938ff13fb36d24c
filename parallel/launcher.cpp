#include "parallel/launcher.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/check.h"
#include "core/cpu/cpu_backend.h"

namespace motley::parallel {

EnvLookup process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

namespace {

// The integer value of `name`, if set and an integer.
std::optional<int> env_int(const EnvLookup& env, const std::string& name) {
  const std::optional<std::string> v = env(name);
  int out = 0;
  if (!v || !absl::SimpleAtoi(*v, &out)) return std::nullopt;
  return out;
}

bool has(const EnvLookup& env, const std::string& name) { return env(name).has_value(); }

constexpr const char* kFix =
    "launch with `srun --mpi=pmix` (see `srun --mpi=list`; cluster/slurm/train.sbatch does), "
    "or with mpirun inside the allocation";

}  // namespace

std::string detect_launcher(const EnvLookup& env) {
  if (has(env, "OMPI_MCA_orte_launch") || has(env, "OMPI_MCA_orte_hnp_uri") ||
      has(env, "OMPI_MCA_prte_launch")) {
    return "mpirun";
  }
  if (has(env, "SLURM_PROCID") && has(env, "SLURM_STEP_ID")) return "srun";
  return "other";
}

int visible_devices(const EnvLookup& env) {
  const std::optional<std::string> v = env("CUDA_VISIBLE_DEVICES");
  if (!v || v->empty() || *v == "NoDevFiles") return 0;
  int n = 0;
  for (absl::string_view part : absl::StrSplit(*v, ',')) {
    if (!part.empty()) ++n;
  }
  return n;
}

bool mpi_supports_pmi2() {
#ifdef OPEN_MPI
  return false;  // Open MPI >= 4 as packaged by Debian: PMIx only
#else
  return true;
#endif
}

std::vector<std::string> check_launch_env(const EnvLookup& env, bool pmi2_ok) {
  std::vector<std::string> problems;
  if (detect_launcher(env) != "srun") return problems;
  const bool wired = has(env, "PMIX_RANK") || has(env, "OMPI_COMM_WORLD_SIZE") ||
                     (pmi2_ok && (has(env, "PMI_RANK") || has(env, "PMI_FD")));
  if (wired) return problems;
  const int tasks = env_int(env, "SLURM_STEP_NUM_TASKS")
                        .value_or(env_int(env, "SLURM_NTASKS").value_or(1));
  std::string how = has(env, "PMI_RANK") ? "PMI-2 (srun --mpi=pmi2), which this MPI (Open MPI, "
                                           "PMIx only) cannot use"
                                         : "no MPI support (srun --mpi=none or MpiDefault=none)";
  problems.push_back(absl::StrCat(
      "srun started ", tasks, " task", tasks == 1 ? "" : "s", " with ", how,
      ": no PMIx variables (PMIX_RANK) in the environment, so every task would start as its "
      "own 1-rank MPI job; ", kFix));
  return problems;
}

std::vector<std::string> check_launch(const LaunchFacts& mpi, const EnvLookup& env) {
  std::vector<std::string> problems;
  auto compare = [&](const char* what, int mpi_value, const std::string& var) {
    const std::optional<int> v = env_int(env, var);
    if (v && *v != mpi_value) {
      problems.push_back(absl::StrCat("MPI ", what, " is ", mpi_value, " but ", var, " = ", *v));
    }
  };
  const std::string launcher = detect_launcher(env);
  if (launcher == "mpirun") {
    compare("world size", mpi.size, "OMPI_COMM_WORLD_SIZE");
    compare("rank", mpi.rank, "OMPI_COMM_WORLD_RANK");
    compare("local rank", mpi.local_rank, "OMPI_COMM_WORLD_LOCAL_RANK");
  } else if (launcher == "srun") {
    const std::string tasks_var =
        has(env, "SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
    const std::optional<int> tasks = env_int(env, tasks_var);
    if (tasks && *tasks != mpi.size) {
      problems.push_back(absl::StrCat(
          "MPI sees ", mpi.size, " rank", mpi.size == 1 ? "" : "s", " but srun started ", *tasks,
          " tasks (", tasks_var, " = ", *tasks, ")",
          mpi.size == 1 ? ": each task started as a singleton (srun without PMIx); " : "; ",
          kFix));
    } else {
      compare("rank", mpi.rank, "SLURM_PROCID");
      compare("local rank", mpi.local_rank, "SLURM_LOCALID");
    }
  }
  compare("rank", mpi.rank, "PMIX_RANK");
  return problems;
}

MpiJob start_mpi_job() {
  const EnvLookup env = process_env();
  const std::vector<std::string> early = check_launch_env(env, mpi_supports_pmi2());
  if (!early.empty()) MOTLEY_FAIL(kUsage, absl::StrJoin(early, "; "));

  mpi_initialize(nullptr, nullptr);
  MpiJob job;
  job.world = MpiCommunicator::world();
  LaunchFacts& f = job.info.mpi;
  f.rank = job.world->rank();
  f.size = job.world->size();
  MPI_Comm node = MPI_COMM_NULL;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, f.rank, MPI_INFO_NULL, &node) ==
          MPI_SUCCESS &&
      node != MPI_COMM_NULL) {
    MPI_Comm_rank(node, &f.local_rank);
    MPI_Comm_size(node, &f.local_size);
    MPI_Comm_free(&node);
  }
  std::vector<std::string> problems = check_launch(f, env);
  // Agree on the verdict and the node count in one allreduce.
  Tensor votes = Tensor::from_vector(
      std::vector<double>{problems.empty() ? 0.0 : 1.0, f.local_rank == 0 ? 1.0 : 0.0}, {2});
  job.world->allreduce_sum(votes);
  const std::vector<double> v = votes.to_vector<double>();
  f.nodes = static_cast<int>(v[1]);
  job.info.launcher = detect_launcher(env);
  job.info.visible_devices = visible_devices(env);
  job.info.device = job.info.visible_devices > 0 ? f.local_rank % job.info.visible_devices : -1;
  if (v[0] > 0) {
    if (!problems.empty()) {
      std::fprintf(stderr, "motley (rank %d of %d): launch check: %s\n", f.rank, f.size,
                   absl::StrJoin(problems, "; ").c_str());
      std::fflush(stderr);
    }
    const int bad = static_cast<int>(v[0]);
    job.world.reset();
    mpi_finalize();
    MOTLEY_FAIL(kUsage, "the launcher and MPI disagree on ", bad, " of ", f.size,
                " rank(s) (details above, Note [Launcher cross-check] in parallel/launcher.h)",
                problems.empty() ? "" : ": ", absl::StrJoin(problems, "; "));
  }
  // Note [BLAS threads] (core/cpu/cpu_backend.cpp): ranks sharing a node
  // share its cores.
  const int threads = default_blas_threads(f.local_size);
  if (threads > 0) set_blas_threads(threads);
  if (f.rank == 0) {
    std::printf("launch: %s, %d ranks on %d node(s), %d per node; device %s; %d BLAS thread(s) "
                "per rank%s\n",
                job.info.launcher.c_str(), f.size, f.nodes, f.local_size,
                job.info.visible_devices > 0
                    ? absl::StrCat("local rank % ", job.info.visible_devices, " (CUDA_VISIBLE_DEVICES)")
                          .c_str()
                    : "cpu",
                blas_threads(), threads > 0 ? "" : " (from OPENBLAS_NUM_THREADS/OMP_NUM_THREADS)");
    std::fflush(stdout);
  }
  return job;
}

}  // namespace motley::parallel
