// HDF5 error handling: the library's default is to print its whole error
// stack to stderr on every failure, including failures motley expects and
// reports itself (a probe for a missing dataset). We switch that off and
// fold the stack's descriptions into the motley::Error instead.
#include "data/hdf5_util.h"

#include <vector>

namespace motley::h5 {
namespace {

herr_t collect_description(unsigned /*n*/, const H5E_error2_t* err, void* client) {
  auto* parts = static_cast<std::vector<std::string>*>(client);
  std::string part = err->desc ? err->desc : "";
  if (err->func_name) part = absl::StrCat(err->func_name, ": ", part);
  parts->push_back(std::move(part));
  return 0;
}

}  // namespace

void silence_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

std::string error_stack() {
  std::vector<std::string> parts;
  // Downward: from the API call to the innermost function that found the
  // problem. The first and the last entries say the most.
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_description, &parts);
  if (parts.empty()) return "(no HDF5 error message)";
  if (parts.size() == 1) return parts.front();
  return absl::StrCat(parts.front(), " <- ", parts.back());
}

void Handle::close(absl::string_view context) {
  if (id_ < 0 || !close_) return;
  const herr_t status = close_(id_);
  id_ = H5I_INVALID_HID;
  check(status, ErrorKind::kData, "close", context);
}

}  // namespace motley::h5
