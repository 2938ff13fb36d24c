// NcclCommunicator: the Communicator interface (communicator.h) over NCCL,
// for CUDA tensors. Compiled only when the build has CUDA and NCCL
// (MOTLEY_HAS_NCCL is defined then); docs/gpu.md, "NCCL communicator".
//
// One device per rank: every rank of the communicator passes its own CUDA
// device (the launcher's choice, local rank % visible devices: Note
// [Launcher cross-check] in launcher.h); two ranks on one device are not
// supported by NCCL.
//
// Tensors: every tensor argument must be defined, contiguous and on this
// communicator's device; reductions take f32, f64, bf16 and i64 (i64 as
// ncclInt64); everything else moves bytes and takes any dtype. A tensor on
// the host or on another device, a strided tensor or another dtype for a
// reduction is a kShape error naming the call. Raw pointers passed to
// alltoallv_bytes must be device memory of this device.
//
// Streams (Note [NCCL streams] in nccl_communicator.cpp): the communicator
// launches on a stream of its own, ordered after the work already issued on
// the CUDA backend's stream of the device; no host synchronisation happens
// except where a call is blocking:
//   * blocking calls (allreduce_sum, reduce_scatter_sum, allgather(v),
//     alltoallv(_bytes), broadcast, barrier, send, recv, split) return when
//     the operation has completed on the device;
//   * iallreduce_sum, isend and irecv return a Request; its wait() returns
//     when the operation has completed. The tensors must stay untouched
//     until then (the request keeps them alive).
//
// Point to point (Note [NCCL point-to-point]): NCCL has no tags. Messages
// between a pair of ranks are matched in the order they were issued; the
// tag must be >= 0 and is otherwise ignored, so a receiver must post its
// receives in the order of the peer's sends. isend/irecv are queued and
// launched together, as one NCCL group, by the next call on this
// communicator that is not an isend/irecv, or by waiting any of their
// requests. The sizes of a send and its receive must match exactly (NCCL
// cannot detect a mismatch). A blocking send/recv to this rank itself is a
// kShape error; isend/irecv to itself are fine.
//
// Errors and timeouts (Note [NCCL timeouts]): no call blocks without a
// deadline. When an operation does not complete within options.timeout_s,
// or NCCL reports an asynchronous error, the communicator is aborted
// (ncclCommAbort) and the call throws kRuntime naming the call, the rank
// and the reason; every later call on it throws kRuntime. Callers are
// expected to end the job (the trainer turns any error into MPI_Abort).
//
// Not thread-safe: one thread issues all calls on a communicator and
// waits its requests.
#pragma once

#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace motley::parallel {

struct NcclOptions {
  // Deadline, in seconds, of each blocking call and each wait(): time spent
  // waiting for the slowest peer counts, so it must exceed the longest
  // legitimate wait in a step (a peer writing a checkpoint, say).
  double timeout_s = 600;

  // The defaults with MOTLEY_NCCL_TIMEOUT_S applied when it is set;
  // kUsage when it is not a positive number.
  static NcclOptions from_env();
};

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `mpi_comm`, whose ranks and order the new communicator
  // takes. Makes `device` the calling thread's current CUDA device, lets
  // rank 0 create the NCCL id, broadcasts it over `mpi_comm` and
  // initialises NCCL (non-blocking, under the timeout). A failure on any
  // rank (no such device, NCCL init error or timeout) throws kRuntime on
  // every rank, so no rank is left waiting.
  static std::unique_ptr<NcclCommunicator> create(Communicator& mpi_comm, int device,
                                                  NcclOptions options = NcclOptions::from_env());
  // Finalizes the communicator (waiting at most the timeout for in-flight
  // operations and for peers), or aborts it after an error. Collective in
  // practice: destroy communicators in the same order on every rank.
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  const NcclOptions& options() const { return options_; }

  void allreduce_sum(Tensor& t) override;
  Request iallreduce_sum(Tensor t) override;
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override;
  void allgather(const Tensor& in, Tensor& out) override;
  // Grouped broadcasts, one per rank with a nonzero count.
  void allgatherv(const Tensor& in, Tensor& out, const std::vector<std::int64_t>& counts) override;
  // One group of ncclSend/ncclRecv, one per peer with a nonzero count.
  void alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts, Tensor& out,
                 const std::vector<std::int64_t>& recv_counts) override;
  void alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts, void* out,
                       const std::vector<std::int64_t>& recv_counts) override;
  void broadcast(Tensor& t, int root) override;
  // A one-element allreduce, waited on the host.
  void barrier() override;
  void send(const Tensor& t, int dest, int tag) override;
  void recv(Tensor& t, int src, int tag) override;
  Request isend(Tensor t, int dest, int tag) override;
  Request irecv(Tensor t, int src, int tag) override;
  // ncclCommSplit: color must be >= 0. The new communicator has the same
  // device and options.
  std::unique_ptr<Communicator> split(int color, int key) override;

  struct Impl;  // shared with the requests, which may outlive a call

 private:
  explicit NcclCommunicator(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1, device_ = 0;
  NcclOptions options_;
};

}  // namespace motley::parallel
