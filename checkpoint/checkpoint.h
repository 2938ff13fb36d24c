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
// Every dataset carries HDF5's Fletcher32 checksum, so a corrupted dataset
// fails to read and is reported by name. Files are written under a
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
  std::int64_t optimizer_step() const;  // 0 when no optimizer state was saved

  // Names of the datasets in a group ("model", "optim/exp_avg", ...).
  std::vector<std::string> names(const std::string& group) const;
  bool has(const std::string& group, const std::string& name) const;
  Shape shape(const std::string& group, const std::string& name) const;
  // Reads one dataset as a float32 CPU tensor (checksum verified).
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
