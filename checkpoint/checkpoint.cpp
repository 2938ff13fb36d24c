#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <tuple>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "layers/expert_sizes.h"
#include "layers/parameter_layout.h"
#include "nlohmann/json.hpp"
#include "parallel/mpi_comm_handle.h"

namespace motley {
namespace fs = std::filesystem;

// Note [Atomic checkpoints]
// A checkpoint becomes visible in two renames: the complete, fsync'ed
// file step_N.h5.tmp -> step_N.h5, then LATEST.tmp -> LATEST. A crash
// before the second rename leaves LATEST naming the previous checkpoint,
// which is never deleted while LATEST names it. Readers only follow
// LATEST, so they never see a partial file. A sharded save (many ranks,
// one file) keeps the same order: every rank that opened the file closes
// it (collective under MPI-IO; rank 0 alone when the others sent it their
// tensors, Note [Sharded save paths]), rank 0 fsyncs it, all ranks meet at
// a barrier, and only then does rank 0 rename it; LATEST follows.

// Note [Checksum attribute]
// HDF5 1.10 cannot apply filters (Fletcher32 included) to datasets written
// in parallel, so a sharded save stores contiguous datasets and, on each,
// a scalar uint64 attribute "checksum": FNV-1a 64 (offset basis
// 14695981039346656037, prime 1099511628211) over the tensor's float32
// little-endian bytes in row-major order. The rank that writes a tensor
// computes it while the data is in its memory; attributes are metadata,
// which parallel HDF5 requires every rank to write identically, so the
// sums are combined with one all-reduce (each slot has exactly one
// writer, the others contribute 0) and then written by all ranks.
// CheckpointReader::read verifies it whenever the attribute is present;
// from Python: h = 14695981039346656037; for b in a.astype("<f4").tobytes():
// h = ((h ^ b) * 1099511628211) % 2**64.

// Note [Sharded save paths]
// save_checkpoint_sharded reaches the file in one of three ways, chosen
// from the communicator it is given (never MPI_COMM_WORLD, so that a
// sub-communicator saves its own file):
//   kSerial      a communicator of one rank: that rank writes through HDF5's
//                default (POSIX) driver;
//   kMpiIo       a communicator with an MPI handle (mpi_comm_handle()):
//                parallel HDF5 on that MPI communicator, every writer
//                writing its own tensors;
//   kSendToRoot  many ranks and no MPI handle (ranks that are threads of one
//                process): every writer sends its tensors to rank 0 over the
//                communicator (send/recv with kShardedSaveTag, in specs
//                order, model then exp_avg then exp_avg_sq for each tensor;
//                messages of one pair with one tag arrive in the order
//                sent), and rank 0 writes them through the default driver.
// All three create the same contiguous datasets with the same "checksum"
// attributes (Note [Checksum attribute]) and the same tokenizer dataset, so
// the files hold the same content and load the same way under any layout
// (tests/checkpoint compare them dataset by dataset and attribute by
// attribute). The send-to-root path uses only send, recv, broadcast and
// barrier, so a minimal in-process communicator suffices.

namespace {

// Owns an HDF5 identifier and closes it with the matching H5*close.
class H5Id {
 public:
  H5Id() = default;
  H5Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Id() { reset(); }
  H5Id(H5Id&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = -1;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  hid_t get() const { return id_; }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = -1;
  }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

// HDF5 prints its error stack by default; motley reports errors itself.
void silence_hdf5() {
  static const bool done = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

// See Note [Sharded save paths].
enum class ShardedPath { kSerial, kMpiIo, kSendToRoot };

// Checks an HDF5 call made while writing (kRuntime: disk full, permissions).
hid_t check_write(hid_t id, const char* what, const std::string& path) {
  MOTLEY_CHECK_KIND(kRuntime, id >= 0, "HDF5 failed to ", what, " while writing checkpoint ",
                    path);
  return id;
}

[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  MOTLEY_FAIL(kCheckpoint, "checkpoint ", path, ": ", why);
}

// Variable-length UTF-8, which h5py returns as str.
void write_string_attr(hid_t obj, const char* name, const std::string& value,
                       const std::string& path) {
  H5Id type(check_write(H5Tcopy(H5T_C_S1), "copy a string type", path), H5Tclose);
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  H5Id space(check_write(H5Screate(H5S_SCALAR), "create a dataspace", path), H5Sclose);
  H5Id attr(check_write(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                        "create an attribute", path),
            H5Aclose);
  const char* data = value.c_str();
  check_write(H5Awrite(attr.get(), type.get(), &data), "write an attribute", path);
}

void write_int_attr(hid_t obj, const char* name, const std::vector<std::int64_t>& values,
                    const std::string& path) {
  const hsize_t n = values.size();
  H5Id space(check_write(n == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr),
                         "create a dataspace", path),
             H5Sclose);
  H5Id attr(check_write(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT,
                                   H5P_DEFAULT),
                        "create an attribute", path),
            H5Aclose);
  check_write(H5Awrite(attr.get(), H5T_NATIVE_INT64, values.data()), "write an attribute", path);
}

H5Id make_group(hid_t parent, const char* name, const std::string& path) {
  return H5Id(check_write(H5Gcreate2(parent, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                          "create a group", path),
              H5Gclose);
}

// Chunks of at most 1 Mi elements, so Fletcher32 covers the data in
// pieces and h5py reads slices without touching the whole tensor.
std::vector<hsize_t> chunk_dims(const Shape& shape) {
  std::vector<hsize_t> chunk(shape.begin(), shape.end());
  auto total = [&] {
    hsize_t n = 1;
    for (hsize_t c : chunk) n *= c;
    return n;
  };
  for (std::size_t d = 0; total() > (1u << 20) && d < chunk.size();) {
    if (chunk[d] > 1) {
      chunk[d] = (chunk[d] + 1) / 2;
    } else {
      ++d;
    }
  }
  return chunk;
}

void write_tensor(hid_t group, const std::string& name, const Tensor& tensor,
                  const std::string& path) {
  const Tensor t = tensor.to(Device::cpu()).to(DType::kF32).contiguous();
  std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
  H5Id space(check_write(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                         "create a dataspace", path),
             H5Sclose);
  H5Id dcpl(check_write(H5Pcreate(H5P_DATASET_CREATE), "create a property list", path),
            H5Pclose);
  if (t.numel() > 0) {
    const std::vector<hsize_t> chunk = chunk_dims(t.shape());
    check_write(H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()),
                "set chunking", path);
    check_write(H5Pset_fletcher32(dcpl.get()), "enable Fletcher32", path);
  }
  H5Id dset(check_write(H5Dcreate2(group, name.c_str(), H5T_IEEE_F32LE, space.get(), H5P_DEFAULT,
                                   dcpl.get(), H5P_DEFAULT),
                        "create a dataset", path),
            H5Dclose);
  check_write(H5Dwrite(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                       t.data<float>()),
              "write a dataset", path);
}

std::string utc_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;  // best effort for directories on odd file systems
  ::fsync(fd);
  ::close(fd);
}

std::string parent_dir(const std::string& path) {
  const fs::path p = fs::path(path).parent_path();
  return p.empty() ? std::string(".") : p.string();
}

// Reading helpers: every failure is kCheckpoint naming the file.
std::string read_string_attr(hid_t obj, const char* name, const std::string& path) {
  if (H5Aexists(obj, name) <= 0) corrupt(path, absl::StrCat("attribute '", name, "' is missing"));
  H5Id attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  if (attr.get() < 0 || type.get() < 0 || H5Tget_class(type.get()) != H5T_STRING) {
    corrupt(path, absl::StrCat("attribute '", name, "' is not a string"));
  }
  if (H5Tis_variable_str(type.get()) > 0) {
    char* value = nullptr;  // read with the file's own type: same cset, no conversion
    if (H5Aread(attr.get(), type.get(), &value) < 0 || !value) {
      corrupt(path, absl::StrCat("cannot read attribute '", name, "'"));
    }
    std::string out(value);
    H5free_memory(value);
    return out;
  }
  std::string out(H5Tget_size(type.get()), '\0');
  if (H5Aread(attr.get(), type.get(), out.data()) < 0) {
    corrupt(path, absl::StrCat("cannot read attribute '", name, "'"));
  }
  out.erase(std::find(out.begin(), out.end(), '\0'), out.end());
  return out;
}

std::vector<std::int64_t> read_int_attr(hid_t obj, const char* name, const std::string& path) {
  if (H5Aexists(obj, name) <= 0) corrupt(path, absl::StrCat("attribute '", name, "' is missing"));
  H5Id attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  H5Id space(H5Aget_space(attr.get()), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  if (n <= 0) corrupt(path, absl::StrCat("attribute '", name, "' is empty"));
  std::vector<std::int64_t> values(n);
  if (H5Aread(attr.get(), H5T_NATIVE_INT64, values.data()) < 0) {
    corrupt(path, absl::StrCat("attribute '", name, "' is not an integer"));
  }
  return values;
}

void write_root_attrs(hid_t root, const CheckpointMeta& meta, const std::string& created_utc,
                      const std::string& path) {
  write_string_attr(root, "format", kCheckpointFormat, path);
  write_int_attr(root, "format_version", {meta.format_version}, path);
  write_int_attr(root, "step", {meta.step}, path);
  write_int_attr(root, "tokens_seen", {meta.tokens_seen}, path);
  write_int_attr(root, "seed", {meta.seed}, path);
  write_string_attr(root, "config", meta.config_json, path);
  write_int_attr(root, "saved_layout", {meta.dp, meta.ep, meta.pp}, path);
  write_string_attr(root, "created_utc", created_utc, path);
}

void write_u64_attr(hid_t obj, const char* name, std::uint64_t value, const std::string& path) {
  H5Id space(check_write(H5Screate(H5S_SCALAR), "create a dataspace", path), H5Sclose);
  H5Id attr(check_write(H5Acreate2(obj, name, H5T_STD_U64LE, space.get(), H5P_DEFAULT,
                                   H5P_DEFAULT),
                        "create an attribute", path),
            H5Aclose);
  check_write(H5Awrite(attr.get(), H5T_NATIVE_UINT64, &value), "write an attribute", path);
}

void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char message[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, message, &len);
  MOTLEY_FAIL(kRuntime, what, " failed: ", std::string(message, len));
}

std::string utc_string(std::time_t when) {
  std::tm tm{};
  gmtime_r(&when, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// The tokenizer JSON as a fixed-length UTF-8 string dataset (h5py: bytes).
H5Id create_tokenizer_dataset(hid_t root, const std::string& json, hid_t dcpl,
                              const std::string& path, H5Id& type) {
  type = H5Id(check_write(H5Tcopy(H5T_C_S1), "copy a string type", path), H5Tclose);
  check_write(H5Tset_size(type.get(), json.size()), "size a string type", path);
  check_write(H5Tset_cset(type.get(), H5T_CSET_UTF8), "set a string type's encoding", path);
  H5Id space(check_write(H5Screate(H5S_SCALAR), "create a dataspace", path), H5Sclose);
  return H5Id(check_write(H5Dcreate2(root, "tokenizer", type.get(), space.get(), H5P_DEFAULT,
                                     dcpl, H5P_DEFAULT),
                          "create the tokenizer dataset", path),
              H5Dclose);
}

}  // namespace

std::uint64_t fnv1a64(const void* data, std::size_t size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  std::uint64_t h = 14695981039346656037ull;
  for (std::size_t i = 0; i < size; ++i) {
    h ^= bytes[i];
    h *= 1099511628211ull;
  }
  return h;
}

std::vector<TensorSpec> global_parameter_specs(const ModelConfig& config) {
  std::vector<TensorSpec> out;
  for (const ParameterSpec& spec : parameter_layout(config)) out.push_back({spec.name, spec.shape});
  return out;
}

int checkpoint_writer(const std::string& name, const ModelConfig& config,
                      const parallel::GroupLayout& layout, const std::vector<int>& expert_owner) {
  const std::int64_t n_layers = config.n_layers;
  if (name.rfind("embed.", 0) == 0) return layout.rank_of(0, 0);
  if (name.rfind("final_norm.", 0) == 0 || name.rfind("lm_head.", 0) == 0) {
    return layout.rank_of(layout.pp - 1, 0);
  }
  if (name.rfind("moe_gru.", 0) == 0) {
    for (std::int64_t l = 0; l < n_layers; ++l) {
      if (config.is_moe_layer(l)) {
        return layout.rank_of(parallel::stage_of_layer(n_layers, layout.pp, l), 0);
      }
    }
    MOTLEY_FAIL(kInternal, name, " in a model without MoE layers");
  }
  MOTLEY_CHECK(name.rfind("layers.", 0) == 0, "not a model parameter: ", name);
  const std::int64_t l = std::stoll(name.substr(7));
  const int stage = parallel::stage_of_layer(n_layers, layout.pp, l);
  int dp_rank = 0;
  const std::size_t at = name.find(".moe.experts.");
  if (at != std::string::npos && layout.ep > 1) {
    const std::int64_t e = std::stoll(name.substr(at + 13));
    MOTLEY_CHECK(e >= 0 && e < static_cast<std::int64_t>(expert_owner.size()), "expert ", e,
                 " of ", name, " has no owner");
    dp_rank = expert_owner[e];
  }
  return layout.rank_of(stage, dp_rank);
}

void save_checkpoint_sharded(const std::string& path, const ParameterSet& local,
                             const AdamW& optimizer, const CheckpointMeta& meta,
                             const std::string& tokenizer_json,
                             const std::vector<TensorSpec>& specs, const std::vector<int>& writer,
                             parallel::Communicator& world) {
  silence_hdf5();
  MOTLEY_CHECK(writer.size() == specs.size(), "save_checkpoint_sharded: ", writer.size(),
               " writers for ", specs.size(), " tensors");
  const int me = world.rank(), size = world.size();
  for (std::size_t i = 0; i < writer.size(); ++i) {
    MOTLEY_CHECK(writer[i] >= 0 && writer[i] < size, "save_checkpoint_sharded: the writer of ",
                 specs[i].name, " is rank ", writer[i], ", not a rank of a communicator of ", size);
  }
  // See Note [Sharded save paths].
  const parallel::MpiCommHandle* mpi = size > 1 ? world.mpi_comm_handle() : nullptr;
  const ShardedPath how = size == 1 ? ShardedPath::kSerial
                          : mpi     ? ShardedPath::kMpiIo
                                    : ShardedPath::kSendToRoot;
  if (mpi) {
    int mpi_size = 0;
    check_mpi(MPI_Comm_size(mpi->comm, &mpi_size), "MPI_Comm_size");
    MOTLEY_CHECK(mpi_size == size, "save_checkpoint_sharded: the communicator has ", size,
                 " ranks but its MPI handle has ", mpi_size);
  }
  const std::string tmp = path + ".tmp";
  // One clock for created_utc (an attribute: identical on every rank).
  std::string created = meta.created_utc;
  if (created.empty()) {
    const auto now = static_cast<std::int64_t>(
        std::chrono::system_clock::to_time_t(std::chrono::system_clock::now()));
    Tensor when = Tensor::from_vector(std::vector<std::int64_t>{me == 0 ? now : 0}, {1});
    world.broadcast(when, 0);
    created = utc_string(static_cast<std::time_t>(when.to_vector<std::int64_t>()[0]));
  }
  if (me == 0) fs::create_directories(parent_dir(path));
  world.barrier();  // the directory exists before anyone opens the file

  // Slot s = g * n + i is tensor i of group g (0 model, 1 exp_avg,
  // 2 exp_avg_sq). This rank's copy of a slot it is the writer of, as a
  // contiguous float32 host tensor (a copy only when stored otherwise).
  const std::size_t n = specs.size();
  auto local_slot = [&](std::size_t slot) -> Tensor {
    const TensorSpec& spec = specs[slot % n];
    MOTLEY_CHECK(local.contains(spec.name), "save_checkpoint_sharded: rank ", me,
                 " is the writer of ", spec.name, " but does not hold it");
    Tensor t;
    if (slot < n) {
      t = local.get(spec.name).data();
    } else if (optimizer.has_state(spec.name)) {
      const AdamWState& state = optimizer.states().at(spec.name);
      t = slot < 2 * n ? state.exp_avg : state.exp_avg_sq;
    } else {  // no update yet: zero moments, as AdamW would start from
      t = Tensor::zeros(spec.shape, DType::kF32);
    }
    t = t.to(Device::cpu()).to(DType::kF32).contiguous();
    MOTLEY_CHECK(t.shape() == spec.shape, "save_checkpoint_sharded: ", spec.name, " is ",
                 shape_str(t.shape()), " on rank ", me, ", the model's is ", shape_str(spec.shape));
    return t;
  };

  if (how == ShardedPath::kSendToRoot && me != 0) {
    // Rank 0 writes the file; this rank only sends what it is the writer
    // of, in the order rank 0 receives it, one tensor in memory at a time.
    for (std::size_t i = 0; i < n; ++i) {
      if (writer[i] != me) continue;
      for (std::size_t slot = i; slot < 3 * n; slot += n) {
        const Tensor t = local_slot(slot);
        if (t.numel() > 0) world.send(t, 0, kShardedSaveTag);
      }
    }
  } else {
    H5Id fapl(check_write(H5Pcreate(H5P_FILE_ACCESS), "create a property list", tmp), H5Pclose);
    if (how == ShardedPath::kMpiIo) {
      check_write(H5Pset_fapl_mpio(fapl.get(), mpi->comm, MPI_INFO_NULL),
                  "select the MPI-IO driver", tmp);
      check_write(H5Pset_all_coll_metadata_ops(fapl.get(), true),
                  "select collective metadata reads", tmp);
      check_write(H5Pset_coll_metadata_write(fapl.get(), true), "select collective metadata writes",
                  tmp);
    }
    H5Id file(check_write(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()),
                          "create the file", tmp),
              H5Fclose);
    const hid_t root = file.get();
    write_root_attrs(root, meta, created, tmp);
    // Contiguous, allocated at creation, never filled: the writer's data is
    // the only thing written into a dataset.
    H5Id dcpl(check_write(H5Pcreate(H5P_DATASET_CREATE), "create a property list", tmp), H5Pclose);
    check_write(H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS), "select contiguous layout", tmp);
    check_write(H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY), "set allocation time", tmp);
    check_write(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), "set fill time", tmp);

    H5Id model = make_group(root, "model", tmp);
    H5Id optim = make_group(root, "optim", tmp);
    write_int_attr(optim.get(), "step", {optimizer.step_count()}, tmp);
    H5Id exp_avg = make_group(optim.get(), "exp_avg", tmp);
    H5Id exp_avg_sq = make_group(optim.get(), "exp_avg_sq", tmp);
    const hid_t groups[3] = {model.get(), exp_avg.get(), exp_avg_sq.get()};

    // 1. Every rank that opened the file creates every dataset, in the
    // same order (collective under MPI-IO).
    std::vector<H5Id> dsets;
    dsets.reserve(3 * n);
    for (const hid_t group : groups) {
      for (const TensorSpec& spec : specs) {
        std::vector<hsize_t> dims(spec.shape.begin(), spec.shape.end());
        H5Id space(
            check_write(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                        "create a dataspace", tmp),
            H5Sclose);
        dsets.emplace_back(
            check_write(H5Dcreate2(group, spec.name.c_str(), H5T_IEEE_F32LE, space.get(),
                                   H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                        "create a dataset", tmp),
            H5Dclose);
      }
    }
    H5Id tokenizer_type, tokenizer;
    if (!tokenizer_json.empty()) {
      tokenizer = create_tokenizer_dataset(root, tokenizer_json, dcpl.get(), tmp, tokenizer_type);
    }

    // 2. Each tensor's data is written by its writer (independent I/O under
    // MPI-IO) or, on the send-to-root path, by rank 0 as it arrives; one
    // tensor in memory at a time, checksummed while it is there.
    std::vector<std::int64_t> sums(3 * n, 0);
    auto write_slot = [&](std::size_t slot, const Tensor& t) {
      if (t.numel() > 0) {
        check_write(H5Dwrite(dsets[slot].get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                             t.data<float>()),
                    "write a dataset", tmp);
      }
      const std::uint64_t sum = fnv1a64(t.raw_data(), static_cast<std::size_t>(t.numel()) * 4);
      sums[slot] = static_cast<std::int64_t>(sum);
    };
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t slot = i; slot < 3 * n; slot += n) {
        if (writer[i] == me) {
          write_slot(slot, local_slot(slot));
        } else if (how == ShardedPath::kSendToRoot) {
          Tensor t = Tensor::empty(specs[i].shape, DType::kF32);
          if (t.numel() > 0) world.recv(t, writer[i], kShardedSaveTag);
          write_slot(slot, t);
        }
      }
    }
    if (tokenizer.get() >= 0 && me == 0) {
      check_write(H5Dwrite(tokenizer.get(), tokenizer_type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT,
                           tokenizer_json.data()),
                  "write the tokenizer", tmp);
    }

    // 3. Checksums. Under MPI-IO one all-reduce, then identical attribute
    // writes everywhere (Note [Checksum attribute]); otherwise this rank
    // computed every one of them.
    if (how == ShardedPath::kMpiIo) {
      Tensor all = Tensor::from_vector(sums, {static_cast<std::int64_t>(sums.size())});
      world.allreduce_sum(all);
      sums = all.to_vector<std::int64_t>();
    }
    for (std::size_t slot = 0; slot < dsets.size(); ++slot) {
      write_u64_attr(dsets[slot].get(), "checksum", static_cast<std::uint64_t>(sums[slot]), tmp);
    }
    dsets.clear();
    tokenizer.reset();
    check_write(H5Fflush(root, H5F_SCOPE_GLOBAL), "flush", tmp);
  }  // every handle closed; H5Fclose is collective under MPI-IO
  if (me == 0) fsync_path(tmp, false);
  world.barrier();  // Note [Atomic checkpoints]: complete everywhere before the rename
  if (me == 0) {
    std::error_code ec;
    fs::rename(tmp, path, ec);
    MOTLEY_CHECK_KIND(kRuntime, !ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
    fsync_path(parent_dir(path), true);
  }
  world.barrier();  // the file exists under its name for every rank
}

void save_checkpoint(const std::string& path, const ParameterSet& params, const AdamW* optimizer,
                     const CheckpointMeta& meta, const std::string& tokenizer_json) {
  silence_hdf5();
  fs::create_directories(parent_dir(path));
  const std::string tmp = path + ".tmp";
  {
    H5Id file(check_write(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
                          "create the file", tmp),
              H5Fclose);
    const hid_t root = file.get();
    write_root_attrs(root, meta, meta.created_utc.empty() ? utc_now() : meta.created_utc, tmp);
    {
      H5Id model = make_group(root, "model", tmp);
      for (const autograd::Variable& p : params.all()) write_tensor(model.get(), p.name(), p.data(), tmp);
    }
    if (optimizer) {
      H5Id optim = make_group(root, "optim", tmp);
      write_int_attr(optim.get(), "step", {optimizer->step_count()}, tmp);
      H5Id m = make_group(optim.get(), "exp_avg", tmp);
      H5Id v = make_group(optim.get(), "exp_avg_sq", tmp);
      for (const auto& [name, state] : optimizer->states()) {
        write_tensor(m.get(), name, state.exp_avg, tmp);
        write_tensor(v.get(), name, state.exp_avg_sq, tmp);
      }
    }
    if (!tokenizer_json.empty()) {
      H5Id type(check_write(H5Tcopy(H5T_C_S1), "copy a string type", tmp), H5Tclose);
      H5Tset_size(type.get(), tokenizer_json.size());
      H5Tset_cset(type.get(), H5T_CSET_UTF8);
      H5Id space(check_write(H5Screate(H5S_SCALAR), "create a dataspace", tmp), H5Sclose);
      H5Id dset(check_write(H5Dcreate2(root, "tokenizer", type.get(), space.get(), H5P_DEFAULT,
                                       H5P_DEFAULT, H5P_DEFAULT),
                            "create the tokenizer dataset", tmp),
                H5Dclose);
      check_write(H5Dwrite(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT,
                           tokenizer_json.data()),
                  "write the tokenizer", tmp);
    }
    check_write(H5Fflush(root, H5F_SCOPE_GLOBAL), "flush", tmp);
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  MOTLEY_CHECK_KIND(kRuntime, !ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
  fsync_path(parent_dir(path), true);
}

// ---- reading ----------------------------------------------------------------------

CheckpointReader::~CheckpointReader() {
  if (file_ >= 0) H5Fclose(file_);
}

CheckpointReader::CheckpointReader(CheckpointReader&& o) noexcept
    : path_(std::move(o.path_)), meta_(std::move(o.meta_)), file_(o.file_) {
  o.file_ = -1;
}

CheckpointReader& CheckpointReader::operator=(CheckpointReader&& o) noexcept {
  if (this != &o) {
    if (file_ >= 0) H5Fclose(file_);
    path_ = std::move(o.path_);
    meta_ = std::move(o.meta_);
    file_ = o.file_;
    o.file_ = -1;
  }
  return *this;
}

CheckpointReader CheckpointReader::open(const std::string& path) {
  silence_hdf5();
  MOTLEY_CHECK_KIND(kCheckpoint, fs::exists(path), "checkpoint ", path, " does not exist");
  if (H5Fis_hdf5(path.c_str()) <= 0) {
    corrupt(path, "not an HDF5 file (or truncated before its superblock)");
  }
  CheckpointReader r;
  r.path_ = path;
  r.file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (r.file_ < 0) corrupt(path, "cannot be opened: truncated or damaged HDF5 file");
  const hid_t root = r.file_;
  if (H5Aexists(root, "format") <= 0 || read_string_attr(root, "format", path) != kCheckpointFormat) {
    corrupt(path, "not a motley checkpoint (root attribute format != \"motley-checkpoint\")");
  }
  CheckpointMeta& m = r.meta_;
  m.format_version = read_int_attr(root, "format_version", path)[0];
  if (m.format_version < 1 || m.format_version > kCheckpointFormatVersion) {
    corrupt(path, absl::StrCat("unsupported format_version ", m.format_version,
                               " (this motley reads 1 to ", kCheckpointFormatVersion, ")"));
  }
  m.step = read_int_attr(root, "step", path)[0];
  m.tokens_seen = read_int_attr(root, "tokens_seen", path)[0];
  m.seed = read_int_attr(root, "seed", path)[0];
  m.config_json = read_string_attr(root, "config", path);
  const auto layout = read_int_attr(root, "saved_layout", path);
  if (layout.size() != 3) corrupt(path, "attribute 'saved_layout' must hold (dp, ep, pp)");
  m.dp = layout[0];
  m.ep = layout[1];
  m.pp = layout[2];
  // Every number is checked here, so nothing later (the sampler, AdamW's
  // bias correction, the layout) meets a value it cannot use.
  constexpr std::int64_t kMaxCount = std::int64_t{1} << 40;
  for (const auto& [name, value, low] :
       {std::tuple<const char*, std::int64_t, std::int64_t>{"step", m.step, 0},
        {"tokens_seen", m.tokens_seen, 0},
        {"seed", m.seed, 0},
        {"saved_layout (dp)", m.dp, 1},
        {"saved_layout (ep)", m.ep, 1},
        {"saved_layout (pp)", m.pp, 1}}) {
    if (value < low || value > kMaxCount) {
      corrupt(path, absl::StrCat("root attribute '", name, "' = ", value, " is out of range [", low,
                                 ", ", kMaxCount, "]"));
    }
  }
  m.created_utc = read_string_attr(root, "created_utc", path);
  if (H5Lexists(root, "model", H5P_DEFAULT) <= 0) corrupt(path, "group /model is missing");
  return r;
}

Config CheckpointReader::config(const std::vector<std::string>& overrides) const {
  if (json_nesting_depth(meta_.config_json) > kMaxJsonDepth) {
    corrupt(path_, "attribute 'config' is nested too deeply to be a config");
  }
  const auto json = nlohmann::ordered_json::parse(meta_.config_json, nullptr, false);
  if (json.is_discarded()) corrupt(path_, "attribute 'config' is not valid JSON");
  // The stored config alone first: what is wrong with it is the
  // checkpoint's fault (exit 4); what the overrides then break is the
  // command line's (exit 2, naming --set).
  try {
    Config::from_json(json);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kUsage) throw;
    corrupt(path_, absl::StrCat("stored config is invalid: ", e.what()));
  }
  if (overrides.empty()) return Config::from_json(json);
  try {
    return Config::from_json(json, overrides);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kUsage) throw;
    throw Error(ErrorKind::kUsage,
                absl::StrCat("--set on the config stored in ", path_, ": ", e.what()));
  }
}

std::optional<std::string> CheckpointReader::tokenizer_json() const {
  if (H5Lexists(file_, "tokenizer", H5P_DEFAULT) <= 0) return std::nullopt;
  H5Id dset(H5Dopen2(file_, "tokenizer", H5P_DEFAULT), H5Dclose);
  H5Id type(H5Dget_type(dset.get()), H5Tclose);
  if (dset.get() < 0 || H5Tget_class(type.get()) != H5T_STRING) {
    corrupt(path_, "/tokenizer is not a string dataset");
  }
  if (H5Tis_variable_str(type.get()) > 0) {
    char* value = nullptr;
    if (H5Dread(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, &value) < 0 || !value) {
      corrupt(path_, "cannot read /tokenizer");
    }
    std::string out(value);
    H5free_memory(value);
    return out;
  }
  std::string out(H5Tget_size(type.get()), '\0');
  if (H5Dread(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0) {
    corrupt(path_, "cannot read /tokenizer");
  }
  out.erase(std::find(out.begin(), out.end(), '\0'), out.end());
  return out;
}

bool CheckpointReader::has_optimizer_state() const {
  return H5Lexists(file_, "optim", H5P_DEFAULT) > 0;
}

std::int64_t CheckpointReader::optimizer_step() const {
  if (H5Lexists(file_, "optim", H5P_DEFAULT) <= 0) return 0;
  H5Id optim(H5Gopen2(file_, "optim", H5P_DEFAULT), H5Gclose);
  const std::int64_t step = read_int_attr(optim.get(), "step", path_)[0];
  // Updates done: at most one per training step.
  if (step < 0 || step > meta_.step) {
    corrupt(path_, absl::StrCat("attribute /optim step = ", step,
                                " is out of range [0, step = ", meta_.step, "]"));
  }
  return step;
}

std::vector<std::string> CheckpointReader::names(const std::string& group) const {
  std::vector<std::string> out;
  if (H5Lexists(file_, group.substr(0, group.find('/')).c_str(), H5P_DEFAULT) <= 0) return out;
  if (H5Lexists(file_, group.c_str(), H5P_DEFAULT) <= 0) return out;
  H5Id g(H5Gopen2(file_, group.c_str(), H5P_DEFAULT), H5Gclose);
  if (g.get() < 0) corrupt(path_, absl::StrCat("cannot open group /", group));
  H5G_info_t info;
  H5Gget_info(g.get(), &info);
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr,
                                           0, H5P_DEFAULT);
    std::string name(len, '\0');
    H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), len + 1,
                       H5P_DEFAULT);
    out.push_back(name);
  }
  return out;
}

bool CheckpointReader::has(const std::string& group, const std::string& name) const {
  const std::string full = group + "/" + name;
  const std::string top = group.substr(0, group.find('/'));
  if (H5Lexists(file_, top.c_str(), H5P_DEFAULT) <= 0) return false;
  if (H5Lexists(file_, group.c_str(), H5P_DEFAULT) <= 0) return false;
  return H5Lexists(file_, full.c_str(), H5P_DEFAULT) > 0;
}

Shape CheckpointReader::shape(const std::string& group, const std::string& name) const {
  const std::string full = group + "/" + name;
  if (!has(group, name)) corrupt(path_, absl::StrCat("dataset /", full, " is missing"));
  H5Id dset(H5Dopen2(file_, full.c_str(), H5P_DEFAULT), H5Dclose);
  H5Id space(H5Dget_space(dset.get()), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) corrupt(path_, absl::StrCat("dataset /", full, " has no simple shape"));
  std::vector<hsize_t> dims(rank);
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  return Shape(dims.begin(), dims.end());
}

Tensor CheckpointReader::read(const std::string& group, const std::string& name) const {
  const std::string full = group + "/" + name;
  Tensor t = Tensor::empty(shape(group, name), DType::kF32);
  H5Id dset(H5Dopen2(file_, full.c_str(), H5P_DEFAULT), H5Dclose);
  H5Id type(H5Dget_type(dset.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_FLOAT) {
    corrupt(path_, absl::StrCat("dataset /", full, " is not floating point"));
  }
  if (t.numel() > 0 &&
      H5Dread(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data<float>()) < 0) {
    corrupt(path_, absl::StrCat("checksum mismatch or unreadable data in dataset /", full,
                                " (the file is corrupt)"));
  }
  // Note [Checksum attribute] (files written by many ranks).
  const htri_t has_sum = H5Aexists(dset.get(), "checksum");
  if (has_sum < 0) corrupt(path_, absl::StrCat("cannot inspect dataset /", full));
  if (has_sum > 0) {
    H5Id attr(H5Aopen(dset.get(), "checksum", H5P_DEFAULT), H5Aclose);
    std::uint64_t want = 0;
    if (attr.get() < 0 || H5Aread(attr.get(), H5T_NATIVE_UINT64, &want) < 0) {
      corrupt(path_, absl::StrCat("cannot read the checksum attribute of dataset /", full));
    }
    const std::uint64_t got = fnv1a64(t.raw_data(), static_cast<std::size_t>(t.numel()) * 4);
    if (got != want) {
      corrupt(path_, absl::StrCat("checksum mismatch in dataset /", full,
                                  " (the file is corrupt): stored ", want, ", computed ", got));
    }
  }
  return t;
}

void load_checkpoint(const CheckpointReader& reader, ParameterSet& params, AdamW* optimizer) {
  auto load_one = [&](const std::string& group, const std::string& name, Tensor& dst) {
    if (!reader.has(group, name)) {
      corrupt(reader.path(), absl::StrCat("dataset /", group, "/", name, " is missing"));
    }
    const Shape shape = reader.shape(group, name);
    if (shape != dst.shape()) {
      corrupt(reader.path(), absl::StrCat("dataset /", group, "/", name, " has shape ",
                                          shape_str(shape), ", the model expects ",
                                          shape_str(dst.shape())));
    }
    dst.copy_(reader.read(group, name));
  };
  for (const autograd::Variable& p : params.all()) {
    Tensor data = p.data();
    load_one("model", p.name(), data);
  }
  if (!optimizer) return;
  const std::int64_t step = reader.optimizer_step();
  optimizer->set_step_count(step);
  if (step == 0) return;
  for (const autograd::Variable& p : params.all()) {
    AdamWState& s = optimizer->state(p);
    load_one("optim/exp_avg", p.name(), s.exp_avg);
    load_one("optim/exp_avg_sq", p.name(), s.exp_avg_sq);
  }
}

std::vector<std::string> check_compatible(const CheckpointReader& reader, const Config& config) {
  const Config saved = reader.config();
  std::vector<std::string> arch, other;
  for (const std::string& key : config_differences(saved, config)) {
    (key.rfind("model.", 0) == 0 ? arch : other).push_back(key);
  }
  if (!arch.empty()) {
    corrupt(reader.path(), absl::StrCat("was saved for another architecture: ",
                                        absl::StrJoin(arch, ", "),
                                        " differ from the config (resume with the saved config, "
                                        "or start a new run)"));
  }
  return other;
}

// ---- run directory -----------------------------------------------------------------

std::string checkpoint_path(const std::string& run_dir, std::int64_t step) {
  return absl::StrFormat("%s/checkpoints/step_%08d.h5", run_dir, step);
}

void write_latest(const std::string& run_dir, const std::string& file_name) {
  const std::string dir = run_dir + "/checkpoints";
  const std::string tmp = dir + "/LATEST.tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << file_name << "\n";
    out.flush();
    MOTLEY_CHECK_KIND(kRuntime, out.good(), "cannot write ", tmp);
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, dir + "/LATEST", ec);
  MOTLEY_CHECK_KIND(kRuntime, !ec, "cannot replace ", dir, "/LATEST: ", ec.message());
  fsync_path(dir, true);
}

std::optional<std::string> latest_checkpoint(const std::string& run_dir) {
  const std::string latest = run_dir + "/checkpoints/LATEST";
  std::ifstream in(latest);
  if (!in.good()) return std::nullopt;
  std::string name;
  std::getline(in, name);
  MOTLEY_CHECK_KIND(kCheckpoint, !name.empty() && name.find('/') == std::string::npos, latest,
                    " is malformed: expected a checkpoint file name");
  const std::string path = run_dir + "/checkpoints/" + name;
  MOTLEY_CHECK_KIND(kCheckpoint, fs::exists(path), latest, " names ", name,
                    ", which does not exist");
  return path;
}

void prune_checkpoints(const std::string& run_dir, std::int64_t keep_last) {
  const std::string dir = run_dir + "/checkpoints";
  if (!fs::exists(dir)) return;
  std::string keep;
  if (auto latest = latest_checkpoint(run_dir)) keep = fs::path(*latest).filename().string();
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step_", 0) == 0 && name.size() > 3 &&
        name.compare(name.size() - 3, 3, ".h5") == 0) {
      files.push_back(name);
    }
  }
  std::sort(files.begin(), files.end());  // zero-padded: name order is step order
  const std::int64_t excess = static_cast<std::int64_t>(files.size()) - keep_last;
  for (std::int64_t i = 0; i < excess; ++i) {
    if (files[i] == keep) continue;
    fs::remove(dir + "/" + files[i]);
  }
}

}  // namespace motley
