#include "core/device.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"

namespace motley {

Device Device::parse(std::string_view text) {
  if (text == "cpu") return cpu();
  if (text == "cuda") return cuda(0);
  int index = 0;
  if (text.substr(0, 5) == "cuda:" && absl::SimpleAtoi(std::string(text.substr(5)), &index) &&
      index >= 0) {
    return cuda(index);
  }
  MOTLEY_FAIL(kUsage, "unknown device '", std::string(text),
              "': expected cpu, cuda or cuda:N");
}

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : absl::StrCat("cuda:", index);
}

}  // namespace motley
