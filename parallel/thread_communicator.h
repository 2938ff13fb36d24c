// ThreadCommunicator: the Communicator interface (communicator.h) with N
// ranks that are N threads of one process, so that the parallel code paths
// (ProcessGroups, the gradient reducer, the expert exchange, the pipeline)
// run in a unit test without mpirun and can be compared with the
// single-process step.
//
//   run_ranks(4, [&](std::shared_ptr<Communicator> world) {
//     ProcessGroups groups(world, GroupLayout{2, 2, 2});
//     ...  // what one MPI rank would do
//   });
//
// Every call of the interface is implemented, with MpiCommunicator's
// semantics:
//   * tensors must be defined, contiguous and on the CPU (kShape otherwise,
//     naming the call); counts are in elements (bytes for alltoallv_bytes);
//     argument checks mirror MpiCommunicator's;
//   * collectives are matched by issue order per communicator (the k-th
//     collective of every rank forms one operation) and must be the same
//     call on every rank: a rank issuing another call, or arguments that
//     disagree between ranks (sizes, dtypes, counts, root), is detected
//     once every rank has arrived and every rank throws the same error
//     (kInternal for a different call, kShape for disagreeing arguments);
//   * sums (allreduce_sum, iallreduce_sum, reduce_scatter_sum) take f32,
//     f64 and i64 (kShape otherwise, naming the call), accumulate in that
//     dtype and add in rank order, ((rank 0 + rank 1) + rank 2) + ...,
//     so the result is deterministic and bitwise identical on every rank
//     (i64 wraps on overflow, as MPI's does in practice);
//   * iallreduce_sum copies `t` when issued and writes the sum into it in
//     wait(), once every rank has issued the operation;
//   * point to point: messages between a pair of ranks with one tag are
//     received in the order sent; a receive's tensor must have exactly the
//     message's size (kRuntime otherwise, naming the call; the message is
//     consumed). Tags are >= 0 and ranks must exist (kRuntime otherwise).
//     isend copies the tensor and returns at once; irecv is posted when
//     issued (it takes messages in posting order, before a later recv) and
//     fills its tensor in wait();
//   * send, and wait() of an isend, return only once the receiver has
//     posted the matching receive: the strictest behaviour MPI allows for
//     a standard-mode send (MPI_Ssend). Code that relies on MPI buffering
//     a blocking send (two ranks that send to each other before either
//     receives) works under MPI only for small messages; here it is
//     reported as a deadlock every time. A blocking send to this rank
//     itself without a posted irecv, or a recv from itself without a sent
//     message, would never complete and throws kRuntime at once;
//   * split(color, key) is collective; ranks with equal colors form a new
//     ThreadCommunicator ordered by (key, rank here). Colors must be >= 0
//     (kRuntime; MPI_UNDEFINED is not supported, ProcessGroups never uses
//     it). Communicators made by split share the world's failure state.
//
// Threads: one thread per rank issues every call on that rank's
// communicators (the world and its splits) and waits its requests; ranks
// run concurrently. Nothing spins: ranks block on a condition variable.
//
// Failure, so that a broken test fails instead of hanging:
//   * when a rank fails (run_ranks saw its body throw), the world is
//     aborted: from then on every call or wait() that still has to wait
//     for another rank, on any rank and any communicator split from the
//     world, throws kRuntime "another rank failed (<why>)" (one whose
//     peers have all taken part completes normally);
//   * deadlock: when every rank is either blocked in a call that no other
//     rank can complete, or has finished its body (run_ranks only), the
//     world is aborted with a report of what each rank is blocked in;
//   * a blocking call or wait() that waits longer than timeout_s throws
//     kRuntime naming the call and aborts the world.
// A request destroyed without wait() waits first and drops any error (as
// MpiCommunicator's do); wait() explicitly to see errors.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace motley::parallel {

class ThreadHub;  // shared by the ranks of one communicator (thread_communicator.cpp)

class ThreadCommunicator final : public Communicator {
 public:
  // Generous: a legitimate wait in a unit test lasts milliseconds.
  static constexpr double kDefaultTimeoutS = 120.0;

  // The ranks of a new world of `size` >= 1: element r is rank r. Hand
  // each to its own thread (run_ranks does that).
  static std::vector<std::shared_ptr<Communicator>> create_world(
      int size, double timeout_s = kDefaultTimeoutS);

  ~ThreadCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(Tensor& t) override;
  Request iallreduce_sum(Tensor t) override;
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override;
  void allgather(const Tensor& in, Tensor& out) override;
  void allgatherv(const Tensor& in, Tensor& out, const std::vector<std::int64_t>& counts) override;
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

 private:
  friend void run_ranks(int, const std::function<void(std::shared_ptr<Communicator>)>&, double);
  ThreadCommunicator(std::shared_ptr<ThreadHub> hub, int rank);

  std::shared_ptr<ThreadHub> hub_;
  int rank_ = 0, size_ = 1;
  std::uint64_t next_collective_ = 0;  // issue number of this rank's next collective
};

// Runs body(world rank r) on one thread per rank of a new world of `size`
// ranks and joins them. If any body throws, the world is aborted (blocked
// ranks throw instead of hanging) and, after every thread has ended, the
// exception of the lowest rank that failed by itself (not merely because
// another rank failed) is rethrown on the caller's thread; if every rank
// failed only through the abort (a deadlock), the lowest rank's is.
void run_ranks(int size, const std::function<void(std::shared_ptr<Communicator> world)>& body,
               double timeout_s = ThreadCommunicator::kDefaultTimeoutS);

}  // namespace motley::parallel
