// Token files through the HDF5 C API.
//
// open() reads /tokens in blocks, letting HDF5 convert whatever integer type
// the file holds to 64 bits of the same signedness, so that h5py files with
// numpy's default int64 work as well as motley's own uint16/uint32, and so
// that a negative or too large id is seen before it is narrowed. Ids are
// kept as int32 (vocab_size is capped at 2^31 - 1) to halve the memory of a
// large corpus against int64.
#include "data/token_file.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "data/hdf5_util.h"

namespace motley {
namespace {

constexpr const char* kTokensName = "tokens";
constexpr const char* kVocabAttr = "vocab_size";
constexpr hsize_t kReadBlock = hsize_t{1} << 20;  // tokens per H5Dread
constexpr const char* kLayoutHint =
    " (a token file holds a 1-D integer dataset /tokens and an integer root attribute "
    "vocab_size; see docs/data.md)";

const char* type_class_name(H5T_class_t cls) {
  switch (cls) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "floating point";
    case H5T_STRING: return "string";
    case H5T_BITFIELD: return "bitfield";
    case H5T_OPAQUE: return "opaque";
    case H5T_COMPOUND: return "compound";
    case H5T_REFERENCE: return "reference";
    case H5T_ENUM: return "enum";
    case H5T_VLEN: return "variable-length";
    case H5T_ARRAY: return "array";
    default: return "unknown";
  }
}

std::int64_t read_vocab_size(hid_t file, const std::string& path) {
  const htri_t has = h5::check(H5Aexists(file, kVocabAttr), ErrorKind::kData, "H5Aexists(vocab_size)", path);
  MOTLEY_CHECK_KIND(kData, has > 0, path, ": missing root attribute vocab_size", kLayoutHint);
  h5::Handle attr(h5::check(H5Aopen(file, kVocabAttr, H5P_DEFAULT), ErrorKind::kData,
                            "H5Aopen(vocab_size)", path),
                  H5Aclose);
  h5::Handle type(h5::check(H5Aget_type(attr), ErrorKind::kData, "H5Aget_type(vocab_size)", path),
                  H5Tclose);
  const H5T_class_t cls = H5Tget_class(type);
  MOTLEY_CHECK_KIND(kData, cls == H5T_INTEGER, path, ": root attribute vocab_size is ",
                    type_class_name(cls), ", expected an integer");
  h5::Handle space(h5::check(H5Aget_space(attr), ErrorKind::kData, "H5Aget_space(vocab_size)", path),
                   H5Sclose);
  const hssize_t points = H5Sget_simple_extent_npoints(space);
  MOTLEY_CHECK_KIND(kData, points == 1, path, ": root attribute vocab_size holds ", points,
                    " values, expected one");
  std::int64_t vocab = 0;
  h5::check(H5Aread(attr, H5T_NATIVE_INT64, &vocab), ErrorKind::kData, "H5Aread(vocab_size)", path);
  MOTLEY_CHECK_KIND(kData, vocab >= 1 && vocab <= std::numeric_limits<std::int32_t>::max(), path,
                    ": root attribute vocab_size = ", vocab, " is outside [1, 2^31 - 1]");
  return vocab;
}

// Checks and stores block [first, first + n) of ids held as T (int64 or
// uint64), reporting the first id outside [0, vocab).
template <typename T>
void take_block(const std::vector<T>& block, hsize_t n, hsize_t first, std::int64_t vocab,
                const std::string& path, std::vector<std::int32_t>& tokens) {
  for (hsize_t k = 0; k < n; ++k) {
    const T v = block[k];
    if constexpr (std::is_signed_v<T>) {
      MOTLEY_CHECK_KIND(kData, v >= 0, "token id ", v, " is negative at offset ", first + k,
                        " in ", path);
    }
    MOTLEY_CHECK_KIND(kData, static_cast<std::uint64_t>(v) < static_cast<std::uint64_t>(vocab),
                      "token id ", v, " >= vocab_size ", vocab, " at offset ", first + k, " in ",
                      path);
    tokens.push_back(static_cast<std::int32_t>(v));
  }
}

}  // namespace

void write_token_file(const std::string& path, const std::vector<std::uint32_t>& tokens,
                      std::int64_t vocab_size) {
  MOTLEY_CHECK_KIND(kData, vocab_size >= 1 && vocab_size <= std::numeric_limits<std::int32_t>::max(),
                    "write_token_file(", path, "): vocab_size ", vocab_size,
                    " is outside [1, 2^31 - 1]");
  MOTLEY_CHECK_KIND(kData, !tokens.empty(), "write_token_file(", path, "): no tokens to write");
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    MOTLEY_CHECK_KIND(kData, tokens[i] < static_cast<std::uint64_t>(vocab_size), "token id ",
                      tokens[i], " >= vocab_size ", vocab_size, " at offset ", i,
                      " (writing ", path, ")");
  }
  h5::silence_errors();
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  {
    h5::Handle file(h5::check(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
                              ErrorKind::kData, "H5Fcreate", tmp),
                    H5Fclose);
    const hsize_t dims[1] = {tokens.size()};
    h5::Handle space(h5::check(H5Screate_simple(1, dims, nullptr), ErrorKind::kData,
                               "H5Screate_simple", tmp),
                     H5Sclose);
    const bool narrow = vocab_size <= 65536;
    h5::Handle dset(h5::check(H5Dcreate2(file, kTokensName, narrow ? H5T_STD_U16LE : H5T_STD_U32LE,
                                         space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                              ErrorKind::kData, "H5Dcreate2(/tokens)", tmp),
                    H5Dclose);
    if (narrow) {
      std::vector<std::uint16_t> small(tokens.begin(), tokens.end());
      h5::check(H5Dwrite(dset, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, small.data()),
                ErrorKind::kData, "H5Dwrite(/tokens)", tmp);
    } else {
      h5::check(H5Dwrite(dset, H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, tokens.data()),
                ErrorKind::kData, "H5Dwrite(/tokens)", tmp);
    }
    h5::Handle scalar(h5::check(H5Screate(H5S_SCALAR), ErrorKind::kData, "H5Screate", tmp),
                      H5Sclose);
    h5::Handle attr(h5::check(H5Acreate2(file, kVocabAttr, H5T_STD_I64LE, scalar, H5P_DEFAULT,
                                         H5P_DEFAULT),
                              ErrorKind::kData, "H5Acreate2(vocab_size)", tmp),
                    H5Aclose);
    h5::check(H5Awrite(attr, H5T_NATIVE_INT64, &vocab_size), ErrorKind::kData,
              "H5Awrite(vocab_size)", tmp);
    attr.close(tmp);
    dset.close(tmp);
    file.close(tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    MOTLEY_FAIL(kData, "cannot rename ", tmp, " to ", path, ": ", ec.message());
  }
}

TokenFile TokenFile::open(const std::string& path) {
  std::error_code ec;
  MOTLEY_CHECK_KIND(kData, std::filesystem::exists(path, ec), "token file ", path,
                    " does not exist");
  MOTLEY_CHECK_KIND(kData, std::filesystem::is_regular_file(path, ec), "token file ", path,
                    " is not a regular file");
  h5::silence_errors();
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  MOTLEY_CHECK_KIND(kData, is_hdf5 >= 0, "token file ", path, " cannot be read: ",
                    h5::error_stack());
  MOTLEY_CHECK_KIND(kData, is_hdf5 > 0, "token file ", path, " is not an HDF5 file",
                    kLayoutHint);
  h5::Handle file(h5::check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), ErrorKind::kData,
                            "H5Fopen", path),
                  H5Fclose);

  const htri_t has_tokens =
      h5::check(H5Lexists(file, kTokensName, H5P_DEFAULT), ErrorKind::kData, "H5Lexists(/tokens)", path);
  MOTLEY_CHECK_KIND(kData, has_tokens > 0, path, ": missing dataset /tokens", kLayoutHint);
  const hid_t dset_id = H5Dopen2(file, kTokensName, H5P_DEFAULT);
  MOTLEY_CHECK_KIND(kData, dset_id >= 0, path, ": /tokens is not a dataset", kLayoutHint);
  h5::Handle dset(dset_id, H5Dclose);

  h5::Handle space(h5::check(H5Dget_space(dset), ErrorKind::kData, "H5Dget_space(/tokens)", path),
                   H5Sclose);
  const int rank = h5::check(H5Sget_simple_extent_ndims(space), ErrorKind::kData,
                             "H5Sget_simple_extent_ndims(/tokens)", path);
  if (rank != 1) {
    hsize_t dims[H5S_MAX_RANK] = {};
    H5Sget_simple_extent_dims(space, dims, nullptr);
    std::string shape = "(";
    for (int d = 0; d < rank; ++d) absl::StrAppend(&shape, d ? ", " : "", dims[d]);
    shape += ")";
    MOTLEY_FAIL(kData, path, ": /tokens has ", rank, " dimensions, shape ", shape,
                "; expected a 1-D dataset", kLayoutHint);
  }
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space, &n, nullptr);
  MOTLEY_CHECK_KIND(kData, n > 0, path, ": /tokens is empty");

  h5::Handle type(h5::check(H5Dget_type(dset), ErrorKind::kData, "H5Dget_type(/tokens)", path),
                  H5Tclose);
  const H5T_class_t cls = H5Tget_class(type);
  MOTLEY_CHECK_KIND(kData, cls == H5T_INTEGER, path, ": /tokens has element type ",
                    type_class_name(cls), ", expected an integer type (uint16 or uint32)");
  const std::size_t width = H5Tget_size(type);
  MOTLEY_CHECK_KIND(kData, width == 1 || width == 2 || width == 4 || width == 8, path,
                    ": /tokens has ", 8 * width, "-bit integers, expected 8, 16, 32 or 64 bits");
  const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;

  TokenFile tf;
  tf.path_ = path;
  tf.vocab_size_ = read_vocab_size(file, path);
  tf.tokens_.reserve(n);

  std::vector<std::int64_t> signed_block;
  std::vector<std::uint64_t> unsigned_block;
  for (hsize_t first = 0; first < n; first += kReadBlock) {
    const hsize_t count = std::min(kReadBlock, n - first);
    h5::check(H5Sselect_hyperslab(space, H5S_SELECT_SET, &first, nullptr, &count, nullptr),
              ErrorKind::kData, "H5Sselect_hyperslab(/tokens)", path);
    h5::Handle mem(h5::check(H5Screate_simple(1, &count, nullptr), ErrorKind::kData,
                             "H5Screate_simple", path),
                   H5Sclose);
    if (is_signed) {
      signed_block.resize(count);
      h5::check(H5Dread(dset, H5T_NATIVE_INT64, mem, space, H5P_DEFAULT, signed_block.data()),
                ErrorKind::kData, "H5Dread(/tokens)", path);
      take_block(signed_block, count, first, tf.vocab_size_, path, tf.tokens_);
    } else {
      unsigned_block.resize(count);
      h5::check(H5Dread(dset, H5T_NATIVE_UINT64, mem, space, H5P_DEFAULT, unsigned_block.data()),
                ErrorKind::kData, "H5Dread(/tokens)", path);
      take_block(unsigned_block, count, first, tf.vocab_size_, path, tf.tokens_);
    }
  }
  return tf;
}

void TokenFile::read(std::int64_t offset, std::int64_t count, std::int64_t* out) const {
  MOTLEY_CHECK_KIND(kData, offset >= 0 && count >= 0 && offset <= size() - count,
                    "token range [", offset, ", ", offset + count, ") is outside the ", size(),
                    " tokens of ", path_);
  std::copy(tokens_.begin() + offset, tokens_.begin() + offset + count, out);
}

}  // namespace motley
