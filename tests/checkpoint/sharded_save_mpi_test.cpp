// Sharded checkpoint writing under mpirun (label mpi): every rank holds
// one (stage, EP rank) shard of the model, the ranks write one file
// together through parallel HDF5 without gathering, and the file, read
// back by the serial single-process CheckpointReader, holds exactly the
// tensors a gathered full model holds. Replicas that are not a tensor's
// writer carry poisoned values, so a tensor written by the wrong rank, or
// not at all, fails the comparison.
#include <mpi.h>
#include <unistd.h>

#include <filesystem>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.h"
#include "core/ops.h"
#include "layers/expert_sizes.h"
#include "layers/transformer.h"
#include "parallel/placement.h"

namespace motley {
namespace {

namespace fs = std::filesystem;
using parallel::Communicator;

std::shared_ptr<Communicator> world() {
  static std::shared_ptr<Communicator> w = parallel::MpiCommunicator::world();
  return w;
}

Config tiny_config() {
  return Config::from_json(nlohmann::ordered_json::parse(R"({
    "model": {"vocab_size": 32, "d_model": 16, "n_layers": 4, "n_heads": 2, "ffn_hidden": 24,
              "moe": {"n_experts": 4, "expert_hidden": 16, "expert_sizes": "modse",
                      "router": "gru", "gru_dim": 8, "every": 1, "first_dense": 1}},
    "train": {"seq_len": 8, "batch_size": 8}})"));
}

// A directory every rank agrees on: rank 0's choice, broadcast.
std::string shared_dir(const std::string& name) {
  Tensor id = Tensor::from_vector(std::vector<std::int64_t>{::getpid()}, {1});
  world()->broadcast(id, 0);
  const std::string dir = ::testing::TempDir() + "/motley_sharded_" + name + "_" +
                          std::to_string(id.to_vector<std::int64_t>()[0]);
  if (world()->rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  world()->barrier();
  return dir;
}

// Moments derived from the parameter, so the expected values are known.
Tensor expected_exp_avg(const Tensor& p) { return ops::scale(p, 2.0); }
Tensor expected_exp_avg_sq(const Tensor& p) { return ops::scale(p, 0.25); }

void expect_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  const std::vector<float> a = got.to_vector<float>(), b = want.to_vector<float>();
  ASSERT_EQ(a.size(), b.size()) << what;
  for (std::size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i], b[i]) << what << " element " << i;
  }
}

TEST(ShardedSave, RanksWriteOneFileEqualToTheGatheredModel) {
  const int size = world()->size(), me = world()->rank();
  parallel::GroupLayout layout;
  layout.pp = size >= 4 ? 2 : 1;
  layout.dp = size / layout.pp;
  layout.ep = layout.dp % 2 == 0 ? 2 : 1;
  ASSERT_EQ(layout.world(), size);
  const Config config = tiny_config();
  const std::vector<int> owner =
      parallel::place_experts("pairs", expert_hidden_sizes(config.model.moe), layout.ep);
  const parallel::RankCoords at = layout.coords(me);
  ModelShard shard;
  const parallel::StageLayers block =
      parallel::stage_layers(config.model.n_layers, layout.pp, at.pp_rank);
  shard.layer_begin = block.begin;
  shard.layer_end = block.end;
  if (layout.ep > 1) {
    for (int o : owner) shard.hold_expert.push_back(o == at.ep_rank);
  }
  Transformer mine(config.model, 5, DType::kF32, Device::cpu(), shard);
  AdamW optimizer(config.train);
  optimizer.set_step_count(7);
  const std::vector<TensorSpec> specs = global_parameter_specs(config.model);
  std::vector<int> writer;
  for (const TensorSpec& s : specs) {
    writer.push_back(checkpoint_writer(s.name, config.model, layout, owner));
  }
  for (const autograd::Variable& p : mine.params().all()) {
    AdamWState& state = optimizer.state(p);
    const bool writes =
        writer[std::find_if(specs.begin(), specs.end(),
                            [&](const TensorSpec& s) { return s.name == p.name(); }) -
               specs.begin()] == me;
    Tensor data = p.data();
    if (!writes) data.copy_(ops::scale(data, -7.0 - me));  // poison replicas
    state.exp_avg.copy_(expected_exp_avg(data));
    state.exp_avg_sq.copy_(expected_exp_avg_sq(data));
  }
  CheckpointMeta meta;
  meta.step = 7;
  meta.seed = 5;
  meta.config_json = config.resolved_json().dump();
  meta.dp = layout.dp;
  meta.ep = layout.ep;
  meta.pp = layout.pp;
  const std::string dir = shared_dir("gathered");
  const std::string path = checkpoint_path(dir, 7);
  save_checkpoint_sharded(path, mine.params(), optimizer, meta, "{\"tok\": 2}", specs, writer,
                          *world());
  EXPECT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // Rank 0 alone, with the serial reader (h5py's view): every tensor of
  // the file equals the full model's.
  if (me == 0) {
    const CheckpointReader reader = CheckpointReader::open(path);
    EXPECT_EQ(reader.meta().step, 7);
    EXPECT_EQ(reader.meta().dp, layout.dp);
    EXPECT_EQ(reader.optimizer_step(), 7);
    EXPECT_EQ(reader.tokenizer_json().value(), "{\"tok\": 2}");
    const Transformer full(config.model, 5);
    EXPECT_EQ(reader.names("model").size(), full.params().all().size());
    for (const autograd::Variable& p : full.params().all()) {
      expect_equal(reader.read("model", p.name()), p.data(), "model/" + p.name());
      expect_equal(reader.read("optim/exp_avg", p.name()), expected_exp_avg(p.data()),
                   "exp_avg/" + p.name());
      expect_equal(reader.read("optim/exp_avg_sq", p.name()), expected_exp_avg_sq(p.data()),
                   "exp_avg_sq/" + p.name());
    }
  }
  // Every rank reads back, by name, only what it holds.
  Transformer fresh(config.model, 99, DType::kF32, Device::cpu(), shard);
  AdamW fresh_optimizer(config.train);
  load_checkpoint(CheckpointReader::open(path), fresh.params(), &fresh_optimizer);
  EXPECT_EQ(fresh_optimizer.step_count(), 7);
  const Transformer full(config.model, 5);
  for (const autograd::Variable& p : fresh.params().all()) {
    expect_equal(p.data(), full.params().get(p.name()).data(), "rank read " + p.name());
  }
  world()->barrier();
  if (me == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace motley

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  motley::parallel::mpi_initialize(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS();
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  motley::parallel::mpi_finalize();
  return failed;
}
