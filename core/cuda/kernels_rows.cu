// Reductions and row kernels: reduce over (outer, n, inner), argmax,
// cumsum, the finiteness check, softmax / log-softmax, cross-entropy and
// RMSNorm, forward and backward.
//
// Every reduction here has a fixed shape-determined order (warp butterflies,
// block trees, partials combined in index order), so results are
// bit-reproducible run to run; no floating-point atomics are used.
#include <climits>
#include <cmath>

#include "core/cuda/device_utils.cuh"

namespace motley::cuda_kernels {
namespace {

constexpr float kNegInf = -INFINITY;

// ---- reduce (outer, n, inner) --------------------------------------------------------
//
// Note [Split reductions]
// A reduction with few outputs and a long n would leave most of the GPU
// idle, so n is cut into `splits` chunks of `chunk` elements. Each
// (output, chunk) pair is reduced in f64 into workspace[(s * outer + o) *
// inner + i]; a second kernel folds the splits of each output in order.
// With splits == 1 the first kernel writes the output directly. The split
// count depends only on the shape, so results are reproducible.
struct ReducePlan {
  std::int64_t splits;
  std::int64_t chunk;
  bool row_blocks;  // inner == 1 and long rows: a block per (row, split)
};

ReducePlan plan_reduce(std::int64_t outer, std::int64_t n, std::int64_t inner) {
  ReducePlan plan{1, n, false};
  const std::int64_t outputs = outer * inner;
  if (inner == 1 && n >= 512) {
    plan.row_blocks = true;
    // Aim for ~1024 blocks in all, each reducing at least 4096 elements.
    std::int64_t splits = (1024 + outer - 1) / outer;
    const std::int64_t max_splits = (n + 4095) / 4096;
    if (splits > max_splits) splits = max_splits;
    if (splits > 65535) splits = 65535;
    plan.splits = splits < 1 ? 1 : splits;
  } else {
    // One thread per (output, split); aim for ~64k threads, each reducing
    // at least 64 elements.
    std::int64_t splits = (65536 + outputs - 1) / outputs;
    const std::int64_t max_splits = (n + 63) / 64;
    if (splits > max_splits) splits = max_splits;
    plan.splits = splits < 1 ? 1 : splits;
  }
  plan.chunk = (n + plan.splits - 1) / plan.splits;
  return plan;
}

// Accumulation per storage type: f64 for floating data (bf16 and f32 are
// exact in f64, and sums keep ~1e-16 relative error whatever n), i64 for
// integers, as the CPU backend does.
template <typename T>
struct ReduceTraits {
  using Acc = double;
  static __device__ __forceinline__ Acc load(const T* p) { return static_cast<double>(load_f(p)); }
  static __device__ __forceinline__ void store(T* p, Acc v) { store_f(p, static_cast<float>(v)); }
  static __device__ __forceinline__ Acc lowest() { return -INFINITY; }
  static __device__ __forceinline__ Acc highest() { return INFINITY; }
};
template <typename I>
struct IntReduceTraits {
  using Acc = long long;
  static __device__ __forceinline__ Acc load(const I* p) { return static_cast<long long>(*p); }
  static __device__ __forceinline__ void store(I* p, Acc v) { *p = static_cast<I>(v); }
  static __device__ __forceinline__ Acc lowest() { return LLONG_MIN; }
  static __device__ __forceinline__ Acc highest() { return LLONG_MAX; }
};
template <>
struct ReduceTraits<std::int32_t> : IntReduceTraits<std::int32_t> {};
template <>
struct ReduceTraits<std::int64_t> : IntReduceTraits<std::int64_t> {};

template <typename T>
__device__ __forceinline__ typename ReduceTraits<T>::Acc reduce_identity(ReduceCode op) {
  switch (op) {
    case ReduceCode::kMax:
      return ReduceTraits<T>::lowest();
    case ReduceCode::kMin:
      return ReduceTraits<T>::highest();
    default:
      return 0;
  }
}

// max/min as the CPU writes them: a new value replaces the running one
// only when strictly greater (smaller).
template <typename Acc>
__device__ __forceinline__ Acc reduce_combine(ReduceCode op, Acc acc, Acc v) {
  switch (op) {
    case ReduceCode::kMax:
      return v > acc ? v : acc;
    case ReduceCode::kMin:
      return v < acc ? v : acc;
    default:
      return acc + v;
  }
}

// The element's contribution: x^2 for kSumSquares (exact in f64 for f32
// data), else x.
template <typename T>
__device__ __forceinline__ typename ReduceTraits<T>::Acc reduce_value(ReduceCode op, const T* p) {
  const auto v = ReduceTraits<T>::load(p);
  return op == ReduceCode::kSumSquares ? v * v : v;
}

template <typename Acc>
struct CombineOp {
  ReduceCode op;
  __device__ __forceinline__ Acc operator()(Acc a, Acc b) const { return reduce_combine(op, a, b); }
};

// grid (outer, splits); inner == 1.
template <typename T>
__global__ void reduce_rows_kernel(ReduceCode op, const T* a, std::int64_t n, std::int64_t chunk,
                                   typename ReduceTraits<T>::Acc* partial, T* out) {
  using Acc = typename ReduceTraits<T>::Acc;
  __shared__ Acc smem[32];
  const std::int64_t o = blockIdx.x;
  const std::int64_t s = blockIdx.y;
  const std::int64_t begin = s * chunk;
  const std::int64_t end = begin + chunk < n ? begin + chunk : n;
  const T* row = a + o * n;
  Acc acc = reduce_identity<T>(op);
  for (std::int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    acc = reduce_combine(op, acc, reduce_value(op, row + j));
  }
  acc = block_allreduce(acc, CombineOp<Acc>{op}, reduce_identity<T>(op), smem);
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) {
      ReduceTraits<T>::store(out + o, acc);
    } else {
      partial[s * gridDim.x + o] = acc;
    }
  }
}

// One thread per (split, o, i).
template <typename T>
__global__ void reduce_cols_kernel(ReduceCode op, const T* a, std::int64_t outer, std::int64_t n,
                                   std::int64_t inner, std::int64_t splits, std::int64_t chunk,
                                   typename ReduceTraits<T>::Acc* partial, T* out) {
  using Acc = typename ReduceTraits<T>::Acc;
  const std::int64_t outputs = outer * inner;
  const std::int64_t total = outputs * splits;
  for (std::int64_t idx = global_thread(); idx < total; idx += grid_stride()) {
    const std::int64_t s = idx / outputs;
    const std::int64_t oi = idx - s * outputs;
    const std::int64_t o = oi / inner;
    const std::int64_t i = oi - o * inner;
    const std::int64_t begin = s * chunk;
    const std::int64_t end = begin + chunk < n ? begin + chunk : n;
    const T* base = a + o * n * inner + i;
    Acc acc = reduce_identity<T>(op);
    for (std::int64_t j = begin; j < end; ++j) {
      acc = reduce_combine(op, acc, reduce_value(op, base + j * inner));
    }
    if (splits == 1) {
      ReduceTraits<T>::store(out + oi, acc);
    } else {
      partial[idx] = acc;
    }
  }
}

// Folds the splits of each output in increasing split order.
template <typename T>
__global__ void reduce_finish_kernel(ReduceCode op, const typename ReduceTraits<T>::Acc* partial,
                                     std::int64_t outputs, std::int64_t splits, T* out) {
  using Acc = typename ReduceTraits<T>::Acc;
  for (std::int64_t oi = global_thread(); oi < outputs; oi += grid_stride()) {
    Acc acc = reduce_identity<T>(op);
    for (std::int64_t s = 0; s < splits; ++s) {
      acc = reduce_combine(op, acc, partial[s * outputs + oi]);
    }
    ReduceTraits<T>::store(out + oi, acc);
  }
}

template <typename T>
cudaError_t reduce_typed(ReduceCode op, const void* a_raw, void* out_raw, std::int64_t outer,
                         std::int64_t n, std::int64_t inner, void* workspace, cudaStream_t stream) {
  using Acc = typename ReduceTraits<T>::Acc;
  const T* a = static_cast<const T*>(a_raw);
  T* out = static_cast<T*>(out_raw);
  Acc* partial = static_cast<Acc*>(workspace);
  const ReducePlan plan = plan_reduce(outer, n, inner);
  const std::int64_t outputs = outer * inner;
  if (plan.row_blocks) {
    if (outer > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(outer), static_cast<unsigned>(plan.splits));
    reduce_rows_kernel<<<grid, 256, 0, stream>>>(op, a, n, plan.chunk, partial, out);
  } else {
    reduce_cols_kernel<<<grid_for(outputs * plan.splits), 256, 0, stream>>>(
        op, a, outer, n, inner, plan.splits, plan.chunk, partial, out);
  }
  if (plan.splits > 1) {
    reduce_finish_kernel<<<grid_for(outputs), 256, 0, stream>>>(op, partial, outputs, plan.splits,
                                                                out);
  }
  return cudaGetLastError();
}

// ---- argmax --------------------------------------------------------------------------

// (value, index) with "larger value, then lower index" winning: the first
// maximum, as a left-to-right scan finds it.
struct ArgMax {
  float value;
  std::int64_t index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

template <bool kBlock, typename T>
__global__ void argmax_kernel(const T* a, std::int64_t rows, std::int64_t n, std::int64_t* out) {
  __shared__ float smem_v[32];
  __shared__ std::int64_t smem_i[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* row = a + g.row * n;
  ArgMax best{kNegInf, n};  // index n: loses every tie against a real element
  for (std::int64_t j = g.lane; j < n; j += g.size) {
    best = better(best, ArgMax{load_f(row + j), j});
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, best.value, offset),
                 __shfl_xor_sync(0xffffffffu, best.index, offset)};
    best = better(best, other);
  }
  if constexpr (kBlock) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (lane == 0) {
      smem_v[warp] = best.value;
      smem_i[warp] = best.index;
    }
    __syncthreads();
    if (warp == 0) {
      const int warps = blockDim.x / 32;
      best = lane < warps ? ArgMax{smem_v[lane], smem_i[lane]} : ArgMax{kNegInf, n};
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        ArgMax other{__shfl_xor_sync(0xffffffffu, best.value, offset),
                     __shfl_xor_sync(0xffffffffu, best.index, offset)};
        best = better(best, other);
      }
    }
  }
  // NaN never wins a comparison, so a row of only NaN keeps index n;
  // report 0, the first element, which is what the CPU's scan returns.
  if (g.lane == 0) out[g.row] = best.index < n ? best.index : 0;
}

// ---- cumsum ----------------------------------------------------------------------------

// Inclusive scan of a row in tiles of the group's size: each thread takes
// one element, warps scan with shuffles, the block combines warp totals,
// and `carry` moves the running total from tile to tile. Acc is f64 for
// floats (error-free against an f32 running sum) and i64 for integers.
template <bool kBlock, typename T, typename Acc>
__global__ void cumsum_kernel(const T* a, T* out, std::int64_t rows, std::int64_t n) {
  __shared__ Acc warp_totals[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* in = a + g.row * n;
  T* dst = out + g.row * n;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  Acc carry = 0;
  for (std::int64_t base = 0; base < n; base += g.size) {
    const std::int64_t j = base + g.lane;
    Acc v = 0;
    if (j < n) v = static_cast<Acc>(in[j]);
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const Acc up = __shfl_up_sync(0xffffffffu, v, offset);
      if (lane >= offset) v += up;
    }
    Acc tile_total;
    if constexpr (kBlock) {
      __syncthreads();  // the previous tile is done with warp_totals
      if (lane == 31) warp_totals[warp] = v;
      __syncthreads();
      Acc before = 0;
      tile_total = 0;
      const int warps = blockDim.x / 32;
      for (int w = 0; w < warps; ++w) {
        if (w < warp) before += warp_totals[w];
        tile_total += warp_totals[w];
      }
      v += before;
    } else {
      tile_total = __shfl_sync(0xffffffffu, v, 31);
    }
    if (j < n) dst[j] = static_cast<T>(carry + v);
    carry += tile_total;
  }
}

// ---- finiteness ------------------------------------------------------------------------

__device__ __forceinline__ bool finite_value(float x) { return isfinite(x); }
__device__ __forceinline__ bool finite_value(double x) { return isfinite(x); }
__device__ __forceinline__ bool finite_value(Bf16 x) { return isfinite(bf16_to_float(x)); }

template <typename T>
__global__ void nonfinite_kernel(const T* a, std::int64_t n, int* flag) {
  bool bad = false;
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    bad |= !finite_value(a[i]);
  }
  if (__any_sync(0xffffffffu, bad) && threadIdx.x % 32 == 0) *flag = 1;
}

// ---- softmax ------------------------------------------------------------------------------

// Row sums accumulate in f64 (as the CPU backend's sum_row does) and are
// rounded once, so f32 results do not drift with the row length.
template <bool kBlock, typename T>
__global__ void softmax_kernel(const T* x, T* y, std::int64_t rows, std::int64_t n, bool log) {
  __shared__ float smem_f[32];
  __shared__ double smem_d[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* xr = x + g.row * n;
  T* yr = y + g.row * n;
  float m = kNegInf;
  for (std::int64_t j = g.lane; j < n; j += g.size) m = fmaxf(m, load_f(xr + j));
  m = group_allreduce<kBlock>(m, MaxOp{}, kNegInf, smem_f);
  double s = 0.0;
  for (std::int64_t j = g.lane; j < n; j += g.size) s += expf(load_f(xr + j) - m);
  s = group_allreduce<kBlock>(s, SumOp{}, 0.0, smem_d);
  if (log) {
    const float lse = static_cast<float>(static_cast<double>(m) + ::log(s));
    for (std::int64_t j = g.lane; j < n; j += g.size) store_f(yr + j, load_f(xr + j) - lse);
  } else {
    const float inv = static_cast<float>(1.0 / s);
    for (std::int64_t j = g.lane; j < n; j += g.size) {
      store_f(yr + j, expf(load_f(xr + j) - m) * inv);
    }
  }
}

//   softmax:     dx = y * (dy - sum(dy * y))
//   log_softmax: dx = dy - exp(y) * sum(dy)
template <bool kBlock, typename T>
__global__ void softmax_backward_kernel(const T* y, const T* dy, T* dx, std::int64_t rows,
                                        std::int64_t n, bool log) {
  __shared__ double smem[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* yr = y + g.row * n;
  const T* dyr = dy + g.row * n;
  T* dxr = dx + g.row * n;
  double acc = 0.0;
  for (std::int64_t j = g.lane; j < n; j += g.size) {
    const double gv = load_f(dyr + j);
    acc += log ? gv : gv * static_cast<double>(load_f(yr + j));
  }
  const float s = static_cast<float>(group_allreduce<kBlock>(acc, SumOp{}, 0.0, smem));
  for (std::int64_t j = g.lane; j < n; j += g.size) {
    const float yv = load_f(yr + j);
    const float dyv = load_f(dyr + j);
    store_f(dxr + j, log ? dyv - expf(yv) * s : yv * (dyv - s));
  }
}

// ---- cross-entropy ---------------------------------------------------------------------------

template <typename I>
__device__ __forceinline__ std::int64_t load_index(const I* p) {
  return static_cast<std::int64_t>(*p);
}

template <bool kBlock, typename T, typename I>
__global__ void cross_entropy_kernel(const T* logits, const I* targets, std::int64_t ignore_index,
                                     std::int64_t rows, std::int64_t n, float* loss, float* lse,
                                     int* bad_target) {
  __shared__ float smem_f[32];
  __shared__ double smem_d[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* xr = logits + g.row * n;
  float m = kNegInf;
  for (std::int64_t j = g.lane; j < n; j += g.size) m = fmaxf(m, load_f(xr + j));
  m = group_allreduce<kBlock>(m, MaxOp{}, kNegInf, smem_f);
  double s = 0.0;
  for (std::int64_t j = g.lane; j < n; j += g.size) s += expf(load_f(xr + j) - m);
  s = group_allreduce<kBlock>(s, SumOp{}, 0.0, smem_d);
  if (g.lane == 0) {
    const double l = static_cast<double>(m) + ::log(s);
    lse[g.row] = static_cast<float>(l);
    const std::int64_t t = load_index(targets + g.row);
    if (t == ignore_index) {
      loss[g.row] = 0.0f;
    } else if (t < 0 || t >= n) {
      loss[g.row] = NAN;
      *bad_target = 1;
    } else {
      loss[g.row] = static_cast<float>(l - static_cast<double>(load_f(xr + t)));
    }
  }
}

// dlogits = dloss * exp(x - lse), then dloss subtracted at the target (the
// CPU's order); 0 for ignored rows. An out-of-range target (reported by
// the forward) subtracts nothing rather than writing out of bounds.
template <bool kBlock, typename T, typename I>
__global__ void cross_entropy_backward_kernel(const T* logits, const I* targets,
                                              std::int64_t ignore_index, const float* lse,
                                              const float* dloss, T* dlogits, std::int64_t rows,
                                              std::int64_t n) {
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* xr = logits + g.row * n;
  T* dxr = dlogits + g.row * n;
  const std::int64_t t = load_index(targets + g.row);
  if (t == ignore_index) {
    for (std::int64_t j = g.lane; j < n; j += g.size) store_f(dxr + j, 0.0f);
    return;
  }
  const float row_lse = lse[g.row];
  const float d = dloss[g.row];
  for (std::int64_t j = g.lane; j < n; j += g.size) {
    const float v = d * expf(load_f(xr + j) - row_lse);
    store_f(dxr + j, j == t ? v - d : v);
  }
}

// ---- RMSNorm ---------------------------------------------------------------------------------

// Row sums in f64 and the CPU backend's expression order.
template <bool kBlock, typename T, typename G>
__global__ void rmsnorm_kernel(const T* x, const G* g, T* y, float* rstd, std::int64_t rows,
                               std::int64_t d, double eps) {
  __shared__ double smem[32];
  const RowGroup<kBlock> grp;
  if (grp.row >= rows) return;
  const T* xr = x + grp.row * d;
  T* yr = y + grp.row * d;
  double ss = 0.0;
  for (std::int64_t j = grp.lane; j < d; j += grp.size) {
    const double v = load_f(xr + j);
    ss += v * v;
  }
  ss = group_allreduce<kBlock>(ss, SumOp{}, 0.0, smem);
  const float r = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(d) + eps));
  for (std::int64_t j = grp.lane; j < d; j += grp.size) {
    store_f(yr + j, load_f(xr + j) * r * load_f(g + j));
  }
  if (grp.lane == 0) rstd[grp.row] = r;
}

// y = x r g with r = (mean(x^2) + eps)^(-1/2):
//   dx_j = r g_j dy_j - x_j r^3 / d * sum_k dy_k g_k x_k
template <bool kBlock, typename T, typename G>
__global__ void rmsnorm_dx_kernel(const T* x, const G* g, const float* rstd, const T* dy, T* dx,
                                  std::int64_t rows, std::int64_t d) {
  __shared__ double smem[32];
  const RowGroup<kBlock> grp;
  if (grp.row >= rows) return;
  const T* xr = x + grp.row * d;
  const T* dyr = dy + grp.row * d;
  T* dxr = dx + grp.row * d;
  double dot = 0.0;
  for (std::int64_t j = grp.lane; j < d; j += grp.size) {
    const float gx = load_f(g + j) * load_f(xr + j);
    dot += static_cast<double>(load_f(dyr + j)) * static_cast<double>(gx);
  }
  dot = group_allreduce<kBlock>(dot, SumOp{}, 0.0, smem);
  const float r = rstd[grp.row];
  const double rd = r;
  const float c = static_cast<float>(rd * rd * rd * dot / static_cast<double>(d));
  for (std::int64_t j = grp.lane; j < d; j += grp.size) {
    store_f(dxr + j, r * load_f(g + j) * load_f(dyr + j) - c * load_f(xr + j));
  }
}

// Note [Deterministic dg]
// dg_j = sum over rows of dy_j x_j r. Pass 1: blocks of 256 columns x one
// chunk of rows (kDgChunkRows, more when rows are many); each thread sums
// its column down the chunk in row order, in f64, into partial[chunk, j].
// Pass 2 folds the chunks of each column in order and adds the f32-rounded
// total to dg, as the CPU does with its single f64 accumulator. No
// atomics, so the result is reproducible; the chunking depends only on the
// shape.
constexpr std::int64_t kDgChunkRows = 64;
constexpr std::int64_t kDgMaxChunks = 1024;

std::int64_t dg_chunk_rows(std::int64_t rows) {
  std::int64_t chunk = kDgChunkRows;
  if ((rows + chunk - 1) / chunk > kDgMaxChunks) chunk = (rows + kDgMaxChunks - 1) / kDgMaxChunks;
  return chunk;
}

template <typename T>
__global__ void rmsnorm_dg_partial_kernel(const T* x, const float* rstd, const T* dy,
                                          std::int64_t rows, std::int64_t d,
                                          std::int64_t chunk_rows, double* partial) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const std::int64_t chunk = blockIdx.y;
  const std::int64_t begin = chunk * chunk_rows;
  const std::int64_t end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  double acc = 0.0;
  for (std::int64_t r = begin; r < end; ++r) {
    acc += static_cast<double>(load_f(dy + r * d + j) * load_f(x + r * d + j) * rstd[r]);
  }
  partial[chunk * d + j] = acc;
}

template <typename G>
__global__ void rmsnorm_dg_finish_kernel(const double* partial, std::int64_t chunks, std::int64_t d,
                                         G* dg) {
  for (std::int64_t j = global_thread(); j < d; j += grid_stride()) {
    double acc = 0.0;
    for (std::int64_t c = 0; c < chunks; ++c) acc += partial[c * d + j];
    store_f(dg + j, load_f(dg + j) + static_cast<float>(acc));
  }
}

// ---- dispatch helpers --------------------------------------------------------------------------

bool block_mode(std::int64_t n) { return n > kWarpRowMax; }

// Block mode uses more threads on long rows.
int row_threads(std::int64_t n) {
  return block_mode(n) ? (n > 8192 ? 1024 : kRowThreads) : kRowThreads;
}

template <typename T>
cudaError_t softmax_typed(const T* x, T* y, std::int64_t rows, std::int64_t n, bool log,
                          cudaStream_t stream) {
  const bool blk = block_mode(n);
  if (blk) {
    softmax_kernel<true><<<row_grid(rows, true), row_threads(n), 0, stream>>>(x, y, rows, n, log);
  } else {
    softmax_kernel<false><<<row_grid(rows, false), kRowThreads, 0, stream>>>(x, y, rows, n, log);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_backward_typed(const T* y, const T* dy, T* dx, std::int64_t rows,
                                   std::int64_t n, bool log, cudaStream_t stream) {
  if (block_mode(n)) {
    softmax_backward_kernel<true>
        <<<row_grid(rows, true), row_threads(n), 0, stream>>>(y, dy, dx, rows, n, log);
  } else {
    softmax_backward_kernel<false>
        <<<row_grid(rows, false), kRowThreads, 0, stream>>>(y, dy, dx, rows, n, log);
  }
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t cross_entropy_typed(const T* logits, const I* targets, std::int64_t ignore_index,
                                std::int64_t rows, std::int64_t n, float* loss, float* lse,
                                int* bad, cudaStream_t stream) {
  if (block_mode(n)) {
    cross_entropy_kernel<true><<<row_grid(rows, true), row_threads(n), 0, stream>>>(
        logits, targets, ignore_index, rows, n, loss, lse, bad);
  } else {
    cross_entropy_kernel<false><<<row_grid(rows, false), kRowThreads, 0, stream>>>(
        logits, targets, ignore_index, rows, n, loss, lse, bad);
  }
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t cross_entropy_backward_typed(const T* logits, const I* targets,
                                         std::int64_t ignore_index, const float* lse,
                                         const float* dloss, T* dlogits, std::int64_t rows,
                                         std::int64_t n, cudaStream_t stream) {
  if (block_mode(n)) {
    cross_entropy_backward_kernel<true><<<row_grid(rows, true), row_threads(n), 0, stream>>>(
        logits, targets, ignore_index, lse, dloss, dlogits, rows, n);
  } else {
    cross_entropy_backward_kernel<false><<<row_grid(rows, false), kRowThreads, 0, stream>>>(
        logits, targets, ignore_index, lse, dloss, dlogits, rows, n);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t rmsnorm_typed(const T* x, const G* g, T* y, float* rstd, std::int64_t rows,
                          std::int64_t d, double eps, cudaStream_t stream) {
  if (block_mode(d)) {
    rmsnorm_kernel<true>
        <<<row_grid(rows, true), row_threads(d), 0, stream>>>(x, g, y, rstd, rows, d, eps);
  } else {
    rmsnorm_kernel<false>
        <<<row_grid(rows, false), kRowThreads, 0, stream>>>(x, g, y, rstd, rows, d, eps);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t rmsnorm_backward_typed(const T* x, const G* g, const float* rstd, const T* dy, T* dx,
                                   G* dg, std::int64_t rows, std::int64_t d, double* partial,
                                   cudaStream_t stream) {
  if (block_mode(d)) {
    rmsnorm_dx_kernel<true>
        <<<row_grid(rows, true), row_threads(d), 0, stream>>>(x, g, rstd, dy, dx, rows, d);
  } else {
    rmsnorm_dx_kernel<false>
        <<<row_grid(rows, false), kRowThreads, 0, stream>>>(x, g, rstd, dy, dx, rows, d);
  }
  const std::int64_t chunk_rows = dg_chunk_rows(rows);
  const std::int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const dim3 grid(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(chunks));
  rmsnorm_dg_partial_kernel<<<grid, 256, 0, stream>>>(x, rstd, dy, rows, d, chunk_rows, partial);
  rmsnorm_dg_finish_kernel<<<grid_for(d), 256, 0, stream>>>(partial, chunks, d, dg);
  return cudaGetLastError();
}

}  // namespace

// ---- launchers
// -----------------------------------------------------------------------------------

std::size_t reduce_workspace_bytes(std::int64_t outer, std::int64_t n, std::int64_t inner) {
  const ReducePlan plan = plan_reduce(outer, n, inner);
  if (plan.splits == 1) return 0;
  return static_cast<std::size_t>(plan.splits * outer * inner) * sizeof(double);
}

// Partials are 8 bytes (f64 or i64) whatever the dtype.
cudaError_t reduce(ReduceCode op, const void* a, void* out, DType dtype, std::int64_t outer,
                   std::int64_t n, std::int64_t inner, void* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32:
      return reduce_typed<float>(op, a, out, outer, n, inner, workspace, stream);
    case DType::kBF16:
      return reduce_typed<Bf16>(op, a, out, outer, n, inner, workspace, stream);
    case DType::kI32:
      return reduce_typed<std::int32_t>(op, a, out, outer, n, inner, workspace, stream);
    case DType::kI64:
      return reduce_typed<std::int64_t>(op, a, out, outer, n, inner, workspace, stream);
    default:
      return cudaErrorNotSupported;
  }
}

cudaError_t argmax(const void* a, DType dtype, std::int64_t rows, std::int64_t n, std::int64_t* out,
                   cudaStream_t stream) {
  const bool blk = block_mode(n);
  const unsigned grid = row_grid(rows, blk);
  const int threads = row_threads(n);
  if (dtype == DType::kF32) {
    const float* p = static_cast<const float*>(a);
    if (blk) {
      argmax_kernel<true><<<grid, threads, 0, stream>>>(p, rows, n, out);
    } else {
      argmax_kernel<false><<<grid, threads, 0, stream>>>(p, rows, n, out);
    }
  } else if (dtype == DType::kBF16) {
    const Bf16* p = static_cast<const Bf16*>(a);
    if (blk) {
      argmax_kernel<true><<<grid, threads, 0, stream>>>(p, rows, n, out);
    } else {
      argmax_kernel<false><<<grid, threads, 0, stream>>>(p, rows, n, out);
    }
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t cumsum(const void* a, void* out, DType dtype, std::int64_t rows, std::int64_t n,
                   cudaStream_t stream) {
  const bool blk = block_mode(n);
  const unsigned grid = row_grid(rows, blk);
  const int threads = row_threads(n);
#define MOTLEY_CUMSUM_CASE(T, Acc)                                                               \
  if (blk) {                                                                                     \
    cumsum_kernel<true, T, Acc>                                                                  \
        <<<grid, threads, 0, stream>>>(static_cast<const T*>(a), static_cast<T*>(out), rows, n); \
  } else {                                                                                       \
    cumsum_kernel<false, T, Acc>                                                                 \
        <<<grid, threads, 0, stream>>>(static_cast<const T*>(a), static_cast<T*>(out), rows, n); \
  }
  switch (dtype) {
    case DType::kF32:
      MOTLEY_CUMSUM_CASE(float, double) break;
    case DType::kI32:
      MOTLEY_CUMSUM_CASE(std::int32_t, long long) break;
    case DType::kI64:
      MOTLEY_CUMSUM_CASE(std::int64_t, long long) break;
    default:
      return cudaErrorNotSupported;
  }
#undef MOTLEY_CUMSUM_CASE
  return cudaGetLastError();
}

cudaError_t find_nonfinite(const void* a, DType dtype, std::int64_t numel, int* flag,
                           cudaStream_t stream) {
  const unsigned grid = grid_for(numel);
  switch (dtype) {
    case DType::kF32:
      nonfinite_kernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(a), numel, flag);
      break;
    case DType::kF64:
      nonfinite_kernel<<<grid, 256, 0, stream>>>(static_cast<const double*>(a), numel, flag);
      break;
    case DType::kBF16:
      nonfinite_kernel<<<grid, 256, 0, stream>>>(static_cast<const Bf16*>(a), numel, flag);
      break;
    default:
      return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t softmax(const void* x, void* y, DType dtype, std::int64_t rows, std::int64_t n,
                    bool log, cudaStream_t stream) {
  if (dtype == DType::kF32) {
    return softmax_typed(static_cast<const float*>(x), static_cast<float*>(y), rows, n, log,
                         stream);
  }
  if (dtype == DType::kBF16) {
    return softmax_typed(static_cast<const Bf16*>(x), static_cast<Bf16*>(y), rows, n, log, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t softmax_backward(const void* y, const void* dy, void* dx, DType dtype,
                             std::int64_t rows, std::int64_t n, bool log, cudaStream_t stream) {
  if (dtype == DType::kF32) {
    return softmax_backward_typed(static_cast<const float*>(y), static_cast<const float*>(dy),
                                  static_cast<float*>(dx), rows, n, log, stream);
  }
  if (dtype == DType::kBF16) {
    return softmax_backward_typed(static_cast<const Bf16*>(y), static_cast<const Bf16*>(dy),
                                  static_cast<Bf16*>(dx), rows, n, log, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t cross_entropy(const void* logits, DType dtype, const void* targets, DType target_dtype,
                          std::int64_t ignore_index, std::int64_t rows, std::int64_t n, float* loss,
                          float* lse, int* bad_target, cudaStream_t stream) {
#define MOTLEY_CE_CASE(T, I)                                                                \
  return cross_entropy_typed(static_cast<const T*>(logits), static_cast<const I*>(targets), \
                             ignore_index, rows, n, loss, lse, bad_target, stream)
  if (dtype == DType::kF32 && target_dtype == DType::kI32) MOTLEY_CE_CASE(float, std::int32_t);
  if (dtype == DType::kF32 && target_dtype == DType::kI64) MOTLEY_CE_CASE(float, std::int64_t);
  if (dtype == DType::kBF16 && target_dtype == DType::kI32) MOTLEY_CE_CASE(Bf16, std::int32_t);
  if (dtype == DType::kBF16 && target_dtype == DType::kI64) MOTLEY_CE_CASE(Bf16, std::int64_t);
#undef MOTLEY_CE_CASE
  return cudaErrorNotSupported;
}

cudaError_t cross_entropy_backward(const void* logits, DType dtype, const void* targets,
                                   DType target_dtype, std::int64_t ignore_index, const float* lse,
                                   const float* dloss, void* dlogits, std::int64_t rows,
                                   std::int64_t n, cudaStream_t stream) {
#define MOTLEY_CEB_CASE(T, I)                                                                   \
  return cross_entropy_backward_typed(static_cast<const T*>(logits),                            \
                                      static_cast<const I*>(targets), ignore_index, lse, dloss, \
                                      static_cast<T*>(dlogits), rows, n, stream)
  if (dtype == DType::kF32 && target_dtype == DType::kI32) MOTLEY_CEB_CASE(float, std::int32_t);
  if (dtype == DType::kF32 && target_dtype == DType::kI64) MOTLEY_CEB_CASE(float, std::int64_t);
  if (dtype == DType::kBF16 && target_dtype == DType::kI32) MOTLEY_CEB_CASE(Bf16, std::int32_t);
  if (dtype == DType::kBF16 && target_dtype == DType::kI64) MOTLEY_CEB_CASE(Bf16, std::int64_t);
#undef MOTLEY_CEB_CASE
  return cudaErrorNotSupported;
}

cudaError_t rmsnorm(const void* x, const void* g, void* y, float* rstd, DType dtype, DType g_dtype,
                    std::int64_t rows, std::int64_t d, double eps, cudaStream_t stream) {
  if (dtype == DType::kF32 && g_dtype == DType::kF32) {
    return rmsnorm_typed(static_cast<const float*>(x), static_cast<const float*>(g),
                         static_cast<float*>(y), rstd, rows, d, eps, stream);
  }
  if (dtype == DType::kBF16 && g_dtype == DType::kBF16) {
    return rmsnorm_typed(static_cast<const Bf16*>(x), static_cast<const Bf16*>(g),
                         static_cast<Bf16*>(y), rstd, rows, d, eps, stream);
  }
  if (dtype == DType::kBF16 && g_dtype == DType::kF32) {
    return rmsnorm_typed(static_cast<const Bf16*>(x), static_cast<const float*>(g),
                         static_cast<Bf16*>(y), rstd, rows, d, eps, stream);
  }
  return cudaErrorNotSupported;
}

std::size_t rmsnorm_workspace_bytes(std::int64_t rows, std::int64_t d) {
  const std::int64_t chunk_rows = dg_chunk_rows(rows);
  const std::int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  return static_cast<std::size_t>(chunks * d) * sizeof(double);
}

cudaError_t rmsnorm_backward(const void* x, const void* g, const float* rstd, const void* dy,
                             void* dx, void* dg, DType dtype, DType g_dtype, std::int64_t rows,
                             std::int64_t d, void* workspace, cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  if (dtype == DType::kF32 && g_dtype == DType::kF32) {
    return rmsnorm_backward_typed(static_cast<const float*>(x), static_cast<const float*>(g), rstd,
                                  static_cast<const float*>(dy), static_cast<float*>(dx),
                                  static_cast<float*>(dg), rows, d, partial, stream);
  }
  if (dtype == DType::kBF16 && g_dtype == DType::kBF16) {
    return rmsnorm_backward_typed(static_cast<const Bf16*>(x), static_cast<const Bf16*>(g), rstd,
                                  static_cast<const Bf16*>(dy), static_cast<Bf16*>(dx),
                                  static_cast<Bf16*>(dg), rows, d, partial, stream);
  }
  if (dtype == DType::kBF16 && g_dtype == DType::kF32) {
    return rmsnorm_backward_typed(static_cast<const Bf16*>(x), static_cast<const float*>(g), rstd,
                                  static_cast<const Bf16*>(dy), static_cast<Bf16*>(dx),
                                  static_cast<float*>(dg), rows, d, partial, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace motley::cuda_kernels
