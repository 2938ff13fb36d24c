#include "layers/optimizer.h"

#include <cmath>

#include <gtest/gtest.h>

namespace motley {
namespace {

// Three steps of torch.optim.AdamW (lr 0.1, 0.05, 0.02; betas (0.9, 0.95);
// eps 1e-8; weight decay 0.1 on the matrix, none on the vector), computed
// with PyTorch 1.13 in float64.
TEST(AdamW, MatchesTorchOptimAdamW) {
  ParameterSet params(0, DType::kF64, Device::cpu());
  autograd::Variable w = params.add("w", {2, 3}, Init::ones());
  autograd::Variable b = params.add("b", {2}, Init::ones());
  w.set_data(Tensor::from_vector(std::vector<double>{0.5, -1.0, 2.0, 0.1, 0.0, -0.3}, {2, 3}));
  b.set_data(Tensor::from_vector(std::vector<double>{1.0, -2.0}, {2}));
  TrainConfig config;
  config.beta1 = 0.9;
  config.beta2 = 0.95;
  config.eps = 1e-8;
  config.weight_decay = 0.1;
  AdamW opt(config);
  const std::vector<std::vector<double>> gw = {{0.3, -0.2, 0.1, 1.0, 0.5, -0.7},
                                               {-0.1, 0.4, 0.0, 0.2, -0.3, 0.9},
                                               {0.05, 0.05, -2.0, 0.0, 0.1, 0.2}};
  const std::vector<std::vector<double>> gb = {{0.5, -0.5}, {0.25, 1.0}, {-1.0, 0.0}};
  const double lrs[] = {0.1, 0.05, 0.02};
  for (int i = 0; i < 3; ++i) {
    w.set_grad(Tensor::from_vector(gw[i], {2, 3}));
    b.set_grad(Tensor::from_vector(gb[i], {2}));
    opt.step(params, lrs[i]);
  }
  EXPECT_EQ(opt.step_count(), 3);
  const std::vector<double> want_w = {0.3637769351121595,   -0.9089917615916419,
                                      1.8449404740297195,   -0.054262364047905576,
                                      -0.114082770380612,   -0.20932611863922604};
  const std::vector<double> want_b = {0.8571037501523265, -1.9238591192297319};
  const auto got_w = w.data().to_vector<double>();
  const auto got_b = b.data().to_vector<double>();
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(got_w[i], want_w[i], 1e-14) << i;
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(got_b[i], want_b[i], 1e-14) << i;
}

TEST(Schedule, WarmupThenCosineToMinLr) {
  TrainConfig c;
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.warmup = 10;
  c.steps = 110;
  EXPECT_DOUBLE_EQ(learning_rate(c, 1), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 5), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(c, 10), 1.0);
  EXPECT_NEAR(learning_rate(c, 60), 0.55, 1e-12);  // half way: (1 + 0.1) / 2
  EXPECT_DOUBLE_EQ(learning_rate(c, 110), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 200), 0.1);
  for (int s = 11; s < 110; ++s) EXPECT_LT(learning_rate(c, s + 1), learning_rate(c, s));
  c.warmup = 0;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 1.0);
}

TEST(Clipping, ScalesByClipOverNormPlusEpsilon) {
  ParameterSet params(0, DType::kF64, Device::cpu());
  autograd::Variable a = params.add("a", {2}, Init::ones());
  autograd::Variable b = params.add("b", {1}, Init::ones());
  params.add("unused", {3}, Init::ones());
  a.set_grad(Tensor::from_vector(std::vector<double>{3.0, 0.0}, {2}));
  b.set_grad(Tensor::from_vector(std::vector<double>{4.0}, {1}));
  const double ss = grad_sum_of_squares(params);
  EXPECT_DOUBLE_EQ(ss, 25.0);
  EXPECT_DOUBLE_EQ(clip_gradients(params, std::sqrt(ss), 10.0), 1.0);
  const double factor = clip_gradients(params, std::sqrt(ss), 1.0);
  EXPECT_DOUBLE_EQ(factor, 1.0 / (5.0 + 1e-6));
  EXPECT_DOUBLE_EQ(a.grad().to_vector<double>()[0], 3.0 * factor);
  EXPECT_DOUBLE_EQ(b.grad().to_vector<double>()[0], 4.0 * factor);
}

}  // namespace
}  // namespace motley
