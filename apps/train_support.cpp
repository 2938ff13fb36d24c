#include "apps/train_support.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "core/check.h"

namespace motley::apps {
namespace fs = std::filesystem;

std::optional<Tokenizer> find_tokenizer(const std::string& path, const std::string& token_file) {
  if (!path.empty()) return Tokenizer::load(path);
  if (token_file.empty()) return std::nullopt;
  const fs::path beside = fs::path(token_file).parent_path() / "tokenizer.json";
  if (fs::exists(beside)) return Tokenizer::load(beside.string());
  return std::nullopt;
}

TrainData open_train_data(const Config& config) {
  MOTLEY_CHECK_KIND(kUsage, !config.data.train.empty(),
                    "config key 'data.train' is empty: set it to a token file written by "
                    "motley prepare (e.g. --set data.train=data-cache/brown/train.h5)");
  TrainData data;
  data.train = TokenFile::open(config.data.train);
  if (!config.data.valid.empty()) data.valid = TokenFile::open(config.data.valid);
  data.tokenizer = find_tokenizer(config.data.tokenizer, config.data.train);
  const std::int64_t need = config.train.seq_len + 2;
  MOTLEY_CHECK_KIND(kData, data.train->size() >= need, config.data.train, " holds ",
                    data.train->size(), " tokens; train.seq_len = ", config.train.seq_len,
                    " needs at least ", need);
  return data;
}

void check_vocab(const Config& config, const TrainData& data) {
  for (const auto* file : {&data.train, &data.valid}) {
    if (!*file) continue;
    MOTLEY_CHECK_KIND(kUsage, (*file)->vocab_size() <= config.model.vocab_size, (*file)->path(),
                      " has vocab_size ", (*file)->vocab_size(),
                      ", larger than model.vocab_size = ", config.model.vocab_size,
                      ": raise model.vocab_size (e.g. --set model.vocab_size=",
                      (*file)->vocab_size(), ")");
  }
}

MetricsLog::MetricsLog(const std::string& path, std::int64_t resume_step) : path_(path) {
  std::vector<std::string> kept;
  {
    std::ifstream in(path);
    std::string line;
    std::int64_t number = 0;
    while (std::getline(in, line)) {
      ++number;
      // A torn last line (a crash mid-write) or a row that is not ours is
      // dropped, with a warning for anything but an empty line.
      const bool sane = json_nesting_depth(line) <= kMaxJsonDepth;
      const auto row = sane ? nlohmann::json::parse(line, nullptr, false)
                            : nlohmann::json(nlohmann::json::value_t::discarded);
      if (row.is_object() && row.contains("step") && row["step"].is_number_integer()) {
        if (row["step"].get<std::int64_t>() <= resume_step) kept.push_back(line);
        continue;
      }
      if (!line.empty()) {
        std::fprintf(stderr,
                     "warning: %s line %lld is not a metrics row with an integer \"step\"; "
                     "dropped\n",
                     path.c_str(), static_cast<long long>(number));
      }
    }
  }
  std::ofstream out(path, std::ios::trunc);
  for (const std::string& line : kept) out << line << "\n";
}

void MetricsLog::append(const nlohmann::ordered_json& row) {
  std::ofstream out(path_, std::ios::app);
  out << row.dump() << "\n";
}

}  // namespace motley::apps
