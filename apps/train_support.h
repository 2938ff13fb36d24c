// What the training, evaluation and generation commands share: opening the
// data a config names and the metrics log.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "core/config.h"
#include "data/token_file.h"
#include "data/tokenizer.h"
#include "nlohmann/json.hpp"

namespace motley::apps {

struct TrainData {
  std::optional<TokenFile> train;
  std::optional<TokenFile> valid;       // absent when data.valid is empty
  std::optional<Tokenizer> tokenizer;   // data.tokenizer, else tokenizer.json beside data.train
};

// Opens data.train (required), data.valid and the tokenizer; every problem
// is a kData error naming the file (exit 3).
TrainData open_train_data(const Config& config);

// The tokenizer at `path`, or the tokenizer.json in the directory of
// `token_file` when `path` is empty; nullopt when neither exists.
std::optional<Tokenizer> find_tokenizer(const std::string& path, const std::string& token_file);

// The token files' vocab_size must fit the model's (kUsage naming both).
void check_vocab(const Config& config, const TrainData& data);

// RUN/metrics.jsonl: one JSON object per line. Opening it for a run that
// resumes at `resume_step` drops the rows past that step (SPEC section 7),
// so a resumed run's log reads as if it had never stopped.
class MetricsLog {
 public:
  MetricsLog(const std::string& path, std::int64_t resume_step);
  void append(const nlohmann::ordered_json& row);

 private:
  std::string path_;
};

}  // namespace motley::apps
