// Launcher checks: where a job's rank, local rank and device come from,
// and the cross-check of what MPI says against what the launcher said
// (docs/cluster.md, "Ranks, local ranks and devices").
//
// Note [Launcher cross-check]
// Rank, size and local rank come from MPI: MPI_COMM_WORLD and its
// shared-memory split (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), keyed by
// world rank), which is also what the device choice uses:
// device = local_rank % visible devices (CUDA_VISIBLE_DEVICES; -1 without
// devices). They are compared with the launcher's variables:
//   mpirun (Open MPI: OMPI_MCA_orte_launch / OMPI_MCA_orte_hnp_uri set):
//       OMPI_COMM_WORLD_SIZE, _RANK, _LOCAL_RANK
//   srun (SLURM_PROCID set, no mpirun marker):
//       SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_PROCID, SLURM_LOCALID
//   either: PMIX_RANK when set
// Any mismatch is a kUsage error (exit 2). The typical one is srun without
// PMIx wiring (srun --mpi=none, or --mpi=pmi2 with an Open MPI built for
// PMIx only, as Debian's is): every task would come up as its own
// singleton (MPI size 1 but SLURM_NTASKS > 1) or, with Open MPI, fail
// inside MPI_Init with a page of text and exit 1; check_launch_env() catches
// it from the environment BEFORE MPI_Init, with a message naming the fix.
//
// The checks are pure functions of (MPI facts, environment) and are unit
// tested; start_mpi_job() runs them around MPI_Init and makes the verdict
// collective (every rank fails together, so nobody hangs in a collective).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace motley::parallel {

// Environment lookup (the process environment, or a map in tests).
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
EnvLookup process_env();

// What MPI says about this rank.
struct LaunchFacts {
  int rank = 0, size = 1;
  int local_rank = 0, local_size = 1;  // shared-memory split of the world
  int nodes = 1;                       // number of shared-memory domains
};

struct LaunchInfo {
  std::string launcher;  // "mpirun", "srun" or "other"
  LaunchFacts mpi;
  int visible_devices = 0;  // entries of CUDA_VISIBLE_DEVICES (0: none set)
  int device = -1;          // local_rank % visible_devices, -1 without devices
};

// "mpirun", "srun" or "other" from the environment (Note [Launcher cross-check]).
std::string detect_launcher(const EnvLookup& env);

// Number of devices listed in CUDA_VISIBLE_DEVICES (0 when unset, empty
// or "NoDevFiles").
int visible_devices(const EnvLookup& env);

// Before MPI_Init: problems visible from the environment alone (srun
// started tasks without MPI wiring). `pmi2_ok`: whether this MPI can use
// Slurm's PMI-2 (false for Open MPI, which Debian builds for PMIx only).
// Empty when fine.
std::vector<std::string> check_launch_env(const EnvLookup& env, bool pmi2_ok);

// After MPI_Init: MPI's facts against the launcher's variables. Empty when
// everything agrees.
std::vector<std::string> check_launch(const LaunchFacts& mpi, const EnvLookup& env);

// Whether the linked MPI can wire up under srun --mpi=pmi2.
bool mpi_supports_pmi2();

// The start of an MPI job: check_launch_env (kUsage before MPI_Init),
// MPI_Init, the world, the shared-memory split, check_launch. The verdict
// is agreed over the world: a rank with a problem prints it to stderr with
// its rank, and every rank throws the same kUsage error (after
// MPI_Finalize). Rank 0 prints one "launch:" line to stdout.
struct MpiJob {
  std::shared_ptr<Communicator> world;
  LaunchInfo info;
};
MpiJob start_mpi_job();

}  // namespace motley::parallel
