// Byte-level BPE: chunking, training, encoding and the JSON form.
//
// Training keeps, for every distinct chunk ("word") of the corpus, its
// frequency and its current symbols, plus a count for every adjacent pair
// and the list of words each pair occurs in. A merge rewrites only the words
// that hold its pair and applies the resulting count changes; a max-heap of
// (count, pair) with lazy deletion picks the next merge. A merge costs a
// scan of the words that hold its pair plus a hash update per occurrence,
// instead of a recount of the corpus: a few MB of text train in about a
// second.
//
// Encoding applies merges lowest rank first within each chunk, using a
// linked list of symbols and a min-heap of (rank, position): O(n log n) per
// chunk even for a pathological multi-megabyte chunk. It reproduces training
// exactly because a merge's result only ever takes part in later (higher
// ranked) merges, and ties at one rank resolve left to right as training's
// left-to-right rewrite does.
#include "data/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <queue>
#include <sstream>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/config.h"
#include "nlohmann/json.hpp"

namespace motley {
namespace {

constexpr std::int32_t kNumBytes = 256;
constexpr const char* kFormat = "motley-bpe";
constexpr int kFormatVersion = 1;
constexpr const char* kPretokenizer = "motley-bytes-v1";
// Chunks cached per tokenizer before the cache stops growing, and the
// longest chunk worth caching (long ones are rare and would hog memory).
constexpr std::size_t kCacheMaxEntries = 1 << 18;
constexpr std::size_t kCacheMaxChunkBytes = 256;

std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) |
         static_cast<std::uint32_t>(b);
}
std::int32_t pair_left(std::uint64_t key) { return static_cast<std::int32_t>(key >> 32); }
std::int32_t pair_right(std::uint64_t key) {
  return static_cast<std::int32_t>(key & 0xffffffffu);
}

// ---- Note [Chunks] -------------------------------------------------------------

enum class ByteClass : std::uint8_t { kLetter, kDigit, kSpace, kPunct };

ByteClass byte_class(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return ByteClass::kLetter;
  if (c >= '0' && c <= '9') return ByteClass::kDigit;
  if (c == ' ' || (c >= '\t' && c <= '\r')) return ByteClass::kSpace;
  return ByteClass::kPunct;
}

// Length of the contraction suffix ('s 't 're 've 'm 'll 'd) at text[i],
// which holds '\'', or 0.
std::size_t contraction_length(std::string_view text, std::size_t i) {
  if (i + 1 >= text.size()) return 0;
  const char c1 = text[i + 1];
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (i + 2 >= text.size()) return 0;
  const char c2 = text[i + 2];
  if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
  return 0;
}

// ---- GPT-2's printable rendering of bytes (for the "vocab" list) ----------------

std::vector<std::string> byte_glyphs() {
  std::vector<int> code(kNumBytes, -1);
  auto keep = [&](int lo, int hi) {
    for (int b = lo; b <= hi; ++b) code[b] = b;
  };
  keep('!', '~');
  keep(0xA1, 0xAC);
  keep(0xAE, 0xFF);
  int next = 256;
  for (int b = 0; b < kNumBytes; ++b) {
    if (code[b] < 0) code[b] = next++;
  }
  std::vector<std::string> glyphs(kNumBytes);
  for (int b = 0; b < kNumBytes; ++b) {
    const int cp = code[b];  // < 0x800: one or two UTF-8 bytes
    if (cp < 0x80) {
      glyphs[b] = std::string(1, static_cast<char>(cp));
    } else {
      glyphs[b] = {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
    }
  }
  return glyphs;
}

std::string render_token(const std::string& bytes) {
  static const std::vector<std::string> glyphs = byte_glyphs();
  std::string out;
  for (unsigned char c : bytes) out += glyphs[c];
  return out;
}

// ---- training state ------------------------------------------------------------

struct HeapEntry {
  std::int64_t count;
  std::uint64_t pair;
  // Max-heap order: larger count first, then the lower pair.
  bool operator<(const HeapEntry& o) const {
    return count != o.count ? count < o.count : pair > o.pair;
  }
};

struct Word {
  std::vector<std::int32_t> symbols;
  std::int64_t count = 0;
};

}  // namespace

void split_chunks(std::string_view text, std::vector<std::string_view>& out) {
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '\'') {
      if (const std::size_t len = contraction_length(text, i)) {
        out.push_back(text.substr(i, len));
        i += len;
        continue;
      }
    }
    std::size_t start = i;
    if (byte_class(c) == ByteClass::kSpace) {
      std::size_t j = i + 1;
      while (j < n && byte_class(static_cast<unsigned char>(text[j])) == ByteClass::kSpace) ++j;
      const bool space_leads_next = j < n && text[j - 1] == ' ';
      if (!space_leads_next) {
        out.push_back(text.substr(i, j - i));
        i = j;
        continue;
      }
      if (j - 1 > i) {
        out.push_back(text.substr(i, j - 1 - i));
      }
      // The final ' ' leads the run that follows.
      start = j - 1;
      i = j;
    }
    const ByteClass cls = byte_class(static_cast<unsigned char>(text[i]));
    std::size_t j = i + 1;
    while (j < n && byte_class(static_cast<unsigned char>(text[j])) == cls) ++j;
    out.push_back(text.substr(start, j - start));
    i = j;
  }
}

// ---- construction ----------------------------------------------------------------

struct Tokenizer::Cache {
  std::mutex mutex;
  absl::flat_hash_map<std::string, std::vector<std::int32_t>> ids;
};

Tokenizer::Tokenizer() : cache_(std::make_unique<Cache>()) {
  vocab_.reserve(kNumBytes + 1);
  for (int b = 0; b < kNumBytes; ++b) vocab_.emplace_back(1, static_cast<char>(b));
  vocab_.emplace_back();  // eot
}

Tokenizer::Tokenizer(const Tokenizer& other)
    : merges_(other.merges_),
      vocab_(other.vocab_),
      ranks_(other.ranks_),
      cache_(std::make_unique<Cache>()) {}

Tokenizer& Tokenizer::operator=(const Tokenizer& other) {
  if (this != &other) {
    merges_ = other.merges_;
    vocab_ = other.vocab_;
    ranks_ = other.ranks_;
    cache_ = std::make_unique<Cache>();
  }
  return *this;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::int32_t Tokenizer::add_merge(std::int32_t a, std::int32_t b) {
  const std::int32_t id = static_cast<std::int32_t>(kNumBytes + merges_.size());
  std::string bytes = vocab_[a] + vocab_[b];
  vocab_.insert(vocab_.end() - 1, std::move(bytes));  // eot stays last
  ranks_[pair_key(a, b)] = static_cast<std::int32_t>(merges_.size());
  merges_.emplace_back(a, b);
  return id;
}

const std::string& Tokenizer::token(std::int32_t id) const {
  MOTLEY_CHECK_KIND(kData, id >= 0 && id < vocab_size(), "token id ", id,
                    " is out of range for a tokenizer of vocab_size ", vocab_size());
  return vocab_[id];
}

std::int64_t Tokenizer::token_bytes(std::int32_t id) const {
  return static_cast<std::int64_t>(token(id).size());
}

// ---- training --------------------------------------------------------------------

Tokenizer Tokenizer::train(const std::vector<std::string>& documents, std::int64_t vocab_size,
                           std::function<void(std::int64_t, std::int64_t)> progress) {
  MOTLEY_CHECK_KIND(kUsage,
                    vocab_size >= kNumBytes + 1 &&
                        vocab_size <= std::numeric_limits<std::int32_t>::max(),
                    "vocab_size must be in [257, 2^31 - 1] (256 bytes + merges + eot), got ",
                    vocab_size);
  const std::int64_t wanted = vocab_size - (kNumBytes + 1);

  // Distinct chunks and their frequencies, views into the documents.
  absl::flat_hash_map<std::string_view, std::int64_t> chunk_counts;
  {
    std::vector<std::string_view> chunks;
    for (const std::string& doc : documents) {
      chunks.clear();
      split_chunks(doc, chunks);
      for (std::string_view c : chunks) {
        if (c.size() >= 2) ++chunk_counts[c];  // a 1-byte chunk has no pair
      }
    }
  }
  // Sorted so that word indices, and so everything below, do not depend on
  // the hash map's iteration order.
  std::vector<std::pair<std::string_view, std::int64_t>> sorted(chunk_counts.begin(),
                                                                chunk_counts.end());
  chunk_counts.clear();
  std::sort(sorted.begin(), sorted.end());
  std::vector<Word> words(sorted.size());
  for (std::size_t w = 0; w < sorted.size(); ++w) {
    words[w].count = sorted[w].second;
    words[w].symbols.reserve(sorted[w].first.size());
    for (unsigned char c : sorted[w].first) words[w].symbols.push_back(c);
  }
  sorted.clear();
  sorted.shrink_to_fit();

  absl::flat_hash_map<std::uint64_t, std::int64_t> pair_counts;
  absl::flat_hash_map<std::uint64_t, std::vector<std::int32_t>> pair_words;
  for (std::size_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w].symbols;
    for (std::size_t k = 0; k + 1 < s.size(); ++k) {
      const std::uint64_t p = pair_key(s[k], s[k + 1]);
      pair_counts[p] += words[w].count;
      auto& list = pair_words[p];
      if (list.empty() || list.back() != static_cast<std::int32_t>(w)) {
        list.push_back(static_cast<std::int32_t>(w));
      }
    }
  }
  std::priority_queue<HeapEntry> heap;
  for (const auto& [p, c] : pair_counts) heap.push({c, p});

  Tokenizer tok;
  tok.merges_.reserve(wanted);
  tok.vocab_.reserve(vocab_size);
  const std::int64_t report_every = std::max<std::int64_t>(1, wanted / 200);
  if (progress) progress(0, wanted);

  std::vector<std::int64_t> visited(words.size(), -1);  // last merge that touched word
  absl::flat_hash_map<std::uint64_t, std::int64_t> delta;
  std::int64_t done = 0;
  while (done < wanted && !heap.empty()) {
    const HeapEntry top = heap.top();
    heap.pop();
    auto found = pair_counts.find(top.pair);
    // Stale: every count change pushes a fresh entry, so only an entry that
    // matches the current count is live.
    if (found == pair_counts.end() || found->second != top.count) continue;

    const std::int32_t a = pair_left(top.pair);
    const std::int32_t b = pair_right(top.pair);
    const std::int32_t merged = tok.add_merge(a, b);
    std::vector<std::int32_t> holders = std::move(pair_words[top.pair]);
    pair_words.erase(top.pair);
    delta.clear();
    for (const std::int32_t w : holders) {
      if (visited[w] == done) continue;
      visited[w] = done;
      Word& word = words[w];
      auto& s = word.symbols;
      const std::int64_t c = word.count;
      // Rewrite left to right in place, changing only the pairs around each
      // occurrence: (x, a) -> (x, merged) and (b, y) -> (merged, y). When
      // occurrences are adjacent, x is the previous merged symbol and the
      // pair (merged, a) added for the previous occurrence is taken back.
      auto touch = [&](std::int32_t x, std::int32_t y, std::int64_t d) {
        const std::uint64_t p = pair_key(x, y);
        delta[p] += d;
        if (d > 0) {
          auto& list = pair_words[p];
          if (list.empty() || list.back() != w) list.push_back(w);
        }
      };
      std::size_t out = 0;
      for (std::size_t k = 0; k < s.size();) {
        if (k + 1 < s.size() && s[k] == a && s[k + 1] == b) {
          delta[top.pair] -= c;
          if (out > 0) {
            touch(s[out - 1], a, -c);
            touch(s[out - 1], merged, c);
          }
          if (k + 2 < s.size()) {
            touch(b, s[k + 2], -c);
            touch(merged, s[k + 2], c);
          }
          s[out++] = merged;
          k += 2;
        } else {
          s[out++] = s[k++];
        }
      }
      s.resize(out);
    }
    // Apply in key order so the heap sees the same pushes on every run.
    std::vector<std::pair<std::uint64_t, std::int64_t>> changes(delta.begin(), delta.end());
    std::sort(changes.begin(), changes.end());
    for (const auto& [p, d] : changes) {
      if (d == 0) continue;
      std::int64_t& c = pair_counts[p];
      c += d;
      if (c <= 0) {
        pair_counts.erase(p);
      } else {
        heap.push({c, p});
      }
    }
    ++done;
    if (progress && (done % report_every == 0) && done < wanted) progress(done, wanted);
  }
  if (progress) progress(done, wanted);
  return tok;
}

// ---- encoding / decoding -----------------------------------------------------------

void Tokenizer::encode_chunk(std::string_view chunk, std::vector<std::int32_t>& out) const {
  if (chunk.size() == 1 || merges_.empty()) {
    for (unsigned char c : chunk) out.push_back(c);
    return;
  }
  const bool cacheable = chunk.size() <= kCacheMaxChunkBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    auto it = cache_->ids.find(absl::string_view(chunk.data(), chunk.size()));
    if (it != cache_->ids.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const std::int32_t n = static_cast<std::int32_t>(chunk.size());
  std::vector<std::int32_t> id(n), next(n), prev(n);
  for (std::int32_t i = 0; i < n; ++i) {
    id[i] = static_cast<unsigned char>(chunk[i]);
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  auto rank_of = [&](std::int32_t x, std::int32_t y) {
    auto it = ranks_.find(pair_key(x, y));
    return it == ranks_.end() ? -1 : it->second;
  };
  using Candidate = std::pair<std::int32_t, std::int32_t>;  // (rank, left position)
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  for (std::int32_t i = 0; i + 1 < n; ++i) {
    const std::int32_t r = rank_of(id[i], id[i + 1]);
    if (r >= 0) heap.push({r, i});
  }
  while (!heap.empty()) {
    const auto [r, i] = heap.top();
    heap.pop();
    if (id[i] < 0 || next[i] < 0) continue;
    const std::int32_t j = next[i];
    if (rank_of(id[i], id[j]) != r) continue;  // stale: a neighbour merged first
    id[i] = kNumBytes + r;
    id[j] = -1;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    if (prev[i] >= 0) {
      const std::int32_t rl = rank_of(id[prev[i]], id[i]);
      if (rl >= 0) heap.push({rl, prev[i]});
    }
    if (next[i] >= 0) {
      const std::int32_t rr = rank_of(id[i], id[next[i]]);
      if (rr >= 0) heap.push({rr, i});
    }
  }
  const std::size_t first = out.size();
  for (std::int32_t i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
  if (!cacheable) return;
  std::lock_guard<std::mutex> lock(cache_->mutex);
  if (cache_->ids.size() < kCacheMaxEntries) {
    cache_->ids.emplace(std::string(chunk),
                        std::vector<std::int32_t>(out.begin() + first, out.end()));
  }
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<std::string_view> chunks;
  split_chunks(text, chunks);
  std::vector<std::int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  for (std::string_view c : chunks) encode_chunk(c, ids);
  return ids;
}

std::string Tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  std::string out;
  for (const std::int32_t id : ids) out += token(id);
  return out;
}

// ---- JSON --------------------------------------------------------------------------

std::string Tokenizer::to_json() const {
  nlohmann::ordered_json j;
  j["format"] = kFormat;
  j["version"] = kFormatVersion;
  j["vocab_size"] = vocab_size();
  j["pretokenizer"] = kPretokenizer;
  j["eot"] = eot_id();
  j["eot_text"] = std::string(kEotText);
  auto merges = nlohmann::ordered_json::array();
  for (const auto& [a, b] : merges_) merges.push_back({a, b});
  j["merges"] = std::move(merges);
  auto vocab = nlohmann::ordered_json::array();
  for (std::int32_t id = 0; id < eot_id(); ++id) vocab.push_back(render_token(vocab_[id]));
  vocab.push_back(std::string(kEotText));
  j["vocab"] = std::move(vocab);
  // One merge per line keeps the file readable and diffable.
  std::string out = "{\n";
  bool first = true;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!first) out += ",\n";
    first = false;
    out += "  " + nlohmann::json(it.key()).dump() + ": ";
    if (it.value().is_array()) {
      out += "[";
      for (std::size_t k = 0; k < it.value().size(); ++k) {
        out += k ? ",\n    " : "\n    ";
        out += it.value()[k].dump();
      }
      out += it.value().empty() ? "]" : "\n  ]";
    } else {
      out += it.value().dump();
    }
  }
  out += "\n}\n";
  return out;
}

// Parses and validates; `source` names the input in messages.
Tokenizer Tokenizer::parse_json(const std::string& text, const std::string& source) {
  MOTLEY_CHECK_KIND(kData, json_nesting_depth(text) <= kMaxJsonDepth, source,
                    ": JSON nested more than ", kMaxJsonDepth, " levels deep");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    MOTLEY_FAIL(kData, source, ": not valid JSON: ", e.what());
  }
  MOTLEY_CHECK_KIND(kData, j.is_object(), source, ": expected a JSON object");
  auto field = [&](const char* name) -> const nlohmann::json& {
    MOTLEY_CHECK_KIND(kData, j.contains(name), source, ": missing field \"", name, "\"");
    return j.at(name);
  };
  auto integer = [&](const char* name) -> std::int64_t {
    const nlohmann::json& v = field(name);
    MOTLEY_CHECK_KIND(kData, v.is_number_integer(), source, ": field \"", name,
                      "\" must be an integer, got ", v.dump());
    return v.get<std::int64_t>();
  };
  const nlohmann::json& format = field("format");
  MOTLEY_CHECK_KIND(kData, format.is_string() && format.get<std::string>() == kFormat, source,
                    ": field \"format\" must be \"", kFormat, "\", got ", format.dump());
  const std::int64_t version = integer("version");
  MOTLEY_CHECK_KIND(kData, version == kFormatVersion, source, ": unsupported version ", version,
                    " (this motley reads version ", kFormatVersion, ")");
  if (j.contains("pretokenizer")) {
    const nlohmann::json& pre = j.at("pretokenizer");
    MOTLEY_CHECK_KIND(kData, pre.is_string() && pre.get<std::string>() == kPretokenizer, source,
                      ": field \"pretokenizer\" must be \"", kPretokenizer, "\", got ",
                      pre.dump());
  }
  const nlohmann::json& merges_json = field("merges");
  MOTLEY_CHECK_KIND(kData, merges_json.is_array(), source,
                    ": field \"merges\" must be an array of [left, right] id pairs");
  std::vector<std::pair<std::int32_t, std::int32_t>> merges;
  merges.reserve(merges_json.size());
  for (std::size_t r = 0; r < merges_json.size(); ++r) {
    const nlohmann::json& m = merges_json[r];
    const std::int64_t next_id = kNumBytes + static_cast<std::int64_t>(r);
    MOTLEY_CHECK_KIND(kData,
                      m.is_array() && m.size() == 2 && m[0].is_number_integer() &&
                          m[1].is_number_integer(),
                      source, ": merges[", r, "] must be a pair of integer ids, got ", m.dump());
    const std::int64_t a = m[0].get<std::int64_t>();
    const std::int64_t b = m[1].get<std::int64_t>();
    MOTLEY_CHECK_KIND(kData, a >= 0 && a < next_id && b >= 0 && b < next_id, source,
                      ": merges[", r, "] = ", m.dump(), " refers to an id outside [0, ", next_id,
                      ") (a merge may only join bytes and earlier merges)");
    merges.emplace_back(static_cast<std::int32_t>(a), static_cast<std::int32_t>(b));
  }
  const std::int64_t expected_vocab = kNumBytes + static_cast<std::int64_t>(merges.size()) + 1;
  const std::int64_t vocab_size = integer("vocab_size");
  MOTLEY_CHECK_KIND(kData, vocab_size == expected_vocab, source, ": vocab_size ", vocab_size,
                    " does not match 256 bytes + ", merges.size(), " merges + eot = ",
                    expected_vocab);
  const std::int64_t eot = integer("eot");
  MOTLEY_CHECK_KIND(kData, eot == vocab_size - 1, source, ": eot must be the last id ",
                    vocab_size - 1, ", got ", eot);
  Tokenizer tok;
  tok.merges_.reserve(merges.size());
  tok.vocab_.reserve(vocab_size);
  for (const auto& [a, b] : merges) tok.add_merge(a, b);
  if (j.contains("vocab")) {
    const nlohmann::json& vocab = j.at("vocab");
    MOTLEY_CHECK_KIND(kData, vocab.is_array() && vocab.size() == static_cast<std::size_t>(vocab_size),
                      source, ": field \"vocab\" must be an array of ", vocab_size, " strings");
    for (std::int32_t id = 0; id < tok.eot_id(); ++id) {
      MOTLEY_CHECK_KIND(kData,
                        vocab[id].is_string() &&
                            vocab[id].get<std::string>() == render_token(tok.token(id)),
                        source, ": vocab[", id, "] = ", vocab[id].dump(),
                        " does not match the merges (expected \"",
                        render_token(tok.token(id)), "\")");
    }
  }
  return tok;
}

Tokenizer Tokenizer::from_json(const std::string& json) {
  return parse_json(json, "tokenizer JSON");
}

void Tokenizer::save(const std::string& path) const {
  const std::string tmp = absl::StrCat(path, ".tmp");
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    MOTLEY_CHECK_KIND(kData, f.good(), "cannot write tokenizer file ", tmp);
    f << to_json();
    f.close();
    MOTLEY_CHECK_KIND(kData, !f.fail(), "writing tokenizer file ", tmp, " failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  MOTLEY_CHECK_KIND(kData, !ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  MOTLEY_CHECK_KIND(kData, std::filesystem::is_regular_file(path, ec), "tokenizer file ", path,
                    " does not exist or is not a regular file");
  std::ifstream f(path, std::ios::binary);
  MOTLEY_CHECK_KIND(kData, f.good(), "cannot open tokenizer file ", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_json(ss.str(), path);
}

}  // namespace motley
