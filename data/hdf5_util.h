// Small helpers for the HDF5 C API, private to data/: an owning handle, and
// a check that turns a failed call into a motley::Error naming the call,
// what it was working on, and HDF5's own explanation.
//
//   h5::silence_errors();   // once before using HDF5: no stack dumps on stderr
//   h5::Handle file(h5::check(H5Fopen(p, H5F_ACC_RDONLY, H5P_DEFAULT),
//                             ErrorKind::kData, "H5Fopen", p),
//                   H5Fclose);
#pragma once

#include <hdf5.h>

#include <string>

#include "absl/strings/string_view.h"
#include "core/check.h"

namespace motley::h5 {

// Turns off HDF5's automatic printing of its error stack for this thread;
// failures are reported through check() instead.
void silence_errors();

// HDF5's description of the current error stack (innermost cause last), or
// "" when it holds nothing.
std::string error_stack();

// Returns result when it is >= 0; otherwise throws `kind` with
// "<context>: <call> failed: <error_stack()>".
template <typename T>
T check(T result, ErrorKind kind, absl::string_view call, absl::string_view context) {
  if (result < 0) {
    detail::throw_error(kind, __FILE__, __LINE__,
                        absl::StrCat(context, ": ", call, " failed: ", error_stack()));
  }
  return result;
}

// Owns one hid_t and closes it with the matching H5?close function.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  ~Handle() { reset(); }

  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }  // NOLINT: handles pass straight to H5 calls
  // Closes now, reporting a failure (a close may flush data to disk).
  void close(absl::string_view context);

 private:
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = H5I_INVALID_HID;
  }

  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

}  // namespace motley::h5
