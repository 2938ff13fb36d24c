// Error vocabulary shared by every motley library.
//
// Every failure is a motley::Error carrying an ErrorKind. User-facing kinds
// (usage/config, data, checkpoint) map to the exit codes of SPEC section 6;
// kInternal means a bug in motley. Messages say what went wrong and, where
// it helps, what to do.
//
//   MOTLEY_CHECK(cond, "message parts ", value, ...);           // kInternal
//   MOTLEY_CHECK_KIND(kData, cond, "token id ", id, " ...");    // kData
//   MOTLEY_FAIL(kConfig, "unknown key ", key);
//
// The message parts are concatenated with absl::StrCat, so any type StrCat
// accepts (numbers, strings, string_views) may be passed.
#pragma once

#include <stdexcept>
#include <string>

#include "absl/strings/str_cat.h"

namespace motley {

enum class ErrorKind {
  kInternal,    // a bug: an invariant of motley broke
  kUsage,       // bad command line or config (exit 2)
  kData,        // missing or malformed data file (exit 3)
  kCheckpoint,  // missing, corrupt or mismatched checkpoint (exit 4)
  kShape,       // an op received tensors of incompatible shape/dtype/device
  kRuntime,     // an external library (MPI, CUDA, HDF5, ...) failed
};

// Exit code for a kind per SPEC section 6 (kInternal/kShape/kRuntime: 1).
int exit_code_for(ErrorKind kind);
const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorKind kind, const char* file, int line,
                              const std::string& message);
}  // namespace detail

}  // namespace motley

#define MOTLEY_FAIL(kind, ...)                                          \
  ::motley::detail::throw_error(::motley::ErrorKind::kind, __FILE__,    \
                                __LINE__, ::absl::StrCat(__VA_ARGS__))

#define MOTLEY_CHECK_KIND(kind, cond, ...)                                  \
  do {                                                                      \
    if (!(cond)) {                                                          \
      ::motley::detail::throw_error(::motley::ErrorKind::kind, __FILE__,    \
                                    __LINE__,                               \
                                    ::absl::StrCat(__VA_ARGS__));           \
    }                                                                       \
  } while (0)

#define MOTLEY_CHECK(cond, ...) \
  MOTLEY_CHECK_KIND(kInternal, cond, "check failed: " #cond ": ", __VA_ARGS__)
