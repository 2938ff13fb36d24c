// NcclCommunicator under mpiexec (labels gpu and mpi): -np 1 needs one
// CUDA device, -np 2 one device per rank. Every collective runs on the
// same data through MpiCommunicator (host copies) and NcclCommunicator
// (device copies) and the results must be equal. The data are small
// integers, exact in every dtype and in any summation order, so equality
// is exact. Without enough devices every test skips with the reason and
// the binary exits 77 (CTest: skipped).
#include "parallel/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "parallel/launcher.h"
#include "tests/cuda/cuda_test_util.h"

namespace motley::parallel {
namespace {

using cuda_test::expect_error;

constexpr int kSkipExitCode = 77;

struct Env {
  std::shared_ptr<Communicator> world;  // MPI_COMM_WORLD
  int device = -1;
  std::string skip;                        // non-empty: why every test skips
  std::unique_ptr<NcclCommunicator> nccl;  // over the world, shared by the tests
};
Env& env() {
  static Env e;
  return e;
}

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!env().skip.empty()) GTEST_SKIP() << env().skip;
  }
  Communicator& mpi() { return *env().world; }
  NcclCommunicator& nccl() { return *env().nccl; }
  Device gpu() const { return Device::cuda(env().device); }
  int rank() const { return env().world->rank(); }
  int size() const { return env().world->size(); }
};

// n small integers in [-8, 8], different per rank and salt, on the host.
Tensor pattern(std::int64_t n, int rank, int salt, DType dtype) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    v[i] = static_cast<double>((rank * 7 + salt * 13 + i * 3) % 17) - 8;
  return Tensor::from_vector(v, {n}).to(dtype);
}

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

// ---- collectives against MPI ---------------------------------------------------------------

TEST_F(Nccl, AllreduceSumMatchesMpiInEveryDtype) {
  for (DType dtype : {DType::kF32, DType::kF64, DType::kBF16, DType::kI64}) {
    const Tensor x = pattern(1000, rank(), 1, dtype);
    // MPI has no bf16 sum: the reference sums the same (exact) values in f32.
    Tensor ref = x.to(dtype == DType::kBF16 ? DType::kF32 : dtype).clone();
    mpi().allreduce_sum(ref);
    Tensor g = x.to(gpu());
    nccl().allreduce_sum(g);
    EXPECT_EQ(g.dtype(), dtype);
    EXPECT_EQ(values(g), values(ref)) << dtype_name(dtype);
  }
}

// The allreduce must read what the backend's stream wrote just before it
// (Note [NCCL streams]): the copy below is still in flight on the backend
// stream when the collective is issued.
TEST_F(Nccl, CollectivesRunAfterTheBackendStream) {
  const std::int64_t n = std::int64_t{1} << 22;
  const Tensor x = pattern(n, rank(), 2, DType::kF32);
  Tensor ref = x.clone();
  mpi().allreduce_sum(ref);
  const Tensor staged = x.to(gpu());
  Tensor g = Tensor::empty({n}, DType::kF32, gpu());
  g.copy_(staged);  // asynchronous on the backend stream
  nccl().allreduce_sum(g);
  EXPECT_EQ(values(g), values(ref));
}

TEST_F(Nccl, IallreduceCompletesOnWaitAndOnDestruction) {
  const Tensor x = pattern(4096, rank(), 3, DType::kF32);
  Tensor ref = x.clone();
  mpi().allreduce_sum(ref);
  Tensor a = x.to(gpu()), b = x.to(gpu());
  Request ra = nccl().iallreduce_sum(a);
  { Request rb = nccl().iallreduce_sum(b); }  // destroyed unwaited: waits
  ra->wait();
  ra->wait();  // a second wait is a no-op
  EXPECT_EQ(values(a), values(ref));
  EXPECT_EQ(values(b), values(ref));
}

TEST_F(Nccl, ReduceScatterMatchesMpi) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    const Tensor in = pattern(5 * size(), rank(), 4, dtype);
    const DType ref_dtype = dtype == DType::kBF16 ? DType::kF32 : dtype;
    Tensor ref = Tensor::empty({5}, ref_dtype);
    mpi().reduce_scatter_sum(in.to(ref_dtype).clone(), ref);
    Tensor out = Tensor::empty({5}, dtype, gpu());
    nccl().reduce_scatter_sum(in.to(gpu()), out);
    EXPECT_EQ(values(out), values(ref)) << dtype_name(dtype);
  }
}

TEST_F(Nccl, AllgatherAndAllgathervMatchMpi) {
  const int n = size(), me = rank();
  const Tensor in = pattern(3, me, 5, DType::kF32);
  Tensor ref = Tensor::empty({3 * n});
  mpi().allgather(in, ref);
  Tensor out = Tensor::empty({3 * n}, DType::kF32, gpu());
  nccl().allgather(in.to(gpu()), out);
  EXPECT_EQ(values(out), values(ref));

  // Rank r contributes r values (rank 0 none), then 2r + 1.
  for (int extra : {0, 1}) {
    std::vector<std::int64_t> counts(n);
    std::int64_t total = 0;
    for (int r = 0; r < n; ++r) total += counts[r] = extra ? 2 * r + 1 : r;
    const Tensor mine = pattern(counts[me], me, 6 + extra, DType::kI64);
    Tensor vref = Tensor::empty({total}, DType::kI64);
    mpi().allgatherv(mine, vref, counts);
    Tensor vout = Tensor::empty({total}, DType::kI64, gpu());
    nccl().allgatherv(mine.to(gpu()), vout, counts);
    EXPECT_EQ(values(vout), values(vref)) << "extra " << extra;
  }
}

// Rank a sends (a + 2b) % 3 values to rank b: zero counts in both
// directions, and to itself.
TEST_F(Nccl, AlltoallvWithZeroCountsMatchesMpi) {
  const int n = size(), me = rank();
  std::vector<std::int64_t> sc(n), rc(n);
  std::int64_t s_total = 0, r_total = 0;
  for (int j = 0; j < n; ++j) {
    s_total += sc[j] = (me + 2 * j) % 3;
    r_total += rc[j] = (j + 2 * me) % 3;
  }
  const Tensor in = pattern(s_total, me, 7, DType::kF32);
  Tensor ref = Tensor::empty({r_total});
  mpi().alltoallv(in, sc, ref, rc);
  Tensor out = Tensor::empty({r_total}, DType::kF32, gpu());
  nccl().alltoallv(in.to(gpu()), sc, out, rc);
  EXPECT_EQ(values(out), values(ref));

  // The byte form on i32 buffers.
  std::vector<std::int64_t> sb(sc), rb(rc);
  for (auto& c : sb) c *= 4;
  for (auto& c : rb) c *= 4;
  const Tensor in32 = pattern(s_total, me, 8, DType::kI32);
  Tensor ref32 = Tensor::empty({r_total}, DType::kI32);
  mpi().alltoallv_bytes(in32.raw_data(), sb, ref32.raw_data(), rb);
  const Tensor in32_gpu = in32.to(gpu());
  Tensor out32 = Tensor::empty({r_total}, DType::kI32, gpu());
  nccl().alltoallv_bytes(in32_gpu.raw_data(), sb, out32.raw_data(), rb);
  EXPECT_EQ(values(out32), values(ref32));

  // Nothing to move anywhere: returns.
  const std::vector<std::int64_t> zeros(n, 0);
  Tensor none = Tensor::empty({0}, DType::kF32, gpu());
  nccl().alltoallv(none, zeros, none, zeros);

  // Host memory through the byte form is refused before any NCCL call.
  if (s_total > 0) {
    const std::string msg = expect_error(ErrorKind::kShape, [&] {
      nccl().alltoallv_bytes(in32.raw_data(), sb, out32.raw_data(), rb);
    });
    EXPECT_NE(msg.find("not memory of cuda:"), std::string::npos) << msg;
  }
}

TEST_F(Nccl, BroadcastFromTheLastRankMatchesMpi) {
  const int root = size() - 1;
  Tensor ref = pattern(7, rank(), 9, DType::kI64);
  Tensor g = ref.to(gpu());
  mpi().broadcast(ref, root);
  nccl().broadcast(g, root);
  EXPECT_EQ(values(g), values(ref));
  nccl().barrier();
}

// Every rank sends two messages to the next rank before it receives from
// the previous one: a deadlock in NCCL unless the sends and receives are
// fused in one group (Note [NCCL point-to-point]). Messages between a
// pair arrive in issue order.
TEST_F(Nccl, PointToPointRingMatchesMpi) {
  const int n = size(), me = rank(), next = (me + 1) % n, prev = (me + n - 1) % n;
  const Tensor a = pattern(6, me, 10, DType::kF32), b = pattern(9, me, 11, DType::kF32);
  Tensor ra_ref = Tensor::empty({6}), rb_ref = Tensor::empty({9});
  {
    std::vector<Request> mpi_requests;
    mpi_requests.push_back(mpi().isend(a, next, 1));
    mpi_requests.push_back(mpi().isend(b, next, 2));
    mpi_requests.push_back(mpi().irecv(ra_ref, prev, 1));
    mpi_requests.push_back(mpi().irecv(rb_ref, prev, 2));
    wait_all(mpi_requests);
  }
  Tensor ra = Tensor::empty({6}, DType::kF32, gpu()), rb = Tensor::empty({9}, DType::kF32, gpu());
  std::vector<Request> requests;
  requests.push_back(nccl().isend(a.to(gpu()), next, 1));
  requests.push_back(nccl().isend(b.to(gpu()), next, 2));
  requests.push_back(nccl().irecv(ra, prev, 1));
  requests.push_back(nccl().irecv(rb, prev, 2));
  wait_all(requests);
  EXPECT_EQ(values(ra), values(ra_ref));
  EXPECT_EQ(values(rb), values(rb_ref));

  if (n >= 2) {
    // Blocking: rank 0 to the last rank.
    const Tensor msg = pattern(4, 0, 12, DType::kBF16);
    if (me == 0) nccl().send(msg.to(gpu()), n - 1, 5);
    if (me == n - 1) {
      Tensor got = Tensor::empty({4}, DType::kBF16, gpu());
      nccl().recv(got, 0, 5);
      EXPECT_EQ(values(got), values(msg));
    }
  }
  // A blocking send to itself can never complete, and tags are >= 0.
  expect_error(ErrorKind::kShape, [&] { nccl().send(a.to(gpu()), me, 0); });
  expect_error(ErrorKind::kShape, [&] { (void)nccl().isend(a.to(gpu()), next, -1); });
}

// Same color and key as the MPI split: the same groups, ranks and sums.
TEST_F(Nccl, SplitMatchesMpiSplit) {
  const int color = rank() % 2, key = -rank();
  std::unique_ptr<Communicator> ms = mpi().split(color, key);
  std::unique_ptr<Communicator> ns = nccl().split(color, key);
  EXPECT_EQ(ns->rank(), ms->rank());
  EXPECT_EQ(ns->size(), ms->size());
  Tensor ref = Tensor::full({3}, rank() + 1.0, DType::kF64);
  Tensor g = ref.to(gpu());
  ms->allreduce_sum(ref);
  ns->allreduce_sum(g);
  EXPECT_EQ(values(g), values(ref));
  ns->barrier();
  expect_error(ErrorKind::kShape, [&] { (void)nccl().split(-1, 0); });
}

// Argument errors are kShape, name the call, and touch no NCCL state (every
// rank fails the same way on its own).
TEST_F(Nccl, RejectsHostStridedAndUnsupportedTensors) {
  Tensor host = Tensor::zeros({4});
  std::string msg = expect_error(ErrorKind::kShape, [&] { nccl().allreduce_sum(host); });
  EXPECT_NE(msg.find("allreduce_sum"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cuda:"), std::string::npos) << msg;

  const Tensor strided = Tensor::zeros({2, 3}, DType::kF32, gpu()).transpose(0, 1);
  Tensor out = Tensor::empty({6 * size()}, DType::kF32, gpu());
  msg = expect_error(ErrorKind::kShape, [&] { nccl().allgather(strided, out); });
  EXPECT_NE(msg.find("contiguous"), std::string::npos) << msg;

  Tensor ints = Tensor::zeros({4}, DType::kI32, gpu());
  msg = expect_error(ErrorKind::kShape, [&] { nccl().allreduce_sum(ints); });
  EXPECT_NE(msg.find("i32"), std::string::npos) << msg;

  msg = expect_error(ErrorKind::kShape, [&] { nccl().broadcast(ints, size()); });
  EXPECT_NE(msg.find("root"), std::string::npos) << msg;
}

// ---- timeouts (Note [NCCL timeouts]); last, since they abort communicators --------------------

using NcclTimeout = Nccl;

void CUDART_CB spin_until_released(void* flag) {
  const auto* released = static_cast<const std::atomic<bool>*>(flag);
  while (!released->load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The backend stream is held by a host function for 3 s, so the allreduce
// (ordered after it) cannot finish within its 2 s timeout on any rank. The
// NCCL kernel is queued behind the stall and runs, and sees the abort,
// once it is released.
TEST_F(NcclTimeout, StalledOperationAbortsWithinTheTimeout) {
  NcclOptions options;
  options.timeout_s = 2;
  std::unique_ptr<NcclCommunicator> c = NcclCommunicator::create(mpi(), env().device, options);
  Tensor t = Tensor::ones({16}, DType::kF32, gpu());
  backend_for(gpu()).synchronize();

  std::atomic<bool> released{false};
  auto stream = static_cast<cudaStream_t>(cuda_backend_stream(env().device));
  ASSERT_EQ(cudaLaunchHostFunc(stream, spin_until_released, &released), cudaSuccess);
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::seconds(3));
    released.store(true);
  });
  const auto start = std::chrono::steady_clock::now();
  const std::string msg = expect_error(ErrorKind::kRuntime, [&] { c->allreduce_sum(t); });
  const double took = seconds_since(start);
  releaser.join();
  EXPECT_GE(took, 1.9) << msg;
  EXPECT_LT(took, 5.0) << msg;
  EXPECT_NE(msg.find("allreduce_sum"), std::string::npos) << msg;
  EXPECT_NE(msg.find(absl::StrCat("rank ", rank(), " of ", size())), std::string::npos) << msg;
  EXPECT_NE(msg.find("timeout"), std::string::npos) << msg;

  // Aborted for good: later calls fail at once.
  const auto again = std::chrono::steady_clock::now();
  const std::string later = expect_error(ErrorKind::kRuntime, [&] { c->barrier(); });
  EXPECT_LT(seconds_since(again), 0.5);
  EXPECT_NE(later.find("aborted"), std::string::npos) << later;
  backend_for(gpu()).synchronize();  // the backend stream drains
  c.reset();
  mpi().barrier();
}

// Every rank waits for a message from the next rank, which never sends.
TEST_F(NcclTimeout, ReceiveWithoutASenderAbortsWithinTheTimeout) {
  if (size() < 2) GTEST_SKIP() << "needs 2 ranks (run under mpiexec -np 2 with 2 GPUs)";
  NcclOptions options;
  options.timeout_s = 2;
  std::unique_ptr<NcclCommunicator> c = NcclCommunicator::create(mpi(), env().device, options);
  Tensor t = Tensor::zeros({256}, DType::kF32, gpu());
  const auto start = std::chrono::steady_clock::now();
  const std::string msg =
      expect_error(ErrorKind::kRuntime, [&] { c->recv(t, (rank() + 1) % size(), 0); });
  const double took = seconds_since(start);
  EXPECT_GE(took, 1.9) << msg;
  EXPECT_LT(took, 5.0) << msg;
  EXPECT_NE(msg.find("recv"), std::string::npos) << msg;
  EXPECT_NE(msg.find(absl::StrCat("rank ", rank())), std::string::npos) << msg;
  c.reset();
  mpi().barrier();
}

}  // namespace
}  // namespace motley::parallel

int main(int argc, char** argv) {
  using namespace motley;
  using namespace motley::parallel;
  ::testing::InitGoogleTest(&argc, argv);
  MpiJob job;
  try {
    job = start_mpi_job();
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  Env& e = env();
  e.world = job.world;
  const int rank = e.world->rank();
  // The launcher's device (local rank % CUDA_VISIBLE_DEVICES entries); it
  // has none when CUDA_VISIBLE_DEVICES is unset, and then the same rule
  // runs over the devices the runtime sees.
  const int devices = cuda_device_count();
  e.device = job.info.device >= 0 ? job.info.device
                                  : (devices > 0 ? job.info.mpi.local_rank % devices : -1);
  if (devices == 0) {
    e.skip =
        "no CUDA device (cuda_device_count() == 0): the NCCL communicator cannot run here "
        "(the tests compile and skip)";
  } else if (job.info.mpi.local_size > devices) {
    e.skip = absl::StrCat(job.info.mpi.local_size, " ranks on this node but ", devices,
                          " CUDA device(s): NCCL needs one device per rank");
  }
  // One verdict for all ranks, so that none enters a collective alone.
  Tensor votes = Tensor::full({1}, e.skip.empty() ? 0.0 : 1.0, DType::kF64);
  e.world->allreduce_sum(votes);
  if (votes.item() > 0 && e.skip.empty()) e.skip = "another rank has too few CUDA devices";
  int failed = 0;
  if (e.skip.empty()) {
    try {
      e.nccl = NcclCommunicator::create(*e.world, e.device, NcclOptions::from_env());
    } catch (const Error& err) {
      std::fprintf(stderr, "rank %d: %s\n", rank, err.what());
      failed = 1;  // create() fails on every rank together
    }
  }
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  if (failed == 0) failed = RUN_ALL_TESTS();
  e.nccl.reset();  // collective: before MPI_Finalize, on every rank
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  int all_skipped =
      failed == 0 && unit.successful_test_count() == 0 && unit.skipped_test_count() > 0 ? 1 : 0;
  // Any rank failing fails the job; the job is skipped only if every rank skipped.
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &all_skipped, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  e.world.reset();
  job.world.reset();
  mpi_finalize();
  if (failed != 0) return 1;
  if (all_skipped != 0) {
    if (rank == 0) std::printf("nccl_communicator_tests: every test skipped: %s\n", e.skip.c_str());
    return kSkipExitCode;
  }
  return 0;
}
