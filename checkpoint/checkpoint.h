// HDF5 checkpoints (SPEC section 5).
//
// One file per checkpoint, RUN/checkpoints/step_NNNNNNNN.h5, plus
// RUN/checkpoints/LATEST naming the newest complete file. Layout:
//
//   /                      attrs: format = "motley-checkpoint", format_version,
//                                 step, tokens_seen, seed, config (JSON),
//                                 saved_layout (dp, ep, pp), created_utc
//   /model/<name>          float32, the full global tensor
//   /optim/exp_avg/<name>  AdamW first moment
//   /optim/exp_avg_sq/<name>
//   /optim                 attrs: step (bias-correction count)
//   /tokenizer             the tokenizer JSON (string dataset; absent if none)
//
// Every float32 dataset carries a checksum, verified on every read, so a
// corrupted dataset is reported by name: HDF5's Fletcher32 filter (chunked
// datasets; files written by save_checkpoint) or, for files written by
// save_checkpoint_sharded (many ranks, possibly through MPI-IO, where HDF5
// 1.10 allows no filters), a uint64 attribute "checksum" holding FNV-1a 64
// of the little-endian float32 bytes of the whole tensor (Note [Checksum
// attribute]). The reader accepts both. Files are written under a
// temporary name, fsync'ed and renamed, and LATEST is replaced the same
// way afterwards: a crash at any moment leaves the previous LATEST
// loadable. See Note [Atomic checkpoints].
//
// Every failure to read is a kCheckpoint error (exit 4) naming the file
// and the reason.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "layers/optimizer.h"
#include "layers/parameters.h"
#include "parallel/communicator.h"
#include "parallel/process_groups.h"

namespace motley {

inline constexpr const char* kCheckpointFormat = "motley-checkpoint";
inline constexpr std::int64_t kCheckpointFormatVersion = 1;

struct CheckpointMeta {
  std::int64_t step = 0;          // updates done
  std::int64_t tokens_seen = 0;
  std::int64_t seed = 0;
  std::string config_json;        // the fully resolved config
  std::int64_t dp = 1, ep = 1, pp = 1;
  std::string created_utc;        // ISO 8601; filled by save if empty
  std::int64_t format_version = kCheckpointFormatVersion;
};

// Writes a complete checkpoint of `params` (and `optimizer`'s moments and
// step when given) to `path` atomically. All tensors are stored as float32.
void save_checkpoint(const std::string& path, const ParameterSet& params,
                     const AdamW* optimizer, const CheckpointMeta& meta,
                     const std::string& tokenizer_json);

// ---- writing from shards (parallel runs) ------------------------------------------
// A tensor of the whole model: its global name and full shape.
struct TensorSpec {
  std::string name;
  Shape shape;
};

// Every parameter of the whole model `config` describes (all stages, all
// experts), in a single process's registration order (SPEC section 5
// names). A pure function of the config: every rank derives the same list
// without communication.
std::vector<TensorSpec> global_parameter_specs(const ModelConfig& config);

// The world rank that writes global parameter `name` in a sharded save
// under `layout`: for dense parameters dp_rank 0 of the stage holding them;
// for an expert the lowest rank among its replicas (the rank of EP block
// 0 with ep_rank expert_owner[e], Note [Expert placement]); for the shared
// GRU cell (moe_gru.*) dp_rank 0 of the first stage with an MoE layer.
// Pure; kInternal for a name that is not a model parameter.
int checkpoint_writer(const std::string& name, const ModelConfig& config,
                      const parallel::GroupLayout& layout, const std::vector<int>& expert_owner);

// The tag of save_checkpoint_sharded's send/recv messages over a
// communicator without an MPI handle (below).
inline constexpr int kShardedSaveTag = 5105;

// Writes one complete checkpoint, atomically, from the shards of every rank
// of `world`, without gathering whole models anywhere: collective over
// `world` and only `world` (every rank of it calls it with the same path,
// meta, tokenizer, specs and writer; `world` may be any communicator, a
// split of MPI_COMM_WORLD included, and other groups may save other files
// at the same time).
//   specs      every global tensor (global_parameter_specs), same order
//              on every rank;
//   writer[i]  the rank of `world` that writes specs[i]: it must hold that
//              parameter in `local` (and its moments in `optimizer`; zeros
//              are written for a parameter without optimizer state).
// How the file is written depends on `world` (Note [Sharded save paths] in
// checkpoint.cpp); every way writes the same content, contiguous float32
// datasets each with a "checksum" attribute (Note [Checksum attribute]):
//   * size 1: serially, through HDF5's default (POSIX) driver;
//   * world.mpi_comm_handle() set: parallel HDF5 on that MPI communicator;
//     every rank creates the file, groups and datasets collectively and
//     each tensor's data is written by its writer alone (independent
//     MPI-IO);
//   * no MPI handle (ranks that are threads of one process): each writer
//     sends its tensors as float32 to rank 0 (send/recv with tag
//     kShardedSaveTag, in specs order) and rank 0 writes the file through
//     the default driver; uses only send, recv, broadcast and barrier of
//     `world`.
// Every call on `world` passes host tensors, so `world` must take them (a
// NcclCommunicator does not). Extra memory per rank: at most one tensor (a
// float32 copy when the parameter is stored otherwise, or on rank 0 of the
// last path the tensor being received). The file is written as
// path + ".tmp", closed, fsync'ed by rank 0 of `world` and renamed by it
// after a barrier; on return the file is complete on every rank (LATEST
// is the caller's: write_latest on one rank).
// Throws kRuntime when HDF5, MPI or the file system fails, kInternal when
// a writer is not a rank of `world` (on every rank, before any
// communication) or does not hold its tensor; a failure on one rank
// leaves the others inside collectives or receives, so callers abort the
// job (apps/train.cpp).
void save_checkpoint_sharded(const std::string& path, const ParameterSet& local,
                             const AdamW& optimizer, const CheckpointMeta& meta,
                             const std::string& tokenizer_json,
                             const std::vector<TensorSpec>& specs, const std::vector<int>& writer,
                             parallel::Communicator& world);

// FNV-1a 64 of `size` bytes (the "checksum" attribute of Note [Checksum
// attribute]).
std::uint64_t fnv1a64(const void* data, std::size_t size);

// An open checkpoint file, validated on open (format, version).
class CheckpointReader {
 public:
  static CheckpointReader open(const std::string& path);
  ~CheckpointReader();
  CheckpointReader(CheckpointReader&&) noexcept;
  CheckpointReader& operator=(CheckpointReader&&) noexcept;

  const std::string& path() const { return path_; }
  const CheckpointMeta& meta() const { return meta_; }
  // The stored config, parsed (kCheckpoint if it does not parse).
  Config config(const std::vector<std::string>& overrides = {}) const;
  std::optional<std::string> tokenizer_json() const;
  // 0 when no optimizer state was saved; kCheckpoint when the stored
  // count is negative or exceeds the step.
  std::int64_t optimizer_step() const;
  bool has_optimizer_state() const;  // the /optim group exists

  // Names of the datasets in a group ("model", "optim/exp_avg", ...).
  std::vector<std::string> names(const std::string& group) const;
  bool has(const std::string& group, const std::string& name) const;
  Shape shape(const std::string& group, const std::string& name) const;
  // Reads one dataset as a float32 CPU tensor, its checksum (Fletcher32
  // or the "checksum" attribute) verified: kCheckpoint naming the dataset
  // on a mismatch.
  Tensor read(const std::string& group, const std::string& name) const;

 private:
  CheckpointReader() = default;
  std::string path_;
  CheckpointMeta meta_;
  std::int64_t file_ = -1;  // hid_t
};

// Copies every parameter of `params` (by name, shape checked) and, when
// `optimizer` is given, its moments and step from the checkpoint. A
// parameter missing from the file or of another shape is a kCheckpoint
// error naming it.
void load_checkpoint(const CheckpointReader& reader, ParameterSet& params, AdamW* optimizer);

// Checks that the architecture the checkpoint was saved with matches
// `config`: model.* keys must agree (kCheckpoint listing the differing
// keys); other differing keys (lr, steps, ...) are returned so the caller
// can report them.
std::vector<std::string> check_compatible(const CheckpointReader& reader, const Config& config);

// ---- run directory ------------------------------------------------------------
// RUN/checkpoints/step_00000042.h5
std::string checkpoint_path(const std::string& run_dir, std::int64_t step);
// Writes RUN/checkpoints/LATEST (atomically) naming `file_name`.
void write_latest(const std::string& run_dir, const std::string& file_name);
// The checkpoint LATEST names, or nullopt when there is no LATEST.
// kCheckpoint when LATEST names a missing file.
std::optional<std::string> latest_checkpoint(const std::string& run_dir);
// Deletes the oldest step_*.h5 files so that at most keep_last remain
// (never the one LATEST names).
void prune_checkpoints(const std::string& run_dir, std::int64_t keep_last);

}  // namespace motley
