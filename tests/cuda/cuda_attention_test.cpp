// Causal flash attention, forward and backward, against the CPU backend:
// head dims below, at and between the kernel's tile widths, Tq < Tk
// (decoding with a cache), single queries, and sequences that are not
// multiples of the tile sizes.
#include <cmath>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace motley::cuda_test {
namespace {

using CudaAttention = CudaTest;

struct AttnCase {
  std::int64_t b, h, tq, tk, hd;
};

const AttnCase kAttnCases[] = {
    {2, 3, 17, 17, 16},                          // smaller than one tile
    {1, 2, 100, 100, 64},                        // hd = 64 kernel, ragged last tile
    {1, 1, 70, 130, 128},                        // Tq < Tk: query i sees keys <= i + 60
    {2, 2, 1, 33, 32},                           // one query (decoding)
    {1, 2, 64, 64, 80},                          // hd not a multiple of 16 (hd <= 128 kernel)
    {1, 1, 200, 200, 128}, {3, 1, 129, 129, 8},  // tiny heads, three query tiles
    {1, 1, 5, 300, 1},                           // hd = 1, long key cache
};

TEST_F(CudaAttention, ForwardAndBackwardMatchCpu) {
  for (const AttnCase& c : kAttnCases) {
    const std::uint64_t seed = 500 + c.tq * 7 + c.hd;
    Tensor q = randn({c.b, c.h, c.tq, c.hd}, seed);
    Tensor k = randn({c.b, c.h, c.tk, c.hd}, seed + 1);
    Tensor v = randn({c.b, c.h, c.tk, c.hd}, seed + 2);
    Tensor dout = randn({c.b, c.h, c.tq, c.hd}, seed + 3);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
    Tensor out_c = Tensor::empty(q.shape()), lse_c = Tensor::empty({c.b, c.h, c.tq});
    cpu_backend_ref().attention(q, k, v, scale, out_c, lse_c);
    const Tensor qg = on_gpu(q), kg = on_gpu(k), vg = on_gpu(v), dg = on_gpu(dout);
    Tensor out_g = Tensor::empty(q.shape(), DType::kF32, gpu());
    Tensor lse_g = Tensor::empty({c.b, c.h, c.tq}, DType::kF32, gpu());
    gpu_backend().attention(qg, kg, vg, scale, out_g, lse_g);
    const std::string what = "B " + std::to_string(c.b) + " H " + std::to_string(c.h) + " Tq " +
                             std::to_string(c.tq) + " Tk " + std::to_string(c.tk) + " hd " +
                             std::to_string(c.hd);
    EXPECT_LT(nmse(out_g, out_c), kF32Tol) << what;
    EXPECT_LT(nmse(lse_g, lse_c), kF32Tol) << what;

    Tensor dq_c = Tensor::empty(q.shape()), dk_c = Tensor::empty(k.shape()),
           dv_c = Tensor::empty(v.shape());
    cpu_backend_ref().attention_backward(q, k, v, out_c, lse_c, dout, scale, dq_c, dk_c, dv_c);
    Tensor dq_g = Tensor::empty(q.shape(), DType::kF32, gpu());
    Tensor dk_g = Tensor::empty(k.shape(), DType::kF32, gpu());
    Tensor dv_g = Tensor::empty(v.shape(), DType::kF32, gpu());
    gpu_backend().attention_backward(qg, kg, vg, out_g, lse_g, dg, scale, dq_g, dk_g, dv_g);
    EXPECT_LT(nmse(dq_g, dq_c), kF32Tol) << what;
    EXPECT_LT(nmse(dk_g, dk_c), kF32Tol) << what;
    EXPECT_LT(nmse(dv_g, dv_c), kF32Tol) << what;

    // Deterministic: no atomics, so a second backward gives the same bits.
    Tensor dq2 = Tensor::empty(q.shape(), DType::kF32, gpu());
    Tensor dk2 = Tensor::empty(k.shape(), DType::kF32, gpu());
    Tensor dv2 = Tensor::empty(v.shape(), DType::kF32, gpu());
    gpu_backend().attention_backward(qg, kg, vg, out_g, lse_g, dg, scale, dq2, dk2, dv2);
    EXPECT_TRUE(same_bits(dq2, dq_g) && same_bits(dk2, dk_g) && same_bits(dv2, dv_g)) << what;
  }
}

// The causal mask itself: with v = one-hot rows, out[i] is the softmax
// weight vector of query i, which must vanish beyond key i + (Tk - Tq).
TEST_F(CudaAttention, CausalMaskWithOffset) {
  const std::int64_t tq = 40, tk = 100, hd = 100;  // hd == tk: v is the identity
  Tensor q = randn({1, 1, tq, hd}, 600), k = randn({1, 1, tk, hd}, 601);
  std::vector<float> eye(tk * hd, 0.0f);
  for (std::int64_t i = 0; i < tk; ++i) eye[i * hd + i] = 1.0f;
  Tensor v = Tensor::from_vector(eye, {1, 1, tk, hd});
  Tensor out = Tensor::empty({1, 1, tq, hd}, DType::kF32, gpu());
  Tensor lse = Tensor::empty({1, 1, tq}, DType::kF32, gpu());
  gpu_backend().attention(on_gpu(q), on_gpu(k), on_gpu(v), 0.1, out, lse);
  const std::vector<float> w = out.to_vector<float>();
  for (std::int64_t i = 0; i < tq; ++i) {
    double total = 0.0;
    for (std::int64_t j = 0; j < tk; ++j) {
      const float wij = w[i * hd + j];
      if (j > i + (tk - tq)) {
        EXPECT_EQ(wij, 0.0f) << "query " << i << " sees key " << j;
      } else {
        EXPECT_GT(wij, 0.0f) << "query " << i << " misses key " << j;
      }
      total += wij;
    }
    EXPECT_NEAR(total, 1.0, 1e-5) << "query " << i;
  }
}

TEST_F(CudaAttention, LargeScoresStayFinite) {
  // Scores of several hundred: exp would overflow without the running max,
  // and the online softmax must rescale its accumulator as the max grows.
  Tensor q = randn({1, 2, 150, 32}, 610, 10.0), k = randn({1, 2, 150, 32}, 611, 10.0);
  Tensor v = randn({1, 2, 150, 32}, 612);
  Tensor out_c = Tensor::empty(q.shape()), lse_c = Tensor::empty({1, 2, 150});
  cpu_backend_ref().attention(q, k, v, 1.0, out_c, lse_c);
  Tensor out_g = Tensor::empty(q.shape(), DType::kF32, gpu());
  Tensor lse_g = Tensor::empty({1, 2, 150}, DType::kF32, gpu());
  gpu_backend().attention(on_gpu(q), on_gpu(k), on_gpu(v), 1.0, out_g, lse_g);
  EXPECT_TRUE(gpu_backend().all_finite(out_g));
  EXPECT_LT(nmse(out_g, out_c), kF32Tol);
  EXPECT_LT(nmse(lse_g, lse_c), kF32Tol);
}

TEST_F(CudaAttention, UnsupportedShapesAreShapeErrors) {
  Tensor q = Tensor::zeros({1, 1, 4, 256}, DType::kF32, gpu());
  Tensor out = Tensor::empty({1, 1, 4, 256}, DType::kF32, gpu());
  Tensor lse = Tensor::empty({1, 1, 4}, DType::kF32, gpu());
  expect_error(ErrorKind::kShape, [&] { gpu_backend().attention(q, q, q, 1.0, out, lse); });
  Tensor q2 = Tensor::zeros({1, 1, 8, 16}, DType::kF32, gpu());
  Tensor k2 = Tensor::zeros({1, 1, 4, 16}, DType::kF32, gpu());
  Tensor out2 = Tensor::empty({1, 1, 8, 16}, DType::kF32, gpu());
  Tensor lse2 = Tensor::empty({1, 1, 8}, DType::kF32, gpu());
  expect_error(ErrorKind::kShape,
               [&] { gpu_backend().attention(q2, k2, k2, 1.0, out2, lse2); });  // Tq > Tk
}

}  // namespace
}  // namespace motley::cuda_test
