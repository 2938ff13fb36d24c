// Sharded checkpoint writing under mpirun (label mpi): every rank holds
// one (stage, EP rank) shard of the model, the ranks write one file
// together through parallel HDF5 without gathering, and the file, read
// back by the serial single-process CheckpointReader, holds exactly the
// tensors a gathered full model holds. Replicas that are not a tensor's
// writer carry poisoned values, so a tensor written by the wrong rank, or
// not at all, fails the comparison. Also: halves of the world saving their
// own files over split communicators at the same time, and the
// send-to-root path (a communicator without an MPI handle) writing the
// same file content as parallel HDF5.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <filesystem>

#include "checkpoint/checkpoint.h"
#include "core/ops.h"
#include "layers/expert_sizes.h"
#include "layers/transformer.h"
#include "parallel/placement.h"
#include "tests/checkpoint/hdf5_content.h"

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

// One rank's part of the model of `seed` under the layout a communicator
// of `size` ranks takes (pp 2 from 4 ranks, EP 2 when dp is even).
struct Shard {
  Config config = tiny_config();
  parallel::GroupLayout layout;
  std::vector<int> owner;
  ModelShard shard;
  std::vector<TensorSpec> specs = global_parameter_specs(config.model);
  std::vector<int> writer;

  explicit Shard(int size, int rank) {
    layout.pp = size >= 4 ? 2 : 1;
    layout.dp = size / layout.pp;
    layout.ep = layout.dp % 2 == 0 ? 2 : 1;
    owner = parallel::place_experts(PlacementKind::kPairs, expert_hidden_sizes(config.model.moe),
                                    layout.ep);
    const parallel::RankCoords at = layout.coords(rank);
    const parallel::StageLayers block =
        parallel::stage_layers(config.model.n_layers, layout.pp, at.pp_rank);
    shard.layer_begin = block.begin;
    shard.layer_end = block.end;
    if (layout.ep > 1) {
      for (int o : owner) shard.hold_expert.push_back(o == at.ep_rank);
    }
    for (const TensorSpec& s : specs) {
      writer.push_back(checkpoint_writer(s.name, config.model, layout, owner));
    }
  }
  CheckpointMeta meta() const {
    CheckpointMeta m;
    m.step = 7;
    m.seed = 5;
    m.config_json = config.resolved_json().dump();
    m.dp = layout.dp;
    m.ep = layout.ep;
    m.pp = layout.pp;
    return m;
  }
};

// Every rank of `comm` saves its shard of the model of `seed` to `path`
// (collective over `comm`). Replicas that are not a tensor's writer carry
// poisoned values; moments are derived from the parameter.
void save_model(parallel::Communicator& comm, std::uint64_t seed, const std::string& path,
                const std::string& created_utc = "") {
  const int me = comm.rank();
  const Shard s(comm.size(), me);
  ASSERT_EQ(s.layout.world(), comm.size());
  Transformer mine(s.config.model, seed, DType::kF32, Device::cpu(), s.shard);
  AdamW optimizer(s.config.train);
  optimizer.set_step_count(7);
  for (const autograd::Variable& p : mine.params().all()) {
    AdamWState& state = optimizer.state(p);
    const bool writes =
        s.writer[std::find_if(s.specs.begin(), s.specs.end(),
                              [&](const TensorSpec& t) { return t.name == p.name(); }) -
                 s.specs.begin()] == me;
    Tensor data = p.data();
    if (!writes) data.copy_(ops::scale(data, -7.0 - me));  // poison replicas
    state.exp_avg.copy_(expected_exp_avg(data));
    state.exp_avg_sq.copy_(expected_exp_avg_sq(data));
  }
  CheckpointMeta meta = s.meta();
  meta.created_utc = created_utc;
  save_checkpoint_sharded(path, mine.params(), optimizer, meta, "{\"tok\": 2}", s.specs, s.writer,
                          comm);
  EXPECT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// The file holds exactly the model of `seed`: in full on rank 0 of `comm`
// with the serial reader (h5py's view), and on every rank by name for what
// it holds (load_checkpoint).
void expect_file_holds(parallel::Communicator& comm, std::uint64_t seed, const std::string& path) {
  const Shard s(comm.size(), comm.rank());
  const Transformer full(s.config.model, seed);
  if (comm.rank() == 0) {
    const CheckpointReader reader = CheckpointReader::open(path);
    EXPECT_EQ(reader.meta().step, 7);
    EXPECT_EQ(reader.meta().dp, s.layout.dp);
    EXPECT_EQ(reader.meta().pp, s.layout.pp);
    EXPECT_EQ(reader.optimizer_step(), 7);
    EXPECT_EQ(reader.tokenizer_json().value(), "{\"tok\": 2}");
    EXPECT_EQ(reader.names("model").size(), full.params().all().size());
    for (const autograd::Variable& p : full.params().all()) {
      expect_equal(reader.read("model", p.name()), p.data(), "model/" + p.name());
      expect_equal(reader.read("optim/exp_avg", p.name()), expected_exp_avg(p.data()),
                   "exp_avg/" + p.name());
      expect_equal(reader.read("optim/exp_avg_sq", p.name()), expected_exp_avg_sq(p.data()),
                   "exp_avg_sq/" + p.name());
    }
  }
  Transformer fresh(s.config.model, 99, DType::kF32, Device::cpu(), s.shard);
  AdamW fresh_optimizer(s.config.train);
  load_checkpoint(CheckpointReader::open(path), fresh.params(), &fresh_optimizer);
  EXPECT_EQ(fresh_optimizer.step_count(), 7);
  for (const autograd::Variable& p : fresh.params().all()) {
    expect_equal(p.data(), full.params().get(p.name()).data(), "rank read " + p.name());
  }
}

TEST(ShardedSave, RanksWriteOneFileEqualToTheGatheredModel) {
  const std::string dir = shared_dir("gathered");
  const std::string path = checkpoint_path(dir, 7);
  ASSERT_TRUE(world()->mpi_comm_handle() != nullptr);
  save_model(*world(), 5, path);
  expect_file_holds(*world(), 5, path);
  world()->barrier();
  if (world()->rank() == 0) fs::remove_all(dir);
}

// Two halves of the world, each a communicator of its own (a split, not
// MPI_COMM_WORLD), save different models to different files at the same
// time: 4 ranks give two parallel-HDF5 saves of 2 ranks each, 2 ranks two
// serial ones. Saving over MPI_COMM_WORLD instead would mix the halves'
// files or hang.
TEST(ShardedSave, SubCommunicatorsSaveTheirOwnFilesConcurrently) {
  const int size = world()->size(), me = world()->rank();
  ASSERT_EQ(size % 2, 0) << "run with an even number of ranks";
  const int half = me < size / 2 ? 0 : 1;
  const std::unique_ptr<Communicator> group = world()->split(half, me);
  ASSERT_EQ(group->size(), size / 2);
  ASSERT_TRUE(group->mpi_comm_handle() != nullptr);
  const std::string dir = shared_dir("halves");
  const std::string path = checkpoint_path(dir + "/half" + std::to_string(half), 7);
  const std::uint64_t seed = 11 + half;  // the halves' files must differ
  save_model(*group, seed, path);
  world()->barrier();  // both files are complete
  expect_file_holds(*group, seed, path);
  if (me == 0) {  // and neither is the other's
    const std::string other = checkpoint_path(dir + "/half1", 7);
    const Tensor a = CheckpointReader::open(path).read("model", "lm_head.weight");
    const Tensor b = CheckpointReader::open(other).read("model", "lm_head.weight");
    EXPECT_GT(ops::max_abs_diff(a, b), 0.0);
  }
  world()->barrier();
  if (me == 0) fs::remove_all(dir);
}

// Forwards every call to an MPI communicator but hides its MPI handle, as
// a communicator of threads would have none: save_checkpoint_sharded then
// takes its send-to-root path, here over real processes.
class WithoutMpiHandle final : public Communicator {
 public:
  explicit WithoutMpiHandle(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void allreduce_sum(Tensor& t) override { inner_.allreduce_sum(t); }
  parallel::Request iallreduce_sum(Tensor t) override { return inner_.iallreduce_sum(t); }
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    inner_.reduce_scatter_sum(in, out);
  }
  void allgather(const Tensor& in, Tensor& out) override { inner_.allgather(in, out); }
  void allgatherv(const Tensor& in, Tensor& out, const std::vector<std::int64_t>& counts) override {
    inner_.allgatherv(in, out, counts);
  }
  void alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts, Tensor& out,
                 const std::vector<std::int64_t>& recv_counts) override {
    inner_.alltoallv(in, send_counts, out, recv_counts);
  }
  void alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts, void* out,
                       const std::vector<std::int64_t>& recv_counts) override {
    inner_.alltoallv_bytes(in, send_counts, out, recv_counts);
  }
  void broadcast(Tensor& t, int root) override { inner_.broadcast(t, root); }
  void barrier() override { inner_.barrier(); }
  void send(const Tensor& t, int dest, int tag) override { inner_.send(t, dest, tag); }
  void recv(Tensor& t, int src, int tag) override { inner_.recv(t, src, tag); }
  parallel::Request isend(Tensor t, int dest, int tag) override {
    return inner_.isend(t, dest, tag);
  }
  parallel::Request irecv(Tensor t, int src, int tag) override { return inner_.irecv(t, src, tag); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    return inner_.split(color, key);
  }

 private:
  Communicator& inner_;
};

// The send-to-root file equals the parallel-HDF5 file of the same shards,
// dataset by dataset and attribute by attribute (checksums included).
TEST(ShardedSave, SendToRootWritesTheSameFileAsParallelHdf5) {
  const std::string dir = shared_dir("send_to_root");
  const std::string created = "2024-05-06T07:08:09Z";  // one clock for both files
  const std::string parallel_path = dir + "/parallel.h5", sent_path = dir + "/sent.h5";
  save_model(*world(), 5, parallel_path, created);
  WithoutMpiHandle hidden(*world());
  ASSERT_TRUE(hidden.mpi_comm_handle() == nullptr);
  save_model(hidden, 5, sent_path, created);
  expect_file_holds(hidden, 5, sent_path);
  if (world()->rank() == 0) hdf5_content::expect_same_content(parallel_path, sent_path);
  world()->barrier();
  if (world()->rank() == 0) fs::remove_all(dir);
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
