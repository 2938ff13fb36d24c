// Byte-level BPE tokenizer (SPEC section 4).
//
// Ids:
//   0 .. 255                 the raw bytes
//   256 .. 256 + M - 1       the M merges, in the order they were learnt;
//                            merge r joins the pair (a, b) into id 256 + r
//   256 + M                  the document separator "<|endoftext|>" (eot),
//                            always the LAST id
// so vocab_size() == 257 + M. Every byte sequence is encodable, and
// decode(encode(x)) == x for every x.
//
// Pre-tokenization (Note [Chunks]): before merging, text is split into chunks
// much like GPT-2 does it; merges never cross a chunk boundary. Bytes are
// classed as letters (A-Z, a-z and every byte >= 0x80, so UTF-8 sequences
// stay with the letters around them), digits (0-9), whitespace (space, \t,
// \n, \v, \f, \r) and punctuation (everything else, control bytes included).
// A chunk is one of:
//   - an English contraction suffix: 's 't 're 've 'm 'll 'd
//   - a run of letters, a run of digits, or a run of punctuation, each with
//     an optional single leading space (' ');
//   - a run of whitespace. When the run is followed by a non-space byte and
//     ends in ' ', that last ' ' is left to lead the next chunk.
// Unlike GPT-2 a whitespace run such as "\n\n" before a word stays one chunk.
//
// encode() never produces eot: callers append eot_id() after each document.
// The text "<|endoftext|>" inside a document is encoded as ordinary bytes.
//
// Training is deterministic: the most frequent adjacent pair is merged
// first, ties broken by the lowest (left id, right id).
//
// Every const method, encode() included, may be called from several
// threads at once: encode()'s per-tokenizer chunk cache is guarded by a
// mutex. A moved-from Tokenizer may only be assigned to or destroyed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace motley {

class Tokenizer {
 public:
  // The text of the document separator token.
  static constexpr std::string_view kEotText = "<|endoftext|>";

  // An untrained tokenizer: the 256 bytes and eot (vocab_size 257).
  Tokenizer();
  Tokenizer(const Tokenizer& other);
  Tokenizer& operator=(const Tokenizer& other);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Learns vocab_size - 257 merges from the documents (kUsage if
  // vocab_size < 257 or >= 2^31). Stops early, with a smaller vocabulary,
  // when no adjacent pair is left to merge. progress, if set, is called
  // with (merges done, merges wanted) now and then and once at the end.
  static Tokenizer train(const std::vector<std::string>& documents,
                         std::int64_t vocab_size,
                         std::function<void(std::int64_t, std::int64_t)> progress = nullptr);

  // Any byte sequence; never fails. Never emits eot.
  std::vector<std::int32_t> encode(std::string_view text) const;
  // eot decodes to ""; an id outside [0, vocab_size) is a kData error
  // naming it.
  std::string decode(const std::vector<std::int32_t>& ids) const;

  std::int64_t vocab_size() const { return static_cast<std::int64_t>(vocab_.size()); }
  std::int32_t eot_id() const { return static_cast<std::int32_t>(vocab_.size() - 1); }
  // Bytes the token decodes to (eot: 0); kData for an id out of range.
  std::int64_t token_bytes(std::int32_t id) const;
  // The bytes of token id (eot: ""); kData for an id out of range.
  const std::string& token(std::int32_t id) const;
  // The learnt merges, in order: merge r makes id 256 + r.
  const std::vector<std::pair<std::int32_t, std::int32_t>>& merges() const { return merges_; }

  // JSON form (docs/data.md):
  //   {"format": "motley-bpe", "version": 1, "vocab_size": V,
  //    "pretokenizer": "motley-bytes-v1",
  //    "merges": [[a, b], ...],          // V - 257 pairs, in order
  //    "eot": V - 1, "eot_text": "<|endoftext|>",
  //    "vocab": ["...", ...]}            // V strings, for reading only
  // "vocab" renders each token's bytes with GPT-2's printable byte-to-
  // unicode table (a space shows as "Ġ", a newline as "Ċ"); it is optional
  // on input and, when present, must agree with the merges.
  std::string to_json() const;
  // kData on malformed input, naming what is wrong.
  static Tokenizer from_json(const std::string& json);

  // save() writes to a temporary name beside path, then renames it.
  // kData if the file cannot be written.
  void save(const std::string& path) const;
  // kData if the file is missing or malformed, naming the path.
  static Tokenizer load(const std::string& path);

 private:
  struct Cache;

  // from_json() with `source` (a path, or "tokenizer JSON") in messages.
  static Tokenizer parse_json(const std::string& text, const std::string& source);
  // Appends merge (a, b) as the next id; returns it.
  std::int32_t add_merge(std::int32_t a, std::int32_t b);
  void encode_chunk(std::string_view chunk, std::vector<std::int32_t>& out) const;

  std::vector<std::pair<std::int32_t, std::int32_t>> merges_;
  std::vector<std::string> vocab_;  // bytes of every id; eot last, as ""
  // (a << 32 | b) -> merge rank, for encoding.
  absl::flat_hash_map<std::uint64_t, std::int32_t> ranks_;
  // chunk -> ids; rebuilt empty on copy (it only saves time).
  std::unique_ptr<Cache> cache_;
};

// Splits text into chunks per Note [Chunks] (see the header comment),
// appending string_views into text. Exposed for tests and tools.
void split_chunks(std::string_view text, std::vector<std::string_view>& out);

}  // namespace motley
