#include "data/tokenizer.h"

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/data/data_test_util.h"

namespace motley {
namespace {

using testing::expect_error;
using testing::TempDir;
using Merges = std::vector<std::pair<std::int32_t, std::int32_t>>;

std::vector<std::string> chunks_of(std::string_view text) {
  std::vector<std::string_view> views;
  split_chunks(text, views);
  return {views.begin(), views.end()};
}

// A few KB of English-like text with repeated words, digits, punctuation
// and some UTF-8.
std::vector<std::string> sample_documents() {
  const std::vector<std::string> words = {
      "the", "jury", "said", "it", "did", "find", "that", "many", "of", "Georgia's",
      "registration", "and", "election", "laws", "are", "outmoded", "or", "inadequate",
      "1961", "42", "café", "naïve", "Zürich", "don't", "we'll", "(see", "below)", "--"};
  std::mt19937 rng(3);
  std::vector<std::string> docs;
  for (int d = 0; d < 6; ++d) {
    std::string doc;
    for (int i = 0; i < 250; ++i) {
      doc += words[rng() % words.size()];
      const int r = rng() % 20;
      doc += r == 0 ? ".\n\n" : r == 1 ? ", " : r == 2 ? "  " : " ";
    }
    docs.push_back(doc);
  }
  return docs;
}

// The textbook trainer: recount every pair of every word before each merge.
Merges naive_train(const std::vector<std::string>& docs, std::int64_t n_merges) {
  std::map<std::string, std::int64_t> counts;
  for (const std::string& d : docs) {
    for (const std::string& c : chunks_of(d)) ++counts[c];
  }
  std::vector<std::pair<std::vector<std::int32_t>, std::int64_t>> words;
  for (const auto& [w, c] : counts) {
    std::vector<std::int32_t> s;
    for (unsigned char ch : w) s.push_back(ch);
    words.emplace_back(s, c);
  }
  Merges merges;
  for (std::int64_t m = 0; m < n_merges; ++m) {
    std::map<std::pair<std::int32_t, std::int32_t>, std::int64_t> pairs;
    for (const auto& [s, c] : words) {
      for (std::size_t k = 0; k + 1 < s.size(); ++k) pairs[{s[k], s[k + 1]}] += c;
    }
    if (pairs.empty()) break;
    auto best = pairs.begin();  // map order: ties go to the lowest pair
    for (auto it = pairs.begin(); it != pairs.end(); ++it) {
      if (it->second > best->second) best = it;
    }
    const auto [a, b] = best->first;
    const std::int32_t id = 256 + static_cast<std::int32_t>(merges.size());
    merges.push_back(best->first);
    for (auto& [s, c] : words) {
      std::vector<std::int32_t> t;
      for (std::size_t k = 0; k < s.size();) {
        if (k + 1 < s.size() && s[k] == a && s[k + 1] == b) {
          t.push_back(id);
          k += 2;
        } else {
          t.push_back(s[k++]);
        }
      }
      s = t;
    }
  }
  return merges;
}

// Encoding by definition: every merge in rank order over each chunk.
std::vector<std::int32_t> naive_encode(const Merges& merges, std::string_view text) {
  std::vector<std::int32_t> out;
  for (const std::string& c : chunks_of(text)) {
    std::vector<std::int32_t> s;
    for (unsigned char ch : c) s.push_back(ch);
    for (std::size_t r = 0; r < merges.size(); ++r) {
      std::vector<std::int32_t> t;
      for (std::size_t k = 0; k < s.size();) {
        if (k + 1 < s.size() && s[k] == merges[r].first && s[k + 1] == merges[r].second) {
          t.push_back(256 + static_cast<std::int32_t>(r));
          k += 2;
        } else {
          t.push_back(s[k++]);
        }
      }
      s = t;
    }
    out.insert(out.end(), s.begin(), s.end());
  }
  return out;
}

std::string random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

TEST(Chunks, SplitsLikeGpt2) {
  EXPECT_EQ(chunks_of("I'm here, it's 42!\n\nOK  x"),
            (std::vector<std::string>{"I", "'m", " here", ",", " it", "'s", " 42", "!", "\n\n",
                                      "OK", " ", " x"}));
  EXPECT_EQ(chunks_of("  hello world  "),
            (std::vector<std::string>{" ", " hello", " world", "  "}));
  EXPECT_EQ(chunks_of("we'll they're I've he'd 'quote'"),
            (std::vector<std::string>{"we", "'ll", " they", "'re", " I", "'ve", " he", "'d", " '",
                                      "quote", "'"}));
  // UTF-8 stays with letters; digits and punctuation runs are separate.
  EXPECT_EQ(chunks_of("café3.14...x\tz"),
            (std::vector<std::string>{"café", "3", ".", "14", "...", "x", "\t", "z"}));
  EXPECT_TRUE(chunks_of("").empty());
}

TEST(Chunks, ConcatenationIsTheInput) {
  for (std::uint32_t seed = 0; seed < 20; ++seed) {
    const std::string s = random_bytes(1000, seed);
    std::string joined;
    for (const std::string& c : chunks_of(s)) {
      ASSERT_FALSE(c.empty());
      joined += c;
    }
    EXPECT_EQ(joined, s);
  }
}

TEST(Tokenizer, UntrainedIsBytesPlusEot) {
  const Tokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 257);
  EXPECT_EQ(tok.eot_id(), 256);
  EXPECT_EQ(tok.encode("hi"), (std::vector<std::int32_t>{'h', 'i'}));
  EXPECT_EQ(tok.token_bytes(tok.eot_id()), 0);
  EXPECT_EQ(tok.token_bytes(65), 1);
}

// "cd ab" has the chunks "cd" and " ab"; every pair occurs once, so ties go
// to the lowest pair: (' ', 'a') = (32, 97) first, then ('c', 'd') =
// (99, 100), then the pair the first merge created, (256, 'b').
TEST(Tokenizer, LearnsHandDerivedMergesWithTieBreaks) {
  const Tokenizer tok = Tokenizer::train({"cd ab"}, 300);
  EXPECT_EQ(tok.merges(), (Merges{{32, 97}, {99, 100}, {256, 98}}));
  EXPECT_EQ(tok.vocab_size(), 256 + 3 + 1);  // ran out of pairs before 300
  EXPECT_EQ(tok.eot_id(), 259);
  EXPECT_EQ(tok.token(258), " ab");
  EXPECT_EQ(tok.encode("cd ab"), (std::vector<std::int32_t>{257, 258}));
}

// "ab ab ab": the pair (a, b) occurs 3 times, (' ', a) twice: (a, b) first.
// "aaaa" counts (a, a) three times (overlapping) but merges it twice.
TEST(Tokenizer, MergesMostFrequentFirst) {
  EXPECT_EQ(Tokenizer::train({"ab ab ab"}, 1000).merges(), (Merges{{97, 98}, {32, 256}}));
  const Tokenizer aa = Tokenizer::train({"aaaa"}, 1000);
  EXPECT_EQ(aa.merges(), (Merges{{97, 97}, {256, 256}}));
  EXPECT_EQ(aa.encode("aaaaa"), (std::vector<std::int32_t>{257, 97}));
  EXPECT_EQ(aa.encode("aaa"), (std::vector<std::int32_t>{256, 97}));
  // Merges never cross chunks: "a a" has no (a, a) pair to merge.
  EXPECT_EQ(aa.encode("a a"), (std::vector<std::int32_t>{97, 32, 97}));
}

TEST(Tokenizer, RespectsVocabSize) {
  const std::vector<std::string> docs = sample_documents();
  for (std::int64_t v : {257, 258, 300, 380}) {
    const Tokenizer tok = Tokenizer::train(docs, v);
    EXPECT_EQ(tok.vocab_size(), v);
    EXPECT_EQ(tok.eot_id(), v - 1);
    for (const std::string& d : docs) {
      for (std::int32_t id : tok.encode(d)) {
        ASSERT_GE(id, 0);
        ASSERT_LT(id, tok.eot_id());  // encode never emits eot
      }
    }
  }
  expect_error([&] { Tokenizer::train(docs, 256); }, ErrorKind::kUsage, {"vocab_size", "256"});
}

TEST(Tokenizer, MatchesNaiveTrainerAndEncoder) {
  const std::vector<std::string> docs = sample_documents();
  const Tokenizer tok = Tokenizer::train(docs, 257 + 300);
  const Merges reference = naive_train(docs, 300);
  ASSERT_EQ(tok.merges().size(), reference.size());
  for (std::size_t r = 0; r < reference.size(); ++r) {
    ASSERT_EQ(tok.merges()[r], reference[r]) << "merge " << r;
  }
  for (const std::string& d : docs) EXPECT_EQ(tok.encode(d), naive_encode(reference, d));
  const std::string noise = random_bytes(3000, 11);
  EXPECT_EQ(tok.encode(noise), naive_encode(reference, noise));
}

// Runs of two letters give many overlapping and adjacent occurrences of
// the same pair ("aaaa", "abab"), the cases incremental updates get wrong.
TEST(Tokenizer, MatchesNaiveTrainerOnRepetitiveText) {
  std::mt19937 rng(17);
  std::vector<std::string> docs(4);
  for (std::string& d : docs) {
    for (int w = 0; w < 400; ++w) {
      const int len = 1 + rng() % 24;
      for (int k = 0; k < len; ++k) d += (rng() % 3 == 0) ? 'b' : 'a';
      d += (rng() % 5 == 0) ? "  " : " ";
    }
  }
  const Tokenizer tok = Tokenizer::train(docs, 257 + 200);
  const Merges reference = naive_train(docs, 200);
  EXPECT_EQ(tok.merges(), reference);
  for (const std::string& d : docs) EXPECT_EQ(tok.encode(d), naive_encode(reference, d));
}

TEST(Tokenizer, TrainingIsDeterministic) {
  const std::vector<std::string> docs = sample_documents();
  std::vector<std::pair<std::int64_t, std::int64_t>> calls;
  const Tokenizer a = Tokenizer::train(docs, 700, [&](std::int64_t done, std::int64_t total) {
    calls.emplace_back(done, total);
  });
  const Tokenizer b = Tokenizer::train(docs, 700);
  EXPECT_EQ(a.merges(), b.merges());
  EXPECT_EQ(a.to_json(), b.to_json());
  ASSERT_FALSE(calls.empty());
  EXPECT_EQ(calls.front(), (std::pair<std::int64_t, std::int64_t>{0, 700 - 257}));
  EXPECT_EQ(calls.back().second, 700 - 257);
  EXPECT_EQ(calls.back().first, a.vocab_size() - 257);
}

TEST(Tokenizer, RoundTripsAsciiUtf8AndRandomBytes) {
  std::vector<std::string> docs = sample_documents();
  docs.push_back(random_bytes(5000, 1));
  const Tokenizer tok = Tokenizer::train(docs, 600);
  std::vector<std::string> cases = {
      "",
      "The Fulton County Grand Jury said Friday an investigation",
      "  leading and trailing spaces \t\n\r\n  ",
      "Grüße, 東京, Ελληνικά, emoji 🙂, combining e\u0301",
      std::string("nul\0byte\0\0", 10),
      "\xff\xfe\x80\xc3(invalid utf-8 \xe2\x82",
      "<|endoftext|> is just text here",
      std::string(100000, ' '),  // one long chunk
      std::string(5000, 'a') + std::string(5000, '.'),
  };
  for (std::uint32_t seed = 0; seed < 10; ++seed) cases.push_back(random_bytes(4096, 100 + seed));
  for (const std::string& s : cases) {
    const std::vector<std::int32_t> ids = tok.encode(s);
    EXPECT_EQ(tok.decode(ids), s);
    std::int64_t bytes = 0;
    for (std::int32_t id : ids) bytes += tok.token_bytes(id);
    EXPECT_EQ(bytes, static_cast<std::int64_t>(s.size()));
  }
  // The eot token decodes to nothing.
  std::vector<std::int32_t> ids = tok.encode("ab");
  ids.push_back(tok.eot_id());
  EXPECT_EQ(tok.decode(ids), "ab");
  // Encoding compresses text it was trained on.
  EXPECT_LT(tok.encode(docs[0]).size(), docs[0].size() / 2);
}

TEST(Tokenizer, CopiesEncodeTheSame) {
  const Tokenizer tok = Tokenizer::train(sample_documents(), 400);
  const std::string text = "the jury said it did find that 1961";
  const std::vector<std::int32_t> ids = tok.encode(text);
  Tokenizer copy = tok;
  EXPECT_EQ(copy.encode(text), ids);
  Tokenizer assigned;
  assigned = copy;
  EXPECT_EQ(assigned.encode(text), ids);
  Tokenizer moved = std::move(copy);
  EXPECT_EQ(moved.encode(text), ids);
}

TEST(Tokenizer, DecodeRejectsOutOfRangeIds) {
  const Tokenizer tok = Tokenizer::train({"ab ab"}, 260);
  expect_error([&] { tok.decode({97, static_cast<std::int32_t>(tok.vocab_size())}); }, ErrorKind::kData,
               {"token id 259", "vocab_size 259"});
  expect_error([&] { tok.decode({-1}); }, ErrorKind::kData, {"token id -1"});
  expect_error([&] { tok.token_bytes(100000); }, ErrorKind::kData, {"100000"});
}

TEST(TokenizerJson, RoundTripGivesIdenticalEncodings) {
  std::vector<std::string> docs = sample_documents();
  docs.push_back(random_bytes(2000, 5));
  const Tokenizer tok = Tokenizer::train(docs, 500);
  const std::string json = tok.to_json();
  const Tokenizer back = Tokenizer::from_json(json);
  EXPECT_EQ(back.merges(), tok.merges());
  EXPECT_EQ(back.vocab_size(), tok.vocab_size());
  EXPECT_EQ(back.to_json(), json);
  for (const std::string& d : docs) EXPECT_EQ(back.encode(d), tok.encode(d));

  TempDir dir;
  tok.save(dir.file("tok.json"));
  const Tokenizer loaded = Tokenizer::load(dir.file("tok.json"));
  EXPECT_EQ(loaded.merges(), tok.merges());
  EXPECT_FALSE(std::filesystem::exists(dir.file("tok.json.tmp")));
}

TEST(TokenizerJson, DocumentsItsFields) {
  const Tokenizer tok = Tokenizer::train({"ab ab ab"}, 1000);
  const std::string json = tok.to_json();
  for (const char* part : {"\"format\": \"motley-bpe\"", "\"version\": 1", "\"vocab_size\": 259",
                           "\"eot\": 258", "[97,98]", "[32,256]", "\"\xC4\xA0" "ab\"",
                           "\"<|endoftext|>\""}) {
    EXPECT_NE(json.find(part), std::string::npos) << part << " not in\n" << json;
  }
}

TEST(TokenizerJson, MalformedInputIsADataError) {
  const std::string good = Tokenizer::train({"ab ab ab"}, 1000).to_json();
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const std::size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return s.replace(at, from.size(), to);
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{not json", "not valid JSON"},
      {"[1, 2]", "expected a JSON object"},
      {replaced("\"motley-bpe\"", "\"gpt2\""), "format"},
      {replaced("\"version\": 1", "\"version\": 7"), "unsupported version 7"},
      {replaced("\"vocab_size\": 259", "\"vocab_size\": 300"), "vocab_size 300"},
      {replaced("\"vocab_size\": 259", "\"vocab_size\": \"x\""),
       "\"vocab_size\" must be an integer"},
      {replaced("\"eot\": 258", "\"eot\": 3"), "eot must be the last id"},
      {replaced("[32,256]", "[32,257]"), "merges[1]"},
      {replaced("[32,256]", "[32]"), "merges[1] must be a pair"},
      {replaced("\"merges\"", "\"merged\""), "missing field \"merges\""},
      {replaced("\"\xC4\xA0"
                "ab\"",
                "\"xyz\""),
       "vocab[257]"},
      // 60,000 levels used to overflow the stack; refused before parsing.
      {replaced("[32,256]", std::string(60000, '[') + std::string(60000, ']')), "nested more than"},
  };
  for (const auto& [text, expected] : cases) {
    expect_error([&] { Tokenizer::from_json(text); }, ErrorKind::kData,
                 {"tokenizer JSON", expected});
  }
}

TEST(TokenizerJson, LoadNamesThePath) {
  TempDir dir;
  expect_error([&] { Tokenizer::load(dir.file("missing.json")); }, ErrorKind::kData,
               {dir.file("missing.json"), "does not exist"});
  testing::write_text(dir.file("bad.json"), "{\"format\": \"motley-bpe\"");
  expect_error([&] { Tokenizer::load(dir.file("bad.json")); }, ErrorKind::kData,
               {dir.file("bad.json"), "not valid JSON"});
}

}  // namespace
}  // namespace motley
