// Corpus reading: directory walks are sorted explicitly because
// std::filesystem iterates in whatever order the file system returns.
#include "data/corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "core/check.h"
#include "nlohmann/json.hpp"

namespace motley {
namespace {

namespace fs = std::filesystem;

bool is_hidden(const fs::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOTLEY_CHECK_KIND(kData, f.good(), "cannot open input file ", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  MOTLEY_CHECK_KIND(kData, !f.bad(), "cannot read input file ", path);
  return ss.str();
}

void read_jsonl(const std::string& path, std::vector<std::string>& docs) {
  const std::string content = read_file(path);
  std::size_t line_no = 0;
  std::size_t pos = 0;
  while (pos < content.size()) {
    std::size_t end = content.find('\n', pos);
    if (end == std::string::npos) end = content.size();
    const std::string_view line(content.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      MOTLEY_FAIL(kData, path, ":", line_no, ": not valid JSON: ", e.what());
    }
    MOTLEY_CHECK_KIND(kData, j.is_object(), path, ":", line_no,
                      ": expected a JSON object with a string field \"text\"");
    auto it = j.find("text");
    MOTLEY_CHECK_KIND(kData, it != j.end(), path, ":", line_no, ": no field \"text\"");
    MOTLEY_CHECK_KIND(kData, it->is_string(), path, ":", line_no,
                      ": field \"text\" must be a string, got ", it->type_name());
    std::string text = it->get<std::string>();
    if (!text.empty()) docs.push_back(std::move(text));
  }
}

void read_file_documents(const std::string& path, std::vector<std::string>& docs) {
  if (absl::EndsWith(path, ".jsonl")) {
    read_jsonl(path, docs);
    return;
  }
  std::string text = read_file(path);
  if (!text.empty()) docs.push_back(std::move(text));
}

}  // namespace

std::vector<std::string> read_documents(const std::vector<std::string>& inputs) {
  std::vector<std::string> docs;
  for (const std::string& input : inputs) {
    std::error_code ec;
    const fs::file_status status = fs::status(input, ec);
    MOTLEY_CHECK_KIND(kData, fs::exists(status), "input ", input, " does not exist");
    if (fs::is_directory(status)) {
      std::vector<std::string> files;
      fs::recursive_directory_iterator it(input, fs::directory_options::follow_directory_symlink,
                                          ec);
      MOTLEY_CHECK_KIND(kData, !ec, "cannot list input directory ", input, ": ", ec.message());
      for (const fs::recursive_directory_iterator end; it != end; it.increment(ec)) {
        MOTLEY_CHECK_KIND(kData, !ec, "cannot list input directory ", input, ": ",
                          ec.message());
        if (is_hidden(it->path())) {
          if (it->is_directory(ec)) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file(ec)) files.push_back(it->path().string());
      }
      MOTLEY_CHECK_KIND(kData, !ec, "cannot list input directory ", input, ": ", ec.message());
      std::sort(files.begin(), files.end());
      for (const std::string& f : files) read_file_documents(f, docs);
    } else {
      read_file_documents(input, docs);
    }
  }
  MOTLEY_CHECK_KIND(kData, !docs.empty(), "no documents found in ", absl::StrJoin(inputs, ", "),
                    " (empty files and hidden files are skipped; a folder is read with its "
                    "subfolders)");
  return docs;
}

}  // namespace motley
