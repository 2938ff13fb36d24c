// Communicator, ProcessGroups and the expert exchange under mpirun (label
// mpi): run with -np 2 and -np 4 (see CMakeLists.txt). Every rank runs
// every test; a failure on any rank fails the job.
#include <mpi.h>

#include <numeric>

#include <gtest/gtest.h>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "parallel/communicator.h"
#include "parallel/expert_exchange.h"
#include "parallel/mpi_comm_handle.h"
#include "parallel/process_groups.h"

namespace motley::parallel {
namespace {

std::shared_ptr<Communicator> world() {
  static std::shared_ptr<Communicator> w = MpiCommunicator::world();
  return w;
}

TEST(Mpi, AllreduceSumAndNonBlocking) {
  auto w = world();
  Tensor t = Tensor::full({3}, w->rank() + 1.0);
  w->allreduce_sum(t);
  const double expect = w->size() * (w->size() + 1) / 2.0;
  for (float v : t.to_vector<float>()) EXPECT_EQ(v, expect);
  Tensor u = Tensor::full({5}, 1.0, DType::kF64);
  Request r = w->iallreduce_sum(u);
  r->wait();
  for (double v : u.to_vector<double>()) EXPECT_EQ(v, w->size());
}

TEST(Mpi, AlltoallvWithZeroCounts) {
  auto w = world();
  const int n = w->size(), me = w->rank();
  // Rank r sends r rows... to rank (r + 1) % n only; nothing to others.
  std::vector<std::int64_t> sc(n, 0), rc(n, 0);
  sc[(me + 1) % n] = me;
  rc[(me + n - 1) % n] = (me + n - 1) % n;
  Tensor in = Tensor::full({me}, me);
  Tensor out = Tensor::empty({rc[(me + n - 1) % n]});
  w->alltoallv(in, sc, out, rc);
  for (float v : out.to_vector<float>()) EXPECT_EQ(v, (me + n - 1) % n);
}

TEST(Mpi, SendRecvBlockingAndNonBlocking) {
  auto w = world();
  const int n = w->size(), me = w->rank();
  Tensor out = Tensor::full({4}, me);
  Request s = w->isend(out, (me + 1) % n, 7);
  Tensor in = Tensor::empty({4});
  Request r = w->irecv(in, (me + n - 1) % n, 7);
  r->wait();
  s->wait();
  for (float v : in.to_vector<float>()) EXPECT_EQ(v, (me + n - 1) % n);
  if (me == 0) w->send(Tensor::full({2}, 42), n - 1, 8);
  if (me == n - 1) {
    Tensor got = Tensor::empty({2});
    w->recv(got, 0, 8);
    EXPECT_EQ(got.to_vector<float>()[0], 42);
  }
}

TEST(Mpi, GatherScatterBroadcast) {
  auto w = world();
  const int n = w->size(), me = w->rank();
  Tensor all = Tensor::empty({n});
  w->allgather(Tensor::full({1}, me), all);
  for (int r = 0; r < n; ++r) EXPECT_EQ(all.to_vector<float>()[r], r);
  std::vector<std::int64_t> counts(n);
  std::iota(counts.begin(), counts.end(), 0);  // rank r contributes r values
  Tensor var = Tensor::empty({n * (n - 1) / 2});
  w->allgatherv(Tensor::full({me}, me), var, counts);
  EXPECT_EQ(var.numel(), n * (n - 1) / 2);
  Tensor rs = Tensor::empty({2});
  w->reduce_scatter_sum(Tensor::ones({2 * n}), rs);
  EXPECT_EQ(rs.to_vector<float>()[1], n);
  Tensor b = Tensor::full({1}, me == 0 ? 9 : 0);
  w->broadcast(b, 0);
  EXPECT_EQ(b.item(), 9);
  w->barrier();
}

TEST(Mpi, ErrorsAreRuntimeErrorsNamingTheCall) {
  auto w = world();
  Tensor t = Tensor::zeros({1});
  try {
    w->send(t, w->size() + 5, 0);  // no such rank
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    EXPECT_NE(std::string(e.what()).find("MPI_Send"), std::string::npos) << e.what();
  }
}

// mpi_comm_handle(): the MPI communicator with exactly the same ranks in
// the same order, for world and for a split; none for LocalCommunicator.
TEST(Mpi, NativeHandleIsTheCommunicatorsOwn) {
  auto w = world();
  const MpiCommHandle* handle = w->mpi_comm_handle();
  ASSERT_TRUE(handle != nullptr);
  int same = MPI_UNEQUAL;
  ASSERT_EQ(MPI_Comm_compare(handle->comm, MPI_COMM_WORLD, &same), MPI_SUCCESS);
  EXPECT_EQ(same, MPI_IDENT);
  // Reversed halves: the split's rank order differs from the world's.
  const std::unique_ptr<Communicator> half = w->split(w->rank() % 2, -w->rank());
  const MpiCommHandle* half_handle = half->mpi_comm_handle();
  ASSERT_TRUE(half_handle != nullptr);
  int rank = -1, size = -1;
  ASSERT_EQ(MPI_Comm_rank(half_handle->comm, &rank), MPI_SUCCESS);
  ASSERT_EQ(MPI_Comm_size(half_handle->comm, &size), MPI_SUCCESS);
  EXPECT_EQ(rank, half->rank());
  EXPECT_EQ(size, half->size());
  EXPECT_EQ(size, (w->size() + 1 - w->rank() % 2) / 2);
  LocalCommunicator local;
  EXPECT_TRUE(local.mpi_comm_handle() == nullptr);
}

TEST(Mpi, ProcessGroupsMatchTheLayout) {
  auto w = world();
  const int n = w->size();
  const GroupLayout layout = n == 4 ? GroupLayout{2, 2, 2} : GroupLayout{n, n, 1};
  ProcessGroups g(w, layout);
  EXPECT_EQ(g.dp().size(), layout.dp);
  EXPECT_EQ(g.ep().size(), layout.ep);
  EXPECT_EQ(g.pp().size(), layout.pp);
  EXPECT_EQ(g.expert_dp().size(), layout.dp / layout.ep);
  // Sum of world ranks over each group equals the layout's prediction.
  auto check = [&](Communicator& c, const std::vector<int>& members) {
    Tensor t = Tensor::full({1}, w->rank(), DType::kF64);
    c.allreduce_sum(t);
    EXPECT_EQ(t.item(), std::accumulate(members.begin(), members.end(), 0));
  };
  check(g.dp(), layout.dp_group(w->rank()));
  check(g.ep(), layout.ep_group(w->rank()));
  check(g.expert_dp(), layout.expert_dp_group(w->rank()));
  check(g.pp(), layout.pp_group(w->rank()));
}

// The differentiable exchange: every expert doubles its rows; rank 0
// routes nothing (zero rows sent). The output must be 2x the input and
// the gradient of sum(out * c) must be 2c, on every rank.
TEST(Mpi, ExpertExchangeForwardAndBackwardWithZeroRows) {
  auto w = world();
  const int n = w->size(), me = w->rank();
  std::vector<int> owner;
  for (int e = 0; e < 2 * n; ++e) owner.push_back((e + 1) % n);  // not contiguous
  CommExpertExchange exchange(*w, owner);
  std::vector<std::int64_t> counts(2 * n, 0);
  if (me != 0) {
    for (int e = 0; e < 2 * n; ++e) counts[e] = (e + me) % 3;
  }
  const std::int64_t rows = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
  std::vector<float> xs(rows * 3);
  for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = static_cast<float>(me * 100 + i);
  autograd::Variable x(Tensor::from_vector(xs, {rows, 3}), true);
  int calls = 0;
  autograd::Variable y = exchange.run(
      x, counts, [&](const autograd::Variable& v, const std::vector<std::int64_t>& local) {
        std::int64_t total = 0;
        for (std::size_t e = 0; e < local.size(); ++e) {
          if (local[e] > 0) {
            EXPECT_EQ(owner[e], me) << "expert " << e;
          }
          total += local[e];
        }
        EXPECT_EQ(total, v.size(0));
        ++calls;
        return autograd::scale(v, 2.0);
      });
  ASSERT_EQ(y.size(0), rows);
  const std::vector<float> ys = y.data().to_vector<float>();
  for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(ys[i], 2 * xs[i]);
  Tensor c = Tensor::full({rows, 3}, 0.5);
  autograd::backward({y}, {c});
  if (rows > 0) {
    for (float g : x.grad().to_vector<float>()) EXPECT_EQ(g, 1.0f);
  }
  // Bytes: a row routed to an expert on another rank crosses the network
  // four times (dispatch and return in forward, both again in backward),
  // each time d f32 values, counted by the rank that sends it.
  Tensor sent = Tensor::from_vector<std::int64_t>({exchange.bytes_sent()}, {1});
  w->allreduce_sum(sent);
  std::int64_t off_rank_rows = 0;
  for (int r = 1; r < n; ++r) {  // rank 0 routes nothing
    for (int e = 0; e < 2 * n; ++e) {
      if (owner[e] != r) off_rank_rows += (e + r) % 3;
    }
  }
  EXPECT_EQ(sent.to_vector<std::int64_t>()[0], 4 * off_rank_rows * 3 * 4);
}

}  // namespace
}  // namespace motley::parallel

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  motley::parallel::mpi_initialize(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS();
  // Any rank failing fails the job.
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  motley::parallel::mpi_finalize();
  return failed;
}
