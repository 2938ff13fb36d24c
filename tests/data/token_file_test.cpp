#include "data/token_file.h"

#include <hdf5.h>

#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/data/data_test_util.h"

namespace motley {
namespace {

using testing::expect_error;
using testing::TempDir;

// Writes a file the way a user's script might: `values` (as int64 in
// memory) stored with file type `file_type` and shape `dims`, plus an int64
// root attribute vocab_size unless vocab < 0.
void write_raw(const std::string& path, const std::vector<std::int64_t>& values,
               std::vector<hsize_t> dims, hid_t file_type, std::int64_t vocab,
               const char* name = "tokens") {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  const hid_t space = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  const hid_t dset = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT,
                                H5P_DEFAULT);
  ASSERT_GE(dset, 0);
  ASSERT_GE(H5Dwrite(dset, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), 0);
  if (vocab >= 0) {
    const hid_t scalar = H5Screate(H5S_SCALAR);
    const hid_t attr = H5Acreate2(file, "vocab_size", H5T_STD_I64LE, scalar, H5P_DEFAULT,
                                  H5P_DEFAULT);
    ASSERT_GE(H5Awrite(attr, H5T_NATIVE_INT64, &vocab), 0);
    H5Aclose(attr);
    H5Sclose(scalar);
  }
  H5Dclose(dset);
  H5Sclose(space);
  H5Fclose(file);
}

// Size in bytes of /tokens' element type as stored in path.
std::size_t stored_width(const std::string& path) {
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t dset = H5Dopen2(file, "tokens", H5P_DEFAULT);
  const hid_t type = H5Dget_type(dset);
  const std::size_t width = H5Tget_size(type);
  const bool is_unsigned = H5Tget_sign(type) == H5T_SGN_NONE;
  H5Tclose(type);
  H5Dclose(dset);
  H5Fclose(file);
  return is_unsigned ? width : 0;
}

std::vector<std::int64_t> read_all(const TokenFile& f) {
  std::vector<std::int64_t> out(f.size());
  f.read(0, f.size(), out.data());
  return out;
}

TEST(TokenFile, RoundTripUint16) {
  TempDir dir;
  std::vector<std::uint32_t> tokens(70000);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = (i * 7919) % 4096;
  write_token_file(dir.file("t.h5"), tokens, 4096);
  EXPECT_EQ(stored_width(dir.file("t.h5")), 2u);
  const TokenFile f = TokenFile::open(dir.file("t.h5"));
  EXPECT_EQ(f.size(), 70000);
  EXPECT_EQ(f.vocab_size(), 4096);
  EXPECT_EQ(f.path(), dir.file("t.h5"));
  const std::vector<std::int64_t> all = read_all(f);
  for (std::size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ(all[i], tokens[i]);
  std::int64_t window[3];
  f.read(69997, 3, window);
  EXPECT_EQ(window[2], tokens[69999]);
  // Only the final name is left behind.
  std::size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1u);
}

TEST(TokenFile, RoundTripUint32AboveUint16Range) {
  TempDir dir;
  const std::vector<std::uint32_t> tokens = {0, 65535, 65536, 99999, 12, 99999};
  write_token_file(dir.file("t.h5"), tokens, 100000);
  EXPECT_EQ(stored_width(dir.file("t.h5")), 4u);
  const TokenFile f = TokenFile::open(dir.file("t.h5"));
  EXPECT_EQ(f.vocab_size(), 100000);
  EXPECT_EQ(read_all(f), (std::vector<std::int64_t>{0, 65535, 65536, 99999, 12, 99999}));
  // vocab_size 65536 still fits uint16.
  write_token_file(dir.file("u.h5"), {0, 65535}, 65536);
  EXPECT_EQ(stored_width(dir.file("u.h5")), 2u);
  EXPECT_EQ(read_all(TokenFile::open(dir.file("u.h5"))), (std::vector<std::int64_t>{0, 65535}));
}

TEST(TokenFile, OverwritesAnExistingFile) {
  TempDir dir;
  write_token_file(dir.file("t.h5"), {1, 2, 3}, 10);
  write_token_file(dir.file("t.h5"), {4, 5}, 10);
  EXPECT_EQ(read_all(TokenFile::open(dir.file("t.h5"))), (std::vector<std::int64_t>{4, 5}));
}

TEST(TokenFile, AcceptsOtherIntegerTypes) {
  TempDir dir;
  const std::vector<std::int64_t> values = {3, 0, 7, 1};
  for (hid_t type : {H5T_STD_I64LE, H5T_STD_I32LE, H5T_STD_U8LE, H5T_STD_U64BE, H5T_STD_I16BE}) {
    write_raw(dir.file("x.h5"), values, {4}, type, 8);
    EXPECT_EQ(read_all(TokenFile::open(dir.file("x.h5"))), values);
  }
}

TEST(TokenFile, WriteRejectsBadIds) {
  TempDir dir;
  expect_error([&] { write_token_file(dir.file("t.h5"), {1, 2, 10}, 10); }, ErrorKind::kData,
               {"token id 10 >= vocab_size 10", "offset 2"});
  expect_error([&] { write_token_file(dir.file("t.h5"), {}, 10); }, ErrorKind::kData,
               {"no tokens"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("t.h5")));
}

TEST(TokenFile, OpenErrorsAreDataErrorsNamingThePath) {
  TempDir dir;
  const std::string missing = dir.file("missing.h5");
  expect_error([&] { TokenFile::open(missing); }, ErrorKind::kData, {missing, "does not exist"});

  const std::string text = dir.file("text.h5");
  testing::write_text(text, "this is not HDF5\n");
  expect_error([&] { TokenFile::open(text); }, ErrorKind::kData, {text, "not an HDF5 file"});

  expect_error([&] { TokenFile::open(dir.path().string()); }, ErrorKind::kData,
               {"not a regular file"});

  const std::string no_tokens = dir.file("no_tokens.h5");
  write_raw(no_tokens, {1, 2}, {2}, H5T_STD_U16LE, 8, "ids");
  expect_error([&] { TokenFile::open(no_tokens); }, ErrorKind::kData,
               {no_tokens, "missing dataset /tokens"});

  const std::string two_d = dir.file("two_d.h5");
  write_raw(two_d, {1, 2, 3, 4, 5, 6}, {2, 3}, H5T_STD_U16LE, 8);
  expect_error([&] { TokenFile::open(two_d); }, ErrorKind::kData,
               {two_d, "2 dimensions", "(2, 3)", "expected a 1-D dataset"});

  const std::string floats = dir.file("floats.h5");
  write_raw(floats, {1, 2}, {2}, H5T_IEEE_F32LE, 8);
  expect_error([&] { TokenFile::open(floats); }, ErrorKind::kData,
               {floats, "floating point", "expected an integer type"});

  const std::string no_vocab = dir.file("no_vocab.h5");
  write_raw(no_vocab, {1, 2}, {2}, H5T_STD_U16LE, -1);
  expect_error([&] { TokenFile::open(no_vocab); }, ErrorKind::kData,
               {no_vocab, "missing root attribute vocab_size"});

  const std::string zero_vocab = dir.file("zero_vocab.h5");
  write_raw(zero_vocab, {0}, {1}, H5T_STD_U16LE, 0);
  expect_error([&] { TokenFile::open(zero_vocab); }, ErrorKind::kData,
               {zero_vocab, "vocab_size = 0"});

  const std::string empty = dir.file("empty.h5");
  write_raw(empty, {}, {0}, H5T_STD_U16LE, 8);
  expect_error([&] { TokenFile::open(empty); }, ErrorKind::kData, {empty, "empty"});
}

TEST(TokenFile, OpenNamesTheOffsetOfTheFirstBadId) {
  TempDir dir;
  // Past the first read block, to check offsets are global.
  std::vector<std::int64_t> values((1 << 20) + 10, 3);
  values[(1 << 20) + 5] = 9;
  values[(1 << 20) + 7] = 100;
  const std::string path = dir.file("bad.h5");
  write_raw(path, values, {values.size()}, H5T_STD_U16LE, 8);
  expect_error([&] { TokenFile::open(path); }, ErrorKind::kData,
               {"token id 9 >= vocab_size 8 at offset 1048581 in ", path});

  const std::string negative = dir.file("negative.h5");
  write_raw(negative, {1, 2, -4}, {3}, H5T_STD_I64LE, 8);
  expect_error([&] { TokenFile::open(negative); }, ErrorKind::kData,
               {"token id -4 is negative at offset 2 in ", negative});
}

TEST(TokenFile, ReadOutsideTheFileIsADataError) {
  TempDir dir;
  write_token_file(dir.file("t.h5"), {1, 2, 3}, 10);
  const TokenFile f = TokenFile::open(dir.file("t.h5"));
  std::int64_t out[4];
  expect_error([&] { f.read(1, 3, out); }, ErrorKind::kData, {"[1, 4)", dir.file("t.h5")});
  expect_error([&] { f.read(-1, 1, out); }, ErrorKind::kData, {"outside"});
  f.read(3, 0, out);  // an empty range at the end is fine
}

// A file written by h5py, as a user would (SPEC section 4). Uses Debian's
// python3 (scripts/setup.sh installs python3-h5py for it), else the first
// python3 on PATH; skipped when neither has h5py and numpy.
TEST(TokenFile, ReadsAFileWrittenWithH5py) {
  std::string python;
  for (const char* candidate : {"/usr/bin/python3", "python3"}) {
    const std::string probe =
        std::string(candidate) + " -c 'import h5py, numpy' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) {
      python = candidate;
      break;
    }
  }
  if (python.empty()) GTEST_SKIP() << "no python3 with h5py and numpy";
  TempDir dir;
  const std::string path = dir.file("user.h5");
  const std::string cmd =
      python + " -c 'import sys, h5py, numpy as np\n"
      "with h5py.File(sys.argv[1], \"w\") as f:\n"
      "    f.create_dataset(\"tokens\", data=np.arange(1000) % 50)\n"  // numpy's default int64
      "    f.attrs[\"vocab_size\"] = 50\n' '" +
      path + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const TokenFile f = TokenFile::open(path);
  EXPECT_EQ(f.size(), 1000);
  EXPECT_EQ(f.vocab_size(), 50);
  const std::vector<std::int64_t> all = read_all(f);
  for (std::int64_t i = 0; i < 1000; ++i) ASSERT_EQ(all[i], i % 50);
}

}  // namespace
}  // namespace motley
