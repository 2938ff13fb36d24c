#include "parallel/communicator.h"

#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "parallel/mpi_comm_handle.h"

namespace motley::parallel {

void wait_all(std::vector<Request>& requests) {
  for (Request& r : requests) {
    if (r) r->wait();
  }
  requests.clear();
}

namespace {

// Every MPI call goes through here: communicators carry MPI_ERRORS_RETURN,
// so a failure comes back as a code that we turn into a kRuntime error
// naming the call instead of an abort without context.
void mpi_check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  MOTLEY_FAIL(kRuntime, call, " failed: ", std::string(text, static_cast<std::size_t>(len)),
              " (MPI error ", code, ")");
}
#define MOTLEY_MPI(call) mpi_check((call), #call)

MPI_Datatype mpi_type(DType dtype, const char* what) {
  switch (dtype) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kF64: return MPI_DOUBLE;
    case DType::kI64: return MPI_INT64_T;
    default: break;
  }
  MOTLEY_FAIL(kShape, what, ": MPI reductions support f32, f64 and i64, not ",
              dtype_name(dtype));
}

// The MPI path reads and writes host memory directly.
void check_host(const Tensor& t, const char* what) {
  MOTLEY_CHECK_KIND(kShape, t.defined(), what, ": undefined tensor");
  MOTLEY_CHECK_KIND(kShape, t.device().is_cpu(), what,
                    ": the MPI communicator needs CPU tensors, got ", t.str(),
                    " (copy to the host first, or use a device communicator)");
  MOTLEY_CHECK_KIND(kShape, t.is_contiguous(), what, ": tensor must be contiguous, got ",
                    t.str());
}

int to_int(std::int64_t v, const char* what) {
  MOTLEY_CHECK_KIND(kRuntime, v >= 0 && v <= INT_MAX, what, ": count ", v,
                    " does not fit MPI's int counts");
  return static_cast<int>(v);
}

std::vector<int> displacements(const std::vector<int>& counts) {
  std::vector<int> d(counts.size(), 0);
  for (std::size_t i = 1; i < counts.size(); ++i) d[i] = d[i - 1] + counts[i - 1];
  return d;
}

std::vector<int> scaled(const std::vector<std::int64_t>& counts, std::int64_t unit,
                        const char* what) {
  std::vector<int> out(counts.size());
  for (std::size_t i = 0; i < counts.size(); ++i) out[i] = to_int(counts[i] * unit, what);
  return out;
}

class DoneRequest final : public CommRequest {
 public:
  void wait() override {}
};

class MpiRequest final : public CommRequest {
 public:
  // `keep` holds the buffer alive until the operation completes.
  MpiRequest(MPI_Request request, Tensor keep, const char* what)
      : request_(request), keep_(std::move(keep)), what_(what) {}
  ~MpiRequest() override {
    // A request must not outlive its buffer: wait, but never throw here.
    if (!done_) MPI_Wait(&request_, MPI_STATUS_IGNORE);
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    mpi_check(MPI_Wait(&request_, MPI_STATUS_IGNORE), what_);
  }

 private:
  MPI_Request request_;
  Tensor keep_;
  const char* what_;
  bool done_ = false;
};

}  // namespace

// ---- LocalCommunicator -------------------------------------------------------------

Request LocalCommunicator::iallreduce_sum(Tensor) { return std::make_unique<DoneRequest>(); }

void LocalCommunicator::reduce_scatter_sum(const Tensor& in, Tensor& out) { out.copy_(in.reshape(out.shape())); }

void LocalCommunicator::allgather(const Tensor& in, Tensor& out) { out.copy_(in.reshape(out.shape())); }

void LocalCommunicator::allgatherv(const Tensor& in, Tensor& out,
                                   const std::vector<std::int64_t>& counts) {
  MOTLEY_CHECK(counts.size() == 1 && counts[0] == in.numel(), "allgatherv counts");
  out.copy_(in.reshape(out.shape()));
}

void LocalCommunicator::alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts,
                                  Tensor& out, const std::vector<std::int64_t>& recv_counts) {
  MOTLEY_CHECK(send_counts.size() == 1 && recv_counts.size() == 1 &&
                   send_counts[0] == recv_counts[0],
               "alltoallv on one rank must send what it receives");
  if (send_counts[0] > 0) out.copy_(in.reshape(out.shape()));
}

void LocalCommunicator::alltoallv_bytes(const void* in,
                                        const std::vector<std::int64_t>& send_counts, void* out,
                                        const std::vector<std::int64_t>& recv_counts) {
  MOTLEY_CHECK(send_counts.size() == 1 && recv_counts.size() == 1 &&
                   send_counts[0] == recv_counts[0],
               "alltoallv on one rank must send what it receives");
  if (send_counts[0] > 0) std::memcpy(out, in, static_cast<std::size_t>(send_counts[0]));
}

void LocalCommunicator::broadcast(Tensor&, int root) {
  MOTLEY_CHECK(root == 0, "broadcast root ", root, " on a size-1 communicator");
}

void LocalCommunicator::send(const Tensor&, int dest, int) {
  MOTLEY_FAIL(kInternal, "send to ", dest, " on a size-1 communicator (no peers)");
}
void LocalCommunicator::recv(Tensor&, int src, int) {
  MOTLEY_FAIL(kInternal, "recv from ", src, " on a size-1 communicator (no peers)");
}
Request LocalCommunicator::isend(Tensor, int dest, int) {
  MOTLEY_FAIL(kInternal, "isend to ", dest, " on a size-1 communicator (no peers)");
}
Request LocalCommunicator::irecv(Tensor, int src, int) {
  MOTLEY_FAIL(kInternal, "irecv from ", src, " on a size-1 communicator (no peers)");
}
std::unique_ptr<Communicator> LocalCommunicator::split(int, int) {
  return std::make_unique<LocalCommunicator>();
}

// ---- MpiCommunicator -----------------------------------------------------------------

// The handle is the Impl itself, so mpi_comm_handle() needs no copy.
struct MpiCommunicator::Impl : MpiCommHandle {
  bool owned = false;
};

MpiCommunicator::MpiCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {
  MOTLEY_MPI(MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN));
  MOTLEY_MPI(MPI_Comm_rank(impl_->comm, &rank_));
  MOTLEY_MPI(MPI_Comm_size(impl_->comm, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (impl_ && impl_->owned && !finalized) MPI_Comm_free(&impl_->comm);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::world() {
  MOTLEY_CHECK(mpi_initialized(), "MpiCommunicator::world() before MPI_Init");
  auto impl = std::make_unique<Impl>();
  impl->comm = MPI_COMM_WORLD;
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(std::move(impl)));
}

void MpiCommunicator::allreduce_sum(Tensor& t) {
  check_host(t, "allreduce_sum");
  if (size_ == 1 || t.numel() == 0) return;
  MOTLEY_MPI(MPI_Allreduce(MPI_IN_PLACE, t.raw_data(), to_int(t.numel(), "allreduce_sum"),
                           mpi_type(t.dtype(), "allreduce_sum"), MPI_SUM, impl_->comm));
}

Request MpiCommunicator::iallreduce_sum(Tensor t) {
  check_host(t, "iallreduce_sum");
  if (size_ == 1 || t.numel() == 0) return std::make_unique<DoneRequest>();
  MPI_Request request;
  MOTLEY_MPI(MPI_Iallreduce(MPI_IN_PLACE, t.raw_data(), to_int(t.numel(), "iallreduce_sum"),
                            mpi_type(t.dtype(), "iallreduce_sum"), MPI_SUM, impl_->comm,
                            &request));
  return std::make_unique<MpiRequest>(request, std::move(t), "MPI_Wait(MPI_Iallreduce)");
}

void MpiCommunicator::reduce_scatter_sum(const Tensor& in, Tensor& out) {
  check_host(in, "reduce_scatter_sum");
  check_host(out, "reduce_scatter_sum");
  MOTLEY_CHECK_KIND(kShape, in.numel() == out.numel() * size_ && in.dtype() == out.dtype(),
                    "reduce_scatter_sum: in ", in.str(), " must hold ", size_, " blocks of out ",
                    out.str());
  MOTLEY_MPI(MPI_Reduce_scatter_block(in.raw_data(), out.raw_data(),
                                      to_int(out.numel(), "reduce_scatter_sum"),
                                      mpi_type(in.dtype(), "reduce_scatter_sum"), MPI_SUM,
                                      impl_->comm));
}

void MpiCommunicator::allgather(const Tensor& in, Tensor& out) {
  check_host(in, "allgather");
  check_host(out, "allgather");
  MOTLEY_CHECK_KIND(kShape, out.numel() == in.numel() * size_ && in.dtype() == out.dtype(),
                    "allgather: out ", out.str(), " must hold ", size_, " copies of ", in.str());
  const int bytes = to_int(static_cast<std::int64_t>(in.nbytes()), "allgather");
  MOTLEY_MPI(MPI_Allgather(in.raw_data(), bytes, MPI_BYTE, out.raw_data(), bytes, MPI_BYTE,
                           impl_->comm));
}

void MpiCommunicator::allgatherv(const Tensor& in, Tensor& out,
                                 const std::vector<std::int64_t>& counts) {
  check_host(in, "allgatherv");
  check_host(out, "allgatherv");
  MOTLEY_CHECK_KIND(kShape, static_cast<int>(counts.size()) == size_ &&
                                counts[rank_] == in.numel() && in.dtype() == out.dtype(),
                    "allgatherv: counts do not match this rank's tensor ", in.str());
  const auto unit = static_cast<std::int64_t>(dtype_size(in.dtype()));
  const std::vector<int> c = scaled(counts, unit, "allgatherv");
  const std::vector<int> d = displacements(c);
  MOTLEY_CHECK_KIND(kShape, static_cast<std::int64_t>(d.back()) + c.back() ==
                                static_cast<std::int64_t>(out.nbytes()),
                    "allgatherv: out ", out.str(), " does not hold the sum of counts");
  MOTLEY_MPI(MPI_Allgatherv(in.raw_data(), c[rank_], MPI_BYTE, out.raw_data(), c.data(),
                            d.data(), MPI_BYTE, impl_->comm));
}

void MpiCommunicator::alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts,
                                Tensor& out, const std::vector<std::int64_t>& recv_counts) {
  check_host(in, "alltoallv");
  check_host(out, "alltoallv");
  MOTLEY_CHECK_KIND(kShape, in.dtype() == out.dtype(), "alltoallv: dtypes differ");
  const auto unit = static_cast<std::int64_t>(dtype_size(in.dtype()));
  std::vector<std::int64_t> sb(send_counts), rb(recv_counts);
  std::int64_t s_total = 0, r_total = 0;
  for (auto& c : sb) { s_total += c; c *= unit; }
  for (auto& c : rb) { r_total += c; c *= unit; }
  MOTLEY_CHECK_KIND(kShape, s_total == in.numel() && r_total == out.numel(),
                    "alltoallv: counts sum to ", s_total, " / ", r_total, " for ", in.str(),
                    " / ", out.str());
  alltoallv_bytes(in.raw_data(), sb, out.raw_data(), rb);
}

void MpiCommunicator::alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts,
                                      void* out, const std::vector<std::int64_t>& recv_counts) {
  MOTLEY_CHECK_KIND(kShape, static_cast<int>(send_counts.size()) == size_ &&
                                static_cast<int>(recv_counts.size()) == size_,
                    "alltoallv: need ", size_, " counts per direction");
  const std::vector<int> sc = scaled(send_counts, 1, "alltoallv"),
                         rc = scaled(recv_counts, 1, "alltoallv");
  const std::vector<int> sd = displacements(sc), rd = displacements(rc);
  // MPI wants valid pointers even for empty buffers.
  static char dummy = 0;
  MOTLEY_MPI(MPI_Alltoallv(in ? in : &dummy, sc.data(), sd.data(), MPI_BYTE,
                           out ? out : &dummy, rc.data(), rd.data(), MPI_BYTE, impl_->comm));
}

void MpiCommunicator::broadcast(Tensor& t, int root) {
  check_host(t, "broadcast");
  MOTLEY_MPI(MPI_Bcast(t.raw_data(), to_int(static_cast<std::int64_t>(t.nbytes()), "broadcast"),
                       MPI_BYTE, root, impl_->comm));
}

void MpiCommunicator::barrier() { MOTLEY_MPI(MPI_Barrier(impl_->comm)); }

void MpiCommunicator::send(const Tensor& t, int dest, int tag) {
  check_host(t, "send");
  MOTLEY_MPI(MPI_Send(t.raw_data(), to_int(static_cast<std::int64_t>(t.nbytes()), "send"),
                      MPI_BYTE, dest, tag, impl_->comm));
}

void MpiCommunicator::recv(Tensor& t, int src, int tag) {
  check_host(t, "recv");
  MPI_Status status;
  MOTLEY_MPI(MPI_Recv(t.raw_data(), to_int(static_cast<std::int64_t>(t.nbytes()), "recv"),
                      MPI_BYTE, src, tag, impl_->comm, &status));
  int got = 0;
  MOTLEY_MPI(MPI_Get_count(&status, MPI_BYTE, &got));
  MOTLEY_CHECK_KIND(kRuntime, static_cast<std::size_t>(got) == t.nbytes(), "recv from rank ",
                    src, " tag ", tag, ": got ", got, " bytes, expected ", t.nbytes());
}

Request MpiCommunicator::isend(Tensor t, int dest, int tag) {
  check_host(t, "isend");
  MPI_Request request;
  MOTLEY_MPI(MPI_Isend(t.raw_data(), to_int(static_cast<std::int64_t>(t.nbytes()), "isend"),
                       MPI_BYTE, dest, tag, impl_->comm, &request));
  return std::make_unique<MpiRequest>(request, std::move(t), "MPI_Wait(MPI_Isend)");
}

Request MpiCommunicator::irecv(Tensor t, int src, int tag) {
  check_host(t, "irecv");
  MPI_Request request;
  MOTLEY_MPI(MPI_Irecv(t.raw_data(), to_int(static_cast<std::int64_t>(t.nbytes()), "irecv"),
                       MPI_BYTE, src, tag, impl_->comm, &request));
  return std::make_unique<MpiRequest>(request, std::move(t), "MPI_Wait(MPI_Irecv)");
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  auto impl = std::make_unique<Impl>();
  MOTLEY_MPI(MPI_Comm_split(impl_->comm, color, key, &impl->comm));
  impl->owned = true;
  return std::unique_ptr<Communicator>(new MpiCommunicator(std::move(impl)));
}

const MpiCommHandle* MpiCommunicator::mpi_comm_handle() const { return impl_.get(); }

// ---- lifetime ------------------------------------------------------------------------

bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK",
                          "MPI_LOCALNRANKS", "SLURM_STEP_ID"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

bool mpi_initialized() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void mpi_initialize(int* argc, char*** argv) {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return;
  int provided = 0;
  // Funneled: only the main thread calls MPI (the CPU backend's worker
  // threads never do).
  MOTLEY_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  MOTLEY_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
}

void mpi_finalize() {
  if (mpi_initialized()) MPI_Finalize();
}

void mpi_abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace motley::parallel
