// ThreadCommunicator (label unit): every Communicator call with 1 to 4
// ranks as threads, against values computed here independently; split and
// ProcessGroups; and the failure paths (a throwing rank, a deadlock, a
// timeout, bad arguments), which must end in errors, never in a hang.
#include "parallel/thread_communicator.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>

#include "parallel/process_groups.h"

namespace motley::parallel {
namespace {

constexpr int kSizes[] = {1, 2, 3, 4};

// Value i of rank r: pseudo-random, with both signs and magnitudes from
// 1e-4 to 1e4, so that adding in another order than rank order changes
// the rounded result (checked below).
double value(int r, std::int64_t i) {
  std::uint64_t x = static_cast<std::uint64_t>(r) * 0x9E3779B97F4A7C15ull +
                    static_cast<std::uint64_t>(i) * 0xBF58476D1CE4E5B9ull + 1;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  const double mantissa = 1.0 + static_cast<double>(x & 0xFFFFF) / 0x100000;  // [1, 2)
  const double exponent = static_cast<double>((x >> 20) % 9) - 4;             // -4 .. 4
  const double sign = (x >> 40) & 1 ? -1.0 : 1.0;
  return sign * mantissa * std::pow(10.0, exponent);
}

template <typename T>
std::vector<T> rank_values(int r, std::int64_t n) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, std::int64_t>) {
      // Large values, so that i64 is not summed through a double.
      v[i] = (std::int64_t{1} << 55) + static_cast<std::int64_t>(value(r, i) * 1000) * (r + 1);
    } else {
      v[i] = static_cast<T>(value(r, i));
    }
  }
  return v;
}

// The sum in rank order, element by element, in T.
template <typename T>
std::vector<T> rank_ordered_sum(int size, std::int64_t n) {
  std::vector<T> acc = rank_values<T>(0, n);
  for (int r = 1; r < size; ++r) {
    const std::vector<T> v = rank_values<T>(r, n);
    for (std::int64_t i = 0; i < n; ++i) acc[i] += v[i];
  }
  return acc;
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Runs `body` and returns the motley::Error it throws (fails the test if
// it throws nothing or something else).
template <typename Body>
Error expect_error(Body body) {
  try {
    body();
  } catch (const Error& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected motley::Error, got " << e.what();
    return Error(ErrorKind::kInternal, "wrong exception");
  }
  ADD_FAILURE() << "expected an error";
  return Error(ErrorKind::kInternal, "no exception");
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

template <typename T>
void check_allreduce(int size) {
  constexpr std::int64_t n = 37;
  std::vector<std::vector<T>> results(static_cast<std::size_t>(size));
  run_ranks(size, [&](std::shared_ptr<Communicator> w) {
    Tensor t = Tensor::from_vector(rank_values<T>(w->rank(), n), {n});
    w->allreduce_sum(t);
    results[w->rank()] = t.to_vector<T>();
  });
  const std::vector<T> expect = rank_ordered_sum<T>(size, n);
  for (int r = 0; r < size; ++r) {
    EXPECT_TRUE(bitwise_equal(results[r], expect)) << "rank " << r << " of " << size;
  }
}

TEST(ThreadCommunicator, AllreduceSumIsTheRankOrderedSumBitwiseOnEveryRank) {
  for (int size : kSizes) {
    check_allreduce<float>(size);
    check_allreduce<double>(size);
    check_allreduce<std::int64_t>(size);
  }
  // The test data can tell the orders apart: summing 4 ranks' f32 values in
  // reverse order gives another result.
  std::vector<float> reverse = rank_values<float>(3, 37);
  for (int r = 2; r >= 0; --r) {
    const std::vector<float> v = rank_values<float>(r, 37);
    for (std::size_t i = 0; i < v.size(); ++i) reverse[i] += v[i];
  }
  EXPECT_FALSE(bitwise_equal(reverse, rank_ordered_sum<float>(4, 37)));
}

TEST(ThreadCommunicator, IallreduceSumCompletesAtWaitWithTheSameSum) {
  for (int size : kSizes) {
    constexpr std::int64_t n = 11;
    std::vector<std::vector<double>> results(static_cast<std::size_t>(size));
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      Tensor a = Tensor::from_vector(rank_values<double>(w->rank(), n), {n});
      Tensor b = Tensor::full({3}, w->rank() + 1.0, DType::kF32);
      // Two in flight, waited in the opposite order on odd ranks, with a
      // blocking collective in between.
      Request ra = w->iallreduce_sum(a);
      Request rb = w->iallreduce_sum(b);
      w->barrier();
      if (w->rank() % 2) {
        rb->wait();
        ra->wait();
      } else {
        ra->wait();
        rb->wait();
      }
      ra->wait();  // a second wait is a no-op
      results[w->rank()] = a.to_vector<double>();
      for (float v : b.to_vector<float>()) EXPECT_EQ(v, size * (size + 1) / 2);
    });
    for (int r = 0; r < size; ++r) {
      EXPECT_TRUE(bitwise_equal(results[r], rank_ordered_sum<double>(size, n))) << "rank " << r;
    }
  }
}

TEST(ThreadCommunicator, ReduceScatterSumGivesEachRankItsBlock) {
  for (int size : kSizes) {
    constexpr std::int64_t n = 5;
    const std::vector<float> sum = rank_ordered_sum<float>(size, size * n);
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank();
      Tensor in = Tensor::from_vector(rank_values<float>(me, size * n), {size * n});
      Tensor out = Tensor::empty({n});
      w->reduce_scatter_sum(in, out);
      const std::vector<float> block(sum.begin() + me * n, sum.begin() + (me + 1) * n);
      EXPECT_TRUE(bitwise_equal(out.to_vector<float>(), block)) << "rank " << me;
    });
  }
}

TEST(ThreadCommunicator, AllgatherAndAllgathervWithZeroCounts) {
  for (int size : kSizes) {
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank();
      Tensor all = Tensor::empty({size, 2}, DType::kI64);
      w->allgather(Tensor::from_vector<std::int64_t>({me, 10 * me}, {2}), all);
      const std::vector<std::int64_t> got = all.to_vector<std::int64_t>();
      for (int r = 0; r < size; ++r) {
        EXPECT_EQ(got[2 * r], r);
        EXPECT_EQ(got[2 * r + 1], 10 * r);
      }
      // Rank r contributes r % 3 values (ranks 0 and 3 nothing).
      std::vector<std::int64_t> counts(static_cast<std::size_t>(size));
      for (int r = 0; r < size; ++r) counts[r] = r % 3;
      const std::int64_t total = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
      std::vector<float> mine;
      for (std::int64_t i = 0; i < counts[me]; ++i) mine.push_back(100.0f * me + i);
      Tensor out = Tensor::full({total}, -1.0);
      w->allgatherv(Tensor::from_vector(mine, {counts[me]}), out, counts);
      std::vector<float> expect;
      for (int r = 0; r < size; ++r) {
        for (std::int64_t i = 0; i < counts[r]; ++i) expect.push_back(100.0f * r + i);
      }
      EXPECT_EQ(out.to_vector<float>(), expect) << "rank " << me;
    });
  }
}

// Rank s sends (s + d) % 3 elements to rank d (zero for some pairs), the
// values naming sender, receiver and position.
std::int64_t pair_count(int s, int d) { return (s + d) % 3; }
float pair_value(int s, int d, std::int64_t i) { return 1000.0f * s + 10.0f * d + i; }

TEST(ThreadCommunicator, AlltoallvWithUnevenAndZeroCounts) {
  for (int size : kSizes) {
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank();
      std::vector<std::int64_t> sc(size), rc(size);
      std::vector<float> send, expect;
      for (int d = 0; d < size; ++d) {
        sc[d] = pair_count(me, d);
        for (std::int64_t i = 0; i < sc[d]; ++i) send.push_back(pair_value(me, d, i));
      }
      for (int s = 0; s < size; ++s) {
        rc[s] = pair_count(s, me);
        for (std::int64_t i = 0; i < rc[s]; ++i) expect.push_back(pair_value(s, me, i));
      }
      Tensor in = Tensor::from_vector(send, {static_cast<std::int64_t>(send.size())});
      Tensor out = Tensor::full({static_cast<std::int64_t>(expect.size())}, -1.0);
      w->alltoallv(in, sc, out, rc);
      EXPECT_EQ(out.to_vector<float>(), expect) << "rank " << me << " of " << size;
    });
  }
}

TEST(ThreadCommunicator, AlltoallvBytesIncludingEmptyBuffers) {
  for (int size : kSizes) {
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank();
      // Rank r sends r + 1 bytes, each its rank and the receiver, to every
      // rank; nothing at all from every rank in a second call.
      std::vector<std::int64_t> sc(size, me + 1), rc(size);
      std::string send;
      for (int d = 0; d < size; ++d)
        send.append(static_cast<std::size_t>(me + 1), static_cast<char>('a' + me * 4 + d));
      std::string expect;
      for (int s = 0; s < size; ++s) {
        rc[s] = s + 1;
        expect.append(static_cast<std::size_t>(s + 1), static_cast<char>('a' + s * 4 + me));
      }
      std::string out(expect.size(), '?');
      w->alltoallv_bytes(send.data(), sc, out.data(), rc);
      EXPECT_EQ(out, expect);
      const std::vector<std::int64_t> zeros(size, 0);
      w->alltoallv_bytes(nullptr, zeros, nullptr, zeros);
    });
  }
}

TEST(ThreadCommunicator, BroadcastFromEveryRoot) {
  for (int size : kSizes) {
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      for (int root = 0; root < size; ++root) {
        Tensor t = Tensor::full({2, 3}, w->rank() == root ? 7.0 + root : -1.0, DType::kF64);
        w->broadcast(t, root);
        for (double v : t.to_vector<double>()) EXPECT_EQ(v, 7.0 + root);
      }
    });
  }
}

TEST(ThreadCommunicator, BarrierWaitsForEveryRank) {
  for (int size : kSizes) {
    std::atomic<int> arrived{0};
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      if (w->rank() == size - 1) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      arrived.fetch_add(1);
      w->barrier();
      EXPECT_EQ(arrived.load(), size) << "rank " << w->rank() << " passed the barrier early";
    });
  }
}

TEST(ThreadCommunicator, MessagesOfOneTagArriveInOrderSentTagsIndependent) {
  run_ranks(2, [&](std::shared_ptr<Communicator> w) {
    if (w->rank() == 0) {
      std::vector<Request> sends;
      sends.push_back(w->isend(Tensor::full({2}, 1.0), 1, 5));
      sends.push_back(w->isend(Tensor::full({3}, 2.0), 1, 6));
      sends.push_back(w->isend(Tensor::full({2}, 3.0), 1, 5));
      wait_all(sends);
      w->send(Tensor::full({1}, 4.0), 1, 5);
    } else {
      // Tag 6 first: it must not take a tag-5 message.
      Tensor b = Tensor::empty({3}), a = Tensor::empty({2}), c = Tensor::empty({2});
      w->recv(b, 0, 6);
      // An irecv posted before a recv of the same tag takes the earlier
      // message, even though the recv completes first.
      Request ra = w->irecv(a, 0, 5);
      w->recv(c, 0, 5);
      ra->wait();
      Tensor d = Tensor::empty({1});
      w->recv(d, 0, 5);
      EXPECT_EQ(b.to_vector<float>(), std::vector<float>(3, 2.0f));
      EXPECT_EQ(a.to_vector<float>(), std::vector<float>(2, 1.0f));
      EXPECT_EQ(c.to_vector<float>(), std::vector<float>(2, 3.0f));
      EXPECT_EQ(d.item(), 4.0);
    }
  });
}

TEST(ThreadCommunicator, IsendIrecvRingDoesNotDeadlock) {
  for (int size : kSizes) {
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank(), next = (me + 1) % size, prev = (me + size - 1) % size;
      // Every rank sends before it receives and waits its send first: the
      // receive is posted at irecv, so the send can complete.
      Tensor in = Tensor::empty({4}, DType::kI64);
      Request s = w->isend(Tensor::full({4}, me, DType::kI64), next, 0);
      Request r = w->irecv(in, prev, 0);
      s->wait();
      r->wait();
      EXPECT_EQ(in.to_vector<std::int64_t>(), std::vector<std::int64_t>(4, prev));
      // The isend copied its tensor: changing it after isend is not seen.
      Tensor out = Tensor::full({1}, 10.0 * me);
      Request s2 = w->isend(out, next, 1);
      out.fill_(-1.0);
      Tensor got = Tensor::empty({1});
      w->recv(got, prev, 1);
      s2->wait();
      EXPECT_EQ(got.item(), 10.0 * prev);
    });
  }
}

TEST(ThreadCommunicator, SplitOrdersByKeyThenRank) {
  for (int size : kSizes) {
    run_ranks(size, [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank();
      // Two colors (even and odd ranks); keys reverse the order.
      std::unique_ptr<Communicator> half = w->split(me % 2, -me);
      std::vector<int> members;
      for (int r = size - 1; r >= 0; --r) {
        if (r % 2 == me % 2) members.push_back(r);
      }
      ASSERT_EQ(half->size(), static_cast<int>(members.size()));
      EXPECT_EQ(members[half->rank()], me);
      Tensor all = Tensor::empty({half->size()}, DType::kI64);
      half->allgather(Tensor::full({1}, me, DType::kI64), all);
      const std::vector<std::int64_t> got = all.to_vector<std::int64_t>();
      EXPECT_EQ(std::vector<int>(got.begin(), got.end()), members);
      // Equal keys: the rank here decides. Point to point in the split uses
      // its ranks.
      std::unique_ptr<Communicator> same = w->split(0, 0);
      EXPECT_EQ(same->rank(), me);
      EXPECT_EQ(same->size(), size);
      if (half->size() > 1) {
        const int n = half->size(), hr = half->rank();
        Request s = half->isend(Tensor::full({1}, me), (hr + 1) % n, 3);
        Tensor got1 = Tensor::empty({1});
        half->recv(got1, (hr + n - 1) % n, 3);
        s->wait();
        EXPECT_EQ(got1.item(), members[(hr + n - 1) % n]);
      }
    });
  }
}

// Layouts over 4 and 8 thread ranks (world = dp * pp): every group has the
// size, the members and the member order of GroupLayout.
TEST(ThreadCommunicator, ProcessGroupsMatchTheLayout) {
  for (const GroupLayout& layout : {GroupLayout{2, 2, 2}, GroupLayout{4, 2, 2}}) {
    run_ranks(layout.world(), [&](std::shared_ptr<Communicator> w) {
      const int me = w->rank();
      ProcessGroups g(w, layout);
      auto check = [&](Communicator& c, const std::vector<int>& members, const char* name) {
        ASSERT_EQ(c.size(), static_cast<int>(members.size())) << name;
        EXPECT_EQ(members[c.rank()], me) << name;
        Tensor all = Tensor::empty({c.size()}, DType::kI64);
        c.allgather(Tensor::full({1}, me, DType::kI64), all);
        const std::vector<std::int64_t> got = all.to_vector<std::int64_t>();
        EXPECT_EQ(std::vector<int>(got.begin(), got.end()), members) << name << ", rank " << me;
      };
      std::vector<int> everyone(static_cast<std::size_t>(layout.world()));
      std::iota(everyone.begin(), everyone.end(), 0);
      check(g.world(), everyone, "world");
      check(g.dp(), layout.dp_group(me), "dp");
      check(g.ep(), layout.ep_group(me), "ep");
      check(g.expert_dp(), layout.expert_dp_group(me), "expert_dp");
      check(g.pp(), layout.pp_group(me), "pp");
      EXPECT_EQ(g.dp().size(), layout.dp);
      EXPECT_EQ(g.ep().size(), layout.ep);
      EXPECT_EQ(g.expert_dp().size(), layout.dp / layout.ep);
      EXPECT_EQ(g.pp().size(), layout.pp);
      // Like the reducer: non-blocking sums on two groups in flight at once.
      Tensor a = Tensor::full({1}, 1.0), b = Tensor::full({1}, me, DType::kI64);
      Request ra = g.dp().iallreduce_sum(a);
      Request rb = g.expert_dp().iallreduce_sum(b);
      rb->wait();
      ra->wait();
      EXPECT_EQ(a.item(), layout.dp);
      const std::vector<int> xg = layout.expert_dp_group(me);
      EXPECT_EQ(b.item(), std::accumulate(xg.begin(), xg.end(), 0));
    });
  }
}

// ---- failures end in errors, never in a hang ------------------------------------------

TEST(ThreadCommunicator, ThrowingRankUnblocksTheOthers) {
  for (int size : {2, 3, 4}) {
    std::vector<std::string> seen(static_cast<std::size_t>(size));
    try {
      run_ranks(size, [&](std::shared_ptr<Communicator> w) {
        const int me = w->rank();
        std::unique_ptr<Communicator> sub = w->split(0, me);
        if (me == 1) throw std::runtime_error("rank one broke");
        try {
          // Blocked on the world or on a split of it, or in a recv.
          Tensor t = Tensor::zeros({2});
          if (me == 0) {
            w->allreduce_sum(t);
          } else if (me == 2) {
            sub->barrier();
          } else {
            w->recv(t, 1, 0);
          }
        } catch (const Error& e) {
          EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
          seen[me] = e.what();
          throw;
        }
      });
      ADD_FAILURE() << "run_ranks did not rethrow";
    } catch (const std::runtime_error& e) {
      // The original error, not rank 0's "another rank failed".
      EXPECT_EQ(std::string(e.what()), "rank one broke");
    }
    for (int r = 0; r < size; ++r) {
      if (r == 1) continue;
      EXPECT_TRUE(contains(seen[r], "another rank failed")) << "rank " << r << ": " << seen[r];
      EXPECT_TRUE(contains(seen[r], "rank one broke")) << seen[r];
    }
  }
}

TEST(ThreadCommunicator, DeadlockIsReportedNamingTheCalls) {
  // Blocking sends in a ring: under MPI this relies on buffering; here a
  // send completes only when received, so no rank can proceed.
  for (int size : {2, 3}) {
    const Error e = expect_error([&] {
      run_ranks(size, [&](std::shared_ptr<Communicator> w) {
        const int me = w->rank();
        w->send(Tensor::full({1}, me), (me + 1) % size, 0);
        Tensor t = Tensor::empty({1});
        w->recv(t, (me + size - 1) % size, 0);
      });
    });
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    EXPECT_TRUE(contains(e.what(), "deadlock")) << e.what();
    EXPECT_TRUE(contains(e.what(), "send to rank")) << e.what();
  }
  // A rank that finishes while another waits for it.
  const Error e = expect_error([] {
    run_ranks(2, [](std::shared_ptr<Communicator> w) {
      if (w->rank() == 0) w->barrier();
    });
  });
  EXPECT_TRUE(contains(e.what(), "deadlock")) << e.what();
  EXPECT_TRUE(contains(e.what(), "world rank 1 has finished")) << e.what();
  EXPECT_TRUE(contains(e.what(), "barrier")) << e.what();
}

TEST(ThreadCommunicator, WaitingForARankThatNeverComesTimesOut) {
  // Rank 1 has no thread, so only the timeout can end rank 0's wait.
  std::vector<std::shared_ptr<Communicator>> world = ThreadCommunicator::create_world(2, 0.2);
  Tensor t = Tensor::empty({1});
  const Error e = expect_error([&] { world[0]->recv(t, 1, 0); });
  EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
  EXPECT_TRUE(contains(e.what(), "timed out")) << e.what();
  EXPECT_TRUE(contains(e.what(), "recv from rank 1")) << e.what();
  // The timeout aborted the world: later calls fail at once.
  const Error later = expect_error([&] { world[0]->barrier(); });
  EXPECT_TRUE(contains(later.what(), "another rank failed")) << later.what();
}

TEST(ThreadCommunicator, BadTensorsAndDtypesAreShapeErrorsNamingTheCall) {
  run_ranks(2, [](std::shared_ptr<Communicator> w) {
    Tensor strided = Tensor::zeros({3, 4}).transpose(0, 1);
    Error e = expect_error([&] { w->allreduce_sum(strided); });
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_TRUE(contains(e.what(), "allreduce_sum")) << e.what();
    EXPECT_TRUE(contains(e.what(), "contiguous")) << e.what();
    e = expect_error([&] { w->send(strided, 1 - w->rank(), 0); });
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_TRUE(contains(e.what(), "send")) << e.what();
    Tensor i32 = Tensor::zeros({2}, DType::kI32);
    e = expect_error([&] { w->allreduce_sum(i32); });
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_TRUE(contains(e.what(), "allreduce_sum")) << e.what();
    EXPECT_TRUE(contains(e.what(), "i32")) << e.what();
    Tensor bf16 = Tensor::zeros({2}, DType::kBF16);
    e = expect_error([&] { w->iallreduce_sum(bf16); });
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    Tensor out = Tensor::empty({3});
    e = expect_error([&] { w->allgather(Tensor::zeros({2}), out); });
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_TRUE(contains(e.what(), "allgather")) << e.what();
    e = expect_error([&] { w->send(Tensor::zeros({1}), 2, 0); });
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    e = expect_error([&] { w->send(Tensor::zeros({1}), 0, -1); });
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    // Nothing above reached the other rank: the world still works.
    Tensor t = Tensor::ones({1});
    w->allreduce_sum(t);
    EXPECT_EQ(t.item(), 2.0);
  });
}

TEST(ThreadCommunicator, RecvOfTheWrongSizeIsAnErrorAndReleasesTheSender) {
  run_ranks(2, [](std::shared_ptr<Communicator> w) {
    if (w->rank() == 0) {
      w->send(Tensor::full({4}, 1.0), 1, 0);  // returns: the message was taken
      w->send(Tensor::full({4}, 2.0), 1, 0);
      Request s = w->isend(Tensor::full({2}, 3.0), 1, 1);
      s->wait();
    } else {
      Tensor small = Tensor::empty({3}), large = Tensor::empty({5}), small2 = Tensor::empty({1});
      Error e = expect_error([&] { w->recv(small, 0, 0); });
      EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
      EXPECT_TRUE(contains(e.what(), "recv from rank 0 tag 0")) << e.what();
      EXPECT_TRUE(contains(e.what(), "got 16 bytes, expected 12")) << e.what();
      e = expect_error([&] { w->recv(large, 0, 0); });
      EXPECT_TRUE(contains(e.what(), "expected 20")) << e.what();
      Request r = w->irecv(small2, 0, 1);
      e = expect_error([&] { r->wait(); });
      EXPECT_TRUE(contains(e.what(), "irecv")) << e.what();
    }
  });
}

TEST(ThreadCommunicator, MismatchedCollectivesFailOnEveryRank) {
  std::vector<std::string> seen(2);
  const Error e = expect_error([&] {
    run_ranks(2, [&](std::shared_ptr<Communicator> w) {
      try {
        if (w->rank() == 0) {
          w->barrier();
        } else {
          Tensor t = Tensor::ones({1});
          w->allreduce_sum(t);
        }
      } catch (const Error& err) {
        seen[w->rank()] = err.what();
        throw;
      }
    });
  });
  EXPECT_EQ(e.kind(), ErrorKind::kInternal);
  for (const std::string& s : seen) {
    EXPECT_TRUE(contains(s, "rank 0 barrier, rank 1 allreduce_sum")) << s;
  }
  // Disagreeing arguments: every rank reports the same count mismatch.
  const Error counts = expect_error([] {
    run_ranks(2, [](std::shared_ptr<Communicator> w) {
      // Rank 0 sends 1 element to rank 1, which expects 2.
      const bool zero = w->rank() == 0;
      std::vector<std::int64_t> sc =
          zero ? std::vector<std::int64_t>{0, 1} : std::vector<std::int64_t>{0, 0};
      std::vector<std::int64_t> rc =
          zero ? std::vector<std::int64_t>{0, 0} : std::vector<std::int64_t>{2, 0};
      Tensor in = Tensor::zeros({zero ? 1 : 0}), out = Tensor::zeros({zero ? 0 : 2});
      w->alltoallv(in, sc, out, rc);
    });
  });
  EXPECT_EQ(counts.kind(), ErrorKind::kShape);
  EXPECT_TRUE(contains(counts.what(), "rank 0 sends 4 bytes to rank 1, which expects 8"))
      << counts.what();
}

TEST(ThreadCommunicator, SizeOneWorldTalksToItselfOnlyWithoutBlocking) {
  run_ranks(1, [](std::shared_ptr<Communicator> w) {
    Tensor got = Tensor::empty({2});
    Request r = w->irecv(got, 0, 0);
    w->send(Tensor::full({2}, 5.0), 0, 0);  // matched by the posted irecv
    r->wait();
    EXPECT_EQ(got.to_vector<float>(), std::vector<float>(2, 5.0f));
    const Error e = expect_error([&] { w->send(Tensor::zeros({1}), 0, 0); });
    EXPECT_TRUE(contains(e.what(), "itself")) << e.what();
  });
}

}  // namespace
}  // namespace motley::parallel
