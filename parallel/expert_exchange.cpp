#include "parallel/expert_exchange.h"

#include <cstring>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "core/ops.h"

namespace motley::parallel {

namespace ag = autograd;

namespace {

std::vector<std::int64_t> inverse(const std::vector<std::int64_t>& perm) {
  std::vector<std::int64_t> inv(perm.size());
  for (std::size_t i = 0; i < perm.size(); ++i) inv[perm[i]] = static_cast<std::int64_t>(i);
  return inv;
}

// out row i = in row index[i] (gather of whole rows; both contiguous). On
// a GPU the index goes to the device (one small upload) and the rows are
// gathered there by the backend: rows never visit the host.
Tensor gather_rows(const Tensor& in, const std::vector<std::int64_t>& index, std::int64_t d) {
  if (!in.device().is_cpu()) {
    const Tensor idx =
        Tensor::from_vector(index, {static_cast<std::int64_t>(index.size())}).to(in.device());
    return ops::index_select_rows(in.contiguous(), idx);
  }
  Tensor src = in.contiguous();
  Tensor out = Tensor::empty({static_cast<std::int64_t>(index.size()), d}, in.dtype(),
                             in.device());
  const std::size_t row = static_cast<std::size_t>(d) * dtype_size(in.dtype());
  const auto* s = static_cast<const char*>(src.raw_data());
  auto* o = static_cast<char*>(out.raw_data());
  for (std::size_t i = 0; i < index.size(); ++i) {
    std::memcpy(o + i * row, s + static_cast<std::size_t>(index[i]) * row, row);
  }
  return out;
}

// The exchange itself on plain tensors: gather by send_index, all-to-all,
// permute by recv_perm.
Tensor exchange_tensor(const Tensor& x, const ExchangePlan& plan, Communicator& comm,
                       std::int64_t* bytes_sent) {
  const std::int64_t d = x.size(1);
  Tensor send = gather_rows(x, plan.send_index, d);
  std::int64_t received = 0;
  for (std::int64_t c : plan.recv_counts) received += c;
  Tensor recv = Tensor::empty({received, d}, x.dtype(), x.device());
  std::vector<std::int64_t> sc(plan.send_counts), rc(plan.recv_counts);
  for (auto& c : sc) c *= d;
  for (auto& c : rc) c *= d;
  comm.alltoallv(send, sc, recv, rc);
  if (bytes_sent != nullptr) {
    const int me = comm.rank();
    for (std::size_t r = 0; r < sc.size(); ++r) {
      if (static_cast<int>(r) != me) {
        *bytes_sent += sc[r] * static_cast<std::int64_t>(dtype_size(x.dtype()));
      }
    }
  }
  return gather_rows(recv, plan.recv_perm, d);
}

}  // namespace

ExchangePlan ExchangePlan::mirrored() const {
  // Forward: out = P_recv(A2A(P_send x)). Its inverse sends what was
  // received back along the same routes: send buffer = this receive buffer
  // (row k = out row inverse(recv_perm)[k]); receive buffer = this send
  // buffer, whose row j is input row send_index[j].
  ExchangePlan m;
  m.send_index = inverse(recv_perm);
  m.send_counts = recv_counts;
  m.recv_counts = send_counts;
  m.recv_perm = inverse(send_index);
  return m;
}

ExchangePlan dispatch_plan(int me, const std::vector<std::vector<std::int64_t>>& all_counts,
                           const std::vector<int>& owner,
                           std::vector<std::int64_t>* local_counts) {
  const int ranks = static_cast<int>(all_counts.size());
  const std::size_t n_experts = owner.size();
  const std::vector<std::int64_t>& mine = all_counts[me];
  std::vector<std::int64_t> offset(n_experts + 1, 0);
  for (std::size_t e = 0; e < n_experts; ++e) offset[e + 1] = offset[e] + mine[e];

  ExchangePlan plan;
  plan.send_counts.assign(ranks, 0);
  plan.recv_counts.assign(ranks, 0);
  for (int dest = 0; dest < ranks; ++dest) {
    for (std::size_t e = 0; e < n_experts; ++e) {
      if (owner[e] != dest) continue;
      for (std::int64_t r = offset[e]; r < offset[e + 1]; ++r) plan.send_index.push_back(r);
      plan.send_counts[dest] += mine[e];
    }
  }
  // Receive buffer: by source rank, then by (my) expert id. Output: by
  // expert, then by source rank, so each expert's rows are one block.
  std::vector<std::vector<std::int64_t>> start(ranks, std::vector<std::int64_t>(n_experts, 0));
  std::int64_t pos = 0;
  for (int src = 0; src < ranks; ++src) {
    for (std::size_t e = 0; e < n_experts; ++e) {
      if (owner[e] != me) continue;
      start[src][e] = pos;
      pos += all_counts[src][e];
      plan.recv_counts[src] += all_counts[src][e];
    }
  }
  if (local_counts) local_counts->assign(n_experts, 0);
  for (std::size_t e = 0; e < n_experts; ++e) {
    if (owner[e] != me) continue;
    for (int src = 0; src < ranks; ++src) {
      for (std::int64_t r = 0; r < all_counts[src][e]; ++r) {
        plan.recv_perm.push_back(start[src][e] + r);
      }
      if (local_counts) (*local_counts)[e] += all_counts[src][e];
    }
  }
  return plan;
}

ag::Variable exchange_rows(const ag::Variable& x, const ExchangePlan& plan, Communicator& comm,
                           std::int64_t* bytes_sent) {
  MOTLEY_CHECK_KIND(kShape, x.dim() == 2, "exchange_rows: rows must be (R, d), got ",
                    x.data().str());
  Tensor out = exchange_tensor(x.data(), plan, comm, bytes_sent);
  Communicator* c = &comm;
  return ag::record_op(
      "expert_all_to_all", out, {x},
      [mirror = plan.mirrored(), c, bytes_sent](const Tensor& grad) -> ag::TensorList {
        return {exchange_tensor(grad, mirror, *c, bytes_sent)};
      });
}

ag::Variable CommExpertExchange::run(const ag::Variable& rows,
                                     const std::vector<std::int64_t>& counts,
                                     const ExpertFn& expert) {
  const int ranks = ep_.size();
  const auto n_experts = static_cast<std::int64_t>(owner_.size());
  MOTLEY_CHECK(static_cast<std::int64_t>(counts.size()) == n_experts, "counts for ",
               counts.size(), " experts, placement for ", n_experts);
  // The counts travel on the rows' device (NCCL moves device tensors only);
  // the plan is computed on the host: one small copy back per layer and
  // direction (docs/gpu.md).
  Tensor mine = Tensor::from_vector(counts, {n_experts}).to(rows.device());
  Tensor all = Tensor::empty({ranks * n_experts}, DType::kI64, rows.device());
  ep_.allgather(mine, all);
  const std::vector<std::int64_t> flat = all.to_vector<std::int64_t>();
  std::vector<std::vector<std::int64_t>> all_counts(ranks);
  for (int r = 0; r < ranks; ++r) {
    all_counts[r].assign(flat.begin() + r * n_experts, flat.begin() + (r + 1) * n_experts);
  }
  std::vector<std::int64_t> local;
  const ExchangePlan plan = dispatch_plan(ep_.rank(), all_counts, owner_, &local);

  ag::Variable received = exchange_rows(rows, plan, ep_, &bytes_sent_);  // (R_local, d)
  std::int64_t local_rows = 0;
  for (std::int64_t c : local) local_rows += c;
  // No local rows: the empty received block goes straight back, keeping
  // both exchanges in the graph so backward mirrors them on every rank.
  const ag::Variable y = local_rows == 0 ? received : expert(received, local);
  return exchange_rows(y, plan.mirrored(), ep_, &bytes_sent_);
}

}  // namespace motley::parallel
