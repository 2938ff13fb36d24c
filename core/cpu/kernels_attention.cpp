// Causal attention on the CPU, flash-attention style (Dao et al. 2022,
// FlashAttention-2's loop order for the backward pass).
//
// Forward, per (batch, head) and block of kBlockQ queries: walk the key
// blocks the causal mask leaves visible, compute one (kBlockQ, kBlockK)
// block of scores with a small GEMM, and fold it into a running max m, a
// running sum l and an unnormalised output with the online softmax
//   m' = max(m, rowmax S);  l' = l e^(m - m') + sum e^(S - m');
//   O' = O e^(m - m') + e^(S - m') V.
// lse = m + log l is saved for the backward pass, which recomputes every
// block of probabilities as P = e^(S - lse) instead of storing them:
//   dV += P^T dO;  dP = dO V^T;  dS = P (dP - D),  D = rowsum(dO * O);
//   dQ += scale dS K;  dK += scale dS^T Q.
// At most one block of scores (plus its gradient in the backward pass) per
// head exists at a time, so memory is O(T hd), not O(T^2).
//
// Key j is visible to query i when j <= i + (Tk - Tq).
//
// Single-threaded like the rest of the CPU backend; the block GEMMs call
// OpenBLAS, which stays on one thread at these sizes.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/cpu/cpu_common.h"
#include "core/cpu/cpu_kernels.h"

namespace motley::cpu {
namespace {

constexpr std::int64_t kBlockQ = 128;
constexpr std::int64_t kBlockK = 64;

struct AttnDims {
  std::int64_t bh, tq, tk, hd;
};

AttnDims check_attention(const char* kernel, const Tensor& q, const Tensor& k,
                         const Tensor& v) {
  for (const Tensor* t : {&q, &k, &v}) require_contiguous(kernel, *t, "input");
  MOTLEY_CHECK_KIND(kShape, q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cpu ", kernel,
                    ": q ", q.str(), ", k ", k.str(), ", v ", v.str(),
                    " must be (B, H, T, hd)");
  MOTLEY_CHECK_KIND(kShape,
                    k.shape() == v.shape() && q.size(0) == k.size(0) &&
                        q.size(1) == k.size(1) && q.size(3) == k.size(3) &&
                        q.size(2) <= k.size(2) && q.size(3) >= 1,
                    "cpu ", kernel, ": q ", shape_str(q.shape()), ", k ", shape_str(k.shape()),
                    ", v ", shape_str(v.shape()), " do not fit (B, H, Tq <= Tk, hd >= 1)");
  MOTLEY_CHECK_KIND(kShape, k.dtype() == q.dtype() && v.dtype() == q.dtype(), "cpu ",
                    kernel, ": q, k, v dtypes differ");
  return {q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3)};
}

void check_out(const char* kernel, const Tensor& t, const Shape& shape, DType dtype,
               const char* name) {
  require_contiguous(kernel, t, name);
  MOTLEY_CHECK_KIND(kShape, t.shape() == shape && t.dtype() == dtype, "cpu ", kernel, ": ",
                    name, " ", t.str(), ", expected ", dtype_str(dtype), " ",
                    shape_str(shape));
}

// Number of keys of block [k0, k0 + bk) visible to query i.
inline std::int64_t visible_keys(std::int64_t i, std::int64_t offset, std::int64_t k0,
                                 std::int64_t bk) {
  return std::clamp<std::int64_t>(i + offset - k0 + 1, 0, bk);
}

template <typename T>
void attention_head(const T* q, const T* k, const T* v, T* out, T* lse, std::int64_t tq,
                    std::int64_t tk, std::int64_t hd, T scale, std::vector<T>& s_buf,
                    std::vector<T>& acc, std::vector<T>& m_run, std::vector<T>& l_run) {
  const std::int64_t offset = tk - tq;
  const T kNegInf = -std::numeric_limits<T>::infinity();
  for (std::int64_t q0 = 0; q0 < tq; q0 += kBlockQ) {
    const std::int64_t bq = std::min(kBlockQ, tq - q0);
    // Keys visible to the last query of the block.
    const std::int64_t k_end = std::min(tk, q0 + bq - 1 + offset + 1);
    std::fill(acc.begin(), acc.begin() + bq * hd, T(0));
    std::fill(m_run.begin(), m_run.begin() + bq, kNegInf);
    std::fill(l_run.begin(), l_run.begin() + bq, T(0));
    for (std::int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
      const std::int64_t bk = std::min(kBlockK, k_end - k0);
      T* s = s_buf.data();  // (bq, bk) scores of this block
      blas_gemm(false, true, bq, bk, hd, scale, q + q0 * hd, hd, k + k0 * hd, hd, T(0), s, bk);
      for (std::int64_t i = 0; i < bq; ++i) {
        T* sr = s + i * bk;
        const std::int64_t nv = visible_keys(q0 + i, offset, k0, bk);
        const T mx = nv > 0 ? max_of(sr, nv) : kNegInf;
        const T m_old = m_run[i];
        const T m_new = mx > m_old ? mx : m_old;
        // Key 0 is visible to every query, so after the first block m_new
        // is finite; before it m_old = -inf and alpha = 0.
        const T alpha = m_old == kNegInf ? T(0) : std::exp(m_old - m_new);
        const T row_sum = static_cast<T>(exp_affine(sr, T(1), -m_new, sr, nv, /*sum=*/true));
        for (std::int64_t j = nv; j < bk; ++j) sr[j] = T(0);
        m_run[i] = m_new;
        l_run[i] = l_run[i] * alpha + row_sum;
        if (alpha != T(1)) {
          T* ar = acc.data() + i * hd;
          for (std::int64_t c = 0; c < hd; ++c) ar[c] *= alpha;
        }
      }
      blas_gemm(false, false, bq, hd, bk, T(1), s, bk, v + k0 * hd, hd, T(1), acc.data(), hd);
    }
    for (std::int64_t i = 0; i < bq; ++i) {
      const T inv = T(1) / l_run[i];
      const T* ar = acc.data() + i * hd;
      T* orow = out + (q0 + i) * hd;
      for (std::int64_t c = 0; c < hd; ++c) orow[c] = ar[c] * inv;
      lse[q0 + i] = m_run[i] + std::log(l_run[i]);
    }
  }
}

template <typename T>
void attention_backward_head(const T* q, const T* k, const T* v, const T* out, const T* lse,
                             const T* dout, T* dq, T* dk, T* dv, std::int64_t tq,
                             std::int64_t tk, std::int64_t hd, T scale, std::vector<T>& p_buf,
                             std::vector<T>& dp_buf, std::vector<T>& d_row) {
  const std::int64_t offset = tk - tq;
  // D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij.
  for (std::int64_t i = 0; i < tq; ++i) {
    d_row[i] = static_cast<T>(dot_row(dout + i * hd, out + i * hd, hd));
  }
  std::fill(dq, dq + tq * hd, T(0));
  std::fill(dk, dk + tk * hd, T(0));
  std::fill(dv, dv + tk * hd, T(0));
  for (std::int64_t k0 = 0; k0 < tk; k0 += kBlockK) {
    const std::int64_t bk = std::min(kBlockK, tk - k0);
    // First query that sees key k0: i + offset >= k0.
    const std::int64_t q_first = std::max<std::int64_t>(0, k0 - offset);
    for (std::int64_t q0 = q_first / kBlockQ * kBlockQ; q0 < tq; q0 += kBlockQ) {
      const std::int64_t bq = std::min(kBlockQ, tq - q0);
      T* p = p_buf.data();    // (bq, bk) probabilities, then dS
      T* dp = dp_buf.data();  // (bq, bk)
      blas_gemm(false, true, bq, bk, hd, scale, q + q0 * hd, hd, k + k0 * hd, hd, T(0), p, bk);
      for (std::int64_t i = 0; i < bq; ++i) {
        T* pr = p + i * bk;
        const std::int64_t nv = visible_keys(q0 + i, offset, k0, bk);
        const T l = lse[q0 + i];
        exp_affine(pr, T(1), -l, pr, nv);
        for (std::int64_t j = nv; j < bk; ++j) pr[j] = T(0);
      }
      // dV_blk += P^T dO_blk
      blas_gemm(true, false, bk, hd, bq, T(1), p, bk, dout + q0 * hd, hd, T(1), dv + k0 * hd,
                hd);
      // dP = dO_blk V_blk^T
      blas_gemm(false, true, bq, bk, hd, T(1), dout + q0 * hd, hd, v + k0 * hd, hd, T(0), dp,
                bk);
      for (std::int64_t i = 0; i < bq; ++i) {
        T* pr = p + i * bk;
        const T* dpr = dp + i * bk;
        const T di = d_row[q0 + i];
        for (std::int64_t j = 0; j < bk; ++j) pr[j] = pr[j] * (dpr[j] - di);
      }
      // dQ_blk += scale dS K_blk;  dK_blk += scale dS^T Q_blk
      blas_gemm(false, false, bq, hd, bk, scale, p, bk, k + k0 * hd, hd, T(1), dq + q0 * hd,
                hd);
      blas_gemm(true, false, bk, hd, bq, scale, p, bk, q + q0 * hd, hd, T(1), dk + k0 * hd,
                hd);
    }
  }
}

}  // namespace

void attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out,
               Tensor& lse) {
  const AttnDims dims = check_attention("attention", q, k, v);
  check_out("attention", out, q.shape(), q.dtype(), "out");
  check_out("attention", lse, {q.size(0), q.size(1), q.size(2)}, q.dtype(), "lse");
  if (dims.bh == 0 || dims.tq == 0) return;
  dispatch_float("attention", q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const std::int64_t hd = dims.hd;
    std::vector<T> s_buf(kBlockQ * kBlockK), acc(kBlockQ * hd), m_run(kBlockQ), l_run(kBlockQ);
    const T* pq = cdata<T>(q);
    const T* pk = cdata<T>(k);
    const T* pv = cdata<T>(v);
    T* po = mdata<T>(out);
    T* pl = mdata<T>(lse);
    for (std::int64_t h = 0; h < dims.bh; ++h) {
      attention_head<T>(pq + h * dims.tq * hd, pk + h * dims.tk * hd, pv + h * dims.tk * hd,
                        po + h * dims.tq * hd, pl + h * dims.tq, dims.tq, dims.tk, hd,
                        static_cast<T>(scale), s_buf, acc, m_run, l_run);
    }
  });
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, double scale, Tensor& dq,
                        Tensor& dk, Tensor& dv) {
  const AttnDims dims = check_attention("attention_backward", q, k, v);
  const Shape lse_shape{q.size(0), q.size(1), q.size(2)};
  require_contiguous("attention_backward", out, "out");
  require_contiguous("attention_backward", lse, "lse");
  require_contiguous("attention_backward", dout, "dout");
  MOTLEY_CHECK_KIND(kShape,
                    out.shape() == q.shape() && dout.shape() == q.shape() &&
                        lse.shape() == lse_shape && out.dtype() == q.dtype() &&
                        dout.dtype() == q.dtype() && lse.dtype() == q.dtype(),
                    "cpu attention_backward: out ", out.str(), ", lse ", lse.str(), ", dout ",
                    dout.str(), " do not fit q ", q.str());
  check_out("attention_backward", dq, q.shape(), q.dtype(), "dq");
  check_out("attention_backward", dk, k.shape(), q.dtype(), "dk");
  check_out("attention_backward", dv, v.shape(), q.dtype(), "dv");
  if (dims.bh == 0) return;
  dispatch_float("attention_backward", q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const std::int64_t hd = dims.hd, tq = dims.tq, tk = dims.tk;
    std::vector<T> p_buf(kBlockQ * kBlockK), dp_buf(kBlockQ * kBlockK), d_row(tq);
    const T* pq = cdata<T>(q);
    const T* pk = cdata<T>(k);
    const T* pv = cdata<T>(v);
    const T* po = cdata<T>(out);
    const T* pl = cdata<T>(lse);
    const T* pdo = cdata<T>(dout);
    T* pdq = mdata<T>(dq);
    T* pdk = mdata<T>(dk);
    T* pdv = mdata<T>(dv);
    for (std::int64_t h = 0; h < dims.bh; ++h) {
      attention_backward_head<T>(pq + h * tq * hd, pk + h * tk * hd, pv + h * tk * hd,
                                 po + h * tq * hd, pl + h * tq, pdo + h * tq * hd,
                                 pdq + h * tq * hd, pdk + h * tk * hd, pdv + h * tk * hd, tq,
                                 tk, hd, static_cast<T>(scale), p_buf, dp_buf, d_row);
    }
  });
}

}  // namespace motley::cpu
