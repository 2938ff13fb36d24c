// motley route: per-token model outputs for routing analyses
// (bench/analyze.py). Loads a checkpoint, runs the model in eval mode over
// the same windows as `motley eval` (SPEC section 4) and writes one HDF5
// file:
//
//   /ce                      (N) f32   cross-entropy of each predicted token (nats)
//   /targets                 (N) i32   the predicted token ids
//   /bytes                   (N) i32   bytes each target decodes to (0 without tokenizer)
//   /layers/<l>/top1         (N) i32   the most probable expert of MoE layer l
//   /layers/<l>/selected     (N, K) i32 the selected experts per slot, -1 padded
//   /layers/<l>/probs        (N, E) f32 router probabilities (unless --no-probs)
//   /layers/<l>/entropy      (N) f32   router entropy -sum p log p (nats)
//   attributes of /: step, seq_len, windows, n_layers, n_experts, d_model,
//   moe_layers (list), expert_sizes (E)
//
// Token n is position n % seq_len of window n / seq_len. The router
// probabilities come from the MoE observer (Note [MoE observer] in
// layers/moe.h); nothing in the model changes.
#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>

#include "apps/cli.h"
#include "apps/progress.h"
#include "apps/subcommands.h"
#include "apps/train_support.h"
#include "autograd/variable.h"
#include "checkpoint/checkpoint.h"
#include "core/ops.h"
#include "data/sampler.h"
#include "data/token_file.h"
#include "data/tokenizer.h"
#include "layers/expert_sizes.h"
#include "layers/transformer.h"

namespace motley::apps {
namespace {

namespace fs = std::filesystem;

void h5_check(herr_t status, const std::string& what) {
  MOTLEY_CHECK_KIND(kData, status >= 0, "motley route: HDF5 ", what, " failed");
}

hid_t h5_id(hid_t id, const std::string& what) {
  MOTLEY_CHECK_KIND(kData, id >= 0, "motley route: HDF5 ", what, " failed");
  return id;
}

// Writes a 1-D or 2-D dataset (deflate-compressed, chunked by rows).
template <typename T>
void write_dataset(hid_t parent, const std::string& name, const std::vector<T>& data,
                   std::vector<hsize_t> dims, hid_t mem_type, hid_t file_type) {
  hsize_t total = 1;
  for (hsize_t d : dims) total *= d;
  MOTLEY_CHECK(total == data.size(), "dataset ", name, " shape does not match its data");
  const hid_t space = h5_id(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                            "H5Screate_simple " + name);
  const hid_t plist = h5_id(H5Pcreate(H5P_DATASET_CREATE), "H5Pcreate");
  if (total > 0) {
    std::vector<hsize_t> chunk = dims;
    chunk[0] = std::min<hsize_t>(dims[0], 16384);
    for (hsize_t& c : chunk) c = std::max<hsize_t>(c, 1);
    h5_check(H5Pset_chunk(plist, static_cast<int>(chunk.size()), chunk.data()), "H5Pset_chunk");
    if (H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) h5_check(H5Pset_deflate(plist, 1), "H5Pset_deflate");
  }
  const hid_t set = h5_id(
      H5Dcreate2(parent, name.c_str(), file_type, space, H5P_DEFAULT, plist, H5P_DEFAULT),
      "H5Dcreate2 " + name);
  if (total > 0) {
    h5_check(H5Dwrite(set, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()),
             "H5Dwrite " + name);
  }
  H5Dclose(set);
  H5Pclose(plist);
  H5Sclose(space);
}

void write_attr(hid_t obj, const std::string& name, const std::vector<std::int64_t>& values,
                bool scalar = false) {
  const hsize_t n = values.size();
  const hid_t space = h5_id(scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr),
                            "H5Screate " + name);
  const hid_t attr = h5_id(
      H5Acreate2(obj, name.c_str(), H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT),
      "H5Acreate2 " + name);
  h5_check(H5Awrite(attr, H5T_NATIVE_INT64, values.data()), "H5Awrite " + name);
  H5Aclose(attr);
  H5Sclose(space);
}

struct LayerData {
  std::vector<std::int32_t> top1;
  std::vector<std::vector<std::int32_t>> selected;  // per token
  std::vector<float> probs;
  std::vector<float> entropy;
  std::int64_t n_experts = 0;
};

}  // namespace

int route_main(int argc, char** argv) {
  CommandLine cli("route",
                  "Per-token outputs of a checkpoint for routing analyses: runs the model in "
                  "eval mode over the eval windows of a token file and writes an HDF5 file with "
                  "each token's cross-entropy and, per MoE layer, its top-1 expert, selected "
                  "experts, router probabilities and router entropy.");
  cli.flag("checkpoint", "PATH", "a checkpoint file, or a run directory (its LATEST)");
  cli.flag("out", "FILE", "the HDF5 file to write");
  cli.flag("data", "FILE", "token file (default: the config's data.valid)");
  cli.flag("windows", "N", "evaluate at most the first N windows (0: all)", std::string("0"));
  cli.switch_flag("no-probs", "do not store the (N, E) router probabilities");
  cli.repeated("set", "KEY=VALUE", "override a config key (e.g. train.seq_len)");
  if (!cli.parse(argc, argv)) return 0;

  std::string path = cli.get("checkpoint");
  if (fs::is_directory(path)) {
    auto latest = latest_checkpoint(path);
    MOTLEY_CHECK_KIND(kCheckpoint, latest.has_value(), path,
                      " is a directory without checkpoints/LATEST");
    path = *latest;
  }
  const CheckpointReader reader = CheckpointReader::open(path);
  const Config config = reader.config(cli.all("set"));
  Transformer model(config.model, static_cast<std::uint64_t>(config.train.seed));
  load_checkpoint(reader, model.params(), nullptr);
  std::optional<Tokenizer> tokenizer;
  if (auto json = reader.tokenizer_json()) tokenizer = Tokenizer::from_json(*json);

  const std::string data_path = cli.get_or("data", config.data.valid);
  MOTLEY_CHECK_KIND(kUsage, !data_path.empty(), "no data: pass --data FILE");
  const TokenFile file = TokenFile::open(data_path);
  MOTLEY_CHECK_KIND(kUsage, file.vocab_size() <= config.model.vocab_size, data_path,
                    " has vocab_size ", file.vocab_size(), ", larger than the model's ",
                    config.model.vocab_size);
  if (!tokenizer) tokenizer = find_tokenizer(config.data.tokenizer, data_path);
  if (tokenizer && tokenizer->vocab_size() != file.vocab_size()) tokenizer.reset();

  const std::int64_t seq_len = config.train.seq_len;
  std::int64_t windows = eval_window_count(file.size(), seq_len);
  MOTLEY_CHECK_KIND(kData, windows > 0, data_path, " is too short for one window");
  const std::int64_t limit = cli.get_int("windows");
  MOTLEY_CHECK_KIND(kUsage, limit >= 0, "--windows must be >= 0");
  if (limit > 0) windows = std::min(windows, limit);
  const std::int64_t batch =
      std::max<std::int64_t>(1, config.train.batch_size / config.train.micro_batches);
  const bool store_probs = !cli.get_switch("no-probs");
  const std::int64_t vocab = config.model.vocab_size;

  autograd::NoGradGuard no_grad;
  MoEObserver observer;
  ForwardContext ctx;
  ctx.training = false;
  ctx.moe_observer = &observer;

  std::vector<float> ce;
  std::vector<std::int32_t> targets_out, bytes_out;
  std::map<std::int64_t, LayerData> layers;
  ProgressBar bar("route", windows);
  for (std::int64_t first = 0; first < windows; first += batch) {
    const std::int64_t count = std::min(batch, windows - first);
    const Batch b = eval_batch(file, first, count, seq_len);
    observer.records.clear();
    const Tensor logits =
        model.logits(b.tokens, ctx).data().reshape({count * seq_len, vocab});
    const Tensor targets = b.targets.reshape({count * seq_len});
    const auto [loss_rows, lse] = ops::cross_entropy(logits, targets);
    for (double v : loss_rows.to_vector<double>()) ce.push_back(static_cast<float>(v));
    for (std::int64_t id : targets.to_vector<std::int64_t>()) {
      targets_out.push_back(static_cast<std::int32_t>(id));
      bytes_out.push_back(tokenizer ? static_cast<std::int32_t>(
                                          tokenizer->token_bytes(static_cast<std::int32_t>(id)))
                                    : 0);
    }
    for (const MoELayerRecord& r : observer.records) {
      LayerData& ld = layers[r.layer];
      ld.n_experts = r.n_experts;
      const Selection& sel = r.selection;
      for (std::int64_t n = 0; n < r.n_tokens; ++n) {
        const double* p = r.probs.data() + n * r.n_experts;
        std::int64_t best = 0;
        double h = 0;
        for (std::int64_t e = 0; e < r.n_experts; ++e) {
          if (p[e] > p[best]) best = e;
          if (p[e] > 0) h -= p[e] * std::log(p[e]);
          if (store_probs) ld.probs.push_back(static_cast<float>(p[e]));
        }
        ld.top1.push_back(static_cast<std::int32_t>(best));
        ld.entropy.push_back(static_cast<float>(h));
        std::vector<std::int32_t> slots;
        for (std::int64_t q = sel.offsets[n]; q < sel.offsets[n + 1]; ++q) {
          slots.push_back(static_cast<std::int32_t>(sel.experts[q]));
        }
        ld.selected.push_back(std::move(slots));
      }
    }
    bar.update(first + count);
  }
  bar.finish();

  // ---- write --------------------------------------------------------------------
  const std::string out = cli.get("out");
  if (fs::path(out).has_parent_path()) fs::create_directories(fs::path(out).parent_path());
  const std::string tmp = out + ".tmp";
  const hid_t f = h5_id(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
                        "H5Fcreate " + tmp);
  const hsize_t n = ce.size();
  write_dataset(f, "ce", ce, {n}, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE);
  write_dataset(f, "targets", targets_out, {n}, H5T_NATIVE_INT32, H5T_STD_I32LE);
  write_dataset(f, "bytes", bytes_out, {n}, H5T_NATIVE_INT32, H5T_STD_I32LE);
  std::vector<std::int64_t> moe_layers;
  const hid_t group = h5_id(H5Gcreate2(f, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                            "H5Gcreate2 layers");
  for (const auto& [l, ld] : layers) {
    moe_layers.push_back(l);
    MOTLEY_CHECK(ld.top1.size() == n, "layer ", l, " saw ", ld.top1.size(), " tokens, not ", n);
    const std::string name = std::to_string(l);
    const hid_t g = h5_id(H5Gcreate2(group, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                          "H5Gcreate2 " + name);
    std::size_t k = 1;
    for (const auto& s : ld.selected) k = std::max(k, s.size());
    std::vector<std::int32_t> selected(n * k, -1);
    for (std::size_t i = 0; i < n; ++i) {
      std::copy(ld.selected[i].begin(), ld.selected[i].end(), selected.begin() + i * k);
    }
    write_dataset(g, "top1", ld.top1, {n}, H5T_NATIVE_INT32, H5T_STD_I32LE);
    write_dataset(g, "selected", selected, {n, k}, H5T_NATIVE_INT32, H5T_STD_I32LE);
    write_dataset(g, "entropy", ld.entropy, {n}, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE);
    if (store_probs) {
      write_dataset(g, "probs", ld.probs,
                    {n, static_cast<hsize_t>(ld.n_experts)}, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE);
    }
    H5Gclose(g);
  }
  H5Gclose(group);
  const ModelConfig& mc = config.model;
  write_attr(f, "step", {reader.meta().step}, true);
  write_attr(f, "seq_len", {seq_len}, true);
  write_attr(f, "windows", {windows}, true);
  write_attr(f, "n_layers", {mc.n_layers}, true);
  write_attr(f, "n_experts", {mc.moe.n_experts}, true);
  write_attr(f, "d_model", {mc.d_model}, true);
  if (!moe_layers.empty()) {
    write_attr(f, "moe_layers", moe_layers);
    write_attr(f, "expert_sizes", expert_hidden_sizes(mc.moe));
  }
  h5_check(H5Fclose(f), "H5Fclose");
  fs::rename(tmp, out);
  double mean = 0;
  for (float v : ce) mean += v;
  std::printf("checkpoint step %lld: %lld tokens, %zu MoE layers, mean ce %.6f -> %s\n",
              static_cast<long long>(reader.meta().step), static_cast<long long>(n),
              layers.size(), n ? mean / static_cast<double>(n) : 0.0, out.c_str());
  return 0;
}

}  // namespace motley::apps
