// Variable: a Tensor that takes part in reverse-mode differentiation.
//
// A Variable is a shared handle (copying it refers to the same variable):
//   data           the value, a core Tensor (core tensors carry no autograd
//                  state; see core/tensor.h)
//   grad           the accumulated gradient, same shape/dtype/device as
//                  data; undefined until the first backward pass reaches
//                  this variable
//   requires_grad  leaves: set by the owner (parameters: true); results of
//                  ops: true exactly when the op recorded a graph node
//   grad_fn        the Node that produced this variable (null for leaves)
//   name           parameters carry their global name from SPEC section 5
//                  ("layers.0.attn.wq"); empty otherwise
//
// Leaf gradients ACCUMULATE over backward calls (grad += incoming) until
// zero_grad(). Accumulation is in place once grad is defined, so a
// reducer may install grad as a view into a flat bucket with set_grad()
// and every later backward pass writes into that bucket. grad() returns a
// tensor that shares storage with the accumulator: clone() it to keep a
// snapshot across backward calls.
//
// Gradient hooks (leaves only): register_grad_hook(fn) runs fn(leaf) once
// per backward call that reaches the leaf, right after that pass's
// gradient for the leaf has been fully accumulated, while the rest of the
// backward pass continues (data-parallel reducers start communicating
// from here). Hooks run in the engine's deterministic order, see
// Note [Backward order] in engine.cpp. A leaf that is in the graph but
// receives no gradient still gets its hook, with grad defined (zeros if it
// had none), so reducers never wait on an unused parameter.
//
// There are no in-place differentiable ops: a Variable's data is never
// overwritten by autograd, so view results (reshape, transpose, ...) may
// safely share storage with their input.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace motley::autograd {

class Node;
class Variable;

// Called after a leaf's gradient for one backward pass is complete.
using GradHook = std::function<void(Variable& leaf)>;

// The state shared by all handles to one variable. Library code uses
// Variable; the engine reaches in here.
struct VariableImpl {
  Tensor data;
  Tensor grad;
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;  // null for leaves
  std::string name;
  std::vector<GradHook> hooks;  // leaves only
  // The leaf's gradient accumulator, shared by every graph that uses the
  // leaf while any of them is alive (weak: the graph owns it).
  std::weak_ptr<Node> grad_accumulator;
};

class Variable {
 public:
  // An undefined variable (defined() false).
  Variable() = default;
  // A leaf holding `data`.
  explicit Variable(Tensor data, bool requires_grad = false, std::string name = {});
  // A named leaf with requires_grad = true: a model parameter.
  static Variable parameter(Tensor data, std::string name);
  // Wraps existing state (used by the engine to hand leaves to hooks).
  static Variable from_impl(std::shared_ptr<VariableImpl> impl);

  bool defined() const { return impl_ != nullptr; }

  // ---- value ---------------------------------------------------------------
  const Tensor& data() const;
  // Replaces the value (e.g. loading a checkpoint, moving to a device).
  // Leaves only; the shape/dtype/device may change, and then an existing
  // grad is dropped.
  void set_data(Tensor data);
  const Shape& shape() const { return data().shape(); }
  std::int64_t dim() const { return data().dim(); }
  std::int64_t size(std::int64_t d) const { return data().size(d); }
  std::int64_t numel() const { return data().numel(); }
  DType dtype() const { return data().dtype(); }
  Device device() const { return data().device(); }

  // ---- gradient ---------------------------------------------------------------
  // Undefined until a backward pass reached this leaf (non-leaves never get
  // one: intermediate gradients live only inside the engine).
  const Tensor& grad() const;
  // Installs a gradient tensor (same shape, dtype, device as data; throws
  // kShape otherwise). Later backward passes accumulate into it in place,
  // so it must be contiguous and not be shared with anything else that
  // must stay unchanged.
  void set_grad(Tensor grad);
  // Zeroes the gradient in place (keeps its storage, so views installed by
  // set_grad stay valid); with set_to_none the gradient becomes undefined
  // and its memory is released.
  void zero_grad(bool set_to_none = false);

  bool requires_grad() const;
  // Leaves only (throws kInternal on an op result).
  void set_requires_grad(bool requires_grad);
  bool is_leaf() const;
  const std::shared_ptr<Node>& grad_fn() const;

  const std::string& name() const;
  void set_name(std::string name);

  // A new leaf sharing this variable's data, with no graph and
  // requires_grad false.
  Variable detach() const;

  // Leaves only (throws kInternal otherwise). Hooks run in registration
  // order. They must not start another backward pass.
  void register_grad_hook(GradHook hook);
  void clear_grad_hooks();

  // backward({*this}, {ones}, retain_graph); this must hold one element.
  void backward(bool retain_graph = false) const;

  // Identity of the underlying variable (two handles to one variable
  // compare equal).
  const VariableImpl* id() const { return impl_.get(); }
  const std::shared_ptr<VariableImpl>& impl() const { return impl_; }

 private:
  VariableImpl& checked_impl() const;

  std::shared_ptr<VariableImpl> impl_;
};

// ---- grad mode ------------------------------------------------------------------
// Whether ops record graph nodes on this thread (default true). The engine
// runs backward functions and hooks with grad mode off.
class GradMode {
 public:
  static bool is_enabled();
  static void set_enabled(bool enabled);
};

// RAII: ops record no graph while alive (thread-local; nests).
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

}  // namespace motley::autograd
