// Note [Launcher cross-check] (parallel/launcher.h): the pure checks of
// MPI's view against the launcher's environment variables.
#include "parallel/launcher.h"

#include <map>

#include <gtest/gtest.h>

namespace motley::parallel {
namespace {

EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

LaunchFacts facts(int rank, int size, int local_rank, int local_size) {
  LaunchFacts f;
  f.rank = rank;
  f.size = size;
  f.local_rank = local_rank;
  f.local_size = local_size;
  return f;
}

const std::map<std::string, std::string> kSrunPmix = {
    {"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "3"}, {"SLURM_LOCALID", "1"},
    {"SLURM_STEP_NUM_TASKS", "4"}, {"SLURM_NTASKS", "4"}, {"PMIX_RANK", "3"}};

TEST(Launcher, DetectsTheLauncher) {
  EXPECT_EQ(detect_launcher(env_of(kSrunPmix)), "srun");
  EXPECT_EQ(detect_launcher(env_of({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_MCA_orte_launch", "1"},
                                    {"SLURM_PROCID", "0"}, {"SLURM_STEP_ID", "0"}})),
            "mpirun");  // mpirun inside an allocation: its orted came from srun
  EXPECT_EQ(detect_launcher(env_of({})), "other");
}

TEST(Launcher, SrunWithPmixAgrees) {
  EXPECT_TRUE(check_launch_env(env_of(kSrunPmix), false).empty());
  EXPECT_TRUE(check_launch(facts(3, 4, 1, 2), env_of(kSrunPmix)).empty());
}

TEST(Launcher, SrunWithoutPmixIsCaughtBeforeMpiInit) {
  auto vars = kSrunPmix;
  vars.erase("PMIX_RANK");
  const auto problems = check_launch_env(env_of(vars), false);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find("srun started 4 tasks"), std::string::npos) << problems[0];
  EXPECT_NE(problems[0].find("--mpi=pmix"), std::string::npos) << problems[0];
  // pmi2: fine for an MPI that speaks PMI-2, not for Debian's Open MPI.
  vars["PMI_RANK"] = "3";
  EXPECT_TRUE(check_launch_env(env_of(vars), true).empty());
  const auto pmi2 = check_launch_env(env_of(vars), false);
  ASSERT_EQ(pmi2.size(), 1u);
  EXPECT_NE(pmi2[0].find("pmi2"), std::string::npos) << pmi2[0];
}

TEST(Launcher, SingletonsUnderSrunAreAnError) {
  auto vars = kSrunPmix;
  vars.erase("PMIX_RANK");
  vars["SLURM_PROCID"] = "0";
  const auto problems = check_launch(facts(0, 1, 0, 1), env_of(vars));
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find("MPI sees 1 rank but srun started 4 tasks"), std::string::npos)
      << problems[0];
  EXPECT_NE(problems[0].find("singleton"), std::string::npos);
}

TEST(Launcher, RankAndLocalRankMismatches) {
  const auto problems = check_launch(facts(2, 4, 0, 2), env_of(kSrunPmix));
  // rank 2 vs SLURM_PROCID 3, local 0 vs SLURM_LOCALID 1, rank vs PMIX_RANK 3
  EXPECT_EQ(problems.size(), 3u);
  const auto ompi = check_launch(
      facts(1, 2, 1, 2), env_of({{"OMPI_MCA_orte_launch", "1"}, {"OMPI_COMM_WORLD_SIZE", "3"},
                                 {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                 // mpirun's ranks inherit its orted's srun variables: ignored
                                 {"SLURM_PROCID", "0"}, {"SLURM_STEP_ID", "0"},
                                 {"SLURM_STEP_NUM_TASKS", "1"}}));
  ASSERT_EQ(ompi.size(), 1u);
  EXPECT_NE(ompi[0].find("OMPI_COMM_WORLD_SIZE = 3"), std::string::npos) << ompi[0];
}

TEST(Launcher, NoLauncherVariablesNoChecks) {
  EXPECT_TRUE(check_launch_env(env_of({}), false).empty());
  EXPECT_TRUE(check_launch(facts(0, 1, 0, 1), env_of({})).empty());
}

TEST(Launcher, VisibleDevices) {
  EXPECT_EQ(visible_devices(env_of({})), 0);
  EXPECT_EQ(visible_devices(env_of({{"CUDA_VISIBLE_DEVICES", ""}})), 0);
  EXPECT_EQ(visible_devices(env_of({{"CUDA_VISIBLE_DEVICES", "NoDevFiles"}})), 0);
  EXPECT_EQ(visible_devices(env_of({{"CUDA_VISIBLE_DEVICES", "0,1,2,3"}})), 4);
  EXPECT_EQ(visible_devices(env_of({{"CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d"}})), 2);
}

}  // namespace
}  // namespace motley::parallel
