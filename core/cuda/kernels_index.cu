// Row gathers and scatters (embedding lookup, expert dispatch and
// combine) and per-row sorting (top-k routing, top-p selection). The only
// file that instantiates cub, to keep its compile time in one place.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include "core/cuda/device_utils.cuh"

namespace motley::cuda_kernels {
namespace {

// ---- index_select_rows -------------------------------------------------------------
// One block per output row; rows are moved in the widest unit (16, 8, 4 or
// 2 bytes) that divides the row size and the pointers' alignment, so the
// kernel is the same for every dtype.
template <typename U, typename I>
__global__ void index_select_kernel(const U* src, std::int64_t src_rows, std::int64_t units,
                                    const I* index, std::int64_t n, U* out, int* bad_index) {
  for (std::int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const std::int64_t idx = static_cast<std::int64_t>(index[r]);
    U* dst = out + r * units;
    if (idx < 0 || idx >= src_rows) {
      if (threadIdx.x == 0) *bad_index = 1;
      for (std::int64_t c = threadIdx.x; c < units; c += blockDim.x) dst[c] = U{};
      continue;
    }
    const U* row = src + idx * units;
    for (std::int64_t c = threadIdx.x; c < units; c += blockDim.x) dst[c] = row[c];
  }
}

template <typename U>
cudaError_t index_select_units(const void* src, std::int64_t src_rows, std::int64_t units,
                               const void* index, DType index_dtype, std::int64_t n, void* out,
                               int* bad, cudaStream_t stream) {
  const int threads = units >= 256 ? 256 : (units >= 64 ? 128 : 32);
  const unsigned grid = static_cast<unsigned>(n < (1 << 20) ? n : (1 << 20));
  if (index_dtype == DType::kI32) {
    index_select_kernel<<<grid, threads, 0, stream>>>(static_cast<const U*>(src), src_rows, units,
                                                      static_cast<const std::int32_t*>(index), n,
                                                      static_cast<U*>(out), bad);
  } else if (index_dtype == DType::kI64) {
    index_select_kernel<<<grid, threads, 0, stream>>>(static_cast<const U*>(src), src_rows, units,
                                                      static_cast<const std::int64_t*>(index), n,
                                                      static_cast<U*>(out), bad);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

// ---- index_add_rows ------------------------------------------------------------------
//
// Note [Deterministic index_add]
// The contract adds rows in order of i. Scattering with atomics would add
// them in whatever order the hardware picks; instead the (row, i) pairs
// are sorted by row with a stable radix sort (equal rows keep increasing
// i), and then one block per distinct row walks its run of i in order,
// each thread owning some columns:
//   out[row, c] = fma(s_i1, src[i1, c], fma(s_i0, src[i0, c], out[row, c]))...
// in f32: the CPU's sequential loop `out += s * src` as GCC compiles it
// for an FMA machine (C++ defaults to -ffp-contract=fast); without a
// scale the terms are plain adds either way. bf16 rows accumulate in f32
// and round once at the end.
//
// Workspace layout (uint32 each, n entries): keys_in, vals_in, keys_out,
// vals_out, then cub's scratch, aligned to 256 bytes.
struct IndexAddWorkspace {
  std::uint32_t* keys_in;
  std::uint32_t* vals_in;
  std::uint32_t* keys_out;
  std::uint32_t* vals_out;
  void* scratch;
};

std::size_t align256(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

IndexAddWorkspace carve_index_add(void* workspace, std::int64_t n) {
  char* p = static_cast<char*>(workspace);
  const std::size_t arr = align256(static_cast<std::size_t>(n) * sizeof(std::uint32_t));
  IndexAddWorkspace w;
  w.keys_in = reinterpret_cast<std::uint32_t*>(p);
  w.vals_in = reinterpret_cast<std::uint32_t*>(p + arr);
  w.keys_out = reinterpret_cast<std::uint32_t*>(p + 2 * arr);
  w.vals_out = reinterpret_cast<std::uint32_t*>(p + 3 * arr);
  w.scratch = p + 4 * arr;
  return w;
}

// Bits needed for keys in [0, out_rows] (out_rows marks a bad index).
int key_bits(std::int64_t out_rows) {
  int bits = 1;
  while (bits < 32 &&
         (static_cast<std::uint64_t>(1) << bits) <= static_cast<std::uint64_t>(out_rows)) {
    ++bits;
  }
  return bits;
}

template <typename I>
__global__ void index_add_keys_kernel(const I* index, std::int64_t n, std::int64_t out_rows,
                                      std::uint32_t* keys, std::uint32_t* vals, int* bad) {
  for (std::int64_t i = global_thread(); i < n; i += grid_stride()) {
    const std::int64_t idx = static_cast<std::int64_t>(index[i]);
    const bool ok = idx >= 0 && idx < out_rows;
    if (!ok) *bad = 1;
    keys[i] = static_cast<std::uint32_t>(ok ? idx : out_rows);
    vals[i] = static_cast<std::uint32_t>(i);
  }
}

__device__ __forceinline__ float scale_at(const float* s, std::uint32_t i) {
  return s == nullptr ? 1.0f : s[i];
}
__device__ __forceinline__ float scale_at(const Bf16* s, std::uint32_t i) {
  return s == nullptr ? 1.0f : bf16_to_float(s[i]);
}

// One block per position of the sorted keys; only the first position of
// each run does work (the others return at once).
template <typename T, typename S>
__global__ void index_add_runs_kernel(const T* src, const S* scale, T* out, std::int64_t n,
                                      std::int64_t d, std::int64_t out_rows,
                                      const std::uint32_t* keys, const std::uint32_t* vals) {
  for (std::int64_t p = blockIdx.x; p < n; p += gridDim.x) {
    const std::uint32_t row = keys[p];
    if ((p > 0 && keys[p - 1] == row) || row >= out_rows) continue;
    T* dst = out + static_cast<std::int64_t>(row) * d;
    for (std::int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = load_f(dst + c);
      for (std::int64_t q = p; q < n && keys[q] == row; ++q) {
        const std::uint32_t i = vals[q];
        acc = fmaf(scale_at(scale, i), load_f(src + static_cast<std::int64_t>(i) * d + c), acc);
      }
      store_f(dst + c, acc);
    }
  }
}

template <typename T, typename S>
cudaError_t index_add_runs(const void* src, const void* scale, void* out, std::int64_t n,
                           std::int64_t d, std::int64_t out_rows, const IndexAddWorkspace& w,
                           cudaStream_t stream) {
  const int threads = d >= 256 ? 256 : (d >= 64 ? 128 : 32);
  const unsigned grid = static_cast<unsigned>(n < (1 << 20) ? n : (1 << 20));
  index_add_runs_kernel<<<grid, threads, 0, stream>>>(
      static_cast<const T*>(src), static_cast<const S*>(scale), static_cast<T*>(out), n, d,
      out_rows, w.keys_out, w.vals_out);
  return cudaGetLastError();
}

// ---- per-row stable descending sort ------------------------------------------------------
//
// Note [Row sort]
// cub::DeviceSegmentedSort::StableSortPairsDescending over segments [r n,
// (r + 1) n) of (key = x as f32, value = column index). Stability keeps
// equal values in increasing column order, which is exactly the contract's
// tie rule for both topk and sort_desc. -0.0 keys are normalised to +0.0
// (the CPU comparator treats them as equal) and every NaN to the positive
// quiet NaN, which the radix order puts above +inf: NaNs come first, in
// index order, as in the CPU backend (and torch.sort). The values written
// out are gathered from x, so signs, payloads and bf16 bits are kept. Workspace (each
// part aligned to 256 bytes): keys_in, keys_out (f32, rows n), vals_in,
// vals_out (i32, rows n), offsets (i32, rows + 1), cub scratch.
struct SortWorkspace {
  float* keys_in;
  float* keys_out;
  std::int32_t* vals_in;
  std::int32_t* vals_out;
  std::int32_t* offsets;
  void* scratch;
};

SortWorkspace carve_sort(void* workspace, std::int64_t rows, std::int64_t n) {
  char* p = static_cast<char*>(workspace);
  const std::size_t arr = align256(static_cast<std::size_t>(rows * n) * 4);
  const std::size_t offs = align256(static_cast<std::size_t>(rows + 1) * 4);
  SortWorkspace w;
  w.keys_in = reinterpret_cast<float*>(p);
  w.keys_out = reinterpret_cast<float*>(p + arr);
  w.vals_in = reinterpret_cast<std::int32_t*>(p + 2 * arr);
  w.vals_out = reinterpret_cast<std::int32_t*>(p + 3 * arr);
  w.offsets = reinterpret_cast<std::int32_t*>(p + 4 * arr);
  w.scratch = p + 4 * arr + offs;
  return w;
}

template <typename T>
__global__ void sort_prepare_kernel(const T* x, std::int64_t rows, std::int64_t n, float* keys,
                                    std::int32_t* vals, std::int32_t* offsets) {
  const std::int64_t total = rows * n;
  for (std::int64_t i = global_thread(); i < total; i += grid_stride()) {
    const float v = load_f(x + i);
    keys[i] = isnan(v) ? __uint_as_float(0x7fc00000u) : (v == 0.0f ? 0.0f : v);
    vals[i] = static_cast<std::int32_t>(i % n);
  }
  for (std::int64_t r = global_thread(); r <= rows; r += grid_stride()) {
    offsets[r] = static_cast<std::int32_t>(r * n);
  }
}

template <typename T>
__global__ void sort_gather_kernel(const T* x, std::int64_t rows, std::int64_t n, std::int64_t k,
                                   const std::int32_t* order, T* values, std::int64_t* indices) {
  const std::int64_t total = rows * k;
  for (std::int64_t i = global_thread(); i < total; i += grid_stride()) {
    const std::int64_t r = i / k;
    const std::int64_t c = i - r * k;
    const std::int32_t j = order[r * n + c];
    values[i] = x[r * n + j];
    indices[i] = j;
  }
}

cudaError_t segmented_sort(void* scratch, std::size_t& scratch_bytes, const SortWorkspace& w,
                           std::int64_t rows, std::int64_t n, cudaStream_t stream) {
  return cub::DeviceSegmentedSort::StableSortPairsDescending(
      scratch, scratch_bytes, w.keys_in, w.keys_out, w.vals_in, w.vals_out, rows * n, rows,
      w.offsets, w.offsets + 1, stream);
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

cudaError_t index_select_rows(const void* src, std::int64_t src_rows, std::int64_t row_bytes,
                              const void* index, DType index_dtype, std::int64_t n, void* out,
                              int* bad_index, cudaStream_t stream) {
  const auto aligned = [&](std::int64_t unit) {
    return row_bytes % unit == 0 && reinterpret_cast<std::uintptr_t>(src) % unit == 0 &&
           reinterpret_cast<std::uintptr_t>(out) % unit == 0;
  };
  if (aligned(16)) {
    return index_select_units<uint4>(src, src_rows, row_bytes / 16, index, index_dtype, n, out,
                                     bad_index, stream);
  }
  if (aligned(8)) {
    return index_select_units<uint2>(src, src_rows, row_bytes / 8, index, index_dtype, n, out,
                                     bad_index, stream);
  }
  if (aligned(4)) {
    return index_select_units<std::uint32_t>(src, src_rows, row_bytes / 4, index, index_dtype, n,
                                             out, bad_index, stream);
  }
  if (aligned(2)) {
    return index_select_units<std::uint16_t>(src, src_rows, row_bytes / 2, index, index_dtype, n,
                                             out, bad_index, stream);
  }
  return index_select_units<std::uint8_t>(src, src_rows, row_bytes, index, index_dtype, n, out,
                                          bad_index, stream);
}

cudaError_t index_add_workspace_bytes(std::int64_t n, std::int64_t out_rows, std::size_t* bytes) {
  std::size_t scratch = 0;
  const cudaError_t err = cub::DeviceRadixSort::SortPairs(
      nullptr, scratch, static_cast<const std::uint32_t*>(nullptr),
      static_cast<std::uint32_t*>(nullptr), static_cast<const std::uint32_t*>(nullptr),
      static_cast<std::uint32_t*>(nullptr), n, 0, key_bits(out_rows));
  if (err != cudaSuccess) return err;
  *bytes = 4 * align256(static_cast<std::size_t>(n) * sizeof(std::uint32_t)) + scratch;
  return cudaSuccess;
}

cudaError_t index_add_prepare(const void* index, DType index_dtype, std::int64_t n,
                              std::int64_t out_rows, void* workspace, int* bad_index,
                              cudaStream_t stream) {
  const IndexAddWorkspace w = carve_index_add(workspace, n);
  if (index_dtype == DType::kI32) {
    index_add_keys_kernel<<<grid_for(n), 256, 0, stream>>>(
        static_cast<const std::int32_t*>(index), n, out_rows, w.keys_in, w.vals_in, bad_index);
  } else if (index_dtype == DType::kI64) {
    index_add_keys_kernel<<<grid_for(n), 256, 0, stream>>>(
        static_cast<const std::int64_t*>(index), n, out_rows, w.keys_in, w.vals_in, bad_index);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t index_add_apply(const void* src, const void* scale, DType scale_dtype, void* out,
                            DType dtype, std::int64_t n, std::int64_t d, std::int64_t out_rows,
                            void* workspace, cudaStream_t stream) {
  const IndexAddWorkspace w = carve_index_add(workspace, n);
  std::size_t scratch = 0;
  cudaError_t err =
      cub::DeviceRadixSort::SortPairs(nullptr, scratch, w.keys_in, w.keys_out, w.vals_in,
                                      w.vals_out, n, 0, key_bits(out_rows), stream);
  if (err != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(w.scratch, scratch, w.keys_in, w.keys_out, w.vals_in,
                                        w.vals_out, n, 0, key_bits(out_rows), stream);
  if (err != cudaSuccess) return err;
  // A null scale is read as 1 whatever scale_dtype says.
  if (dtype == DType::kF32 && (scale == nullptr || scale_dtype == DType::kF32)) {
    return index_add_runs<float, float>(src, scale, out, n, d, out_rows, w, stream);
  }
  if (dtype == DType::kBF16 && (scale == nullptr || scale_dtype == DType::kF32)) {
    return index_add_runs<Bf16, float>(src, scale, out, n, d, out_rows, w, stream);
  }
  if (dtype == DType::kBF16 && scale_dtype == DType::kBF16) {
    return index_add_runs<Bf16, Bf16>(src, scale, out, n, d, out_rows, w, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t sort_rows_workspace_bytes(std::int64_t rows, std::int64_t n, std::size_t* bytes) {
  SortWorkspace w{};
  std::size_t scratch = 0;
  const cudaError_t err = segmented_sort(nullptr, scratch, w, rows, n, nullptr);
  if (err != cudaSuccess) return err;
  *bytes = 4 * align256(static_cast<std::size_t>(rows * n) * 4) +
           align256(static_cast<std::size_t>(rows + 1) * 4) + scratch;
  return cudaSuccess;
}

cudaError_t sort_rows_desc(const void* x, DType dtype, std::int64_t rows, std::int64_t n,
                           std::int64_t k, void* values, std::int64_t* indices, void* workspace,
                           cudaStream_t stream) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) return cudaErrorNotSupported;
  const SortWorkspace w = carve_sort(workspace, rows, n);
  const unsigned grid = grid_for(rows * n);
  if (dtype == DType::kF32) {
    sort_prepare_kernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(x), rows, n, w.keys_in,
                                                  w.vals_in, w.offsets);
  } else {
    sort_prepare_kernel<<<grid, 256, 0, stream>>>(static_cast<const Bf16*>(x), rows, n, w.keys_in,
                                                  w.vals_in, w.offsets);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  std::size_t scratch = 0;
  err = segmented_sort(nullptr, scratch, w, rows, n, stream);
  if (err != cudaSuccess) return err;
  err = segmented_sort(w.scratch, scratch, w, rows, n, stream);
  if (err != cudaSuccess) return err;
  const unsigned gather_grid = grid_for(rows * k);
  if (dtype == DType::kF32) {
    sort_gather_kernel<<<gather_grid, 256, 0, stream>>>(
        static_cast<const float*>(x), rows, n, k, w.vals_out, static_cast<float*>(values), indices);
  } else {
    sort_gather_kernel<<<gather_grid, 256, 0, stream>>>(
        static_cast<const Bf16*>(x), rows, n, k, w.vals_out, static_cast<Bf16*>(values), indices);
  }
  return cudaGetLastError();
}

}  // namespace motley::cuda_kernels
