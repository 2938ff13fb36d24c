// motley prepare: raw text -> tokenizer.json, train.h5, valid.h5 (SPEC
// sections 4 and 6).
//
// The train/valid split is by document, so no document straddles the two
// splits: document i goes to valid when philox_uniform(philox_key(seed,
// "data/split"), i) < valid_fraction. With few documents that can select
// none (or all); then the document with the smallest (largest) draw is
// moved, so each split holds at least one document. The tokenizer is
// trained on the train split only, so valid measures generalisation.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"
#include "apps/cli.h"
#include "apps/progress.h"
#include "apps/subcommands.h"
#include "core/check.h"
#include "core/philox.h"
#include "data/corpus.h"
#include "data/token_file.h"
#include "data/tokenizer.h"

namespace motley::apps {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::int64_t kDefaultVocabSize = 4096;
constexpr double kDefaultValidFraction = 0.05;
constexpr std::uint64_t kDefaultSeed = 1234;

struct PrepareOptions {
  std::vector<std::string> inputs;
  std::string out;
  std::int64_t vocab_size = 0;
  double valid_fraction = 0;
  std::uint64_t seed = 0;
};

// The options, or nullopt after --help.
std::optional<PrepareOptions> parse_flags(int argc, char** argv) {
  CommandLine cli("prepare",
                  "Read raw text, train a byte-level BPE tokenizer on the train split and write "
                  "DIR/tokenizer.json, DIR/train.h5 and DIR/valid.h5 (HDF5: a 1-D dataset "
                  "/tokens and a root attribute vocab_size; see docs/data.md).");
  cli.list("input", "FILE_OR_DIR",
           "text to read (required): repeat the flag, give a comma-separated list, or list "
           "several paths after one --input");
  cli.flag("out", "DIR", "output folder, created if missing (required)");
  cli.flag("vocab-size", "N",
           "tokenizer vocabulary: 256 bytes + merges + the end-of-text token, at least 257",
           std::to_string(kDefaultVocabSize));
  cli.flag("valid-fraction", "F",
           "share of documents held out for validation, strictly between 0 and 1; at least "
           "one document is held out and at least one kept for training",
           absl::StrCat(kDefaultValidFraction));
  cli.flag("seed", "S", "seed of the train/valid split", std::to_string(kDefaultSeed));
  cli.details(
      "Documents: a plain text file is one document; a .jsonl file holds one\n"
      "document per line in the string field \"text\"; a directory is read\n"
      "recursively, files in path order, skipping names that start with '.'.\n"
      "Each document is followed by the end-of-text token in the token files.\n"
      "\n"
      "Exit codes: 0 done, 2 usage error, 3 data error.\n");
  if (!cli.parse(argc, argv)) return std::nullopt;

  PrepareOptions opt;
  opt.inputs = cli.all("input");
  MOTLEY_CHECK_KIND(kUsage, !opt.inputs.empty(), "--input is required (see motley prepare --help)");
  opt.out = cli.get("out");
  opt.vocab_size = cli.get_int("vocab-size");
  MOTLEY_CHECK_KIND(kUsage,
                    opt.vocab_size >= 257 &&
                        opt.vocab_size <= std::numeric_limits<std::int32_t>::max(),
                    "--vocab-size must be in [257, 2^31 - 1] (256 bytes + merges + end-of-text), "
                    "got ", opt.vocab_size);
  opt.valid_fraction = cli.get_double("valid-fraction");
  MOTLEY_CHECK_KIND(kUsage, opt.valid_fraction > 0.0 && opt.valid_fraction < 1.0,
                    "--valid-fraction must be in (0, 1), got ", opt.valid_fraction);
  opt.seed = cli.get_uint64("seed");
  return opt;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct SplitStats {
  std::int64_t documents = 0;
  std::int64_t bytes = 0;
  std::int64_t tokens = 0;  // including one end-of-text per document
};

// Encodes the documents, each followed by eot, into one token stream.
std::vector<std::uint32_t> encode_split(const Tokenizer& tok,
                                        const std::vector<std::string>& docs,
                                        ProgressBar& bar, std::int64_t& bytes_done,
                                        SplitStats& stats) {
  std::vector<std::uint32_t> out;
  for (const std::string& doc : docs) {
    const std::vector<std::int32_t> ids = tok.encode(doc);
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(static_cast<std::uint32_t>(tok.eot_id()));
    bytes_done += static_cast<std::int64_t>(doc.size());
    bar.update(bytes_done);
    stats.documents += 1;
    stats.bytes += static_cast<std::int64_t>(doc.size());
  }
  stats.tokens = static_cast<std::int64_t>(out.size());
  return out;
}

double bytes_per_token(const SplitStats& s) {
  const std::int64_t text_tokens = s.tokens - s.documents;
  return text_tokens > 0 ? static_cast<double>(s.bytes) / static_cast<double>(text_tokens) : 0.0;
}

}  // namespace

int prepare_main(int argc, char** argv) {
  const std::optional<PrepareOptions> parsed = parse_flags(argc, argv);
  if (!parsed) return 0;
  const PrepareOptions& opt = *parsed;
  const auto t_start = Clock::now();

  // ---- read --------------------------------------------------------------------------
  auto t0 = Clock::now();
  std::vector<std::string> docs = read_documents(opt.inputs);
  std::int64_t total_bytes = 0;
  for (const std::string& d : docs) total_bytes += static_cast<std::int64_t>(d.size());
  std::printf("read %zu document%s, %lld bytes (%.2f MB) from %zu input%s in %.2f s\n",
              docs.size(), docs.size() == 1 ? "" : "s", static_cast<long long>(total_bytes),
              total_bytes / 1e6, opt.inputs.size(), opt.inputs.size() == 1 ? "" : "s",
              seconds_since(t0));
  MOTLEY_CHECK_KIND(kData, docs.size() >= 2, "the inputs hold one document; the train/valid "
                    "split needs at least 2. A plain text file is "
                    "one document: split the text into several files, or use JSONL with one "
                    "document per line");

  // ---- split -------------------------------------------------------------------------
  const PhiloxKey split_key = philox_key(opt.seed, "data/split");
  std::vector<double> draw(docs.size());
  std::vector<bool> is_valid(docs.size());
  std::size_t n_valid = 0;
  for (std::size_t i = 0; i < docs.size(); ++i) {
    draw[i] = philox_uniform(split_key, i);
    is_valid[i] = draw[i] < opt.valid_fraction;
    n_valid += is_valid[i];
  }
  if (n_valid == 0) {
    is_valid[std::min_element(draw.begin(), draw.end()) - draw.begin()] = true;
  } else if (n_valid == docs.size()) {
    is_valid[std::max_element(draw.begin(), draw.end()) - draw.begin()] = false;
  }
  std::vector<std::string> train_docs, valid_docs;
  for (std::size_t i = 0; i < docs.size(); ++i) {
    (is_valid[i] ? valid_docs : train_docs).push_back(std::move(docs[i]));
  }
  docs.clear();

  // ---- train the tokenizer --------------------------------------------------------
  t0 = Clock::now();
  Tokenizer tok;
  {
    ProgressBar bar("training tokenizer (merges)", opt.vocab_size - 257);
    tok = Tokenizer::train(train_docs, opt.vocab_size,
                           [&](std::int64_t done, std::int64_t) { bar.update(done); });
    bar.finish();
  }
  const double t_train = seconds_since(t0);
  std::printf("trained tokenizer: vocab_size %lld (256 bytes + %zu merges + end-of-text) in %.2f s\n",
              static_cast<long long>(tok.vocab_size()), tok.merges().size(), t_train);
  if (tok.vocab_size() < opt.vocab_size) {
    std::printf("note: the train split ran out of pairs to merge; vocab_size is %lld, not %lld\n",
                static_cast<long long>(tok.vocab_size()), static_cast<long long>(opt.vocab_size));
  }

  // ---- encode ------------------------------------------------------------------------
  t0 = Clock::now();
  SplitStats train_stats, valid_stats;
  std::vector<std::uint32_t> train_tokens, valid_tokens;
  {
    ProgressBar bar("encoding (bytes)", total_bytes);
    std::int64_t bytes_done = 0;
    train_tokens = encode_split(tok, train_docs, bar, bytes_done, train_stats);
    valid_tokens = encode_split(tok, valid_docs, bar, bytes_done, valid_stats);
    bar.finish();
  }
  const double t_encode = seconds_since(t0);

  // ---- write -------------------------------------------------------------------------
  t0 = Clock::now();
  std::error_code ec;
  std::filesystem::create_directories(opt.out, ec);
  MOTLEY_CHECK_KIND(kData, !ec && std::filesystem::is_directory(opt.out), "cannot create output "
                    "folder ", opt.out, ec ? ": " + ec.message() : std::string());
  const std::string tokenizer_path = (std::filesystem::path(opt.out) / "tokenizer.json").string();
  const std::string train_path = (std::filesystem::path(opt.out) / "train.h5").string();
  const std::string valid_path = (std::filesystem::path(opt.out) / "valid.h5").string();
  tok.save(tokenizer_path);
  write_token_file(train_path, train_tokens, tok.vocab_size());
  write_token_file(valid_path, valid_tokens, tok.vocab_size());
  // Read back through the same validation that training applies.
  const TokenFile train_check = TokenFile::open(train_path);
  const TokenFile valid_check = TokenFile::open(valid_path);
  MOTLEY_CHECK(train_check.size() == train_stats.tokens && valid_check.size() == valid_stats.tokens,
               "token files read back with a different length");
  const double t_write = seconds_since(t0);

  // ---- report ------------------------------------------------------------------------
  std::printf("encoded in %.2f s, wrote and verified in %.2f s\n", t_encode, t_write);
  std::printf("split (seed %llu, valid fraction %g):\n",
              static_cast<unsigned long long>(opt.seed), opt.valid_fraction);
  std::printf("  %-6s %10s %12s %12s %12s\n", "split", "documents", "bytes", "tokens",
              "bytes/token");
  for (const auto& [name, s] : {std::pair<const char*, const SplitStats&>{"train", train_stats},
                                std::pair<const char*, const SplitStats&>{"valid", valid_stats}}) {
    std::printf("  %-6s %10lld %12lld %12lld %12.3f\n", name, static_cast<long long>(s.documents),
                static_cast<long long>(s.bytes), static_cast<long long>(s.tokens),
                bytes_per_token(s));
  }
  std::printf("  (tokens include one end-of-text per document; bytes/token excludes them)\n");
  std::printf("wrote %s, %s, %s\n", tokenizer_path.c_str(), train_path.c_str(),
              valid_path.c_str());
  std::printf("total %.2f s\n", seconds_since(t_start));
  return 0;
}

}  // namespace motley::apps
