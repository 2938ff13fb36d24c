#include "apps/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "absl/strings/str_format.h"

namespace motley::apps {

ProgressBar::ProgressBar(std::string label, std::int64_t total)
    : label_(std::move(label)),
      total_(total),
      tty_(isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()) {}

void ProgressBar::update(std::int64_t done) {
  const auto now = std::chrono::steady_clock::now();
  const double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  if (tty_) {
    if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    const int width = 30;
    const int filled = static_cast<int>(frac * width);
    const std::string bar = std::string(filled, '#') + std::string(width - filled, '.');
    const double eta = frac > 0 ? elapsed * (1 - frac) / frac : 0.0;
    std::fprintf(stderr, "\r%s [%s] %3d%% %lld/%lld eta %s   ", label_.c_str(), bar.c_str(),
                 static_cast<int>(frac * 100), static_cast<long long>(done),
                 static_cast<long long>(total_), format_duration(eta).c_str());
    std::fflush(stderr);
  } else {
    // Logs get a line per quarter, and only for work that takes a while.
    if (elapsed < 2.0) return;
    const int decile = static_cast<int>(frac * 4);  // 25%, 50%, 75%, 100%
    if (decile == last_decile_) return;
    last_decile_ = decile;
    std::fprintf(stderr, "%s: %3d%% (%lld/%lld, %s)\n", label_.c_str(), static_cast<int>(frac * 100),
                 static_cast<long long>(done), static_cast<long long>(total_),
                 format_duration(elapsed).c_str());
  }
}

void ProgressBar::finish() {
  update(total_);
  if (tty_) std::fprintf(stderr, "\n");
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long long s = static_cast<long long>(seconds + 0.5);
  if (s < 60) return absl::StrFormat("%ds", s);
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
}

std::string format_count(double n) {
  if (n >= 1e9) return absl::StrFormat("%.2fG", n / 1e9);
  if (n >= 1e6) return absl::StrFormat("%.2fM", n / 1e6);
  if (n >= 1e3) return absl::StrFormat("%.1fk", n / 1e3);
  return absl::StrFormat("%.0f", n);
}

}  // namespace motley::apps
