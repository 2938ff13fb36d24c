// Causal attention, forward and backward, as tiled flash-attention kernels
// in f32 (FMA on CUDA cores: tensor-core TF32 would break parity with the
// CPU reference).
//
// Layout: q (bh, tq, hd), k and v (bh, tk, hd), contiguous; query i may
// attend to keys j <= i + (tk - tq). Scores are scale * q.k.
//
// Note [Attention tiling]
// A block of 256 threads is a 16 x 16 grid (ty = tid / 16, tx = tid % 16).
// A tile of scores has 64 rows (thread row ty owns rows 4 ty .. 4 ty + 3)
// and 32 columns (thread column tx owns columns tx and tx + 16). Output
// rows of hd values are owned the same way: the thread of row r holds
// columns tx, tx + 16, ... < hd, so the per-row softmax statistics a
// thread needs are its own, and row reductions run over the 16 tx lanes of
// a half-warp (xor shuffles 8, 4, 2, 1). Shared rows read by varying tx
// are padded to hd + 1 floats so that the 16 lanes hit 16 banks.
//
//   forward:  block = 64 queries; loop over 32-key tiles up to the causal
//             edge; online softmax (running max m, sum l, rescaled
//             accumulator); writes out and lse = m + log l.
//   backward: D = rowsum(dout * out) first; then two kernels that each
//             recompute P = exp(s - lse) from the saved lse:
//               dkv: block = 64 keys, loop over 32-query tiles:
//                    dv += P^T dout, dk += scale * dS^T q
//               dq:  block = 64 queries, loop over 32-key tiles:
//                    dq += scale * dS k
//             with dS = P * (dout v^T - D). Computing dq in its own pass
//             costs a second recomputation of P but needs no atomics, so
//             the gradients are bit-reproducible.
// Only one 64 x 32 block of scores exists per block at a time, as the
// Backend contract requires.
#include <cmath>

#include "core/cuda/device_utils.cuh"

namespace motley::cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 64;  // 16 thread rows x 4
constexpr int kColsPerTile = 32;   // 16 thread columns x 2
constexpr int kTileLd = kColsPerTile + 1;
constexpr float kNegInf = -INFINITY;

std::size_t fwd_smem_floats(int hd) {
  return static_cast<std::size_t>(kRowsPerBlock * (hd + 1) + kColsPerTile * (hd + 1) +
                                  kColsPerTile * hd + kRowsPerBlock * kTileLd);
}
std::size_t dkv_smem_floats(int hd) {
  return static_cast<std::size_t>(2 * kRowsPerBlock * (hd + 1) + 2 * kColsPerTile * (hd + 1) +
                                  2 * kRowsPerBlock * kTileLd + 2 * kColsPerTile);
}
std::size_t dq_smem_floats(int hd) {
  return static_cast<std::size_t>(2 * kRowsPerBlock * (hd + 1) + 2 * kColsPerTile * (hd + 1) +
                                  kRowsPerBlock * kTileLd + 2 * kRowsPerBlock);
}

// Copies rows [row0, row0 + count) of src (rows_total, hd) into dst with
// row stride ld; rows past rows_total become zeros (so padded keys
// contribute 0 * 0 rather than 0 * garbage, which could be NaN).
__device__ __forceinline__ void load_rows(float* dst, int ld, const float* src, int row0, int count,
                                          int rows_total, int hd) {
  for (int idx = threadIdx.x; idx < count * hd; idx += kThreads) {
    const int r = idx / hd;
    const int c = idx - r * hd;
    const int row = row0 + r;
    dst[r * ld + c] = row < rows_total ? src[static_cast<std::int64_t>(row) * hd + c] : 0.0f;
  }
}

// Number of keys a block of queries [q0, q0 + 64) needs: keys up to the
// causal edge of its last real query.
__device__ __forceinline__ int causal_key_end(int q0, int tq, int tk) {
  const int q_last = min(q0 + kRowsPerBlock, tq) - 1;
  return min(tk, q_last + (tk - tq) + 1);
}

// ---- forward ---------------------------------------------------------------------------

template <int kMaxHd>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_kernel(const float* q, const float* k, const float* v, float* out, float* lse,
                         int tq, int tk, int hd, float scale, int q_tiles) {
  constexpr int kCols = kMaxHd / 16;
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  // Later query tiles see more keys: start them first.
  const int tile = q_tiles - 1 - static_cast<int>(blockIdx.x % q_tiles);
  const std::int64_t bh = blockIdx.x / q_tiles;
  const int q0 = tile * kRowsPerBlock;
  const int off = tk - tq;
  const float* qb = q + bh * tq * hd;
  const float* kb = k + bh * tk * hd;
  const float* vb = v + bh * tk * hd;

  const int ldq = hd + 1;
  const int ldk = hd + 1;
  const int ldv = hd;
  float* s_q = smem;                       // (64, hd + 1)
  float* s_k = s_q + kRowsPerBlock * ldq;  // (32, hd + 1)
  float* s_v = s_k + kColsPerTile * ldk;   // (32, hd)
  float* s_p = s_v + kColsPerTile * ldv;   // (64, 33)

  load_rows(s_q, ldq, qb, q0, kRowsPerBlock, tq, hd);

  float acc[4][kCols];
  float m_run[4];
  float l_run[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m_run[i] = kNegInf;
    l_run[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.0f;
  }

  const int key_end = causal_key_end(q0, tq, tk);
  for (int k0 = 0; k0 < key_end; k0 += kColsPerTile) {
    __syncthreads();  // previous tile's s_k / s_v / s_p are no longer read
    load_rows(s_k, ldk, kb, k0, kColsPerTile, tk, hd);
    load_rows(s_v, ldv, vb, k0, kColsPerTile, tk, hd);
    __syncthreads();

    float s[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < hd; ++d) {
      float qv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = s_q[(ty * 4 + i) * ldq + d];
      const float k0v = s_k[tx * ldk + d];
      const float k1v = s_k[(tx + 16) * ldk + d];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[i][0] += qv[i] * k0v;
        s[i][1] += qv[i] * k1v;
      }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int qi = q0 + ty * 4 + i;
      float tile_max = kNegInf;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool valid = key < tk && key <= qi + off;
        s[i][j] = valid ? s[i][j] * scale : kNegInf;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      tile_max = warp_allreduce<16>(tile_max, MaxOp{});
      const float m_new = fmaxf(m_run[i], tile_max);
      // Rows always see key 0 in the first tile, so m_new is finite; the
      // guards keep a fully masked row at p = 0 instead of NaN regardless.
      const float corr = m_run[i] == kNegInf ? 0.0f : expf(m_run[i] - m_new);
      float p_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float p = s[i][j] == kNegInf ? 0.0f : expf(s[i][j] - m_new);
        s_p[(ty * 4 + i) * kTileLd + tx + 16 * j] = p;
        p_sum += p;
      }
      p_sum = warp_allreduce<16>(p_sum, SumOp{});
      l_run[i] = l_run[i] * corr + p_sum;
      m_run[i] = m_new;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[i][c] *= corr;
    }
    __syncthreads();  // s_p complete

#pragma unroll 4
    for (int j = 0; j < kColsPerTile; ++j) {
      float vv[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = tx + 16 * c;
        vv[c] = col < hd ? s_v[j * ldv + col] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = s_p[(ty * 4 + i) * kTileLd + j];
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[i][c] += p * vv[c];
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int qi = q0 + ty * 4 + i;
    if (qi >= tq) continue;
    const float inv = 1.0f / l_run[i];
    float* orow = out + (bh * tq + qi) * hd;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = tx + 16 * c;
      if (col < hd) orow[col] = acc[i][c] * inv;
    }
    if (tx == 0) lse[bh * tq + qi] = m_run[i] + logf(l_run[i]);
  }
}

// ---- backward -------------------------------------------------------------------------------

// D[row] = sum_d dout[row, d] * out[row, d]; one warp per row.
__global__ void attention_d_kernel(const float* out, const float* dout, float* d_out,
                                   std::int64_t rows, int hd) {
  const std::int64_t row =
      static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float* o = out + row * hd;
  const float* g = dout + row * hd;
  float acc = 0.0f;
  for (int c = lane; c < hd; c += 32) acc += o[c] * g[c];
  acc = warp_allreduce(acc, SumOp{});
  if (lane == 0) d_out[row] = acc;
}

// Block = 64 keys (thread row ty owns keys 4 ty + i); tiles of 32 queries
// (thread column tx owns queries tx, tx + 16). Accumulates dk, dv rows.
template <int kMaxHd>
__global__ void __launch_bounds__(kThreads)
    attention_dkv_kernel(const float* q, const float* k, const float* v, const float* lse,
                         const float* d_rows, const float* dout, float* dk, float* dv, int tq,
                         int tk, int hd, float scale, int k_tiles) {
  constexpr int kCols = kMaxHd / 16;
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  // Earlier key tiles see more queries: they come first in blockIdx order.
  const int tile = static_cast<int>(blockIdx.x % k_tiles);
  const std::int64_t bh = blockIdx.x / k_tiles;
  const int k0 = tile * kRowsPerBlock;
  const int off = tk - tq;
  const float* qb = q + bh * tq * hd;
  const float* kb = k + bh * tk * hd;
  const float* vb = v + bh * tk * hd;
  const float* gb = dout + bh * tq * hd;
  const float* lseb = lse + bh * tq;
  const float* db = d_rows + bh * tq;

  const int ld = hd + 1;
  float* s_k = smem;                               // (64, hd + 1)
  float* s_v = s_k + kRowsPerBlock * ld;           // (64, hd + 1)
  float* s_q = s_v + kRowsPerBlock * ld;           // (32, hd + 1)
  float* s_g = s_q + kColsPerTile * ld;            // (32, hd + 1) dout
  float* s_pt = s_g + kColsPerTile * ld;           // (64, 33) P^T
  float* s_dst = s_pt + kRowsPerBlock * kTileLd;   // (64, 33) dS^T
  float* s_lse = s_dst + kRowsPerBlock * kTileLd;  // (32)
  float* s_d = s_lse + kColsPerTile;               // (32)

  load_rows(s_k, ld, kb, k0, kRowsPerBlock, tk, hd);
  load_rows(s_v, ld, vb, k0, kRowsPerBlock, tk, hd);

  float acc_k[4][kCols];
  float acc_v[4][kCols];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc_k[i][c] = acc_v[i][c] = 0.0f;
  }

  // Queries i with i + off >= k0 see at least one key of this block.
  const int q_first = max(0, k0 - off);
  for (int q0 = (q_first / kColsPerTile) * kColsPerTile; q0 < tq; q0 += kColsPerTile) {
    __syncthreads();
    load_rows(s_q, ld, qb, q0, kColsPerTile, tq, hd);
    load_rows(s_g, ld, gb, q0, kColsPerTile, tq, hd);
    if (tid < kColsPerTile) {
      const int qi = q0 + tid;
      s_lse[tid] = qi < tq ? lseb[qi] : 0.0f;
      s_d[tid] = qi < tq ? db[qi] : 0.0f;
    }
    __syncthreads();

    float s[4][2];
    float dp[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = dp[i][0] = dp[i][1] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < hd; ++d) {
      float kv[4];
      float vv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        kv[i] = s_k[(ty * 4 + i) * ld + d];
        vv[i] = s_v[(ty * 4 + i) * ld + d];
      }
      const float q0v = s_q[tx * ld + d];
      const float q1v = s_q[(tx + 16) * ld + d];
      const float g0v = s_g[tx * ld + d];
      const float g1v = s_g[(tx + 16) * ld + d];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[i][0] += kv[i] * q0v;
        s[i][1] += kv[i] * q1v;
        dp[i][0] += vv[i] * g0v;
        dp[i][1] += vv[i] * g1v;
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = k0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int ql = tx + 16 * j;
        const int qi = q0 + ql;
        const bool valid = qi < tq && key < tk && key <= qi + off;
        const float p = valid ? expf(s[i][j] * scale - s_lse[ql]) : 0.0f;
        s_pt[(ty * 4 + i) * kTileLd + ql] = p;
        s_dst[(ty * 4 + i) * kTileLd + ql] = p * (dp[i][j] - s_d[ql]);
      }
    }
    __syncthreads();

#pragma unroll 4
    for (int ql = 0; ql < kColsPerTile; ++ql) {
      float gv[kCols];
      float qv[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = tx + 16 * c;
        gv[c] = col < hd ? s_g[ql * ld + col] : 0.0f;
        qv[c] = col < hd ? s_q[ql * ld + col] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = s_pt[(ty * 4 + i) * kTileLd + ql];
        const float ds = s_dst[(ty * 4 + i) * kTileLd + ql];
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          acc_v[i][c] += p * gv[c];
          acc_k[i][c] += ds * qv[c];
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int key = k0 + ty * 4 + i;
    if (key >= tk) continue;
    float* dkr = dk + (bh * tk + key) * hd;
    float* dvr = dv + (bh * tk + key) * hd;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = tx + 16 * c;
      if (col < hd) {
        dkr[col] = acc_k[i][c] * scale;
        dvr[col] = acc_v[i][c];
      }
    }
  }
}

// Block = 64 queries (thread row ty owns queries 4 ty + i); tiles of 32
// keys (thread column tx owns keys tx, tx + 16). Accumulates dq rows.
template <int kMaxHd>
__global__ void __launch_bounds__(kThreads)
    attention_dq_kernel(const float* q, const float* k, const float* v, const float* lse,
                        const float* d_rows, const float* dout, float* dq, int tq, int tk, int hd,
                        float scale, int q_tiles) {
  constexpr int kCols = kMaxHd / 16;
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int tile = q_tiles - 1 - static_cast<int>(blockIdx.x % q_tiles);
  const std::int64_t bh = blockIdx.x / q_tiles;
  const int q0 = tile * kRowsPerBlock;
  const int off = tk - tq;
  const float* qb = q + bh * tq * hd;
  const float* kb = k + bh * tk * hd;
  const float* vb = v + bh * tk * hd;
  const float* gb = dout + bh * tq * hd;

  const int ld = hd + 1;
  float* s_q = smem;                              // (64, hd + 1)
  float* s_g = s_q + kRowsPerBlock * ld;          // (64, hd + 1) dout
  float* s_k = s_g + kRowsPerBlock * ld;          // (32, hd + 1)
  float* s_v = s_k + kColsPerTile * ld;           // (32, hd + 1)
  float* s_ds = s_v + kColsPerTile * ld;          // (64, 33)
  float* s_lse = s_ds + kRowsPerBlock * kTileLd;  // (64)
  float* s_d = s_lse + kRowsPerBlock;             // (64)

  load_rows(s_q, ld, qb, q0, kRowsPerBlock, tq, hd);
  load_rows(s_g, ld, gb, q0, kRowsPerBlock, tq, hd);
  if (tid < kRowsPerBlock) {
    const int qi = q0 + tid;
    s_lse[tid] = qi < tq ? lse[bh * tq + qi] : 0.0f;
    s_d[tid] = qi < tq ? d_rows[bh * tq + qi] : 0.0f;
  }

  float acc[4][kCols];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.0f;
  }

  const int key_end = causal_key_end(q0, tq, tk);
  for (int k0 = 0; k0 < key_end; k0 += kColsPerTile) {
    __syncthreads();
    load_rows(s_k, ld, kb, k0, kColsPerTile, tk, hd);
    load_rows(s_v, ld, vb, k0, kColsPerTile, tk, hd);
    __syncthreads();

    float s[4][2];
    float dp[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = dp[i][0] = dp[i][1] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < hd; ++d) {
      float qv[4];
      float gv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        qv[i] = s_q[(ty * 4 + i) * ld + d];
        gv[i] = s_g[(ty * 4 + i) * ld + d];
      }
      const float k0v = s_k[tx * ld + d];
      const float k1v = s_k[(tx + 16) * ld + d];
      const float v0v = s_v[tx * ld + d];
      const float v1v = s_v[(tx + 16) * ld + d];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[i][0] += qv[i] * k0v;
        s[i][1] += qv[i] * k1v;
        dp[i][0] += gv[i] * v0v;
        dp[i][1] += gv[i] * v1v;
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rl = ty * 4 + i;
      const int qi = q0 + rl;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool valid = qi < tq && key < tk && key <= qi + off;
        const float p = valid ? expf(s[i][j] * scale - s_lse[rl]) : 0.0f;
        s_ds[rl * kTileLd + tx + 16 * j] = p * (dp[i][j] - s_d[rl]);
      }
    }
    __syncthreads();

#pragma unroll 4
    for (int kl = 0; kl < kColsPerTile; ++kl) {
      float kv[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = tx + 16 * c;
        kv[c] = col < hd ? s_k[kl * ld + col] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float ds = s_ds[(ty * 4 + i) * kTileLd + kl];
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[i][c] += ds * kv[c];
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int qi = q0 + ty * 4 + i;
    if (qi >= tq) continue;
    float* dqr = dq + (bh * tq + qi) * hd;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = tx + 16 * c;
      if (col < hd) dqr[col] = acc[i][c] * scale;
    }
  }
}

// Opts a kernel in to more than 48 KiB of dynamic shared memory.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, std::size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <int kMaxHd>
cudaError_t attention_fwd_typed(const float* q, const float* k, const float* v, float* out,
                                float* lse, std::int64_t bh, int tq, int tk, int hd, float scale,
                                cudaStream_t stream) {
  const int q_tiles = (tq + kRowsPerBlock - 1) / kRowsPerBlock;
  const std::size_t smem = fwd_smem_floats(hd) * sizeof(float);
  cudaError_t err = allow_smem(attention_fwd_kernel<kMaxHd>, smem);
  if (err != cudaSuccess) return err;
  const std::int64_t blocks = bh * q_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  attention_fwd_kernel<kMaxHd><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      q, k, v, out, lse, tq, tk, hd, scale, q_tiles);
  return cudaGetLastError();
}

template <int kMaxHd>
cudaError_t attention_bwd_typed(const float* q, const float* k, const float* v, const float* out,
                                const float* lse, const float* dout, float* dq, float* dk,
                                float* dv, std::int64_t bh, int tq, int tk, int hd, float scale,
                                float* d_rows, cudaStream_t stream) {
  const std::int64_t rows = bh * tq;
  attention_d_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(out, dout, d_rows,
                                                                                rows, hd);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int k_tiles = (tk + kRowsPerBlock - 1) / kRowsPerBlock;
  const std::size_t smem_kv = dkv_smem_floats(hd) * sizeof(float);
  err = allow_smem(attention_dkv_kernel<kMaxHd>, smem_kv);
  if (err != cudaSuccess) return err;
  const std::int64_t kv_blocks = bh * k_tiles;
  if (kv_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  attention_dkv_kernel<kMaxHd><<<static_cast<unsigned>(kv_blocks), kThreads, smem_kv, stream>>>(
      q, k, v, lse, d_rows, dout, dk, dv, tq, tk, hd, scale, k_tiles);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int q_tiles = (tq + kRowsPerBlock - 1) / kRowsPerBlock;
  const std::size_t smem_q = dq_smem_floats(hd) * sizeof(float);
  err = allow_smem(attention_dq_kernel<kMaxHd>, smem_q);
  if (err != cudaSuccess) return err;
  const std::int64_t q_blocks = bh * q_tiles;
  if (q_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  attention_dq_kernel<kMaxHd><<<static_cast<unsigned>(q_blocks), kThreads, smem_q, stream>>>(
      q, k, v, lse, d_rows, dout, dq, tq, tk, hd, scale, q_tiles);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention(const float* q, const float* k, const float* v, float* out, float* lse,
                      std::int64_t bh, std::int64_t tq, std::int64_t tk, std::int64_t hd,
                      float scale, cudaStream_t stream) {
  if (hd <= 0 || hd > kAttentionMaxHd || tq > 0x3fffffff || tk > 0x3fffffff) {
    return cudaErrorInvalidValue;
  }
  if (hd <= 64) {
    return attention_fwd_typed<64>(q, k, v, out, lse, bh, static_cast<int>(tq),
                                   static_cast<int>(tk), static_cast<int>(hd), scale, stream);
  }
  return attention_fwd_typed<128>(q, k, v, out, lse, bh, static_cast<int>(tq), static_cast<int>(tk),
                                  static_cast<int>(hd), scale, stream);
}

std::size_t attention_backward_workspace_bytes(std::int64_t bh, std::int64_t tq) {
  return static_cast<std::size_t>(bh * tq) * sizeof(float);
}

cudaError_t attention_backward(const float* q, const float* k, const float* v, const float* out,
                               const float* lse, const float* dout, float* dq, float* dk, float* dv,
                               std::int64_t bh, std::int64_t tq, std::int64_t tk, std::int64_t hd,
                               float scale, void* workspace, cudaStream_t stream) {
  if (hd <= 0 || hd > kAttentionMaxHd || tq > 0x3fffffff || tk > 0x3fffffff) {
    return cudaErrorInvalidValue;
  }
  float* d_rows = static_cast<float*>(workspace);
  if (hd <= 64) {
    return attention_bwd_typed<64>(q, k, v, out, lse, dout, dq, dk, dv, bh, static_cast<int>(tq),
                                   static_cast<int>(tk), static_cast<int>(hd), scale, d_rows,
                                   stream);
  }
  return attention_bwd_typed<128>(q, k, v, out, lse, dout, dq, dk, dv, bh, static_cast<int>(tq),
                                  static_cast<int>(tk), static_cast<int>(hd), scale, d_rows,
                                  stream);
}

}  // namespace motley::cuda_kernels
