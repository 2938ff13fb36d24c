#include "parallel/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/device_scope.h"

// Written against nccl.h of NCCL 2.28 (non-blocking configs through
// ncclCommInitRankConfig, ncclCommFinalize, ncclCommSplit,
// ncclCommGetAsyncError, ncclBfloat16); ncclCommSplit is the newest of
// these, from NCCL 2.18.
static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0), "motley needs NCCL >= 2.18");

namespace motley::parallel {

// Note [NCCL timeouts]
// When a peer never joins an operation (it died, took another branch, or
// issued its collectives in another order), NCCL does not fail: its kernel
// spins on the GPU, and a host that synchronises on that kernel hangs
// forever, and with it every rank waiting for this one. So nothing here
// blocks in CUDA or NCCL without a deadline:
//   * communicators are non-blocking (config.blocking = 0): init, split,
//     group launches and finalize may return ncclInProgress instead of
//     blocking, and settle() polls ncclCommGetAsyncError until the state
//     leaves ncclInProgress (NCCL requires that before any other call on
//     the communicator, or any work on its stream);
//   * completion is observed by cudaEventQuery on an event recorded after
//     the operation, never by cudaStreamSynchronize or
//     cudaEventSynchronize, with ncclCommGetAsyncError polled in between:
//     network errors and ncclRemoteError surface there while the kernel
//     may still spin;
//   * every poll loop (settling a launch or an init, waiting for
//     completion in a blocking call or in wait(), finalizing) ends after
//     options.timeout_s. Waiting for the slowest peer counts, so the
//     timeout must exceed the longest legitimate wait in a step;
//   * on a timeout or an error the communicator is aborted (ncclCommAbort
//     makes the kernels still running on it exit, so the device and the
//     memory they touch become usable again), the failure is remembered so
//     that every later call throws at once, and the call throws kRuntime
//     naming the call, the rank and the reason. The trainer turns that
//     exception into MPI_Abort of the whole job, which also ends the peers,
//     whose kernels may still spin with no deadline of their own yet.
// There is no watchdog thread: a rank notices only inside a blocking call
// or a wait(). That suffices because every training step ends in blocking
// calls on its communicators. Polling spins (with yield) for the first
// millisecond, since small collectives finish in microseconds, then sleeps
// 20 us, and 1 ms once 100 ms have passed.
//
// Note [NCCL streams]
// Each communicator launches on a CUDA stream of its own, created with
// cudaStreamNonBlocking so that it does not synchronise with the legacy
// default stream. Before every launch it records an event on the CUDA
// backend's stream of the device (cuda_backend_stream: every kernel, copy
// and cuBLAS call of the backend runs there, in issue order) and makes its
// own stream wait for that event, so NCCL reads a tensor only after the
// kernels that wrote it, without a host synchronisation. The other
// direction needs no event: blocking calls return only after their
// operation completed and a request's tensors may be used only after
// wait(), both observed on the host. The caching allocator hands a freed
// block to the next tensor at once (cuda_allocator.h), so the tensors of
// an operation are kept alive (by the request, or by the blocking call's
// arguments) until its completion has been observed.
//
// Note [NCCL point-to-point]
// NCCL has no tags: sends and receives between a pair of ranks are paired
// in issue order. An ncclSend keeps its stream busy until the peer's
// matching ncclRecv runs, so two ranks that each send before they receive
// (a ring exchange; a pipeline stage sending activations while its
// neighbour sends gradients back) deadlock unless each rank's send and
// receive are fused in one ncclGroupStart/ncclGroupEnd. Hence isend and
// irecv only queue the operation; the queue is launched as one group by
// the next call on this communicator that is not an isend/irecv (a
// blocking send or recv joins that group), or when one of the queued
// requests is waited or destroyed. Issue order on the device is host
// issue order. What follows for callers:
//   * a receiver posts its receives in the order of the peer's sends; the
//     tag is checked (>= 0) and otherwise ignored;
//   * a send and its receive have the same size (a mismatch hangs until
//     the timeout or delivers garbage; NCCL cannot detect it);
//   * a queued isend has not started yet: a rank must not block elsewhere
//     (in MPI, on another communicator) on something that needs its own
//     queued sends to have been delivered; wait them first;
//   * zero-byte messages are skipped on both sides (sizes match);
//   * a blocking send or recv to the rank itself could only complete in a
//     group with its counterpart, so it is rejected; isend/irecv to itself
//     work.

namespace {

using Clock = std::chrono::steady_clock;
using EventPtr = std::shared_ptr<std::remove_pointer_t<cudaEvent_t>>;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One step of a poll loop (Note [NCCL timeouts]).
void poll_pause(Clock::time_point start) {
  const double waited = seconds_since(start);
  if (waited < 1e-3) {
    std::this_thread::yield();
  } else if (waited < 0.1) {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

std::string nccl_text(ncclResult_t r) {
  std::string text =
      absl::StrCat(ncclGetErrorString(r), " (ncclResult_t ", static_cast<int>(r), ")");
  // The last error NCCL logged (process-wide; may belong to an earlier
  // call, but it usually names the cause).
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && last[0] != '\0') absl::StrAppend(&text, "; NCCL says: ", last);
  return text;
}

std::string cuda_text(cudaError_t err) {
  return absl::StrCat(cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

// A comm handle written by another thread (NCCL publishes the result of a
// non-blocking split with an atomic store).
ncclComm_t load_comm(ncclComm_t* handle) { return __atomic_load_n(handle, __ATOMIC_ACQUIRE); }

ncclDataType_t nccl_sum_type(DType dtype, const char* what) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kI64:
      return ncclInt64;
    default:
      break;
  }
  MOTLEY_FAIL(kShape, what, ": NCCL reductions support f32, f64, bf16 and i64, not ",
              dtype_name(dtype));
}

// Where NCCL publishes the handle of a communicator it initialises: its
// init job stores it from another thread when it ends, possibly after we
// stopped waiting (a timeout), so a slot is freed only once the job is
// known to have ended and is deliberately leaked otherwise.
ncclComm_t* new_handle_slot() { return new ncclComm_t(nullptr); }

}  // namespace

NcclOptions NcclOptions::from_env() {
  NcclOptions options;
  const char* env = std::getenv("MOTLEY_NCCL_TIMEOUT_S");
  if (env != nullptr && env[0] != '\0') {
    double value = 0;
    MOTLEY_CHECK_KIND(kUsage, absl::SimpleAtod(env, &value) && std::isfinite(value) && value > 0,
                      "MOTLEY_NCCL_TIMEOUT_S=", env, ": expected a positive number of seconds");
    options.timeout_s = value;
  }
  return options;
}

// ---- the shared state ----------------------------------------------------------------

struct NcclCommunicator::Impl {
  // The first failing call inside a group; the group is closed regardless.
  struct GroupCalls {
    ncclResult_t first = ncclSuccess;
    const char* call = nullptr;
    void operator()(ncclResult_t r, const char* name) {
      if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) {
        first = r;
        call = name;
      }
    }
  };
  // The operation of a request (Note [NCCL point-to-point]).
  struct Operation {
    const char* what = "";
    Tensor tensor;  // kept alive until completion is observed
    bool is_send = false;
    int peer = -1;
    EventPtr done;  // null while queued
  };

  Impl(int device_index, NcclOptions opts) : device(device_index), options(opts) {}
  ~Impl();
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  ncclComm_t comm = nullptr;
  int device = 0, rank = 0, size = 1;
  NcclOptions options;
  cudaStream_t stream = nullptr;                   // this communicator's (Note [NCCL streams])
  cudaStream_t producer = nullptr;                 // the backend's stream of `device`
  cudaEvent_t ready = nullptr;                     // recorded on `producer` before each launch
  Tensor barrier_buffer;                           // (1,) f32 on the device
  std::vector<std::shared_ptr<Operation>> queued;  // isend/irecv not launched yet
  std::string failure;                             // set once the communicator was aborted

  // Streams, events and the barrier buffer; `device` must be current.
  void create_resources();
  std::string where() const {
    return absl::StrCat("rank ", rank, " of ", size, " on cuda:", device);
  }

  // Aborts the communicator and throws kRuntime (Note [NCCL timeouts]).
  [[noreturn]] void fail(const char* what, const std::string& reason);
  void check_alive(const char* what) const;
  // The return code of an NCCL call: ncclInProgress is settled, an error
  // aborts.
  void check(ncclResult_t r, const char* call, const char* what);
  void check_cuda(cudaError_t err, const char* call, const char* what);
  // Polls until the communicator leaves ncclInProgress.
  void settle(const char* call, const char* what);
  // Makes the stream wait for the work issued so far on the backend's stream.
  void after_producer(const char* what);
  EventPtr record(const char* what);
  // Polls `event` and the communicator's error state until the event
  // completes; fails on error or after the timeout.
  void wait(cudaEvent_t event, const char* what);
  // Launches the queued point-to-point operations as one group.
  void launch_queued(const char* what);
  // Runs `enqueue` (NCCL calls on `stream`) after the queued operations and
  // the producer, then waits for completion on the host.
  template <typename F>
  void run_blocking(const char* what, F&& enqueue) {
    check_alive(what);
    launch_queued(what);
    after_producer(what);
    enqueue();
    const EventPtr done = record(what);
    wait(done.get(), what);
  }
  // Runs `body(GroupCalls&)` between ncclGroupStart and ncclGroupEnd.
  template <typename F>
  void grouped(const char* what, F&& body) {
    check(ncclGroupStart(), "ncclGroupStart", what);
    GroupCalls calls;
    body(calls);
    const ncclResult_t end = ncclGroupEnd();
    if (calls.first != ncclSuccess) {
      fail(what, absl::StrCat(calls.call, " failed: ", nccl_text(calls.first)));
    }
    check(end, "ncclGroupEnd", what);
  }
};

void NcclCommunicator::Impl::create_resources() {
  producer = static_cast<cudaStream_t>(cuda_backend_stream(device));
  MOTLEY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MOTLEY_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  barrier_buffer = Tensor::zeros({1}, DType::kF32, Device::cuda(device));
}

NcclCommunicator::Impl::~Impl() {
  DeviceScope scope(device);
  if (comm != nullptr) {
    // ncclCommFinalize flushes what was issued and waits for the peers to
    // quiesce; under the same deadline as everything else, then abort.
    std::string problem;
    ncclResult_t r = ncclCommFinalize(comm);
    if (r == ncclSuccess || r == ncclInProgress) {
      const Clock::time_point start = Clock::now();
      ncclResult_t state = ncclInProgress;
      while (true) {
        r = ncclCommGetAsyncError(comm, &state);
        if (r != ncclSuccess || state != ncclInProgress) break;
        if (seconds_since(start) > options.timeout_s) {
          problem =
              absl::StrCat("ncclCommFinalize did not complete within ", options.timeout_s, " s");
          break;
        }
        poll_pause(start);
      }
      if (problem.empty() && r != ncclSuccess) problem = "ncclCommGetAsyncError: " + nccl_text(r);
      if (problem.empty() && state != ncclSuccess) {
        problem = "ncclCommFinalize: " + nccl_text(state);
      }
    } else {
      problem = "ncclCommFinalize: " + nccl_text(r);
    }
    if (problem.empty()) {
      r = ncclCommDestroy(comm);
      if (r != ncclSuccess) {
        std::fprintf(stderr, "motley: NCCL communicator (%s): ncclCommDestroy: %s\n",
                     where().c_str(), nccl_text(r).c_str());
      }
    } else {
      std::fprintf(stderr, "motley: NCCL communicator (%s): %s; aborting it\n", where().c_str(),
                   problem.c_str());
      (void)ncclCommAbort(comm);
    }
    comm = nullptr;
  }
  // Destroying a stream or event with work pending is allowed: CUDA
  // releases them once the work is done.
  if (ready != nullptr) (void)cudaEventDestroy(ready);
  if (stream != nullptr) (void)cudaStreamDestroy(stream);
  (void)cudaGetLastError();
}

void NcclCommunicator::Impl::fail(const char* what, const std::string& reason) {
  const std::string message = absl::StrCat("NCCL ", what, " (", where(), "): ", reason);
  if (comm != nullptr) {
    (void)ncclCommAbort(comm);
    comm = nullptr;
  }
  queued.clear();  // their requests throw on wait()
  failure = message;
  MOTLEY_FAIL(kRuntime, message,
              "; the communicator was aborted (Note [NCCL timeouts] in "
              "parallel/nccl_communicator.cpp)");
}

void NcclCommunicator::Impl::check_alive(const char* what) const {
  MOTLEY_CHECK_KIND(kRuntime, failure.empty(), "NCCL ", what, " (", where(),
                    "): the communicator was aborted after an earlier error: ", failure);
}

void NcclCommunicator::Impl::check(ncclResult_t r, const char* call, const char* what) {
  if (r == ncclSuccess) return;
  if (r == ncclInProgress) {
    settle(call, what);
    return;
  }
  fail(what, absl::StrCat(call, " failed: ", nccl_text(r)));
}

void NcclCommunicator::Impl::check_cuda(cudaError_t err, const char* call, const char* what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  fail(what, absl::StrCat(call, " failed: ", cuda_text(err), detail::cuda_error_hint(err)));
}

void NcclCommunicator::Impl::settle(const char* call, const char* what) {
  const Clock::time_point start = Clock::now();
  while (true) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) {
      fail(what, absl::StrCat("ncclCommGetAsyncError after ", call, ": ", nccl_text(r)));
    }
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(what, absl::StrCat(call, ": ", nccl_text(state)));
    if (seconds_since(start) > options.timeout_s) {
      fail(what, absl::StrCat(call, " still in progress after ", options.timeout_s,
                              " s (timeout; a peer did not join)"));
    }
    poll_pause(start);
  }
}

void NcclCommunicator::Impl::after_producer(const char* what) {
  check_cuda(cudaEventRecord(ready, producer), "cudaEventRecord", what);
  check_cuda(cudaStreamWaitEvent(stream, ready, 0), "cudaStreamWaitEvent", what);
}

EventPtr NcclCommunicator::Impl::record(const char* what) {
  cudaEvent_t event = nullptr;
  check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate", what);
  EventPtr owned(event, [](cudaEvent_t e) { (void)cudaEventDestroy(e); });
  check_cuda(cudaEventRecord(event, stream), "cudaEventRecord", what);
  return owned;
}

void NcclCommunicator::Impl::wait(cudaEvent_t event, const char* what) {
  const Clock::time_point start = Clock::now();
  while (true) {
    const cudaError_t q = cudaEventQuery(event);
    if (q != cudaSuccess && q != cudaErrorNotReady) {
      check_cuda(q, "cudaEventQuery", what);
    }
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) fail(what, "ncclCommGetAsyncError: " + nccl_text(r));
    if (state != ncclSuccess && state != ncclInProgress) {
      fail(what, "asynchronous NCCL error: " + nccl_text(state));
    }
    if (q == cudaSuccess) return;
    if (seconds_since(start) > options.timeout_s) {
      fail(what,
           absl::StrCat("not complete after ", options.timeout_s,
                        " s (timeout; a peer did not join, or joined a different operation)"));
    }
    poll_pause(start);
  }
}

void NcclCommunicator::Impl::launch_queued(const char* what) {
  if (queued.empty()) return;
  check_alive(what);
  after_producer(what);
  grouped(what, [&](GroupCalls& calls) {
    for (const std::shared_ptr<Operation>& op : queued) {
      const Tensor& t = op->tensor;
      if (op->is_send) {
        calls(ncclSend(t.raw_data(), t.nbytes(), ncclUint8, op->peer, comm, stream), "ncclSend");
      } else {
        calls(ncclRecv(t.raw_data(), t.nbytes(), ncclUint8, op->peer, comm, stream), "ncclRecv");
      }
    }
  });
  const EventPtr done = record(what);
  for (const std::shared_ptr<Operation>& op : queued) op->done = done;
  queued.clear();
}

// ---- requests -----------------------------------------------------------------------

namespace {

using Impl = NcclCommunicator::Impl;
using Operation = Impl::Operation;
using GroupCalls = Impl::GroupCalls;

class NcclRequest final : public CommRequest {
 public:
  NcclRequest(std::shared_ptr<Impl> impl, std::shared_ptr<Operation> op)
      : impl_(std::move(impl)), op_(std::move(op)) {}
  ~NcclRequest() override {
    if (done_) return;
    // A request must not outlive its operation: wait, but never throw here.
    try {
      wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "motley: unwaited NCCL request failed: %s\n", e.what());
    }
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    DeviceScope scope(impl_->device);
    impl_->check_alive(op_->what);
    if (!op_->done) impl_->launch_queued(op_->what);
    MOTLEY_CHECK(op_->done != nullptr, "NCCL ", op_->what, ": request not launched");
    impl_->wait(op_->done.get(), op_->what);
    op_->tensor = Tensor();
  }

 private:
  std::shared_ptr<Impl> impl_;
  std::shared_ptr<Operation> op_;
  bool done_ = false;
};

class DoneRequest final : public CommRequest {
 public:
  void wait() override {}
};

}  // namespace

// ---- argument checks ----------------------------------------------------------------

namespace {

void check_tensor(const Tensor& t, int device, const char* what) {
  MOTLEY_CHECK_KIND(kShape, t.defined(), what, ": undefined tensor");
  MOTLEY_CHECK_KIND(kShape, t.device() == Device::cuda(device), what,
                    ": the NCCL communicator of cuda:", device, " needs tensors on cuda:", device,
                    ", got ", t.str());
  MOTLEY_CHECK_KIND(kShape, t.is_contiguous(), what, ": tensor must be contiguous, got ", t.str());
}

void check_peer(int peer, int rank, int size, int tag, bool blocking, const char* what) {
  MOTLEY_CHECK_KIND(kShape, peer >= 0 && peer < size, what, ": rank ", peer,
                    " is not in a communicator of size ", size);
  MOTLEY_CHECK_KIND(kShape, tag >= 0, what, ": tag ", tag, " must be >= 0");
  MOTLEY_CHECK_KIND(kShape, !blocking || peer != rank, what, " to or from rank ", rank,
                    " itself: a blocking NCCL send/recv to self never completes; use "
                    "isend/irecv (Note [NCCL point-to-point])");
}

// Byte displacements of consecutive blocks.
std::vector<std::int64_t> offsets(const std::vector<std::int64_t>& counts) {
  std::vector<std::int64_t> d(counts.size(), 0);
  for (std::size_t i = 1; i < counts.size(); ++i) d[i] = d[i - 1] + counts[i - 1];
  return d;
}

}  // namespace

// ---- creation ----------------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(std::shared_ptr<Impl> impl)
    : impl_(std::move(impl)),
      rank_(impl_->rank),
      size_(impl_->size),
      device_(impl_->device),
      options_(impl_->options) {}

NcclCommunicator::~NcclCommunicator() = default;

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator& mpi_comm, int device,
                                                           NcclOptions options) {
  MOTLEY_CHECK_KIND(kUsage, std::isfinite(options.timeout_s) && options.timeout_s > 0,
                    "NCCL timeout must be a positive number of seconds, got ", options.timeout_s);
  const int rank = mpi_comm.rank(), size = mpi_comm.size();
  // Every rank's verdict is agreed over mpi_comm after each phase, so that a
  // failure on one rank fails all of them instead of leaving the others
  // waiting for it in NCCL.
  auto agree = [&](const std::string& local_error, const char* phase) {
    Tensor bad = Tensor::full({1}, local_error.empty() ? 0.0 : 1.0, DType::kF64);
    mpi_comm.allreduce_sum(bad);
    const int failed = static_cast<int>(bad.item());
    MOTLEY_CHECK_KIND(kRuntime, failed == 0, "NCCL communicator ", phase, " failed on ", failed,
                      " of ", size, " rank(s); rank ", rank, " (cuda:", device,
                      "): ", local_error.empty() ? "ok here" : local_error);
  };

  // Phase 1: the device, the streams, and (rank 0) the unique id.
  auto impl = std::make_shared<Impl>(device, options);
  impl->rank = rank;
  impl->size = size;
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  std::string error;
  try {
    const int count = cuda_backend_device_count();
    MOTLEY_CHECK_KIND(kRuntime, device >= 0 && device < count, "CUDA device cuda:", device,
                      " requested, but ", count, " CUDA device(s) are visible");
    MOTLEY_CUDA_CHECK(cudaSetDevice(device));
    impl->create_resources();
    if (rank == 0) {
      const ncclResult_t r = ncclGetUniqueId(&id);
      MOTLEY_CHECK_KIND(kRuntime, r == ncclSuccess, "ncclGetUniqueId failed: ", nccl_text(r));
    }
  } catch (const Error& e) {
    error = e.what();
  }
  // The id travels as 32 i32 words through mpi_comm's broadcast (host
  // tensors, any Communicator).
  static_assert(sizeof(ncclUniqueId) % sizeof(std::int32_t) == 0);
  Tensor id_words =
      Tensor::zeros({static_cast<std::int64_t>(sizeof(ncclUniqueId) / 4)}, DType::kI32);
  if (rank == 0) std::memcpy(id_words.raw_data(), &id, sizeof(id));
  mpi_comm.broadcast(id_words, 0);
  std::memcpy(&id, id_words.raw_data(), sizeof(id));
  agree(error, "setup");

  // Phase 2: non-blocking init under the timeout (Note [NCCL timeouts]).
  DeviceScope scope(device);
  try {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t* slot = new_handle_slot();
    const ncclResult_t r = ncclCommInitRankConfig(slot, size, id, rank, &config);
    // NCCL stores the handle before returning (and again when the job ends).
    impl->comm = load_comm(slot);
    if (r != ncclSuccess && r != ncclInProgress) {
      if (impl->comm != nullptr) (void)ncclCommAbort(impl->comm);
      impl->comm = nullptr;
      MOTLEY_FAIL(kRuntime, "ncclCommInitRankConfig failed: ", nccl_text(r));
    }
    MOTLEY_CHECK_KIND(kRuntime, impl->comm != nullptr,
                      "ncclCommInitRankConfig returned no communicator");
    impl->settle("ncclCommInitRankConfig", "init");  // aborts and throws on timeout
    delete slot;                                     // the init job has ended
    int nccl_rank = -1, nccl_size = -1;
    impl->check(ncclCommUserRank(impl->comm, &nccl_rank), "ncclCommUserRank", "init");
    impl->check(ncclCommCount(impl->comm, &nccl_size), "ncclCommCount", "init");
    MOTLEY_CHECK(nccl_rank == rank && nccl_size == size, "NCCL init: rank ", nccl_rank, " of ",
                 nccl_size, ", expected ", rank, " of ", size);
  } catch (const Error& e) {
    error = e.what();
  }
  if (!error.empty() && impl->comm != nullptr) {
    (void)ncclCommAbort(impl->comm);
    impl->comm = nullptr;
  }
  agree(error, "init");
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(impl)));
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  const char* what = "split";
  MOTLEY_CHECK_KIND(kShape, color >= 0, "split: color must be >= 0 for NCCL, got ", color);
  DeviceScope scope(device_);
  Impl& parent = *impl_;
  parent.check_alive(what);
  parent.launch_queued(what);

  auto child = std::make_shared<Impl>(device_, options_);
  child->create_resources();
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t* slot = new_handle_slot();
  const ncclResult_t r = ncclCommSplit(parent.comm, color, key, slot, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    parent.fail(what, absl::StrCat("ncclCommSplit failed: ", nccl_text(r)));
  }
  // The split is an asynchronous job of the parent: NCCL publishes the new
  // handle when the job ends, and the parent may report ncclInProgress
  // until then. Done when both have left ncclInProgress.
  const Clock::time_point start = Clock::now();
  while (true) {
    ncclResult_t parent_state = ncclInProgress;
    const ncclResult_t q = ncclCommGetAsyncError(parent.comm, &parent_state);
    if (q != ncclSuccess) parent.fail(what, "ncclCommGetAsyncError: " + nccl_text(q));
    if (parent_state != ncclSuccess && parent_state != ncclInProgress) {
      parent.fail(what, "ncclCommSplit: " + nccl_text(parent_state));
    }
    ncclComm_t handle = load_comm(slot);
    std::string problem;
    if (handle != nullptr) {
      ncclResult_t state = ncclInProgress;
      const ncclResult_t c = ncclCommGetAsyncError(handle, &state);
      if (c != ncclSuccess) {
        problem = nccl_text(c);
      } else if (state != ncclSuccess && state != ncclInProgress) {
        problem = nccl_text(state);
      } else if (state == ncclSuccess && parent_state == ncclSuccess) {
        child->comm = handle;
        delete slot;  // published: the job has ended
        break;
      }
    }
    if (problem.empty() && seconds_since(start) > options_.timeout_s) {
      problem = absl::StrCat("not initialised after ", options_.timeout_s,
                             " s (timeout; a peer did not join the split)");
    }
    if (!problem.empty()) {
      if (handle != nullptr) (void)ncclCommAbort(handle);
      parent.fail(what, "the new communicator: " + problem);
    }
    poll_pause(start);
  }
  child->check(ncclCommUserRank(child->comm, &child->rank), "ncclCommUserRank", what);
  child->check(ncclCommCount(child->comm, &child->size), "ncclCommCount", what);
  return std::unique_ptr<Communicator>(new NcclCommunicator(std::move(child)));
}

// ---- collectives -------------------------------------------------------------------------

void NcclCommunicator::allreduce_sum(Tensor& t) {
  const char* what = "allreduce_sum";
  check_tensor(t, device_, what);
  const ncclDataType_t type = nccl_sum_type(t.dtype(), what);
  if (t.numel() == 0) return;
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.run_blocking(what, [&] {
    s.check(ncclAllReduce(t.raw_data(), t.raw_data(), static_cast<std::size_t>(t.numel()), type,
                          ncclSum, s.comm, s.stream),
            "ncclAllReduce", what);
  });
}

Request NcclCommunicator::iallreduce_sum(Tensor t) {
  const char* what = "iallreduce_sum";
  check_tensor(t, device_, what);
  const ncclDataType_t type = nccl_sum_type(t.dtype(), what);
  if (t.numel() == 0) return std::make_unique<DoneRequest>();
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.check_alive(what);
  s.launch_queued(what);
  s.after_producer(what);
  s.check(ncclAllReduce(t.raw_data(), t.raw_data(), static_cast<std::size_t>(t.numel()), type,
                        ncclSum, s.comm, s.stream),
          "ncclAllReduce", what);
  auto op = std::make_shared<Operation>();
  op->what = what;
  op->tensor = std::move(t);
  op->done = s.record(what);
  return std::make_unique<NcclRequest>(impl_, std::move(op));
}

void NcclCommunicator::reduce_scatter_sum(const Tensor& in, Tensor& out) {
  const char* what = "reduce_scatter_sum";
  check_tensor(in, device_, what);
  check_tensor(out, device_, what);
  MOTLEY_CHECK_KIND(kShape, in.numel() == out.numel() * size_ && in.dtype() == out.dtype(), what,
                    ": in ", in.str(), " must hold ", size_, " blocks of out ", out.str());
  const ncclDataType_t type = nccl_sum_type(in.dtype(), what);
  if (out.numel() == 0) return;
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.run_blocking(what, [&] {
    s.check(ncclReduceScatter(in.raw_data(), out.raw_data(), static_cast<std::size_t>(out.numel()),
                              type, ncclSum, s.comm, s.stream),
            "ncclReduceScatter", what);
  });
}

void NcclCommunicator::allgather(const Tensor& in, Tensor& out) {
  const char* what = "allgather";
  check_tensor(in, device_, what);
  check_tensor(out, device_, what);
  MOTLEY_CHECK_KIND(kShape, out.numel() == in.numel() * size_ && in.dtype() == out.dtype(), what,
                    ": out ", out.str(), " must hold ", size_, " copies of ", in.str());
  if (in.numel() == 0) return;
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.run_blocking(what, [&] {
    s.check(ncclAllGather(in.raw_data(), out.raw_data(), in.nbytes(), ncclUint8, s.comm, s.stream),
            "ncclAllGather", what);
  });
}

void NcclCommunicator::allgatherv(const Tensor& in, Tensor& out,
                                  const std::vector<std::int64_t>& counts) {
  const char* what = "allgatherv";
  check_tensor(in, device_, what);
  check_tensor(out, device_, what);
  MOTLEY_CHECK_KIND(kShape,
                    static_cast<int>(counts.size()) == size_ && counts[rank_] == in.numel() &&
                        in.dtype() == out.dtype(),
                    what, ": counts do not match this rank's tensor ", in.str());
  const auto unit = static_cast<std::int64_t>(dtype_size(in.dtype()));
  std::vector<std::int64_t> bytes(counts);
  std::int64_t total = 0;
  for (std::int64_t& c : bytes) {
    MOTLEY_CHECK_KIND(kShape, c >= 0, what, ": negative count ", c);
    total += c;
    c *= unit;
  }
  MOTLEY_CHECK_KIND(kShape, total == out.numel(), what, ": out ", out.str(),
                    " does not hold the sum of counts, ", total);
  if (total == 0) return;
  const std::vector<std::int64_t> at = offsets(bytes);
  DeviceScope scope(device_);
  Impl& s = *impl_;
  char* base = static_cast<char*>(out.raw_data());
  s.run_blocking(what, [&] {
    s.grouped(what, [&](GroupCalls& calls) {
      for (int r = 0; r < size_; ++r) {
        if (bytes[r] == 0) continue;  // every rank skips the same roots
        // sendbuff is read on the root only.
        const void* send = r == rank_ ? in.raw_data() : base + at[r];
        calls(ncclBroadcast(send, base + at[r], static_cast<std::size_t>(bytes[r]), ncclUint8, r,
                            s.comm, s.stream),
              "ncclBroadcast");
      }
    });
  });
}

void NcclCommunicator::alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts,
                                 Tensor& out, const std::vector<std::int64_t>& recv_counts) {
  const char* what = "alltoallv";
  check_tensor(in, device_, what);
  check_tensor(out, device_, what);
  MOTLEY_CHECK_KIND(kShape, in.dtype() == out.dtype(), what, ": dtypes differ, ", in.str(), " and ",
                    out.str());
  MOTLEY_CHECK_KIND(kShape,
                    static_cast<int>(send_counts.size()) == size_ &&
                        static_cast<int>(recv_counts.size()) == size_,
                    what, ": need ", size_, " counts per direction");
  const auto unit = static_cast<std::int64_t>(dtype_size(in.dtype()));
  std::vector<std::int64_t> sb(send_counts), rb(recv_counts);
  std::int64_t s_total = 0, r_total = 0;
  for (auto& c : sb) {
    s_total += c;
    c *= unit;
  }
  for (auto& c : rb) {
    r_total += c;
    c *= unit;
  }
  MOTLEY_CHECK_KIND(kShape, s_total == in.numel() && r_total == out.numel(), what,
                    ": counts sum to ", s_total, " / ", r_total, " for ", in.str(), " / ",
                    out.str());
  alltoallv_bytes(in.raw_data(), sb, out.raw_data(), rb);
}

void NcclCommunicator::alltoallv_bytes(const void* in, const std::vector<std::int64_t>& send_counts,
                                       void* out, const std::vector<std::int64_t>& recv_counts) {
  const char* what = "alltoallv";
  MOTLEY_CHECK_KIND(kShape,
                    static_cast<int>(send_counts.size()) == size_ &&
                        static_cast<int>(recv_counts.size()) == size_,
                    what, ": need ", size_, " counts per direction");
  std::int64_t s_total = 0, r_total = 0;
  for (std::int64_t c : send_counts) {
    MOTLEY_CHECK_KIND(kShape, c >= 0, what, ": negative count ", c);
    s_total += c;
  }
  for (std::int64_t c : recv_counts) {
    MOTLEY_CHECK_KIND(kShape, c >= 0, what, ": negative count ", c);
    r_total += c;
  }
  if (s_total == 0 && r_total == 0) return;
  DeviceScope scope(device_);
  // The pointers must be memory of this device (NCCL would fault, or read
  // host memory through a device address, otherwise).
  auto check_pointer = [&](const void* p, std::int64_t bytes, const char* which) {
    if (bytes == 0) return;
    cudaPointerAttributes attr;
    std::memset(&attr, 0, sizeof(attr));
    const cudaError_t err =
        p == nullptr ? cudaErrorInvalidValue : cudaPointerGetAttributes(&attr, p);
    if (err != cudaSuccess) (void)cudaGetLastError();
    MOTLEY_CHECK_KIND(
        kShape,
        err == cudaSuccess &&
            (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) &&
            attr.device == device_,
        what, ": the ", which, " buffer is not memory of cuda:", device_);
  };
  check_pointer(in, s_total, "send");
  check_pointer(out, r_total, "receive");
  const std::vector<std::int64_t> sd = offsets(send_counts), rd = offsets(recv_counts);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  Impl& s = *impl_;
  s.run_blocking(what, [&] {
    s.grouped(what, [&](GroupCalls& calls) {
      for (int peer = 0; peer < size_; ++peer) {
        if (send_counts[peer] > 0) {
          calls(ncclSend(src + sd[peer], static_cast<std::size_t>(send_counts[peer]), ncclUint8,
                         peer, s.comm, s.stream),
                "ncclSend");
        }
        if (recv_counts[peer] > 0) {
          calls(ncclRecv(dst + rd[peer], static_cast<std::size_t>(recv_counts[peer]), ncclUint8,
                         peer, s.comm, s.stream),
                "ncclRecv");
        }
      }
    });
  });
}

void NcclCommunicator::broadcast(Tensor& t, int root) {
  const char* what = "broadcast";
  check_tensor(t, device_, what);
  MOTLEY_CHECK_KIND(kShape, root >= 0 && root < size_, what, ": root ", root,
                    " is not in a communicator of size ", size_);
  if (t.numel() == 0) return;
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.run_blocking(what, [&] {
    s.check(
        ncclBroadcast(t.raw_data(), t.raw_data(), t.nbytes(), ncclUint8, root, s.comm, s.stream),
        "ncclBroadcast", what);
  });
}

void NcclCommunicator::barrier() {
  const char* what = "barrier";
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.run_blocking(what, [&] {
    s.check(ncclAllReduce(s.barrier_buffer.raw_data(), s.barrier_buffer.raw_data(), 1, ncclFloat32,
                          ncclSum, s.comm, s.stream),
            "ncclAllReduce", what);
  });
}

// ---- point to point (Note [NCCL point-to-point]) -------------------------------------------

void NcclCommunicator::send(const Tensor& t, int dest, int tag) {
  const char* what = "send";
  check_tensor(t, device_, what);
  check_peer(dest, rank_, size_, tag, /*blocking=*/true, what);
  if (t.nbytes() == 0) return;
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.check_alive(what);
  auto op = std::make_shared<Operation>();
  op->what = what;
  op->tensor = t;
  op->is_send = true;
  op->peer = dest;
  s.queued.push_back(op);
  s.launch_queued(what);  // with whatever isend/irecv came before
  s.wait(op->done.get(), what);
}

void NcclCommunicator::recv(Tensor& t, int src, int tag) {
  const char* what = "recv";
  check_tensor(t, device_, what);
  check_peer(src, rank_, size_, tag, /*blocking=*/true, what);
  if (t.nbytes() == 0) return;
  DeviceScope scope(device_);
  Impl& s = *impl_;
  s.check_alive(what);
  auto op = std::make_shared<Operation>();
  op->what = what;
  op->tensor = t;
  op->peer = src;
  s.queued.push_back(op);
  s.launch_queued(what);
  s.wait(op->done.get(), what);
}

Request NcclCommunicator::isend(Tensor t, int dest, int tag) {
  const char* what = "isend";
  check_tensor(t, device_, what);
  check_peer(dest, rank_, size_, tag, /*blocking=*/false, what);
  if (t.nbytes() == 0) return std::make_unique<DoneRequest>();
  impl_->check_alive(what);
  auto op = std::make_shared<Operation>();
  op->what = what;
  op->tensor = std::move(t);
  op->is_send = true;
  op->peer = dest;
  impl_->queued.push_back(op);
  return std::make_unique<NcclRequest>(impl_, std::move(op));
}

Request NcclCommunicator::irecv(Tensor t, int src, int tag) {
  const char* what = "irecv";
  check_tensor(t, device_, what);
  check_peer(src, rank_, size_, tag, /*blocking=*/false, what);
  if (t.nbytes() == 0) return std::make_unique<DoneRequest>();
  impl_->check_alive(what);
  auto op = std::make_shared<Operation>();
  op->what = what;
  op->tensor = std::move(t);
  op->peer = src;
  impl_->queued.push_back(op);
  return std::make_unique<NcclRequest>(impl_, std::move(op));
}

}  // namespace motley::parallel
