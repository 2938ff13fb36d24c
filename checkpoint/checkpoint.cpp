#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace motley {
namespace fs = std::filesystem;

// Note [Atomic checkpoints]
// A checkpoint becomes visible in two renames: the complete, fsync'ed
// file step_N.h5.tmp -> step_N.h5, then LATEST.tmp -> LATEST. A crash
// before the second rename leaves LATEST naming the previous checkpoint,
// which is never deleted while LATEST names it. Readers only follow
// LATEST, so they never see a partial file.

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

}  // namespace

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
    write_string_attr(root, "format", kCheckpointFormat, tmp);
    write_int_attr(root, "format_version", {meta.format_version}, tmp);
    write_int_attr(root, "step", {meta.step}, tmp);
    write_int_attr(root, "tokens_seen", {meta.tokens_seen}, tmp);
    write_int_attr(root, "seed", {meta.seed}, tmp);
    write_string_attr(root, "config", meta.config_json, tmp);
    write_int_attr(root, "saved_layout", {meta.dp, meta.ep, meta.pp}, tmp);
    write_string_attr(root, "created_utc", meta.created_utc.empty() ? utc_now() : meta.created_utc,
                      tmp);
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
  m.created_utc = read_string_attr(root, "created_utc", path);
  if (H5Lexists(root, "model", H5P_DEFAULT) <= 0) corrupt(path, "group /model is missing");
  return r;
}

Config CheckpointReader::config(const std::vector<std::string>& overrides) const {
  const auto json = nlohmann::ordered_json::parse(meta_.config_json, nullptr, false);
  if (json.is_discarded()) corrupt(path_, "attribute 'config' is not valid JSON");
  try {
    return Config::from_json(json, overrides);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kUsage) throw;
    corrupt(path_, absl::StrCat("stored config is invalid: ", e.what()));
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

std::int64_t CheckpointReader::optimizer_step() const {
  if (H5Lexists(file_, "optim", H5P_DEFAULT) <= 0) return 0;
  H5Id optim(H5Gopen2(file_, "optim", H5P_DEFAULT), H5Gclose);
  return read_int_attr(optim.get(), "step", path_)[0];
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
