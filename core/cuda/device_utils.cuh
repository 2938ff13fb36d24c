// Device helpers shared by the backend's .cu files: the bf16 storage type,
// loads and stores that compute in f32, warp and block reductions, launch
// sizing. Private to core/cuda/.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/cuda/kernels.h"

namespace motley::cuda_kernels {

// bf16 as stored: the upper half of an IEEE float (motley::BFloat16's
// layout). A distinct type so that templates can tell it from uint16.
struct Bf16 {
  std::uint16_t bits;
};

__device__ __forceinline__ float bf16_to_float(Bf16 v) {
  return __uint_as_float(static_cast<std::uint32_t>(v.bits) << 16);
}

// Round to nearest even; NaN becomes the canonical 0x7fc0. Bit-identical
// to BFloat16::round_from_float on the host.
__device__ __forceinline__ Bf16 float_to_bf16(float f) {
  const std::uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{0x7fc0};
  const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<std::uint16_t>((u + rounding_bias) >> 16)};
}

// f32 compute type for the floating storage types.
__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const Bf16* p) { return bf16_to_float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(Bf16* p, float v) { *p = float_to_bf16(v); }

// Value conversion between any two storage types, as the CPU backend does
// it: through float when either side is bf16 (so double -> bf16 rounds
// twice, exactly like BFloat16(static_cast<float>(d))), else static_cast.
template <typename D, typename S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (std::is_same_v<S, Bf16>) {
    return convert<D>(bf16_to_float(v));
  } else if constexpr (std::is_same_v<D, Bf16>) {
    return float_to_bf16(static_cast<float>(v));
  } else {
    return static_cast<D>(v);
  }
}

// ---- reductions ----------------------------------------------------------------
// Butterfly (xor) reductions. Because IEEE addition and max are
// commutative, every lane ends with the bit-identical result, so all lanes
// may use it; the tree is fixed, so results are deterministic.
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a < b ? b : a;
  }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b < a ? b : a;
  }
};

// Reduces over groups of `kWidth` consecutive lanes (a power of two <= 32).
template <int kWidth = 32, typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// All threads of the block get the result. `smem` holds 32 T. Safe to call
// repeatedly: the leading barrier keeps a new call from overwriting
// partials that a slow warp is still reading from the previous one.
// blockDim.x must be a multiple of 32.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T identity, T* smem) {
  v = warp_allreduce(v, op);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  T r = lane < warps ? smem[lane] : identity;
  return warp_allreduce(r, op);
}

// Note [Row groups]
// Row kernels (softmax, cross-entropy, rmsnorm, argmax, cumsum) give each
// row to a "group" of threads: one warp per row when rows are short
// (kBlock = false, blockDim.x / 32 rows per block, no block barriers), or
// the whole block when rows are long (kBlock = true). group_allreduce
// hides the difference. In warp mode whole warps may return early; in
// block mode the row is uniform across the block, so no thread skips a
// barrier.
template <bool kBlock>
struct RowGroup {
  std::int64_t row;  // this group's row (may be >= rows: caller returns)
  int lane;          // index within the group
  int size;          // threads in the group

  __device__ __forceinline__ RowGroup() {
    if constexpr (kBlock) {
      row = blockIdx.x;
      lane = threadIdx.x;
      size = blockDim.x;
    } else {
      row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
      lane = threadIdx.x % 32;
      size = 32;
    }
  }
};

template <bool kBlock, typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, Op op, T identity, T* smem) {
  if constexpr (kBlock) {
    return block_allreduce(v, op, identity, smem);
  } else {
    return warp_allreduce(v, op);
  }
}

// Rows at most this long use one warp per row; longer ones a block.
constexpr std::int64_t kWarpRowMax = 1024;
constexpr int kRowThreads = 256;

inline unsigned row_grid(std::int64_t rows, bool block_mode) {
  return static_cast<unsigned>(block_mode ? rows
                                          : (rows + kRowThreads / 32 - 1) / (kRowThreads / 32));
}

// Grid for a grid-stride loop over n items with `threads` per block.
inline unsigned grid_for(std::int64_t n, int threads = 256) {
  const std::int64_t blocks = (n + threads - 1) / threads;
  constexpr std::int64_t kMaxBlocks = 1 << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

__device__ __forceinline__ std::int64_t global_thread() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ std::int64_t grid_stride() {
  return static_cast<std::int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace motley::cuda_kernels
