#include "checkpoint/checkpoint.h"

#include <hdf5.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "core/ops.h"
#include "layers/transformer.h"

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

}  // namespace
}  // namespace motley
