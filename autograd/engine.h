// The backward engine: graph nodes, recording ops, and running backward.
//
// Every differentiable op (autograd/ops.h) computes its result with core
// ops and calls record_op(), which, when grad mode is on and an input
// requires grad, creates one Node:
//   sequence_nr   a process-wide creation counter (monotonic), which orders
//                 the backward pass (Note [Backward order] in engine.cpp)
//   next_edges    one per op input: the input's grad_fn, the input leaf's
//                 gradient accumulator, or null when that input needs no
//                 gradient
//   backward_fn   output gradient -> one gradient per input; its lambda
//                 captures the saved tensors, which are released right
//                 after the node runs unless retain_graph
//                 (Note [Saved tensor release])
//   name          the op's name, used in error messages
//   output        shape, dtype and device of the op's result, against which
//                 every incoming gradient is validated (kShape, message
//                 naming the op)
//
// Leaves that require grad get one accumulator Node (is_accumulator()),
// shared by every graph alive at the same time; running it adds the summed
// gradient to the leaf's grad and fires the leaf's hooks.
//
// Ownership: a Variable owns its grad_fn; a Node owns the nodes of its
// inputs (never its output), so a graph lives exactly as long as some
// variable produced in it. Destroying a graph never recurses
// (Note [Iterative graph destruction]), so chains of any length are safe.
//
// Threading: one graph belongs to one thread at a time. Grad mode is
// thread-local. Sequence numbers are process-wide.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "autograd/variable.h"
#include "core/tensor.h"

namespace motley::autograd {

using TensorList = std::vector<Tensor>;

// Receives the gradient of the node's output, summed over all its uses,
// with exactly the output's shape, dtype and device (it may be a
// non-contiguous or broadcast view: treat it as read-only). Returns one
// gradient per op input, in the order given to record_op; an undefined
// Tensor means "no gradient" (zero), and may be returned for inputs that
// need no gradient. A returned gradient must have its input's shape, dtype
// and device (validated: kShape naming the op). Backward functions run
// with grad mode off.
using BackwardFn = std::function<TensorList(const Tensor& grad_output)>;

struct TensorMeta {
  Shape shape;
  DType dtype = DType::kF32;
  Device device;

  static TensorMeta of(const Tensor& t) { return {t.shape(), t.dtype(), t.device()}; }
};

struct Node {
  // An op node. Its sequence number is taken at construction, after the
  // nodes of its inputs exist, so reverse creation order is a topological
  // order of the graph.
  Node(std::string name, std::vector<std::shared_ptr<Node>> next_edges, BackwardFn backward_fn,
       TensorMeta output);
  // The gradient accumulator of a leaf (holds the leaf alive).
  static std::shared_ptr<Node> make_accumulator(std::shared_ptr<VariableImpl> leaf);
  // Iterative: see Note [Iterative graph destruction].
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  bool is_accumulator() const { return leaf != nullptr; }
  // Drops backward_fn and with it the saved tensors it captured.
  void release();

  const std::uint64_t sequence_nr;
  std::string name;
  std::vector<std::shared_ptr<Node>> next_edges;
  BackwardFn backward_fn;  // null once released (and for accumulators)
  TensorMeta output;
  bool released = false;
  std::shared_ptr<VariableImpl> leaf;  // accumulators only
};

// The node a gradient for `v` flows into: its grad_fn, or for a leaf that
// requires grad its accumulator (created on first use). Null when v does
// not require grad.
std::shared_ptr<Node> gradient_edge(const Variable& v);

// Records one op. Returns a Variable holding `output`; when grad mode is on
// and any defined input requires grad, the Variable gets a new Node named
// `name` with one edge per input (undefined inputs allowed: they get a null
// edge) and `backward_fn`. Otherwise backward_fn and everything it captured
// is dropped at once and the result is a constant.
//
// Note [Saved tensor release]: backward_fn's captures ARE the node's saved
// tensors. Capture Tensors (data) and plain values, never Variables of the
// graph: a captured Variable would keep its grad_fn alive from inside a
// node (a reference cycle when it is the op's own output, and a recursive
// destruction path otherwise). The engine destroys backward_fn right after
// the node runs unless retain_graph, which is what frees the activations
// during backward; running a released node again throws.
Variable record_op(std::string name, Tensor output, const std::vector<Variable>& inputs,
                   BackwardFn backward_fn);

// Runs backward from any set of roots, each with its incoming gradient
// (pipeline stages receive theirs from the next stage). grads[i] must have
// roots[i]'s shape, dtype and device (kShape otherwise); every root must
// require grad (kInternal otherwise). Gradients reaching a node from
// several uses are summed before it runs; the nodes run in a deterministic
// order (Note [Backward order]); leaf gradients accumulate and leaf hooks
// fire as each leaf completes. Without retain_graph every node that runs
// releases its saved tensors, and a second backward through it throws.
void backward(const std::vector<Variable>& roots, const std::vector<Tensor>& grads,
              bool retain_graph = false);
// backward({loss}, {1}) for a one-element loss (kShape otherwise).
void backward(const Variable& loss, bool retain_graph = false);

}  // namespace motley::autograd
