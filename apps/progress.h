// Human-readable progress output: a progress bar for long work (redrawn
// in place on a terminal, a few plain lines otherwise) and duration and
// count formatting for log lines.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace motley::apps {

class ProgressBar {
 public:
  // `label` prefixes the bar; output goes to stderr.
  ProgressBar(std::string label, std::int64_t total);
  void update(std::int64_t done);
  void finish();

 private:
  std::string label_;
  std::int64_t total_;
  bool tty_;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

std::string format_duration(double seconds);  // "3m12s", "1h04m", "45s"
std::string format_count(double n);           // "12.3k", "4.56M"

}  // namespace motley::apps
