// Tensor: a typed, strided view of reference-counted storage.
//
// A Tensor is a small value (copying it shares the storage):
//   storage  shared_ptr<Storage>, bytes on one Device
//   shape    sizes per dimension, outermost first
//   strides  in ELEMENTS (not bytes), one per dimension; the LAST dimension
//            is the fastest: a contiguous (B, T, C) tensor has strides
//            (T*C, C, 1)
//   offset   in elements from the start of the storage
//   dtype, device
//
// View operations (reshape of a contiguous tensor, transpose, permute,
// narrow, slice, select, unsqueeze, squeeze, expand) share storage and copy
// nothing. contiguous() copies only when the tensor is not already
// contiguous. A default-constructed Tensor is "undefined" (defined() false).
//
// Tensors carry no autograd state: see autograd/variable.h.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/types/span.h"
#include "core/check.h"
#include "core/device.h"
#include "core/dtype.h"

namespace motley {

using Shape = absl::InlinedVector<std::int64_t, 6>;

class Backend;

std::int64_t shape_numel(absl::Span<const std::int64_t> shape);
std::string shape_str(absl::Span<const std::int64_t> shape);  // "(2, 3)"
Shape contiguous_strides(absl::Span<const std::int64_t> shape);

// Bytes on one device, allocated from (and returned to) its backend.
class Storage {
 public:
  Storage(std::size_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  std::size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  std::size_t nbytes_ = 0;
  Device device_;
  Backend* backend_ = nullptr;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, Shape shape, Shape strides,
         std::int64_t offset, DType dtype);

  // Factories. Memory from empty() is uninitialised.
  static Tensor empty(Shape shape, DType dtype = DType::kF32,
                      Device device = Device::cpu());
  static Tensor zeros(Shape shape, DType dtype = DType::kF32,
                      Device device = Device::cpu());
  static Tensor ones(Shape shape, DType dtype = DType::kF32,
                     Device device = Device::cpu());
  static Tensor full(Shape shape, double value, DType dtype = DType::kF32,
                     Device device = Device::cpu());
  // Copies host values into a new tensor of dtype_of<T>() on `device`.
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, Shape shape,
                            Device device = Device::cpu());
  // 0-d tensor holding one value.
  static Tensor scalar(double value, DType dtype = DType::kF32,
                       Device device = Device::cpu());
  // 0, 1, ..., n-1 as i64 (or another dtype).
  static Tensor arange(std::int64_t n, DType dtype = DType::kI64,
                       Device device = Device::cpu());

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  std::int64_t offset() const { return offset_; }
  std::int64_t dim() const { return static_cast<std::int64_t>(shape_.size()); }
  // Size of dimension d; negative d counts from the end.
  std::int64_t size(std::int64_t d) const;
  std::int64_t stride(std::int64_t d) const;
  std::int64_t numel() const { return shape_numel(shape_); }
  std::size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  Backend& backend() const;
  bool is_contiguous() const;
  // True when both tensors view the same storage.
  bool shares_storage(const Tensor& other) const {
    return storage_ && storage_ == other.storage_;
  }

  // Pointer to element 0 of this view (storage + offset). data<T>() checks
  // that T matches the dtype. Device pointers for CUDA tensors.
  void* raw_data() const;
  template <typename T> T* data() const;

  // Views (no copy). reshape() copies only when the tensor is not
  // contiguous; view() throws instead. One size may be -1.
  Tensor view(Shape shape) const;
  Tensor reshape(Shape shape) const;
  Tensor flatten() const { return reshape({numel()}); }
  Tensor transpose(std::int64_t d0, std::int64_t d1) const;
  Tensor permute(absl::Span<const std::int64_t> order) const;
  // Elements [start, start + length) of dimension d.
  Tensor narrow(std::int64_t d, std::int64_t start, std::int64_t length) const;
  // Elements start, start + step, ... < end of dimension d (step >= 1).
  Tensor slice(std::int64_t d, std::int64_t start, std::int64_t end,
               std::int64_t step = 1) const;
  // Index `index` of dimension d, removing the dimension.
  Tensor select(std::int64_t d, std::int64_t index) const;
  Tensor unsqueeze(std::int64_t d) const;
  Tensor squeeze(std::int64_t d) const;
  // Broadcast size-1 dimensions (and new leading ones) with stride 0.
  Tensor expand(Shape shape) const;

  // Copies.
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(Device device) const;   // this tensor if already there
  Tensor to(DType dtype) const;     // this tensor if already that dtype
  // Copies src (same shape, any dtype/device/strides) into this tensor.
  void copy_(const Tensor& src);
  void fill_(double value);
  void zero_() { fill_(0.0); }

  // Host copies of the values (in logical row-major order).
  template <typename T> std::vector<T> to_vector() const;
  // The single value of a 1-element tensor, converted to double.
  double item() const;

  std::string str() const;  // "Tensor(f32, cpu, (2, 3))"

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  Shape strides_;
  std::int64_t offset_ = 0;
  DType dtype_ = DType::kF32;
};

// Normalises a possibly negative dimension index against `rank`.
std::int64_t wrap_dim(std::int64_t d, std::int64_t rank);

template <typename T>
T* Tensor::data() const {
  MOTLEY_CHECK_KIND(kShape, dtype_ == dtype_of<T>(), "Tensor::data: tensor is ",
                    dtype_name(dtype_), ", requested ",
                    dtype_name(dtype_of<T>()));
  return static_cast<T*>(raw_data());
}

}  // namespace motley
