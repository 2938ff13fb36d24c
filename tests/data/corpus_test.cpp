#include "data/corpus.h"

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/data/data_test_util.h"

namespace motley {
namespace {

using testing::expect_error;
using testing::TempDir;
using testing::write_text;

TEST(Corpus, ReadsFilesDirectoriesAndJsonlInPathOrder) {
  TempDir dir;
  write_text(dir.file("corpus/b.txt"), "second file\n\nwith a blank line\n");
  write_text(dir.file("corpus/a.txt"), "first file");
  write_text(dir.file("corpus/sub/c.jsonl"),
             "{\"text\": \"json one\", \"id\": 1}\n"
             "\n"
             "{\"text\": \"json two \\u00e9\\n\"}\r\n"
             "{\"text\": \"\"}\n");
  write_text(dir.file("corpus/empty.txt"), "");
  write_text(dir.file("corpus/.hidden"), "skipped");
  write_text(dir.file("corpus/.git/config"), "skipped too");
  write_text(dir.file("single.txt"), "a lone file");

  const std::vector<std::string> docs =
      read_documents({dir.file("corpus"), dir.file("single.txt")});
  EXPECT_EQ(docs, (std::vector<std::string>{"first file", "second file\n\nwith a blank line\n",
                                            "json one", "json two \xC3\xA9\n", "a lone file"}));
  // Inputs are read in the order given.
  EXPECT_EQ(read_documents({dir.file("single.txt"), dir.file("corpus/a.txt")}),
            (std::vector<std::string>{"a lone file", "first file"}));
}

TEST(Corpus, KeepsBytesAsTheyAre) {
  TempDir dir;
  const char kRaw[] = "nul\0 and \xff\xfe invalid utf-8\r\n";
  const std::string raw(kRaw, sizeof(kRaw) - 1);
  write_text(dir.file("raw.bin"), raw);
  EXPECT_EQ(read_documents({dir.file("raw.bin")}), std::vector<std::string>{raw});
}

TEST(Corpus, BadJsonlLinesNameFileAndLine) {
  TempDir dir;
  const std::string path = dir.file("bad.jsonl");
  write_text(path, "{\"text\": \"ok\"}\n\n{\"text\": \"broken\n");
  expect_error([&] { read_documents({path}); }, ErrorKind::kData, {path + ":3", "not valid JSON"});
  write_text(path, "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  expect_error([&] { read_documents({path}); }, ErrorKind::kData, {path + ":2", "no field \"text\""});
  write_text(path, "{\"text\": 5}\n");
  expect_error([&] { read_documents({path}); }, ErrorKind::kData,
               {path + ":1", "must be a string"});
  write_text(path, "[\"text\"]\n");
  expect_error([&] { read_documents({path}); }, ErrorKind::kData,
               {path + ":1", "expected a JSON object"});
}

TEST(Corpus, MissingOrEmptyInputsAreDataErrors) {
  TempDir dir;
  expect_error([&] { read_documents({dir.file("nope")}); }, ErrorKind::kData,
               {dir.file("nope"), "does not exist"});
  write_text(dir.file("empty/e.txt"), "");
  // The message names the inputs (it used to say only "no documents").
  expect_error([&] { read_documents({dir.file("empty")}); }, ErrorKind::kData,
               {"no documents", dir.file("empty")});
}

}  // namespace
}  // namespace motley
