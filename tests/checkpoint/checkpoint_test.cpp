#include "checkpoint/checkpoint.h"

#include <gtest/gtest.h>
#include <hdf5.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "core/ops.h"
#include "layers/transformer.h"
#include "tests/checkpoint/hdf5_content.h"

namespace motley {
namespace {

namespace fs = std::filesystem;

Config tiny_config() {
  return Config::from_json(nlohmann::ordered_json::parse(R"({
    "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 24,
              "moe": {"n_experts": 4, "expert_hidden": 16, "expert_sizes": "modse",
                      "router": "gru", "gru_dim": 8}},
    "train": {"seq_len": 8, "batch_size": 2}})"));
}

std::string temp_dir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/motley_ckpt_" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A model and optimizer with a few steps of state.
struct Trained {
  Config config = tiny_config();
  Transformer model{config.model, 5};
  AdamW optimizer{config.train};
  Trained() {
    for (int step = 0; step < 2; ++step) {
      model.params().zero_grad();
      for (const autograd::Variable& p : model.params().all()) {
        autograd::Variable q = p;
        q.set_grad(ops::scale(p.data(), 0.5));
      }
      optimizer.step(model.params(), 0.01);
    }
  }
  CheckpointMeta meta() const {
    CheckpointMeta m;
    m.step = 2;
    m.tokens_seen = 32;
    m.seed = 5;
    m.config_json = config.resolved_json().dump();
    return m;
  }
};

TEST(Checkpoint, SaveLoadRoundTripIsExact) {
  const std::string dir = temp_dir("roundtrip");
  Trained t;
  const std::string path = checkpoint_path(dir, 2);
  EXPECT_EQ(fs::path(path).filename(), "step_00000002.h5");
  save_checkpoint(path, t.model.params(), &t.optimizer, t.meta(), "{\"tok\": 1}");
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  const CheckpointReader reader = CheckpointReader::open(path);
  EXPECT_EQ(reader.meta().step, 2);
  EXPECT_EQ(reader.meta().tokens_seen, 32);
  EXPECT_EQ(reader.meta().dp, 1);
  EXPECT_EQ(reader.optimizer_step(), 2);
  EXPECT_EQ(reader.tokenizer_json().value(), "{\"tok\": 1}");
  EXPECT_FALSE(reader.meta().created_utc.empty());
  EXPECT_EQ(reader.shape("model", "layers.0.moe.experts.0.w1"),
            (Shape{t.model.expert_sizes()[0], 16}));
  EXPECT_EQ(reader.names("model").size(), t.model.params().all().size());

  Transformer fresh(t.config.model, 99);  // different init
  AdamW opt(t.config.train);
  load_checkpoint(reader, fresh.params(), &opt);
  EXPECT_EQ(opt.step_count(), 2);
  for (const autograd::Variable& p : t.model.params().all()) {
    EXPECT_EQ(ops::max_abs_diff(p.data(), fresh.params().get(p.name()).data()), 0.0) << p.name();
    EXPECT_EQ(ops::max_abs_diff(t.optimizer.state(p).exp_avg_sq,
                                opt.state(fresh.params().get(p.name())).exp_avg_sq),
              0.0);
  }
  EXPECT_TRUE(check_compatible(reader, t.config).empty());
}

template <typename F>
void expect_checkpoint_error(F f, const std::string& needle) {
  try {
    f();
    FAIL() << "expected a checkpoint error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kCheckpoint) << e.what();
    EXPECT_EQ(exit_code_for(e.kind()), 4);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, RefusesWhatIsNotAValidCheckpoint) {
  const std::string dir = temp_dir("refuse");
  Trained t;
  const std::string good = dir + "/good.h5";
  save_checkpoint(good, t.model.params(), &t.optimizer, t.meta(), "");

  expect_checkpoint_error([&] { CheckpointReader::open(dir + "/missing.h5"); }, "does not exist");
  {
    std::ofstream out(dir + "/text.h5");
    out << "not hdf5 at all";
  }
  expect_checkpoint_error([&] { CheckpointReader::open(dir + "/text.h5"); }, "not an HDF5 file");
  // Truncated: the first half of a real checkpoint.
  const auto size = fs::file_size(good);
  fs::copy_file(good, dir + "/truncated.h5");
  fs::resize_file(dir + "/truncated.h5", size / 2);
  expect_checkpoint_error([&] { CheckpointReader::open(dir + "/truncated.h5"); }, "truncated");
  // An HDF5 file that is not a motley checkpoint.
  {
    hid_t f = H5Fcreate((dir + "/other.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
  }
  expect_checkpoint_error([&] { CheckpointReader::open(dir + "/other.h5"); },
                          "not a motley checkpoint");
  // A newer format version.
  CheckpointMeta future = t.meta();
  future.format_version = 99;
  save_checkpoint(dir + "/future.h5", t.model.params(), nullptr, future, "");
  expect_checkpoint_error([&] { CheckpointReader::open(dir + "/future.h5"); },
                          "unsupported format_version 99");
}

// Every root attribute is range-checked on open, and the optimizer's
// update count against the step: a negative step used to reach the
// sampler's and AdamW's internal checks (exit 1).
TEST(Checkpoint, OutOfRangeAttributesAreRefusedOnOpen) {
  const std::string dir = temp_dir("attrs");
  Trained t;
  const std::vector<std::pair<std::function<void(CheckpointMeta&)>, std::string>> cases = {
      {[](CheckpointMeta& m) { m.step = -3; }, "'step' = -3"},
      {[](CheckpointMeta& m) { m.tokens_seen = -1; }, "'tokens_seen' = -1"},
      {[](CheckpointMeta& m) { m.seed = -7; }, "'seed' = -7"},
      {[](CheckpointMeta& m) { m.dp = 0; }, "saved_layout (dp)"},
  };
  int i = 0;
  for (const auto& [mutate, needle] : cases) {
    CheckpointMeta meta = t.meta();
    mutate(meta);
    const std::string path = dir + "/bad" + std::to_string(i++) + ".h5";
    save_checkpoint(path, t.model.params(), &t.optimizer, meta, "");
    expect_checkpoint_error([&] { CheckpointReader::open(path); }, needle);
  }
  // Two AdamW updates stored in a checkpoint of step 1.
  CheckpointMeta early = t.meta();
  early.step = 1;
  save_checkpoint(dir + "/early.h5", t.model.params(), &t.optimizer, early, "");
  const CheckpointReader reader = CheckpointReader::open(dir + "/early.h5");
  expect_checkpoint_error([&] { reader.optimizer_step(); }, "/optim step = 2");
  EXPECT_TRUE(reader.has_optimizer_state());
}

// A bad --set on a stored config is the command line's fault (exit 2,
// naming --set and the key), not the checkpoint's (it said "checkpoint
// error: stored config is invalid", exit 4).
TEST(Checkpoint, BadOverridesOfTheStoredConfigAreUsageErrors) {
  const std::string dir = temp_dir("overrides");
  Trained t;
  save_checkpoint(dir + "/c.h5", t.model.params(), &t.optimizer, t.meta(), "");
  const CheckpointReader reader = CheckpointReader::open(dir + "/c.h5");
  for (const char* set : {"train.seq_len=-5", "train.no_such_key=1", "train.lr"}) {
    try {
      reader.config({set});
      ADD_FAILURE() << set << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUsage) << set << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find("--set"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(reader.config({"train.seq_len=4"}).train.seq_len, 4);
}

TEST(Checkpoint, ChecksumMismatchNamesTheDataset) {
  const std::string dir = temp_dir("checksum");
  Trained t;
  const std::string path = dir + "/ckpt.h5";
  save_checkpoint(path, t.model.params(), &t.optimizer, t.meta(), "");
  // Find the raw bytes of lm_head.weight in the file and flip one.
  const CheckpointReader reader = CheckpointReader::open(path);
  const Tensor head = reader.read("model", "lm_head.weight");
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string needle(static_cast<const char*>(head.raw_data()), 64);
  const std::size_t at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos);
  bytes[at + 10] ^= 0x5a;
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const CheckpointReader damaged = CheckpointReader::open(path);
  expect_checkpoint_error([&] { damaged.read("model", "lm_head.weight"); },
                          "/model/lm_head.weight");
  Transformer fresh(t.config.model, 1);
  expect_checkpoint_error([&] { load_checkpoint(damaged, fresh.params(), nullptr); },
                          "lm_head.weight");
}

// Flips one byte of the stored data of a contiguous dataset.
void flip_contiguous_byte(const std::string& path, const std::string& dataset) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t d = H5Dopen2(f, dataset.c_str(), H5P_DEFAULT);
  ASSERT_GE(d, 0);
  const haddr_t offset = H5Dget_offset(d);
  H5Dclose(d);
  H5Fclose(f);
  ASSERT_NE(offset, HADDR_UNDEF) << dataset << " is not contiguous";
  std::fstream io(path, std::ios::binary | std::ios::in | std::ios::out);
  io.seekg(static_cast<std::streamoff>(offset + 10));
  char c = 0;
  io.read(&c, 1);
  c ^= 0x5a;
  io.seekp(static_cast<std::streamoff>(offset + 10));
  io.write(&c, 1);
}

TEST(Checkpoint, GlobalSpecsMatchTheModel) {
  for (const std::vector<std::string>& sets :
       {std::vector<std::string>{}, {"model.moe.router=linear", "model.moe.every=2"},
        {"model.moe.router=noisy", "model.n_layers=3", "model.moe.first_dense=1"},
        {"model.moe.n_experts=0"}}) {
    const Config c = Config::from_json(tiny_config().resolved_json(), sets);
    const Transformer full(c.model, 1);
    const std::vector<TensorSpec> specs = global_parameter_specs(c.model);
    ASSERT_EQ(specs.size(), full.params().all().size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
      EXPECT_EQ(specs[i].name, full.params().all()[i].name());
      EXPECT_EQ(specs[i].shape, full.params().all()[i].shape()) << specs[i].name;
    }
  }
}

TEST(Checkpoint, WritersHoldTheirTensors) {
  // Under every layout, the writer of each tensor holds it (simulated
  // ranks), and replicas defer to dp_rank 0 / the lowest owner.
  const Config c = Config::from_json(tiny_config().resolved_json(), {"model.n_layers=4"});
  for (const parallel::GroupLayout layout :
       {parallel::GroupLayout{1, 1, 1}, parallel::GroupLayout{2, 2, 1},
        parallel::GroupLayout{4, 2, 2}, parallel::GroupLayout{2, 1, 4}}) {
    const std::vector<int> owner = layout.ep > 1 ? std::vector<int>{0, 1, 0, 1}
                                                 : std::vector<int>{0, 0, 0, 0};
    for (const TensorSpec& spec : global_parameter_specs(c.model)) {
      const int w = checkpoint_writer(spec.name, c.model, layout, owner);
      const parallel::RankCoords at = layout.coords(w);
      EXPECT_LT(at.dp_rank, layout.ep) << spec.name;  // EP block 0
      ModelShard shard;
      const parallel::StageLayers block = parallel::stage_layers(4, layout.pp, at.pp_rank);
      shard.layer_begin = block.begin;
      shard.layer_end = block.end;
      if (layout.ep > 1) {
        for (int o : owner) shard.hold_expert.push_back(o == at.ep_rank);
      }
      const Transformer mine(c.model, 1, DType::kF32, Device::cpu(), shard);
      EXPECT_TRUE(mine.params().contains(spec.name)) << spec.name << " on rank " << w;
    }
  }
}

TEST(Checkpoint, ShardedSaveOfOneRankRoundTripsWithAttributeChecksums) {
  const std::string dir = temp_dir("sharded");
  Trained t;
  const std::string path = checkpoint_path(dir, 2);
  const std::vector<TensorSpec> specs = global_parameter_specs(t.config.model);
  parallel::LocalCommunicator world;
  save_checkpoint_sharded(path, t.model.params(), t.optimizer, t.meta(), "{\"tok\": 1}", specs,
                          std::vector<int>(specs.size(), 0), world);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const CheckpointReader reader = CheckpointReader::open(path);
  EXPECT_EQ(reader.meta().step, 2);
  EXPECT_EQ(reader.optimizer_step(), 2);
  EXPECT_EQ(reader.tokenizer_json().value(), "{\"tok\": 1}");
  EXPECT_EQ(reader.names("model").size(), specs.size());
  Transformer fresh(t.config.model, 99);
  AdamW opt(t.config.train);
  load_checkpoint(reader, fresh.params(), &opt);
  EXPECT_EQ(opt.step_count(), 2);
  for (const autograd::Variable& p : t.model.params().all()) {
    EXPECT_EQ(ops::max_abs_diff(p.data(), fresh.params().get(p.name()).data()), 0.0) << p.name();
    EXPECT_EQ(ops::max_abs_diff(t.optimizer.state(p).exp_avg,
                                opt.state(fresh.params().get(p.name())).exp_avg),
              0.0);
  }
  // The attribute holds FNV-1a 64 of the float32 bytes.
  {
    hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t a = H5Aopen_by_name(f, "model/final_norm.weight", "checksum", H5P_DEFAULT, H5P_DEFAULT);
    std::uint64_t stored = 0;
    ASSERT_GE(H5Aread(a, H5T_NATIVE_UINT64, &stored), 0);
    H5Aclose(a);
    H5Fclose(f);
    const Tensor w = t.model.params().get("final_norm.weight").data();
    EXPECT_EQ(stored, fnv1a64(w.raw_data(), static_cast<std::size_t>(w.numel()) * 4));
  }
  EXPECT_EQ(fnv1a64("a", 1), 0xaf63dc4c8601ec8cull);  // the published FNV-1a 64 vector

  // A flipped byte is caught and the dataset named.
  flip_contiguous_byte(path, "optim/exp_avg_sq/lm_head.weight");
  const CheckpointReader damaged = CheckpointReader::open(path);
  EXPECT_NO_THROW(damaged.read("model", "lm_head.weight"));
  expect_checkpoint_error([&] { damaged.read("optim/exp_avg_sq", "lm_head.weight"); },
                          "checksum mismatch in dataset /optim/exp_avg_sq/lm_head.weight");
  Transformer again(t.config.model, 1);
  AdamW opt2(t.config.train);
  expect_checkpoint_error([&] { load_checkpoint(damaged, again.params(), &opt2); },
                          "lm_head.weight");
}

TEST(Checkpoint, ArchitectureMismatchNamesTheKeys) {
  const std::string dir = temp_dir("arch");
  Trained t;
  const std::string path = dir + "/ckpt.h5";
  save_checkpoint(path, t.model.params(), &t.optimizer, t.meta(), "");
  const CheckpointReader reader = CheckpointReader::open(path);
  const Config other = Config::from_json(t.config.resolved_json(),
                                         {"model.d_model=32", "model.moe.top_k=1", "train.lr=0.5"});
  expect_checkpoint_error([&] { check_compatible(reader, other); },
                          "model.d_model, model.moe.top_k");
  const Config lr_only = Config::from_json(t.config.resolved_json(), {"train.lr=0.5"});
  EXPECT_EQ(check_compatible(reader, lr_only), (std::vector<std::string>{"train.lr"}));
  // A model of another shape cannot load it, and the parameter is named.
  Transformer wide(other.model, 1);
  expect_checkpoint_error([&] { load_checkpoint(reader, wide.params(), nullptr); }, "shape");
}

TEST(Checkpoint, LatestAndPruning) {
  const std::string dir = temp_dir("latest");
  EXPECT_FALSE(latest_checkpoint(dir).has_value());
  Trained t;
  for (int step : {1, 2, 3, 4}) {
    const std::string path = checkpoint_path(dir, step);
    save_checkpoint(path, t.model.params(), nullptr, t.meta(), "");
    write_latest(dir, fs::path(path).filename().string());
    prune_checkpoints(dir, 2);
  }
  EXPECT_EQ(latest_checkpoint(dir).value(), checkpoint_path(dir, 4));
  EXPECT_FALSE(fs::exists(checkpoint_path(dir, 1)));
  EXPECT_FALSE(fs::exists(checkpoint_path(dir, 2)));
  EXPECT_TRUE(fs::exists(checkpoint_path(dir, 3)));
  // A leftover temporary file from a killed save does not disturb LATEST.
  {
    std::ofstream out(checkpoint_path(dir, 5) + ".tmp");
    out << "partial";
  }
  EXPECT_EQ(latest_checkpoint(dir).value(), checkpoint_path(dir, 4));
  // LATEST naming a missing file is a clear error.
  fs::remove(checkpoint_path(dir, 4));
  expect_checkpoint_error([&] { latest_checkpoint(dir); }, "does not exist");
}

// ---- sharded save over a communicator without MPI ------------------------------------

// A test-only communicator whose ranks are threads of this process: just
// what save_checkpoint_sharded's send-to-root path may use (send, recv,
// broadcast, barrier), so that a call to anything else fails the test
// (Note [Sharded save paths]). send copies into a mailbox and returns;
// waits give up after a deadline instead of hanging the test.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size) {}
  int size() const { return size_; }

  void post(int src, int dst, int tag, const void* data, std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto* p = static_cast<const char*>(data);
    mailbox_[{src, dst, tag}].emplace_back(p, p + bytes);
    cv_.notify_all();
  }
  std::vector<char> take(int src, int dst, int tag) {
    std::unique_lock<std::mutex> lock(mu_);
    auto& queue = mailbox_[{src, dst, tag}];
    MOTLEY_CHECK_KIND(kRuntime, cv_.wait_for(lock, kDeadline, [&] { return !queue.empty(); }),
                      "ThreadGroup: rank ", dst, " waited too long for rank ", src, " tag ", tag);
    std::vector<char> out = std::move(queue.front());
    queue.pop_front();
    return out;
  }
  void barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    const std::int64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    MOTLEY_CHECK_KIND(kRuntime,
                      cv_.wait_for(lock, kDeadline, [&] { return generation_ != generation; }),
                      "ThreadGroup: barrier waited too long");
  }

 private:
  static constexpr std::chrono::seconds kDeadline{60};
  const int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::tuple<int, int, int>, std::deque<std::vector<char>>> mailbox_;
  int arrived_ = 0;
  std::int64_t generation_ = 0;
};

class ThreadCommunicator final : public parallel::Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }

  void send(const Tensor& t, int dest, int tag) override {
    check(t, "send");
    group_.post(rank_, dest, tag, t.raw_data(), t.nbytes());
  }
  void recv(Tensor& t, int src, int tag) override {
    check(t, "recv");
    const std::vector<char> bytes = group_.take(src, rank_, tag);
    MOTLEY_CHECK_KIND(kRuntime, bytes.size() == t.nbytes(), "recv from rank ", src, ": got ",
                      bytes.size(), " bytes, expected ", t.nbytes());
    std::memcpy(t.raw_data(), bytes.data(), bytes.size());
  }
  void broadcast(Tensor& t, int root) override {
    if (rank_ == root) {
      for (int r = 0; r < size(); ++r) {
        if (r != root) send(t, r, kBroadcastTag);
      }
    } else {
      recv(t, root, kBroadcastTag);
    }
  }
  void barrier() override { group_.barrier(); }

  // Not needed by the send-to-root path: calling one fails the test.
  void allreduce_sum(Tensor&) override { unsupported("allreduce_sum"); }
  parallel::Request iallreduce_sum(Tensor) override { unsupported("iallreduce_sum"); }
  void reduce_scatter_sum(const Tensor&, Tensor&) override { unsupported("reduce_scatter_sum"); }
  void allgather(const Tensor&, Tensor&) override { unsupported("allgather"); }
  void allgatherv(const Tensor&, Tensor&, const std::vector<std::int64_t>&) override {
    unsupported("allgatherv");
  }
  void alltoallv(const Tensor&, const std::vector<std::int64_t>&, Tensor&,
                 const std::vector<std::int64_t>&) override {
    unsupported("alltoallv");
  }
  void alltoallv_bytes(const void*, const std::vector<std::int64_t>&, void*,
                       const std::vector<std::int64_t>&) override {
    unsupported("alltoallv_bytes");
  }
  parallel::Request isend(Tensor, int, int) override { unsupported("isend"); }
  parallel::Request irecv(Tensor, int, int) override { unsupported("irecv"); }
  std::unique_ptr<parallel::Communicator> split(int, int) override { unsupported("split"); }

 private:
  static constexpr int kBroadcastTag = -1;  // never used by callers
  static void check(const Tensor& t, const char* what) {
    MOTLEY_CHECK(t.device().is_cpu() && t.is_contiguous(), what, ": ", t.str());
  }
  [[noreturn]] static void unsupported(const char* what) {
    MOTLEY_FAIL(kInternal, "ThreadCommunicator::", what, " is not supported");
  }
  ThreadGroup& group_;
  const int rank_;
};

// Runs body(rank) on `size` threads, one ThreadCommunicator each; rethrows
// the first exception.
template <typename F>
void run_ranks(int size, F body) {
  ThreadGroup group(size);
  std::vector<std::exception_ptr> errors(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        ThreadCommunicator comm(group, r);
        body(comm);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

TEST(Checkpoint, ShardedSaveWithoutMpiSendsToRankZeroAndWritesTheSameFile) {
  const std::string dir = temp_dir("sharded_threads");
  Trained t;
  CheckpointMeta meta = t.meta();
  meta.created_utc = "2024-05-06T07:08:09Z";  // one clock for both files
  meta.dp = 3;
  const std::vector<TensorSpec> specs = global_parameter_specs(t.config.model);
  // Reference: the serial path (a world of one).
  const std::string reference = dir + "/reference.h5";
  {
    parallel::LocalCommunicator one;
    save_checkpoint_sharded(reference, t.model.params(), t.optimizer, meta, "{\"tok\": 3}", specs,
                            std::vector<int>(specs.size(), 0), one);
  }
  // Three ranks as threads: ranks 0 and 1 alternate as writers, rank 2
  // writes nothing. Each rank holds the same model and optimizer (same
  // seed, same steps) with everything it does not write poisoned, so a
  // tensor taken from the wrong rank fails the comparison.
  constexpr int kRanks = 3;
  std::vector<int> writer;
  for (std::size_t i = 0; i < specs.size(); ++i) writer.push_back(static_cast<int>(i % 2));
  std::vector<std::unique_ptr<Trained>> ranks;
  for (int r = 0; r < kRanks; ++r) {
    ranks.push_back(std::make_unique<Trained>());
    for (std::size_t i = 0; i < specs.size(); ++i) {
      if (writer[i] == r) continue;
      const autograd::Variable& p = ranks[r]->model.params().get(specs[i].name);
      Tensor data = p.data();
      data.copy_(ops::scale(data, -7.0 - r));
      AdamWState& state = ranks[r]->optimizer.state(p);
      state.exp_avg.copy_(ops::scale(state.exp_avg, 3.0));
      state.exp_avg_sq.copy_(ops::scale(state.exp_avg_sq, 5.0));
    }
  }
  const std::string threaded = dir + "/threads.h5";
  run_ranks(kRanks, [&](parallel::Communicator& comm) {
    EXPECT_TRUE(comm.mpi_comm_handle() == nullptr);  // the send-to-root path
    const Trained& mine = *ranks[comm.rank()];
    save_checkpoint_sharded(threaded, mine.model.params(), mine.optimizer, meta, "{\"tok\": 3}",
                            specs, writer, comm);
    // Complete under its name on every rank when the call returns.
    EXPECT_TRUE(fs::exists(threaded));
    EXPECT_FALSE(fs::exists(threaded + ".tmp"));
  });

  // The same content, dataset by dataset and attribute by attribute
  // (checksums included), as the serial path.
  hdf5_content::expect_same_content(reference, threaded);
  // ... which is not vacuous: save_checkpoint's chunked, Fletcher32 file
  // differs in layout and attributes.
  const std::string chunked = dir + "/chunked.h5";
  save_checkpoint(chunked, t.model.params(), &t.optimizer, meta, "{\"tok\": 3}");
  EXPECT_NE(hdf5_content::content(chunked), hdf5_content::content(reference));

  const CheckpointReader reader = CheckpointReader::open(threaded);
  EXPECT_EQ(reader.meta().step, 2);
  EXPECT_EQ(reader.meta().dp, 3);
  EXPECT_EQ(reader.meta().created_utc, meta.created_utc);
  EXPECT_EQ(reader.optimizer_step(), 2);
  EXPECT_EQ(reader.tokenizer_json().value(), "{\"tok\": 3}");
  EXPECT_EQ(reader.names("model").size(), specs.size());
  Transformer fresh(t.config.model, 99);
  AdamW opt(t.config.train);
  load_checkpoint(reader, fresh.params(), &opt);
  EXPECT_EQ(opt.step_count(), 2);
  for (const autograd::Variable& p : t.model.params().all()) {
    const autograd::Variable& q = fresh.params().get(p.name());
    EXPECT_EQ(ops::max_abs_diff(p.data(), q.data()), 0.0) << p.name();
    EXPECT_EQ(ops::max_abs_diff(t.optimizer.state(p).exp_avg, opt.state(q).exp_avg), 0.0)
        << p.name();
    EXPECT_EQ(ops::max_abs_diff(t.optimizer.state(p).exp_avg_sq, opt.state(q).exp_avg_sq), 0.0)
        << p.name();
  }

  // Without a created_utc, rank 0's clock reaches every rank (broadcast)
  // and the file still loads.
  CheckpointMeta undated = meta;
  undated.created_utc.clear();
  const std::string second = dir + "/undated.h5";
  run_ranks(kRanks, [&](parallel::Communicator& comm) {
    const Trained& mine = *ranks[comm.rank()];
    save_checkpoint_sharded(second, mine.model.params(), mine.optimizer, undated, "", specs, writer,
                            comm);
  });
  const CheckpointReader again = CheckpointReader::open(second);
  EXPECT_FALSE(again.meta().created_utc.empty());
  EXPECT_FALSE(again.tokenizer_json().has_value());
  Transformer fresh2(t.config.model, 98);
  load_checkpoint(again, fresh2.params(), nullptr);
  EXPECT_EQ(ops::max_abs_diff(t.model.params().get("lm_head.weight").data(),
                              fresh2.params().get("lm_head.weight").data()),
            0.0);
}

TEST(Checkpoint, ShardedSaveRejectsAWriterOutsideTheCommunicator) {
  const std::string dir = temp_dir("sharded_bad_writer");
  Trained t;
  const std::vector<TensorSpec> specs = global_parameter_specs(t.config.model);
  std::vector<int> writer(specs.size(), 0);
  writer.back() = 1;  // a world of one has no rank 1
  parallel::LocalCommunicator one;
  try {
    save_checkpoint_sharded(dir + "/x.h5", t.model.params(), t.optimizer, t.meta(), "", specs,
                            writer, one);
    FAIL() << "expected kInternal";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInternal) << e.what();
    EXPECT_NE(std::string(e.what()).find(specs.back().name), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir + "/x.h5"));
  EXPECT_FALSE(fs::exists(dir + "/x.h5.tmp"));
}

}  // namespace
}  // namespace motley
