#include "core/tensor.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_join.h"
#include "core/backend.h"

namespace motley {

std::int64_t shape_numel(absl::Span<const std::int64_t> shape) {
  std::int64_t n = 1;
  for (std::int64_t s : shape) n *= s;
  return n;
}

std::string shape_str(absl::Span<const std::int64_t> shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

Shape contiguous_strides(absl::Span<const std::int64_t> shape) {
  Shape strides(shape.size());
  std::int64_t s = 1;
  for (std::int64_t i = static_cast<std::int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

std::int64_t wrap_dim(std::int64_t d, std::int64_t rank) {
  const std::int64_t wrapped = d < 0 ? d + rank : d;
  MOTLEY_CHECK_KIND(kShape, wrapped >= 0 && wrapped < rank, "dimension ", d,
                    " out of range for a tensor of rank ", rank);
  return wrapped;
}

// ---- Storage ----------------------------------------------------------------

Storage::Storage(std::size_t nbytes, Device device)
    : nbytes_(nbytes), device_(device), backend_(&backend_for(device)) {
  // Zero-size tensors still get a distinct (non-null) allocation so that
  // defined() and shares_storage() work uniformly.
  data_ = backend_->allocate(std::max<std::size_t>(nbytes, 1));
}

Storage::~Storage() { backend_->deallocate(data_, std::max<std::size_t>(nbytes_, 1)); }

// ---- Tensor -------------------------------------------------------------------

Tensor::Tensor(std::shared_ptr<Storage> storage, Shape shape, Shape strides,
               std::int64_t offset, DType dtype)
    : storage_(std::move(storage)),
      shape_(std::move(shape)),
      strides_(std::move(strides)),
      offset_(offset),
      dtype_(dtype) {
  MOTLEY_CHECK(shape_.size() == strides_.size(), "shape ", shape_str(shape_),
               " and strides ", shape_str(strides_), " differ in rank");
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  for (std::int64_t s : shape) {
    MOTLEY_CHECK_KIND(kShape, s >= 0, "negative size in shape ", shape_str(shape));
  }
  const std::size_t nbytes = shape_numel(shape) * dtype_size(dtype);
  auto storage = std::make_shared<Storage>(nbytes, device);
  Shape strides = contiguous_strides(shape);
  return Tensor(std::move(storage), std::move(shape), std::move(strides), 0, dtype);
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  return full(std::move(shape), 0.0, dtype, device);
}

Tensor Tensor::ones(Shape shape, DType dtype, Device device) {
  return full(std::move(shape), 1.0, dtype, device);
}

Tensor Tensor::full(Shape shape, double value, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  t.fill_(value);
  return t;
}

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, Shape shape,
                           Device device) {
  MOTLEY_CHECK_KIND(kShape, shape_numel(shape) == static_cast<std::int64_t>(values.size()),
                    "from_vector: ", values.size(), " values do not fill shape ",
                    shape_str(shape));
  Tensor t = empty(std::move(shape), dtype_of<T>(), device);
  if (!values.empty()) {
    t.backend().copy_from_host(t.raw_data(), values.data(), values.size() * sizeof(T));
  }
  return t;
}

template Tensor Tensor::from_vector(const std::vector<float>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<double>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<BFloat16>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<std::int32_t>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<std::int64_t>&, Shape, Device);

Tensor Tensor::scalar(double value, DType dtype, Device device) {
  return full(Shape{}, value, dtype, device);
}

Tensor Tensor::arange(std::int64_t n, DType dtype, Device device) {
  std::vector<std::int64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  Tensor t = from_vector(v, {n}, device);
  return t.to(dtype);
}

std::int64_t Tensor::size(std::int64_t d) const { return shape_[wrap_dim(d, dim())]; }
std::int64_t Tensor::stride(std::int64_t d) const { return strides_[wrap_dim(d, dim())]; }

Device Tensor::device() const {
  MOTLEY_CHECK(defined(), "device() of an undefined tensor");
  return storage_->device();
}

Backend& Tensor::backend() const { return backend_for(device()); }

bool Tensor::is_contiguous() const {
  std::int64_t expected = 1;
  for (std::int64_t i = dim() - 1; i >= 0; --i) {
    if (shape_[i] == 1) continue;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  MOTLEY_CHECK(defined(), "data of an undefined tensor");
  return static_cast<char*>(storage_->data()) + offset_ * dtype_size(dtype_);
}

// ---- views --------------------------------------------------------------------

namespace {

Shape infer_shape(Shape shape, std::int64_t numel, const Shape& from) {
  std::int64_t infer = -1;
  std::int64_t known = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MOTLEY_CHECK_KIND(kShape, infer < 0, "reshape: more than one -1 in ",
                        shape_str(shape));
      infer = static_cast<std::int64_t>(i);
    } else {
      MOTLEY_CHECK_KIND(kShape, shape[i] >= 0, "reshape: invalid size in ",
                        shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MOTLEY_CHECK_KIND(kShape, known != 0 && numel % known == 0, "reshape: cannot view ",
                      shape_str(from), " as ", shape_str(shape));
    shape[infer] = numel / known;
  }
  MOTLEY_CHECK_KIND(kShape, shape_numel(shape) == numel, "reshape: cannot view ",
                    shape_str(from), " (", numel, " elements) as ", shape_str(shape));
  return shape;
}

}  // namespace

Tensor Tensor::view(Shape shape) const {
  shape = infer_shape(std::move(shape), numel(), shape_);
  MOTLEY_CHECK_KIND(kShape, is_contiguous(), "view of a non-contiguous tensor ",
                    str(), ": call contiguous() or reshape()");
  Shape strides = contiguous_strides(shape);
  return Tensor(storage_, std::move(shape), std::move(strides), offset_, dtype_);
}

Tensor Tensor::reshape(Shape shape) const {
  if (is_contiguous()) return view(std::move(shape));
  return contiguous().view(std::move(shape));
}

Tensor Tensor::transpose(std::int64_t d0, std::int64_t d1) const {
  d0 = wrap_dim(d0, dim());
  d1 = wrap_dim(d1, dim());
  Shape shape = shape_, strides = strides_;
  std::swap(shape[d0], shape[d1]);
  std::swap(strides[d0], strides[d1]);
  return Tensor(storage_, std::move(shape), std::move(strides), offset_, dtype_);
}

Tensor Tensor::permute(absl::Span<const std::int64_t> order) const {
  MOTLEY_CHECK_KIND(kShape, static_cast<std::int64_t>(order.size()) == dim(),
                    "permute: order of length ", order.size(), " for ", str());
  Shape shape(order.size()), strides(order.size());
  std::vector<bool> seen(order.size(), false);
  for (std::size_t i = 0; i < order.size(); ++i) {
    const std::int64_t d = wrap_dim(order[i], dim());
    MOTLEY_CHECK_KIND(kShape, !seen[d], "permute: dimension ", d, " repeated");
    seen[d] = true;
    shape[i] = shape_[d];
    strides[i] = strides_[d];
  }
  return Tensor(storage_, std::move(shape), std::move(strides), offset_, dtype_);
}

Tensor Tensor::narrow(std::int64_t d, std::int64_t start, std::int64_t length) const {
  d = wrap_dim(d, dim());
  MOTLEY_CHECK_KIND(kShape, start >= 0 && length >= 0 && start + length <= shape_[d],
                    "narrow: [", start, ", ", start + length, ") outside dimension ", d,
                    " of ", str());
  Shape shape = shape_;
  shape[d] = length;
  return Tensor(storage_, std::move(shape), strides_, offset_ + start * strides_[d],
                dtype_);
}

Tensor Tensor::slice(std::int64_t d, std::int64_t start, std::int64_t end,
                     std::int64_t step) const {
  d = wrap_dim(d, dim());
  MOTLEY_CHECK_KIND(kShape, step >= 1, "slice: step must be >= 1, got ", step);
  end = std::min(end, shape_[d]);
  MOTLEY_CHECK_KIND(kShape, start >= 0 && start <= end, "slice: [", start, ", ", end,
                    ") invalid for dimension ", d, " of ", str());
  Shape shape = shape_, strides = strides_;
  shape[d] = (end - start + step - 1) / step;
  strides[d] = strides_[d] * step;
  return Tensor(storage_, std::move(shape), std::move(strides),
                offset_ + start * strides_[d], dtype_);
}

Tensor Tensor::select(std::int64_t d, std::int64_t index) const {
  d = wrap_dim(d, dim());
  if (index < 0) index += shape_[d];
  MOTLEY_CHECK_KIND(kShape, index >= 0 && index < shape_[d], "select: index ", index,
                    " outside dimension ", d, " of ", str());
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return Tensor(storage_, std::move(shape), std::move(strides),
                offset_ + index * strides_[d], dtype_);
}

Tensor Tensor::unsqueeze(std::int64_t d) const {
  d = wrap_dim(d, dim() + 1);
  Shape shape = shape_, strides = strides_;
  const std::int64_t stride = d < dim() ? strides_[d] * shape_[d] : 1;
  shape.insert(shape.begin() + d, 1);
  strides.insert(strides.begin() + d, stride);
  return Tensor(storage_, std::move(shape), std::move(strides), offset_, dtype_);
}

Tensor Tensor::squeeze(std::int64_t d) const {
  d = wrap_dim(d, dim());
  MOTLEY_CHECK_KIND(kShape, shape_[d] == 1, "squeeze: dimension ", d, " of ", str(),
                    " is not 1");
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return Tensor(storage_, std::move(shape), std::move(strides), offset_, dtype_);
}

Tensor Tensor::expand(Shape shape) const {
  MOTLEY_CHECK_KIND(kShape, static_cast<std::int64_t>(shape.size()) >= dim(),
                    "expand: cannot expand ", str(), " to ", shape_str(shape));
  const std::int64_t lead = static_cast<std::int64_t>(shape.size()) - dim();
  Shape strides(shape.size(), 0);
  for (std::int64_t i = 0; i < dim(); ++i) {
    const std::int64_t target = shape[lead + i];
    if (shape_[i] == target) {
      strides[lead + i] = strides_[i];
    } else {
      MOTLEY_CHECK_KIND(kShape, shape_[i] == 1, "expand: cannot expand ", str(), " to ",
                        shape_str(shape));
      strides[lead + i] = 0;
    }
  }
  return Tensor(storage_, std::move(shape), std::move(strides), offset_, dtype_);
}

// ---- copies -----------------------------------------------------------------------

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::clone() const {
  Tensor out = empty(shape_, dtype_, device());
  out.copy_(*this);
  return out;
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  Tensor src = contiguous();
  Tensor out = empty(shape_, dtype_, device);
  if (src.nbytes() == 0) return out;
  if (src.device().is_cpu()) {
    out.backend().copy_from_host(out.raw_data(), src.raw_data(), src.nbytes());
  } else if (device.is_cpu()) {
    src.backend().copy_to_host(out.raw_data(), src.raw_data(), src.nbytes());
  } else {
    // Between two CUDA devices: stage through the host (rare; checkpoints).
    Tensor host = src.to(Device::cpu());
    return host.to(device);
  }
  return out;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  Tensor out = empty(shape_, dtype, device());
  out.copy_(*this);
  return out;
}

void Tensor::copy_(const Tensor& src) {
  MOTLEY_CHECK_KIND(kShape, src.shape() == shape_, "copy_: source ", src.str(),
                    " does not match destination ", str());
  if (numel() == 0) return;
  if (src.device() != device()) {
    copy_(src.to(device()));
    return;
  }
  backend().copy(src, *this);
}

void Tensor::fill_(double value) {
  if (numel() == 0) return;
  if (is_contiguous()) {
    backend().fill(*this, value);
  } else {
    Tensor tmp = full(shape_, value, dtype_, device());
    copy_(tmp);
  }
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = to(Device::cpu()).to(dtype_of<T>()).contiguous();
  std::vector<T> out(numel());
  if (!out.empty()) std::copy_n(host.data<T>(), out.size(), out.data());
  return out;
}

template std::vector<float> Tensor::to_vector() const;
template std::vector<double> Tensor::to_vector() const;
template std::vector<BFloat16> Tensor::to_vector() const;
template std::vector<std::int32_t> Tensor::to_vector() const;
template std::vector<std::int64_t> Tensor::to_vector() const;

double Tensor::item() const {
  MOTLEY_CHECK_KIND(kShape, numel() == 1, "item() of ", str(), " which has ", numel(),
                    " elements");
  return to_vector<double>()[0];
}

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  return absl::StrCat("Tensor(", dtype_name(dtype_), ", ", device().str(), ", ",
                      shape_str(shape_), ")");
}

}  // namespace motley
