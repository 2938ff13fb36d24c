// Token files (SPEC section 4): HDF5 with a 1-D dataset /tokens and a root
// attribute vocab_size, so users can write their own, e.g. with h5py:
//
//   with h5py.File("train.h5", "w") as f:
//       f.create_dataset("tokens", data=np.asarray(ids, dtype=np.uint16))
//       f.attrs["vocab_size"] = 4096
//
// Accepted on read: /tokens of ANY HDF5 integer type of 8, 16, 32 or 64
// bits, signed or unsigned (numpy's default int64 included), any layout,
// chunking or filter HDF5 can read; vocab_size an integer attribute (scalar
// or one element) in [1, 2^31 - 1]; at least one token. Every id must be in
// [0, vocab_size): the first that is not is an error naming its offset. motley itself writes
// uint16 when vocab_size <= 65536 and uint32 otherwise.
//
// Every problem with a file (missing, not HDF5, wrong shape or type, bad
// id, unreadable) is a motley::Error of kind kData whose message names the
// path and the problem.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace motley {

// Writes tokens as /tokens (uint16 when vocab_size <= 65536, else uint32)
// with the root attribute vocab_size (int64). The file is written under a
// temporary name in the same folder and renamed over `path`, so readers
// never see a partial file. kData if an id is >= vocab_size (naming its
// offset) or the file cannot be written.
void write_token_file(const std::string& path, const std::vector<std::uint32_t>& tokens,
                      std::int64_t vocab_size);

// A validated token file, held entirely in memory (4 bytes per token) after
// open(): Brown is ~1.5M tokens, a few GB of tokens still fit.
// Read-only after open(), so safe to share between threads.
class TokenFile {
 public:
  // Opens, validates (see the header comment) and loads path.
  static TokenFile open(const std::string& path);

  std::int64_t size() const { return static_cast<std::int64_t>(tokens_.size()); }
  std::int64_t vocab_size() const { return vocab_size_; }
  const std::string& path() const { return path_; }

  // Copies tokens [offset, offset + count) into out[0 .. count) as int64.
  // kData (naming the path) if the range is not inside [0, size()).
  void read(std::int64_t offset, std::int64_t count, std::int64_t* out) const;

 private:
  TokenFile() = default;

  std::string path_;
  std::int64_t vocab_size_ = 0;
  std::vector<std::int32_t> tokens_;
};

}  // namespace motley
