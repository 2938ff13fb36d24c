// The backward engine, after PyTorch's (torch/csrc/autograd/engine.cpp):
// dependency counts plus a ready queue ordered by creation number, without
// its threads, streams or reentrancy.

#include "autograd/engine.h"

#include <algorithm>
#include <atomic>
#include <queue>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "core/ops.h"

namespace motley::autograd {

namespace {

std::atomic<std::uint64_t> next_sequence_nr{0};

std::string describe(const TensorMeta& meta) {
  return absl::StrCat(shape_str(meta.shape), " ", std::string(dtype_name(meta.dtype)), " ",
                      meta.device.str());
}

std::string describe(const Tensor& t) { return describe(TensorMeta::of(t)); }

bool matches(const Tensor& t, const TensorMeta& meta) {
  return t.shape() == meta.shape && t.dtype() == meta.dtype && t.device() == meta.device;
}

}  // namespace

// ---- Node ---------------------------------------------------------------------------

Node::Node(std::string name_in, std::vector<std::shared_ptr<Node>> next_edges_in,
           BackwardFn backward_fn_in, TensorMeta output_in)
    : sequence_nr(next_sequence_nr.fetch_add(1, std::memory_order_relaxed)),
      name(std::move(name_in)),
      next_edges(std::move(next_edges_in)),
      backward_fn(std::move(backward_fn_in)),
      output(std::move(output_in)) {}

std::shared_ptr<Node> Node::make_accumulator(std::shared_ptr<VariableImpl> leaf_in) {
  MOTLEY_CHECK(leaf_in != nullptr, "accumulator without a leaf");
  std::string label = leaf_in->name.empty() ? std::string("unnamed leaf") : leaf_in->name;
  auto node = std::make_shared<Node>(absl::StrCat("AccumulateGrad(", label, ")"),
                                     std::vector<std::shared_ptr<Node>>{}, BackwardFn(),
                                     TensorMeta::of(leaf_in->data));
  node->leaf = std::move(leaf_in);
  return node;
}

// Note [Iterative graph destruction]
// A graph is a chain of shared_ptr<Node>: destroying the last variable of a
// 10,000-op chain would, with default member destruction, run ~Node inside
// ~Node 10,000 deep and overflow the stack. Instead each destructor moves
// its edges onto a local stack and, for every node on it that it is the
// last owner of, first steals that node's edges before letting it go, so
// every node dies with no edges left and the depth stays 1. Backward
// lambdas capture only tensors (Note [Saved tensor release]), so they
// cannot hide another path to a node.
Node::~Node() {
  std::vector<std::shared_ptr<Node>> stack = std::move(next_edges);
  while (!stack.empty()) {
    std::shared_ptr<Node> node = std::move(stack.back());
    stack.pop_back();
    if (node != nullptr && node.use_count() == 1) {
      for (std::shared_ptr<Node>& edge : node->next_edges) {
        if (edge != nullptr) stack.push_back(std::move(edge));
      }
      node->next_edges.clear();
    }
    // `node` is released here, with no edges if this was its last owner.
  }
}

void Node::release() {
  backward_fn = nullptr;
  released = true;
}

// ---- recording -------------------------------------------------------------------------

std::shared_ptr<Node> gradient_edge(const Variable& v) {
  if (!v.defined() || !v.requires_grad()) return nullptr;
  if (v.grad_fn() != nullptr) return v.grad_fn();
  VariableImpl& impl = *v.impl();
  std::shared_ptr<Node> acc = impl.grad_accumulator.lock();
  if (acc == nullptr) {
    acc = Node::make_accumulator(v.impl());
    impl.grad_accumulator = acc;
  }
  return acc;
}

Variable record_op(std::string name, Tensor output, const std::vector<Variable>& inputs,
                   BackwardFn backward_fn) {
  MOTLEY_CHECK(output.defined(), "op ", name, " produced an undefined tensor");
  bool needed = false;
  if (GradMode::is_enabled()) {
    for (const Variable& in : inputs) needed = needed || (in.defined() && in.requires_grad());
  }
  if (!needed) return Variable(std::move(output));

  std::vector<std::shared_ptr<Node>> edges;
  edges.reserve(inputs.size());
  for (const Variable& in : inputs) edges.push_back(gradient_edge(in));
  MOTLEY_CHECK(backward_fn != nullptr, "op ", name, " recorded without a backward function");
  // The node is created after gradient_edge() may have created accumulators,
  // so every edge target has a lower sequence number than the node.
  auto node = std::make_shared<Node>(std::move(name), std::move(edges), std::move(backward_fn),
                                     TensorMeta::of(output));
  auto impl = std::make_shared<VariableImpl>();
  impl->data = std::move(output);
  impl->requires_grad = true;
  impl->grad_fn = std::move(node);
  return Variable::from_impl(std::move(impl));
}

// ---- the backward pass -------------------------------------------------------------------

namespace {

// Sum of the gradients that reached one node. The first gradient is kept
// as given (it may alias a tensor another node also received, e.g. both
// inputs of `add` get the same tensor), so the first sum is out of place;
// after that the buffer owns its tensor and sums in place.
struct GradBuffer {
  Tensor sum;
  bool owned = false;

  void add(const Tensor& grad) {
    if (!sum.defined()) {
      sum = grad;
      owned = false;
    } else if (owned) {
      ops::add_(sum, grad);
    } else {
      sum = ops::add(sum, grad);
      owned = true;
    }
  }
};

// Note [Backward order]
// The ready queue pops the node with the highest priority, where leaf
// accumulators come first and otherwise the higher sequence number (the
// later created node) wins. Because a node's sequence number exceeds those
// of all its inputs' nodes, this is reverse creation order restricted to
// nodes whose gradient is complete. It depends only on the order in which
// the program recorded ops, so every rank running the same program runs
// backward, and fires its gradient hooks (and the collectives they start),
// in the same order. Accumulators run as soon as they are ready (as
// PyTorch's AccumulateGrad, which has the maximal sequence number), so a
// parameter's hook fires right after its last use in backward, not at the
// end; ties among accumulators go to the later created one.
struct ReadyOrder {
  bool operator()(const Node* a, const Node* b) const {
    // true when a has LOWER priority than b (std::priority_queue is a max-heap).
    if (a->is_accumulator() != b->is_accumulator()) return b->is_accumulator();
    return a->sequence_nr < b->sequence_nr;
  }
};

// A gradient that is only referenced from here, contiguous and covering its
// whole storage, becomes the leaf's grad without a copy; anything else
// (a view, a tensor the caller or another buffer still holds) is cloned so
// that later in-place accumulation cannot write into someone else's data.
Tensor adopt_gradient(Tensor grad) {
  const bool sole_owner = grad.storage().use_count() == 1;
  const bool dense =
      grad.is_contiguous() && grad.offset() == 0 && grad.nbytes() == grad.storage()->nbytes();
  if (sole_owner && dense) return grad;
  return grad.clone();
}

void run_accumulator(Node& node, Tensor grad) {
  const std::shared_ptr<VariableImpl>& impl = node.leaf;
  if (grad.defined()) {
    if (impl->grad.defined()) {
      ops::add_(impl->grad, grad);
    } else {
      impl->grad = adopt_gradient(std::move(grad));
    }
  } else if (!impl->grad.defined()) {
    // The leaf is in the graph but no gradient reached it (every path gave
    // "no gradient"): its gradient is zero, and its hooks still fire.
    impl->grad = Tensor::zeros(impl->data.shape(), impl->data.dtype(), impl->data.device());
  }
  if (impl->hooks.empty()) return;
  Variable leaf = Variable::from_impl(impl);
  // A copy: a hook may register or clear hooks.
  std::vector<GradHook> hooks = impl->hooks;
  for (GradHook& hook : hooks) hook(leaf);
}

}  // namespace

void backward(const std::vector<Variable>& roots, const std::vector<Tensor>& grads,
              bool retain_graph) {
  MOTLEY_CHECK_KIND(kShape, roots.size() == grads.size(), "backward: ", roots.size(), " roots but ",
                    grads.size(), " gradients");
  NoGradGuard no_grad;

  std::unordered_map<Node*, GradBuffer> buffers;
  std::vector<std::shared_ptr<Node>> root_nodes;
  for (std::size_t i = 0; i < roots.size(); ++i) {
    const Variable& root = roots[i];
    MOTLEY_CHECK(root.defined(), "backward: root ", i, " is undefined");
    std::shared_ptr<Node> node = gradient_edge(root);
    MOTLEY_CHECK(node != nullptr, "backward: root ", i,
                 " does not require grad (no input of the ops that produced it requires "
                 "grad, or it was computed under NoGradGuard)");
    const Tensor& grad = grads[i];
    MOTLEY_CHECK_KIND(kShape, grad.defined(), "backward: gradient for root ", i, " (output of ",
                      node->name, ") is undefined");
    MOTLEY_CHECK_KIND(kShape, matches(grad, node->output), "backward: gradient for root ", i,
                      " (output of ", node->name, ") is ", describe(grad), " but the output is ",
                      describe(node->output));
    buffers[node.get()].add(grad);
    root_nodes.push_back(std::move(node));
  }

  // Count, for every node reachable from the roots, how many edges of
  // reachable nodes point at it. Iterative: an explicit stack, no recursion.
  std::unordered_map<Node*, int> dependencies;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  for (const std::shared_ptr<Node>& node : root_nodes) {
    if (seen.insert(node.get()).second) stack.push_back(node.get());
  }
  while (!stack.empty()) {
    Node* node = stack.back();
    stack.pop_back();
    for (const std::shared_ptr<Node>& edge : node->next_edges) {
      if (edge == nullptr) continue;
      ++dependencies[edge.get()];
      if (seen.insert(edge.get()).second) stack.push_back(edge.get());
    }
  }

  std::priority_queue<Node*, std::vector<Node*>, ReadyOrder> ready;
  std::unordered_set<Node*> queued_roots;
  for (const std::shared_ptr<Node>& node : root_nodes) {
    // A root that is also an input of another root's graph waits for it.
    if (dependencies.count(node.get()) == 0 && queued_roots.insert(node.get()).second) {
      ready.push(node.get());
    }
  }

  // Nodes stay alive while the engine runs: the roots own them (the caller
  // holds the roots), and every reachable node is owned through edges.
  while (!ready.empty()) {
    Node* node = ready.top();
    ready.pop();
    Tensor grad;
    auto it = buffers.find(node);
    if (it != buffers.end()) {
      grad = std::move(it->second.sum);
      buffers.erase(it);
    }

    if (node->is_accumulator()) {
      run_accumulator(*node, std::move(grad));
      continue;
    }

    MOTLEY_CHECK(!node->released, "backward through ", node->name,
                 " a second time: its saved tensors were released after the first "
                 "backward; pass retain_graph=true to the first backward call");
    TensorList input_grads;
    if (grad.defined()) {
      input_grads = node->backward_fn(grad);
      MOTLEY_CHECK(input_grads.size() == node->next_edges.size(), "backward of ", node->name,
                   " returned ", input_grads.size(), " gradients for ", node->next_edges.size(),
                   " inputs");
    }
    // Note [Saved tensor release]: free what the op saved before its inputs
    // run, so peak memory falls as backward proceeds.
    if (!retain_graph) node->release();
    grad = Tensor();

    for (std::size_t j = 0; j < node->next_edges.size(); ++j) {
      Node* next = node->next_edges[j].get();
      if (next == nullptr) continue;
      if (j < input_grads.size() && input_grads[j].defined()) {
        const Tensor& g = input_grads[j];
        MOTLEY_CHECK_KIND(kShape, matches(g, next->output), "backward of ", node->name,
                          ": gradient for input ", j, " is ", describe(g), " but that input (from ",
                          next->name, ") is ", describe(next->output));
        buffers[next].add(g);
      }
      if (--dependencies[next] == 0) ready.push(next);
    }
  }
}

void backward(const Variable& loss, bool retain_graph) {
  MOTLEY_CHECK(loss.defined(), "backward of an undefined Variable");
  MOTLEY_CHECK_KIND(kShape, loss.numel() == 1, "backward(loss): loss is ", loss.data().str(),
                    "; pass explicit gradients for a root with more than one element");
  Tensor one = Tensor::ones(loss.shape(), loss.dtype(), loss.device());
  backward(std::vector<Variable>{loss}, std::vector<Tensor>{one}, retain_graph);
}

}  // namespace motley::autograd
