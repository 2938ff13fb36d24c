// Communicator: the collective and point-to-point operations that data,
// expert and pipeline parallelism need, behind one interface (STYLE 6).
//
//   MpiCommunicator    an MPI communicator (MPI_COMM_WORLD or a split of it)
//   LocalCommunicator  size 1: collectives are identities, so a single
//                      process runs the parallel code paths unchanged
//   NcclCommunicator   CUDA tensors over NCCL (nccl_communicator.h, CUDA builds)
//   ThreadCommunicator ranks as threads of one process, for tests without
//                      mpirun (thread_communicator.h)
//
// Communicators are values handed to whoever needs them (ProcessGroups in
// process_groups.h), never globals. Every call is collective over the
// communicator it is made on unless it is point-to-point (send/recv); all
// ranks of that communicator must issue the same collectives in the same
// order (Note [Collective order] in grad_reducer.h).
//
// Tensors: any dtype; counts are in ELEMENTS of the tensor's dtype. The MPI
// implementation requires contiguous CPU tensors (kShape otherwise, naming
// the call); a failing MPI call throws kRuntime naming the call and MPI's
// error string. Sums are elementwise; reductions support f32, f64 and i64.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace motley::parallel {

// The MPI_Comm behind a communicator, for libraries that take one
// (parallel HDF5's H5Pset_fapl_mpio). Defined in parallel/mpi_comm_handle.h,
// which includes mpi.h; this header only names it so that it stays free of
// mpi.h.
struct MpiCommHandle;

// A pending non-blocking operation. wait() blocks until it is complete
// (the tensors it was given may then be read or reused); waiting twice is
// a no-op. Destroying a request that was not waited waits first.
class CommRequest {
 public:
  virtual ~CommRequest() = default;
  virtual void wait() = 0;
};
using Request = std::unique_ptr<CommRequest>;

// Waits for every request in order and clears the list.
void wait_all(std::vector<Request>& requests);

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // ---- collectives ----------------------------------------------------------
  // In place: t := sum over ranks of t.
  virtual void allreduce_sum(Tensor& t) = 0;
  // Non-blocking allreduce_sum; `t` must stay alive and untouched until
  // the request is waited.
  virtual Request iallreduce_sum(Tensor t) = 0;
  // in: (size * n) elements; out: n elements, rank r receiving the sum of
  // block r of every rank's `in`.
  virtual void reduce_scatter_sum(const Tensor& in, Tensor& out) = 0;
  // out: size * in.numel() elements, block r holding rank r's `in`.
  virtual void allgather(const Tensor& in, Tensor& out) = 0;
  // Rank r contributes counts[r] elements (in.numel() == counts[rank()]);
  // out holds them concatenated in rank order.
  virtual void allgatherv(const Tensor& in, Tensor& out,
                          const std::vector<std::int64_t>& counts) = 0;
  // Sends send_counts[r] consecutive elements of `in` (blocks in rank
  // order) to rank r and receives recv_counts[r] from rank r into `out`
  // (blocks in rank order). Zero counts are allowed everywhere.
  virtual void alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts,
                         Tensor& out, const std::vector<std::int64_t>& recv_counts) = 0;
  // Byte-buffer form of alltoallv (counts in bytes).
  virtual void alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts,
                               void* out, const std::vector<std::int64_t>& recv_counts) = 0;
  // t := root's t on every rank.
  virtual void broadcast(Tensor& t, int root) = 0;
  virtual void barrier() = 0;

  // ---- point to point ---------------------------------------------------------
  // Messages between one pair with one tag arrive in the order sent.
  virtual void send(const Tensor& t, int dest, int tag) = 0;
  virtual void recv(Tensor& t, int src, int tag) = 0;  // t preallocated, exact size
  virtual Request isend(Tensor t, int dest, int tag) = 0;
  virtual Request irecv(Tensor t, int src, int tag) = 0;

  // Collective: ranks passing the same color form a new communicator,
  // ordered by key (then by rank in this one).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // ---- native handle ----------------------------------------------------------
  // The MPI communicator with exactly this communicator's ranks, in its rank
  // order, when there is one: MpiCommunicator returns its own; the default,
  // nullptr, means "not MPI" (LocalCommunicator, NcclCommunicator, ranks that
  // are threads of one process). The handle is owned by this communicator
  // and valid while it lives. Not collective.
  virtual const MpiCommHandle* mpi_comm_handle() const { return nullptr; }
};

// Size 1, no peers: collectives copy or do nothing; send/recv throw
// kInternal (there is no one to talk to).
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(Tensor&) override {}
  Request iallreduce_sum(Tensor t) override;
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override;
  void allgather(const Tensor& in, Tensor& out) override;
  void allgatherv(const Tensor& in, Tensor& out,
                  const std::vector<std::int64_t>& counts) override;
  void alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts, Tensor& out,
                 const std::vector<std::int64_t>& recv_counts) override;
  void alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts, void* out,
                       const std::vector<std::int64_t>& recv_counts) override;
  void broadcast(Tensor&, int root) override;
  void barrier() override {}
  void send(const Tensor&, int dest, int tag) override;
  void recv(Tensor&, int src, int tag) override;
  Request isend(Tensor, int dest, int tag) override;
  Request irecv(Tensor, int src, int tag) override;
  std::unique_ptr<Communicator> split(int color, int key) override;
};

// Wraps an MPI communicator (MPI_COMM_WORLD or one made by split(); its
// MPI_Comm is reachable through mpi_comm_handle()). The world communicator
// is not freed; communicators made by split() are freed on destruction.
// Sets MPI_ERRORS_RETURN on the communicator so failures surface as
// kRuntime errors instead of aborts.
class MpiCommunicator final : public Communicator {
 public:
  // MPI_COMM_WORLD (MPI must be initialised).
  static std::unique_ptr<MpiCommunicator> world();
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(Tensor& t) override;
  Request iallreduce_sum(Tensor t) override;
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override;
  void allgather(const Tensor& in, Tensor& out) override;
  void allgatherv(const Tensor& in, Tensor& out,
                  const std::vector<std::int64_t>& counts) override;
  void alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts, Tensor& out,
                 const std::vector<std::int64_t>& recv_counts) override;
  void alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts, void* out,
                       const std::vector<std::int64_t>& recv_counts) override;
  void broadcast(Tensor& t, int root) override;
  void barrier() override;
  void send(const Tensor& t, int dest, int tag) override;
  void recv(Tensor& t, int src, int tag) override;
  Request isend(Tensor t, int dest, int tag) override;
  Request irecv(Tensor t, int src, int tag) override;
  std::unique_ptr<Communicator> split(int color, int key) override;
  const MpiCommHandle* mpi_comm_handle() const override;

 private:
  struct Impl;
  explicit MpiCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
};

// ---- process-wide MPI lifetime (apps only) ---------------------------------------
// Whether this process was started by an MPI launcher (mpirun, srun, ...),
// judged from the launcher's environment variables.
bool launched_by_mpi();
// MPI_Init_thread(MPI_THREAD_FUNNELED) if MPI is not initialised yet.
void mpi_initialize(int* argc, char*** argv);
bool mpi_initialized();
// MPI_Finalize if initialised and not finalised.
void mpi_finalize();
// MPI_Abort(MPI_COMM_WORLD, code): ends every rank of the job.
[[noreturn]] void mpi_abort(int code);

}  // namespace motley::parallel
