#include "layers/modules.h"

#include <cmath>

#include <gtest/gtest.h>

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tests/layers/layer_test_util.h"

namespace motley {
namespace {

namespace ag = autograd;
using testing::random_tensor;

TEST(Modules, AttentionBlockGradientCheck) {
  // B = 2, T = 5, d = 8, 2 heads of 4.
  const Tensor x = random_tensor({2, 5, 8}, "attn.x");
  std::vector<Tensor> inputs = {x};
  for (const char* w : {"wq", "wk", "wv", "wo"}) {
    inputs.push_back(random_tensor({8, 8}, std::string("attn.") + w, 0.4));
  }
  const Tensor proj = random_tensor({2, 5, 8}, "attn.proj");
  auto f = [&](const std::vector<ag::Variable>& in) {
    AttentionWeights w{in[1], in[2], in[3], in[4]};
    return ag::sum(ag::mul(attention_block(w, in[0], 2, 100.0), ag::Variable(proj)));
  };
  const ag::GradcheckResult r = ag::gradcheck(f, inputs);
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(Modules, AttentionIsCausal) {
  const Tensor x = random_tensor({1, 6, 8}, "causal.x");
  AttentionWeights w;
  for (ag::Variable* v : {&w.wq, &w.wk, &w.wv, &w.wo}) {
    *v = ag::Variable(random_tensor({8, 8}, "causal.w", 0.4));
  }
  const auto full = attention_block(w, ag::Variable(x), 2, 10000.0).data().to_vector<double>();
  // Changing the last token leaves every earlier output unchanged.
  Tensor x2 = x.clone();
  x2.narrow(1, 5, 1).fill_(3.0);
  const auto changed = attention_block(w, ag::Variable(x2), 2, 10000.0).data().to_vector<double>();
  for (int i = 0; i < 5 * 8; ++i) EXPECT_DOUBLE_EQ(full[i], changed[i]) << i;
  bool last_differs = false;
  for (int i = 5 * 8; i < 6 * 8; ++i) last_differs |= full[i] != changed[i];
  EXPECT_TRUE(last_differs);
}

TEST(Modules, SwigluFfnValueAndGradient) {
  const Tensor x = random_tensor({3, 4}, "ffn.x");
  const Tensor w1 = random_tensor({5, 4}, "ffn.w1"), w3 = random_tensor({5, 4}, "ffn.w3");
  const Tensor w2 = random_tensor({4, 5}, "ffn.w2");
  SwiGluWeights w{ag::Variable(w1), ag::Variable(w3), ag::Variable(w2)};
  const auto y = swiglu_ffn(w, ag::Variable(x)).data().to_vector<double>();
  const auto xv = x.to_vector<double>(), w1v = w1.to_vector<double>(),
             w3v = w3.to_vector<double>(), w2v = w2.to_vector<double>();
  for (int n = 0; n < 3; ++n) {
    auto a = testing::matvec(w1v, 5, 4, &xv[n * 4]);
    auto b = testing::matvec(w3v, 5, 4, &xv[n * 4]);
    for (int i = 0; i < 5; ++i) a[i] = testing::silu(a[i]) * b[i];
    const auto want = testing::matvec(w2v, 4, 5, a.data());
    for (int j = 0; j < 4; ++j) EXPECT_NEAR(y[n * 4 + j], want[j], 1e-14);
  }
  auto f = [](const std::vector<ag::Variable>& in) {
    return ag::sum(ag::square(swiglu_ffn({in[1], in[2], in[3]}, in[0])));
  };
  const ag::GradcheckResult r = ag::gradcheck(f, {x, w1, w3, w2});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(Modules, GruCellMatchesPyTorchEquations) {
  const std::int64_t p = 3;
  const Tensor x = random_tensor({2, p}, "gru.x"), h = random_tensor({2, p}, "gru.h");
  const Tensor wih = random_tensor({3 * p, p}, "gru.wih"), whh = random_tensor({3 * p, p}, "gru.whh");
  const Tensor bih = random_tensor({3 * p}, "gru.bih"), bhh = random_tensor({3 * p}, "gru.bhh");
  GruWeights w{ag::Variable(wih), ag::Variable(whh), ag::Variable(bih), ag::Variable(bhh)};
  const auto got = gru_cell(w, ag::Variable(x), ag::Variable(h)).data().to_vector<double>();
  const auto xv = x.to_vector<double>(), hv = h.to_vector<double>();
  const auto wi = wih.to_vector<double>(), wh = whh.to_vector<double>();
  const auto bi = bih.to_vector<double>(), bh = bhh.to_vector<double>();
  auto sigmoid = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  for (int n = 0; n < 2; ++n) {
    const auto gi = testing::matvec(wi, 3 * p, p, &xv[n * p]);
    const auto gh = testing::matvec(wh, 3 * p, p, &hv[n * p]);
    for (int i = 0; i < p; ++i) {
      const double r = sigmoid(gi[i] + bi[i] + gh[i] + bh[i]);
      const double z = sigmoid(gi[p + i] + bi[p + i] + gh[p + i] + bh[p + i]);
      const double nn = std::tanh(gi[2 * p + i] + bi[2 * p + i] + r * (gh[2 * p + i] + bh[2 * p + i]));
      EXPECT_NEAR(got[n * p + i], (1 - z) * nn + z * hv[n * p + i], 1e-14);
    }
  }
  auto f = [](const std::vector<ag::Variable>& in) {
    return ag::sum(ag::square(gru_cell({in[2], in[3], in[4], in[5]}, in[0], in[1])));
  };
  const ag::GradcheckResult r = ag::gradcheck(f, {x, h, wih, whh, bih, bhh});
  EXPECT_TRUE(r.ok) << r.message;
}

}  // namespace
}  // namespace motley
