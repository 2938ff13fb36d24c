// The engine: order, accumulation, hooks, roots, memory release, deep
// graphs, grad mode and error messages.

#include "autograd/engine.h"

#include <pthread.h>

#include <cmath>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "core/backend.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace motley::autograd {
namespace {

using testing::randn;
using testing::values;

// An identity op that appends `label` to `log` when its backward runs.
Variable tag(const Variable& x, const std::string& label, std::vector<std::string>* log) {
  return record_op("tag", x.data(), {x}, [label, log](const Tensor& g) -> TensorList {
    log->push_back(label);
    return {g};
  });
}

// ---- order ----------------------------------------------------------------------------

// Three layers, each y = tag(y * w_l); w0 also feeds a side branch.
std::vector<std::string> run_logged_graph() {
  std::vector<std::string> log;
  std::vector<Variable> w;
  for (int l = 0; l < 3; ++l) {
    w.push_back(Variable::parameter(randn({2, 2}, 10 + l), "layers." + std::to_string(l) + ".w"));
    w.back().register_grad_hook([&log](Variable& v) { log.push_back("hook " + v.name()); });
  }
  Variable x(randn({2, 2}, 1));
  Variable y = x;
  for (int l = 0; l < 3; ++l) y = tag(mul(y, w[l]), "layer" + std::to_string(l), &log);
  Variable side = tag(exp(w[0]), "side", &log);
  // Separate statements: the creation order must not depend on the
  // unspecified evaluation order of function arguments.
  Variable sum_y = sum(y);
  Variable sum_side = sum(side);
  Variable loss = add(sum_y, sum_side);
  loss.backward();
  return log;
}

TEST(AutogradEngine, DeterministicReverseCreationOrderWithHooksAsSoonAsReady) {
  std::vector<std::string> first = run_logged_graph();
  std::vector<std::string> second = run_logged_graph();
  EXPECT_EQ(first, second);
  // Reverse creation order: "side" was created last so runs first; each
  // parameter's hook fires right after its last use, not at the end.
  const std::vector<std::string> expected = {"side",           "layer2",          "hook layers.2.w",
                                             "layer1",         "hook layers.1.w", "layer0",
                                             "hook layers.0.w"};
  EXPECT_EQ(first, expected);
}

// A graph from an earlier step that is still alive (e.g. the previous
// loss, still held by a training loop while the next forward runs) keeps
// w's accumulator, created long before this step's nodes. Plain reverse
// creation order would then run the whole unrelated branch v before w's
// hook; accumulators run as soon as they are ready, so w's hook still fires
// right after its last use.
TEST(AutogradEngine, HookFiresAsSoonAsTheGradientIsComplete) {
  std::vector<std::string> log;
  Variable w = Variable::parameter(randn({2}, 30), "w");
  Variable z = Variable::parameter(randn({2}, 31), "z");
  for (Variable* p : {&w, &z}) {
    p->register_grad_hook([&log](Variable& v) { log.push_back("hook " + v.name()); });
  }
  Variable x(randn({2}, 32));
  Variable previous_step = mul(x, w);
  Variable v = tag(exp(z), "v", &log);
  Variable u = tag(mul(x, w), "u", &log);
  ASSERT_EQ(u.grad_fn()->next_edges[0]->next_edges[1], previous_step.grad_fn()->next_edges[1]);
  Variable sum_v = sum(v);
  Variable sum_u = sum(u);
  add(sum_v, sum_u).backward();
  EXPECT_EQ(log, (std::vector<std::string>{"u", "hook w", "v", "hook z"}));
}

// ---- accumulation --------------------------------------------------------------------------

TEST(AutogradEngine, LeafGradientsAccumulateUntilZeroGrad) {
  Tensor xv = randn({3}, 2);
  Variable w = Variable::parameter(randn({3}, 3), "w");
  auto step = [&] { sum(mul(w, Variable(xv))).backward(); };
  step();
  const std::vector<double> once = values(w.grad());
  EXPECT_EQ(once, values(xv));
  Tensor before_second = w.grad();
  step();
  const std::vector<double> twice = values(w.grad());
  for (std::size_t i = 0; i < once.size(); ++i) EXPECT_DOUBLE_EQ(twice[i], 2 * once[i]);
  // Accumulation is in place: the storage is kept.
  EXPECT_TRUE(w.grad().shares_storage(before_second));
  w.zero_grad();
  ASSERT_TRUE(w.grad().defined());
  for (double g : values(w.grad())) EXPECT_EQ(g, 0.0);
  step();
  EXPECT_EQ(values(w.grad()), once);
  w.zero_grad(/*set_to_none=*/true);
  EXPECT_FALSE(w.grad().defined());
}

TEST(AutogradEngine, RetainGraphAllowsASecondBackwardAndAccumulates) {
  Variable x(randn({4}, 4), true);
  Variable loss = sum(exp(x));
  loss.backward(/*retain_graph=*/true);
  const std::vector<double> once = values(x.grad());
  loss.backward();
  const std::vector<double> twice = values(x.grad());
  std::vector<double> e = values(exp(Variable(x.data())).data());
  for (std::size_t i = 0; i < e.size(); ++i) {
    EXPECT_NEAR(once[i], e[i], 1e-12);
    EXPECT_NEAR(twice[i], 2 * e[i], 1e-12);
  }
  // Released now: a third backward must say so.
  try {
    loss.backward();
    FAIL() << "third backward through released nodes did not throw";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("retain_graph"), std::string::npos) << err.what();
  }
}

TEST(AutogradEngine, UserGradientIsNeverModifiedByAccumulation) {
  Variable x(randn({3}, 5), true);
  Tensor g = Tensor::from_vector(std::vector<double>{1, 2, 3}, {3});
  backward({x}, {g});
  backward({x}, {g});
  EXPECT_EQ(values(g), (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(values(x.grad()), (std::vector<double>{2, 4, 6}));
}

// ---- roots ----------------------------------------------------------------------------------

TEST(AutogradEngine, BackwardFromSeveralRootsWithGivenGradients) {
  Tensor xv = randn({3}, 6), av = randn({3}, 7);
  Variable x(xv, true);
  Variable y1 = mul(x, Variable(av));  // dy1/dx = a
  Variable y2 = exp(x);                // dy2/dx = exp(x)
  Tensor g1 = randn({3}, 8), g2 = randn({3}, 9);
  backward({y1, y2}, {g1, g2});
  std::vector<double> xs = values(xv), as = values(av), g1s = values(g1), g2s = values(g2);
  std::vector<double> got = values(x.grad());
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(got[i], g1s[i] * as[i] + g2s[i] * std::exp(xs[i]), 1e-12);
  }
}

TEST(AutogradEngine, RootThatFeedsAnotherRootWaitsForIt) {
  // Pipeline-like: y1 is both a root (its own incoming gradient) and an
  // input of root y2; its node must run once, with both gradients summed.
  Variable x(randn({2}, 10), true);
  std::vector<std::string> log;
  Variable y1 = tag(scale(x, 3.0), "y1", &log);
  Variable y2 = scale(y1, 2.0);
  Tensor g1 = Tensor::from_vector(std::vector<double>{1, 1}, {2});
  Tensor g2 = Tensor::from_vector(std::vector<double>{10, 100}, {2});
  backward({y1, y2}, {g1, g2});
  EXPECT_EQ(log, (std::vector<std::string>{"y1"}));
  EXPECT_EQ(values(x.grad()), (std::vector<double>{3 * (1 + 20), 3 * (1 + 200)}));
}

TEST(AutogradEngine, RootGradientIsValidated) {
  Variable x(randn({2, 3}, 11), true);
  Variable y = matmul(x, Variable(randn({3, 4}, 12)));
  try {
    backward({y}, {Tensor::ones({2, 3}, DType::kF64)});
    FAIL() << "wrong-shaped root gradient accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("matmul"), std::string::npos) << e.what();
  }
  try {
    backward({y}, {Tensor::ones({2, 4}, DType::kF32)});
    FAIL() << "wrong-dtype root gradient accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
  }
  EXPECT_THROW(backward(y), Error);  // not one element
}

TEST(AutogradEngine, BadBackwardGradientNamesTheOp) {
  Variable x(randn({2, 3}, 13), true);
  Variable y = record_op("broken_op", x.data().clone(), {x}, [](const Tensor& g) -> TensorList {
    return {Tensor::ones({3, 2}, g.dtype())};
  });
  try {
    sum(y).backward();
    FAIL() << "wrong-shaped op gradient accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("broken_op"), std::string::npos) << e.what();
  }
}

// ---- hooks -----------------------------------------------------------------------------------

TEST(AutogradEngine, HookFiresOncePerBackwardAfterFullAccumulation) {
  Variable w = Variable::parameter(randn({3}, 14), "w");
  int calls = 0;
  std::vector<std::vector<double>> seen;
  w.register_grad_hook([&](Variable& leaf) {
    ++calls;
    EXPECT_EQ(leaf.id(), w.id());
    seen.push_back(values(leaf.grad()));
  });
  // w used by three ops: d/dw [sum(2w) + sum(w*w) + sum(exp(w))] = 2 + 2w + exp(w).
  auto run = [&] {
    Variable loss = add(add(sum(scale(w, 2.0)), sum(mul(w, w))), sum(exp(w)));
    loss.backward();
  };
  run();
  ASSERT_EQ(calls, 1);
  std::vector<double> wv = values(w.data());
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(seen[0][i], 2 + 2 * wv[i] + std::exp(wv[i]), 1e-12);
  run();
  ASSERT_EQ(calls, 2);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(seen[1][i], 2 * seen[0][i], 1e-12);
}

TEST(AutogradEngine, LeafReachedWithoutGradientStillFiresItsHook) {
  Variable w = Variable::parameter(randn({2}, 15), "unused_path");
  int calls = 0;
  w.register_grad_hook([&](Variable&) { ++calls; });
  Variable y = record_op("no_grad_to_input", Tensor::ones({2}, DType::kF64), {w},
                         [](const Tensor&) -> TensorList { return {Tensor()}; });
  sum(y).backward();
  EXPECT_EQ(calls, 1);
  ASSERT_TRUE(w.grad().defined());
  EXPECT_EQ(values(w.grad()), (std::vector<double>{0, 0}));
}

TEST(AutogradEngine, HooksOnlyOnLeaves) {
  Variable x(randn({2}, 16), true);
  Variable y = exp(x);
  EXPECT_THROW(y.register_grad_hook([](Variable&) {}), Error);
}

// ---- memory ---------------------------------------------------------------------------------

// bytes_in_use of the CPU backend over one forward/backward; the forward
// returns only the loss so no activation is held by the test itself.
TEST(AutogradEngine, SavedTensorsAreReleasedAfterBackward) {
  Backend& cpu = backend_for(Device::cpu());
  Variable w = Variable::parameter(randn({64, 64}, 17, 0, 0.1), "w");
  Variable x(randn({32, 64}, 18));
  auto forward = [&] {
    Variable h = tanh(linear(x, w));  // saves x, w, tanh output
    return mean(mul(h, rmsnorm(h, Variable(Tensor::ones({64}, DType::kF64)), 1e-5)));
  };

  const std::size_t before = cpu.bytes_in_use();
  {
    Variable loss = forward();
    // Alive: the tanh output h and the rmsnorm output (saved by mul), rstd.
    EXPECT_GT(cpu.bytes_in_use(), before + 2 * 32 * 64 * 8);
    loss.backward();
    const std::size_t grad_bytes = w.grad().storage()->nbytes();
    const std::size_t loss_bytes = loss.data().storage()->nbytes();
    EXPECT_EQ(cpu.bytes_in_use(), before + grad_bytes + loss_bytes)
        << "saved tensors outlived backward";
  }
  EXPECT_EQ(cpu.bytes_in_use(), before + w.grad().storage()->nbytes());
  w.zero_grad(/*set_to_none=*/true);
  EXPECT_EQ(cpu.bytes_in_use(), before);

  // With retain_graph the saved tensors stay until the graph is dropped.
  {
    Variable loss = forward();
    loss.backward(/*retain_graph=*/true);
    EXPECT_GT(cpu.bytes_in_use(), before + w.grad().storage()->nbytes() + 2 * 32 * 64 * 8);
  }
  EXPECT_EQ(cpu.bytes_in_use(), before + w.grad().storage()->nbytes());
}

// ---- deep graphs -------------------------------------------------------------------------------

void run_chain(std::int64_t length, double* grad_out) {
  Variable x0(Tensor::ones({1}, DType::kF64), true);
  {
    Variable x = x0;
    for (std::int64_t i = 0; i < length; ++i) x = scale(x, 1.0001);
    x.backward();
  }  // the chain is destroyed here
  *grad_out = x0.grad().item();
}

TEST(AutogradEngine, TenThousandNodeChainOnTheDefaultStack) {
  double grad = 0;
  run_chain(10000, &grad);
  EXPECT_NEAR(grad, std::pow(1.0001, 10000), 1e-9 * std::pow(1.0001, 10000));
}

// The same on a 512 KiB stack with a longer chain: recursion in traversal,
// backward or destruction (several frames per node) would overflow it.
TEST(AutogradEngine, LongChainOnASmallStack) {
  struct Args {
    double grad = 0;
  } args;
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 512 * 1024), 0);
  pthread_t thread;
  auto body = [](void* p) -> void* {
    run_chain(50000, &static_cast<Args*>(p)->grad);
    return nullptr;
  };
  ASSERT_EQ(pthread_create(&thread, &attr, body, &args), 0);
  ASSERT_EQ(pthread_join(thread, nullptr), 0);
  pthread_attr_destroy(&attr);
  EXPECT_NEAR(args.grad, std::pow(1.0001, 50000), 1e-8 * std::pow(1.0001, 50000));
}

// ---- grad mode, detach
// ---------------------------------------------------------------------------

TEST(AutogradEngine, NoGradGuardRecordsNoGraph) {
  Variable x(randn({3}, 19), true);
  EXPECT_TRUE(GradMode::is_enabled());
  {
    NoGradGuard guard;
    EXPECT_FALSE(GradMode::is_enabled());
    Variable y = mul(exp(x), x);
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
    {
      NoGradGuard nested;
      EXPECT_FALSE(GradMode::is_enabled());
    }
    EXPECT_FALSE(GradMode::is_enabled());
  }
  EXPECT_TRUE(GradMode::is_enabled());
  Variable z = exp(x);
  EXPECT_TRUE(z.requires_grad());
  ASSERT_NE(z.grad_fn(), nullptr);
  EXPECT_EQ(z.grad_fn()->name, "exp");
}

TEST(AutogradEngine, OpsOnConstantsRecordNothing) {
  Variable a(randn({3}, 20)), b(randn({3}, 21));
  Variable c = add(a, b);
  EXPECT_FALSE(c.requires_grad());
  EXPECT_TRUE(c.is_leaf());
}

TEST(AutogradEngine, DetachCutsTheGraphAndSharesData) {
  Variable x(randn({3}, 22), true);
  Variable y = exp(x);
  Variable d = detach(y);
  EXPECT_FALSE(d.requires_grad());
  EXPECT_TRUE(d.is_leaf());
  EXPECT_TRUE(d.data().shares_storage(y.data()));
  // Gradient flows through y but not through d.
  sum(add(y, mul(d, d))).backward();
  std::vector<double> e = values(y.data()), g = values(x.grad());
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(g[i], e[i], 1e-12);
}

TEST(AutogradEngine, NodesHaveIncreasingSequenceNumbers) {
  Variable x(randn({2}, 23), true);
  Variable a = exp(x);
  Variable b = exp(a);
  EXPECT_LT(a.grad_fn()->sequence_nr, b.grad_fn()->sequence_nr);
  ASSERT_EQ(b.grad_fn()->next_edges.size(), 1u);
  EXPECT_EQ(b.grad_fn()->next_edges[0], a.grad_fn());
  // The leaf's accumulator is shared by every use of the leaf.
  Variable c = exp(x);
  EXPECT_EQ(a.grad_fn()->next_edges[0], c.grad_fn()->next_edges[0]);
  EXPECT_TRUE(a.grad_fn()->next_edges[0]->is_accumulator());
}

TEST(AutogradEngine, RequiresGradOnlyOnFloatingLeaves) {
  EXPECT_THROW(Variable(Tensor::zeros({2}, DType::kI64), true), Error);
  Variable v(Tensor::zeros({2}, DType::kF64));
  v.set_requires_grad(true);
  EXPECT_TRUE(v.requires_grad());
  Variable y = exp(v);
  EXPECT_THROW(y.set_requires_grad(false), Error);
}

}  // namespace
}  // namespace motley::autograd
