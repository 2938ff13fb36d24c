// Row gather / scatter and per-row sorting against the CPU backend.
#include <algorithm>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace motley::cuda_test {
namespace {

using CudaIndex = CudaTest;

TEST_F(CudaIndex, IndexSelectRowsEveryDTypeAndRowWidth) {
  // Row widths that select each copy unit: 16-byte (d = 8 f32), 8-byte,
  // 4-byte and 2-byte (odd bf16 rows).
  for (DType dt : {DType::kF32, DType::kBF16, DType::kI64, DType::kI32}) {
    for (std::int64_t d : {1, 2, 3, 8, 33, 1024}) {
      const bool integer = dt == DType::kI64 || dt == DType::kI32;
      const Tensor src =
          integer ? randint({50, d}, 701 + d, -9, 9, dt) : randn({50, d}, 700 + d, 1.0, dt);
      for (DType idt : {DType::kI32, DType::kI64}) {
        Tensor index = randint({77}, 702 + d, 0, 50, idt);  // repeats
        Tensor oc = Tensor::empty({77, d}, dt), og = Tensor::empty({77, d}, dt, gpu());
        cpu_backend_ref().index_select_rows(src, index, oc);
        gpu_backend().index_select_rows(on_gpu(src), on_gpu(index), og);
        EXPECT_TRUE(same_bits(og, oc)) << dtype_name(dt) << " d " << d << " " << dtype_name(idt);
      }
    }
  }
  // (R, d1, d2) rows.
  Tensor src3 = randn({6, 4, 5}, 710);
  Tensor index = Tensor::from_vector(std::vector<std::int64_t>{5, 0, 5}, {3});
  Tensor oc = Tensor::empty({3, 4, 5}), og = Tensor::empty({3, 4, 5}, DType::kF32, gpu());
  cpu_backend_ref().index_select_rows(src3, index, oc);
  gpu_backend().index_select_rows(on_gpu(src3), on_gpu(index), og);
  EXPECT_TRUE(same_bits(og, oc));
}

TEST_F(CudaIndex, IndexSelectOutOfRangeIsAShapeError) {
  Tensor src = on_gpu(randn({10, 4}, 720));
  Tensor out = Tensor::empty({3, 4}, DType::kF32, gpu());
  for (std::int64_t bad : {10, -1, 123456}) {
    Tensor index = on_gpu(Tensor::from_vector(std::vector<std::int64_t>{0, bad, 2}, {3}));
    const std::string msg =
        expect_error(ErrorKind::kShape, [&] { gpu_backend().index_select_rows(src, index, out); });
    EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
  }
  // The backend is usable afterwards.
  Tensor ok = on_gpu(Tensor::from_vector(std::vector<std::int32_t>{9, 0, 1}, {3}));
  gpu_backend().index_select_rows(src, ok, out);
  EXPECT_TRUE(gpu_backend().all_finite(out));
}

TEST_F(CudaIndex, IndexAddRowsInOrderWithAndWithoutScale) {
  for (std::int64_t d : {1, 5, 64, 1000}) {
    for (std::int64_t n : {1, 300, 20000}) {
      const std::int64_t rows = 97;
      Tensor src = randn({n, d}, 730 + n + d);
      Tensor scale = randn({n}, 731 + n);
      Tensor index = randint({n}, 732 + n, 0, rows, n % 2 ? DType::kI32 : DType::kI64);
      Tensor out0 = randn({rows, d}, 733 + d);  // accumulates into existing values
      for (bool with_scale : {false, true}) {
        const Tensor sc = with_scale ? scale : Tensor();
        Tensor oc = out0.clone(), og = on_gpu(out0);
        cpu_backend_ref().index_add_rows(src, index, sc, oc);
        gpu_backend().index_add_rows(on_gpu(src), on_gpu(index),
                                     with_scale ? on_gpu(scale) : Tensor(), og);
        // Same order of additions as the CPU: differences only from FMA
        // contraction (~1e-15), none at all when both contract alike.
        EXPECT_LT(nmse(og, oc), 1e-10) << "n " << n << " d " << d << " scale " << with_scale;
        // Deterministic.
        Tensor og2 = on_gpu(out0);
        gpu_backend().index_add_rows(on_gpu(src), on_gpu(index),
                                     with_scale ? on_gpu(scale) : Tensor(), og2);
        EXPECT_TRUE(same_bits(og, og2)) << "n " << n << " d " << d;
      }
    }
  }
}

TEST_F(CudaIndex, IndexAddRowsBf16) {
  const std::int64_t n = 500, d = 37, rows = 20;
  Tensor src = randn({n, d}, 740, 1.0, DType::kBF16);
  Tensor index = randint({n}, 741, 0, rows);
  Tensor scale = randn({n}, 742);
  Tensor oc = Tensor::zeros({rows, d});
  cpu_backend_ref().index_add_rows(src.to(DType::kF32), index, scale, oc);
  Tensor og = Tensor::zeros({rows, d}, DType::kBF16, gpu());
  gpu_backend().index_add_rows(on_gpu(src), on_gpu(index), on_gpu(scale), og);
  EXPECT_LT(nmse(og, oc), kBf16Tol);
}

TEST_F(CudaIndex, IndexAddOutOfRangeThrowsBeforeWriting) {
  Tensor src = on_gpu(randn({3, 4}, 750));
  Tensor out = Tensor::zeros({5, 4}, DType::kF32, gpu());
  Tensor index = on_gpu(Tensor::from_vector(std::vector<std::int64_t>{1, 2, 5}, {3}));
  const std::string msg = expect_error(
      ErrorKind::kShape, [&] { gpu_backend().index_add_rows(src, index, Tensor(), out); });
  EXPECT_NE(msg.find("position 2"), std::string::npos) << msg;
  EXPECT_EQ(out.to_vector<float>(), std::vector<float>(20, 0.0f)) << "out untouched";
}

// Values on a coarse grid so that ties are frequent: the tie rule (lower
// index first) is then exercised on every row.
TEST_F(CudaIndex, TopkAndSortDescMatchCpuExactlyWithTies) {
  for (std::int64_t n : {1, 2, 8, 64, 1000, 3000}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      Tensor x = ops::scale(randint({33, n}, 760 + n, -5, 6, DType::kF32), 0.5).to(dt);
      Tensor x32 = x.to(DType::kF32);
      for (std::int64_t k : {std::int64_t{1}, std::min<std::int64_t>(2, n), n}) {
        Tensor vc = Tensor::empty({33, k}), ic = Tensor::empty({33, k}, DType::kI64);
        cpu_backend_ref().topk(x32, k, vc, ic);
        Tensor vg = Tensor::empty({33, k}, dt, gpu()),
               ig = Tensor::empty({33, k}, DType::kI64, gpu());
        gpu_backend().topk(on_gpu(x), k, vg, ig);
        EXPECT_TRUE(same_bits(ig, ic)) << "topk n " << n << " k " << k << " " << dtype_name(dt);
        EXPECT_TRUE(same_values(vg, vc)) << "topk n " << n << " k " << k;
      }
      Tensor vc = Tensor::empty({33, n}), ic = Tensor::empty({33, n}, DType::kI64);
      cpu_backend_ref().sort_desc(x32, vc, ic);
      Tensor vg = Tensor::empty({33, n}, dt, gpu()),
             ig = Tensor::empty({33, n}, DType::kI64, gpu());
      gpu_backend().sort_desc(on_gpu(x), vg, ig);
      EXPECT_TRUE(same_bits(ig, ic)) << "sort n " << n << " " << dtype_name(dt);
      EXPECT_TRUE(same_values(vg, vc)) << "sort n " << n;
    }
  }
}

TEST_F(CudaIndex, SortSpecialValues) {
  // NaN first (in index order), +-0 equal (index order), infinities placed.
  const std::vector<float> v = {0.0f, NAN, -0.0f, -INFINITY, 1.0f, NAN, INFINITY, -0.0f, 0.0f};
  const std::int64_t n = static_cast<std::int64_t>(v.size());
  Tensor x = Tensor::from_vector(v, {1, n});
  Tensor vc = Tensor::empty({1, n}), ic = Tensor::empty({1, n}, DType::kI64);
  cpu_backend_ref().sort_desc(x, vc, ic);
  Tensor vg = Tensor::empty({1, n}, DType::kF32, gpu()),
         ig = Tensor::empty({1, n}, DType::kI64, gpu());
  gpu_backend().sort_desc(on_gpu(x), vg, ig);
  EXPECT_TRUE(same_bits(ig, ic)) << "indices";
  EXPECT_TRUE(same_bits(vg, vc)) << "values, including the sign of zeros";
}

TEST_F(CudaIndex, TopkRoutingShape) {
  // The MoE router's shape: many tokens, few experts.
  Tensor probs = randn({16384, 64}, 780);
  Tensor vc = Tensor::empty({16384, 2}), ic = Tensor::empty({16384, 2}, DType::kI64);
  cpu_backend_ref().topk(probs, 2, vc, ic);
  Tensor vg = Tensor::empty({16384, 2}, DType::kF32, gpu());
  Tensor ig = Tensor::empty({16384, 2}, DType::kI64, gpu());
  gpu_backend().topk(on_gpu(probs), 2, vg, ig);
  EXPECT_TRUE(same_bits(ig, ic));
  EXPECT_TRUE(same_bits(vg, vc));
}

}  // namespace
}  // namespace motley::cuda_test
