#include "autograd/variable.h"

#include <utility>

#include "autograd/engine.h"
#include "core/ops.h"

namespace motley::autograd {

namespace {

// Grad mode is per thread so that, e.g., an evaluation thread under
// NoGradGuard does not switch off recording for a training thread.
thread_local bool grad_mode_enabled = true;

}  // namespace

// ---- Variable ------------------------------------------------------------------

Variable::Variable(Tensor data, bool requires_grad, std::string name)
    : impl_(std::make_shared<VariableImpl>()) {
  MOTLEY_CHECK(data.defined(), "Variable of an undefined tensor");
  if (requires_grad) {
    MOTLEY_CHECK_KIND(kShape, is_floating(data.dtype()), "Variable: requires_grad on a ",
                      std::string(dtype_name(data.dtype())),
                      " tensor; only floating tensors can have gradients");
  }
  impl_->data = std::move(data);
  impl_->requires_grad = requires_grad;
  impl_->name = std::move(name);
}

Variable Variable::parameter(Tensor data, std::string name) {
  return Variable(std::move(data), /*requires_grad=*/true, std::move(name));
}

Variable Variable::from_impl(std::shared_ptr<VariableImpl> impl) {
  Variable v;
  v.impl_ = std::move(impl);
  return v;
}

VariableImpl& Variable::checked_impl() const {
  MOTLEY_CHECK(impl_ != nullptr, "use of an undefined Variable");
  return *impl_;
}

const Tensor& Variable::data() const { return checked_impl().data; }

void Variable::set_data(Tensor data) {
  VariableImpl& impl = checked_impl();
  MOTLEY_CHECK(impl.grad_fn == nullptr, "set_data on the result of an op (", impl.grad_fn->name,
               "); only leaves can be replaced");
  MOTLEY_CHECK(data.defined(), "set_data with an undefined tensor");
  const bool same_meta = data.shape() == impl.data.shape() && data.dtype() == impl.data.dtype() &&
                         data.device() == impl.data.device();
  if (!same_meta) {
    impl.grad = Tensor();
    // Graphs recorded against the old value keep their accumulator; new
    // ones get a fresh one that validates against the new metadata.
    impl.grad_accumulator.reset();
  }
  impl.data = std::move(data);
}

const Tensor& Variable::grad() const { return checked_impl().grad; }

void Variable::set_grad(Tensor grad) {
  VariableImpl& impl = checked_impl();
  if (grad.defined()) {
    MOTLEY_CHECK_KIND(kShape,
                      grad.shape() == impl.data.shape() && grad.dtype() == impl.data.dtype() &&
                          grad.device() == impl.data.device(),
                      "set_grad: gradient ", grad.str(), " does not match variable '", impl.name,
                      "' ", impl.data.str());
  }
  impl.grad = std::move(grad);
}

void Variable::zero_grad(bool set_to_none) {
  VariableImpl& impl = checked_impl();
  if (!impl.grad.defined()) return;
  if (set_to_none) {
    impl.grad = Tensor();
  } else {
    impl.grad.zero_();
  }
}

bool Variable::requires_grad() const {
  const VariableImpl& impl = checked_impl();
  return impl.grad_fn != nullptr || impl.requires_grad;
}

void Variable::set_requires_grad(bool requires_grad) {
  VariableImpl& impl = checked_impl();
  MOTLEY_CHECK(impl.grad_fn == nullptr, "set_requires_grad on the result of ", impl.grad_fn->name,
               "; only leaves (use detach() to cut a graph)");
  if (requires_grad) {
    MOTLEY_CHECK_KIND(kShape, is_floating(impl.data.dtype()), "set_requires_grad on a ",
                      std::string(dtype_name(impl.data.dtype())),
                      " tensor; only floating tensors can have gradients");
  }
  impl.requires_grad = requires_grad;
}

bool Variable::is_leaf() const { return checked_impl().grad_fn == nullptr; }

const std::shared_ptr<Node>& Variable::grad_fn() const { return checked_impl().grad_fn; }

const std::string& Variable::name() const { return checked_impl().name; }

void Variable::set_name(std::string name) { checked_impl().name = std::move(name); }

Variable Variable::detach() const { return Variable(data(), /*requires_grad=*/false); }

void Variable::register_grad_hook(GradHook hook) {
  VariableImpl& impl = checked_impl();
  MOTLEY_CHECK(impl.grad_fn == nullptr, "register_grad_hook on the result of ", impl.grad_fn->name,
               "; hooks are for leaves (parameters)");
  impl.hooks.push_back(std::move(hook));
}

void Variable::clear_grad_hooks() { checked_impl().hooks.clear(); }

void Variable::backward(bool retain_graph) const { autograd::backward(*this, retain_graph); }

// ---- grad mode ------------------------------------------------------------------

bool GradMode::is_enabled() { return grad_mode_enabled; }

void GradMode::set_enabled(bool enabled) { grad_mode_enabled = enabled; }

NoGradGuard::NoGradGuard() : previous_(grad_mode_enabled) { grad_mode_enabled = false; }

NoGradGuard::~NoGradGuard() { grad_mode_enabled = previous_; }

}  // namespace motley::autograd
