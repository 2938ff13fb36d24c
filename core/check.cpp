#include "core/check.h"

#include <cstring>

namespace motley {

int exit_code_for(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kUsage: return 2;
    case ErrorKind::kData: return 3;
    case ErrorKind::kCheckpoint: return 4;
    default: return 1;
  }
}

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInternal: return "internal error";
    case ErrorKind::kUsage: return "usage error";
    case ErrorKind::kData: return "data error";
    case ErrorKind::kCheckpoint: return "checkpoint error";
    case ErrorKind::kShape: return "shape error";
    case ErrorKind::kRuntime: return "runtime error";
  }
  return "error";
}

namespace detail {

void throw_error(ErrorKind kind, const char* file, int line,
                 const std::string& message) {
  // Keep only the path below the repository root so messages do not depend
  // on where motley was built.
  const char* short_file = file;
  for (const char* root : {"/core/", "/autograd/", "/layers/", "/parallel/",
                           "/data/", "/checkpoint/", "/apps/", "/tests/"}) {
    if (const char* p = std::strstr(file, root)) {
      short_file = p + 1;
      break;
    }
  }
  throw Error(kind, absl::StrCat(message, " [", short_file, ":", line, "]"));
}

}  // namespace detail
}  // namespace motley
