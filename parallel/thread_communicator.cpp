#include "parallel/thread_communicator.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/check.h"

namespace motley::parallel {

// Note [Thread world]
// All ranks of a world, and of every communicator split from it, share one
// ThreadWorld: one mutex guards the state of all its hubs, and one
// condition variable wakes every blocked rank whenever anything changes.
// A single lock is simple and cheap enough for tests, and it lets a
// failure or a deadlock anywhere wake the ranks blocked on any of the
// world's communicators.
//
// Deadlock detection: state only changes under the mutex, by a rank that
// is running. Every change bumps `generation` and resets `stalled`, the
// number of ranks that have found their wait unsatisfied since the last
// change. A rank whose wait is unsatisfied counts itself once per
// generation. When the stalled ranks and the finished ones (run_ranks)
// are all the ranks, no rank is left that could change anything, so every
// stalled rank would wait forever: the world is aborted with a report.
// This assumes one thread per rank (the header's contract); more threads
// per rank could make it fire while one of them still runs.
struct ThreadWorld {
  ThreadWorld(int size, double timeout)
      : world_size(size),
        timeout_s(timeout),
        stalled_at(static_cast<std::size_t>(size), 0),
        waiting_in(static_cast<std::size_t>(size)),
        finished_rank(static_cast<std::size_t>(size), false),
        failed_by_abort(static_cast<std::size_t>(size), false) {}

  std::mutex mu;
  std::condition_variable cv;
  const int world_size;
  const double timeout_s;

  bool aborted = false;
  std::string abort_reason;

  std::uint64_t generation = 0;
  int stalled = 0;
  int finished = 0;
  // Per world rank: generation + 1 at which it last stalled (0: running).
  std::vector<std::uint64_t> stalled_at;
  std::vector<std::string> waiting_in;  // the call a stalled rank is blocked in
  std::vector<bool> finished_rank;
  // Per world rank: its last error came from the abort, not from itself
  // (run_ranks rethrows an original error when there is one).
  std::vector<bool> failed_by_abort;

  // With `mu` held, after any change that a blocked rank may wait for.
  void changed() {
    ++generation;
    stalled = 0;
    cv.notify_all();
  }

  void abort(std::string reason) {
    if (aborted) return;
    aborted = true;
    abort_reason = std::move(reason);
    changed();
  }

  void unstall(int me) {
    if (stalled_at[me] == generation + 1) --stalled;
    stalled_at[me] = 0;
  }

  bool deadlocked() const { return stalled > 0 && stalled + finished == world_size; }

  std::string deadlock_report() const {
    std::string report = "deadlock: no rank can make progress (";
    for (int r = 0; r < world_size; ++r) {
      absl::StrAppend(&report, r > 0 ? "; " : "", "world rank ", r, " ",
                      finished_rank[r] ? "has finished" : absl::StrCat("waits in ", waiting_in[r]));
    }
    absl::StrAppend(&report, ")");
    return report;
  }

  // Blocks, with `lock` holding `mu`, until ready() holds. `me` is the
  // world rank of the calling thread, `what` names the call for errors.
  template <typename Ready>
  void wait(std::unique_lock<std::mutex>& lock, int me, const std::string& what, Ready ready) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_s));
    for (;;) {
      // A call that can complete does, even in an aborted world (its peers
      // took part before they failed).
      if (ready()) {
        unstall(me);
        return;
      }
      if (aborted) {
        unstall(me);
        failed_by_abort[me] = true;
        MOTLEY_FAIL(kRuntime, what, ": another rank failed (", abort_reason, ")");
      }
      if (stalled_at[me] != generation + 1) {
        stalled_at[me] = generation + 1;
        ++stalled;
        waiting_in[me] = what;
      }
      if (deadlocked()) {
        std::string report = deadlock_report();
        unstall(me);
        abort(report);
        MOTLEY_FAIL(kRuntime, what, ": ", report);
      }
      if (cv.wait_until(lock, deadline) == std::cv_status::timeout && !ready() && !aborted) {
        unstall(me);
        abort(absl::StrCat("world rank ", me, " timed out in ", what));
        MOTLEY_FAIL(kRuntime, what, ": timed out after ", timeout_s,
                    " s waiting for the other ranks (a rank that never issues the matching "
                    "call, or issues collectives in another order?)");
      }
    }
  }
};

namespace {

using Bytes = std::vector<unsigned char>;

// One rank's part of a collective: what it brings and the arguments that
// every rank checks against the others'.
struct CollectivePart {
  const char* call = "";
  Bytes data;
  DType dtype = DType::kF32;
  std::int64_t numel = 0;  // elements (bytes for byte calls) of the rank's buffer
  std::int64_t arg = 0;    // broadcast: root; split: color
  std::int64_t key = 0;    // split: key
  std::vector<std::int64_t> counts, recv_counts;
};

struct CollectiveSlot {
  explicit CollectiveSlot(int size) : parts(static_cast<std::size_t>(size)) {}
  std::vector<CollectivePart> parts;
  int arrived = 0;
  std::map<int, std::shared_ptr<ThreadHub>> split_hubs;  // split: one hub per color
};

struct Message {
  Bytes data;
  bool matched = false;
};

struct PostedRecv {
  std::shared_ptr<Message> message;  // null until a send matches it
};

// Messages and receives of one (source, destination, tag), each in order.
// At most one of the two queues is non-empty.
struct Channel {
  std::deque<std::shared_ptr<Message>> unmatched;
  std::deque<std::shared_ptr<PostedRecv>> posted;
};

}  // namespace

class ThreadHub {
 public:
  ThreadHub(std::shared_ptr<ThreadWorld> world, std::vector<int> world_ranks)
      : world(std::move(world)), world_ranks(std::move(world_ranks)) {}

  const std::shared_ptr<ThreadWorld> world;
  const std::vector<int> world_ranks;  // world rank of each rank here
  // Guarded by world->mu. A slot leaves the map when its last rank
  // arrives; the ranks keep it alive through their shared_ptr.
  std::map<std::uint64_t, std::shared_ptr<CollectiveSlot>> slots;
  std::map<std::tuple<int, int, int>, Channel> channels;  // (src, dst, tag)
};

namespace {

class ThreadRequest final : public CommRequest {
 public:
  explicit ThreadRequest(std::function<void()> complete) : complete_(std::move(complete)) {}
  ~ThreadRequest() override {
    if (done_) return;
    try {
      wait();
    } catch (...) {  // destructors must not throw (communicator.h)
    }
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    std::function<void()> complete = std::move(complete_);
    complete();
  }

 private:
  std::function<void()> complete_;
  bool done_ = false;
};

void check_host(const Tensor& t, const char* what) {
  MOTLEY_CHECK_KIND(kShape, t.defined(), what, ": undefined tensor");
  MOTLEY_CHECK_KIND(kShape, t.device().is_cpu(), what,
                    ": the thread communicator needs CPU tensors, got ", t.str());
  MOTLEY_CHECK_KIND(kShape, t.is_contiguous(), what, ": tensor must be contiguous, got ", t.str());
}

void check_sum_dtype(DType dtype, const char* what) {
  MOTLEY_CHECK_KIND(kShape, dtype == DType::kF32 || dtype == DType::kF64 || dtype == DType::kI64,
                    what, ": reductions support f32, f64 and i64, not ", dtype_name(dtype));
}

Bytes copy_bytes(const void* data, std::int64_t nbytes) {
  Bytes b(static_cast<std::size_t>(nbytes));
  if (nbytes > 0) std::memcpy(b.data(), data, b.size());
  return b;
}

Bytes copy_bytes(const Tensor& t) {
  return copy_bytes(t.raw_data(), static_cast<std::int64_t>(t.nbytes()));
}

// A collective contribution holding a copy of all of `t`.
CollectivePart tensor_part(const char* call, const Tensor& t) {
  CollectivePart part;
  part.call = call;
  part.data = copy_bytes(t);
  part.dtype = t.dtype();
  part.numel = t.numel();
  return part;
}

// memcpy that allows empty ranges with null pointers.
void copy_to(void* dst, const void* src, std::int64_t nbytes) {
  if (nbytes > 0) std::memcpy(dst, src, static_cast<std::size_t>(nbytes));
}

// out[i] = sum over ranks r in rank order of element offset + i of part r.
template <typename T>
void sum_in_rank_order(const std::vector<CollectivePart>& parts, std::int64_t offset,
                       std::int64_t n, void* out) {
  T* o = static_cast<T*>(out);
  const T* first = reinterpret_cast<const T*>(parts[0].data.data()) + offset;
  std::copy(first, first + n, o);
  for (std::size_t r = 1; r < parts.size(); ++r) {
    const T* x = reinterpret_cast<const T*>(parts[r].data.data()) + offset;
    for (std::int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<T, std::int64_t>) {
        // Wraps instead of signed overflow (undefined behaviour).
        o[i] = static_cast<std::int64_t>(static_cast<std::uint64_t>(o[i]) +
                                         static_cast<std::uint64_t>(x[i]));
      } else {
        o[i] += x[i];
      }
    }
  }
}

void sum_parts(const std::vector<CollectivePart>& parts, DType dtype, std::int64_t offset,
               std::int64_t n, void* out) {
  if (n == 0) return;
  switch (dtype) {
    case DType::kF32:
      return sum_in_rank_order<float>(parts, offset, n, out);
    case DType::kF64:
      return sum_in_rank_order<double>(parts, offset, n, out);
    case DType::kI64:
      return sum_in_rank_order<std::int64_t>(parts, offset, n, out);
    default:
      break;
  }
  MOTLEY_FAIL(kInternal, "sum of ", dtype_name(dtype), " passed the dtype check");
}

// Every rank runs the same checks on the same parts, so a mismatch makes
// every rank throw the same error instead of some of them hanging.
void check_same_call(const std::vector<CollectivePart>& parts, const char* what) {
  for (const CollectivePart& p : parts) {
    if (std::strcmp(p.call, what) == 0) continue;
    std::string calls;
    for (std::size_t r = 0; r < parts.size(); ++r) {
      absl::StrAppend(&calls, r > 0 ? ", " : "", "rank ", r, " ", parts[r].call);
    }
    MOTLEY_FAIL(kInternal, what, ": the ranks issued different collectives at the same point (",
                calls, "); every rank must issue the same collectives in the same order");
  }
}

void check_same_dtype_and_numel(const std::vector<CollectivePart>& parts, const char* what) {
  for (std::size_t r = 1; r < parts.size(); ++r) {
    MOTLEY_CHECK_KIND(kShape, parts[r].dtype == parts[0].dtype && parts[r].numel == parts[0].numel,
                      what, ": rank ", r, " passes ", parts[r].numel, " ",
                      dtype_name(parts[r].dtype), " elements, rank 0 ", parts[0].numel, " ",
                      dtype_name(parts[0].dtype));
  }
}

std::int64_t total(const std::vector<std::int64_t>& counts) {
  std::int64_t sum = 0;
  for (std::int64_t c : counts) sum += c;
  return sum;
}

std::string describe(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an exception not derived from std::exception";
  }
}

}  // namespace

// ---- ThreadCommunicator --------------------------------------------------------------

std::vector<std::shared_ptr<Communicator>> ThreadCommunicator::create_world(int size,
                                                                            double timeout_s) {
  MOTLEY_CHECK_KIND(kUsage, size >= 1, "a thread world needs at least one rank, got ", size);
  // The upper bound keeps the deadline arithmetic far from overflow.
  MOTLEY_CHECK_KIND(kUsage, timeout_s > 0 && timeout_s <= 1e7,
                    "thread communicator timeout must be in (0, 1e7] s, got ", timeout_s);
  auto world = std::make_shared<ThreadWorld>(size, timeout_s);
  std::vector<int> ranks(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) ranks[r] = r;
  auto hub = std::make_shared<ThreadHub>(world, std::move(ranks));
  std::vector<std::shared_ptr<Communicator>> comms;
  for (int r = 0; r < size; ++r) {
    comms.push_back(std::shared_ptr<Communicator>(new ThreadCommunicator(hub, r)));
  }
  return comms;
}

ThreadCommunicator::ThreadCommunicator(std::shared_ptr<ThreadHub> hub, int rank)
    : hub_(std::move(hub)), rank_(rank), size_(static_cast<int>(hub_->world_ranks.size())) {}

ThreadCommunicator::~ThreadCommunicator() = default;

namespace {

// The collective machinery, as free functions of a hub so that requests
// can complete after their communicator is gone.

// Adds `part` as rank `rank`'s contribution to collective number `seq`.
std::shared_ptr<CollectiveSlot> post(ThreadHub& hub, std::uint64_t seq, int rank,
                                     CollectivePart part) {
  ThreadWorld& w = *hub.world;
  std::lock_guard<std::mutex> lock(w.mu);
  const int size = static_cast<int>(hub.world_ranks.size());
  std::shared_ptr<CollectiveSlot>& entry = hub.slots[seq];
  if (!entry) entry = std::make_shared<CollectiveSlot>(size);
  std::shared_ptr<CollectiveSlot> slot = entry;
  slot->parts[rank] = std::move(part);
  if (++slot->arrived == size) hub.slots.erase(seq);
  w.changed();
  return slot;
}

// Blocks until every rank has posted to `slot`. Afterwards the parts are
// read without the lock: nobody writes them again, and taking the lock
// here orders every rank's post before these reads.
void await(ThreadHub& hub, CollectiveSlot& slot, int rank, const char* what) {
  ThreadWorld& w = *hub.world;
  std::unique_lock<std::mutex> lock(w.mu);
  const int size = static_cast<int>(hub.world_ranks.size());
  w.wait(lock, hub.world_ranks[rank],
         absl::StrCat(what, " (rank ", rank, " of a ", size, "-rank communicator)"),
         [&] { return slot.arrived == size; });
}

// post, await and check_same_call: a blocking collective's exchange.
std::shared_ptr<CollectiveSlot> collect(ThreadHub& hub, std::uint64_t seq, int rank,
                                        CollectivePart part) {
  const char* what = part.call;
  std::shared_ptr<CollectiveSlot> slot = post(hub, seq, rank, std::move(part));
  await(hub, *slot, rank, what);
  check_same_call(slot->parts, what);
  return slot;
}

std::string p2p_what(const char* call, const char* dir, int peer, int tag, int rank, int size) {
  return absl::StrCat(call, " ", dir, " rank ", peer, " tag ", tag, " (rank ", rank, " of a ", size,
                      "-rank communicator)");
}

}  // namespace

void ThreadCommunicator::allreduce_sum(Tensor& t) {
  const char* what = "allreduce_sum";
  check_host(t, what);
  check_sum_dtype(t.dtype(), what);
  CollectivePart part = tensor_part(what, t);
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  check_same_dtype_and_numel(slot->parts, what);
  sum_parts(slot->parts, t.dtype(), 0, t.numel(), t.raw_data());
}

Request ThreadCommunicator::iallreduce_sum(Tensor t) {
  const char* what = "iallreduce_sum";
  check_host(t, what);
  check_sum_dtype(t.dtype(), what);
  CollectivePart part = tensor_part(what, t);
  std::shared_ptr<CollectiveSlot> slot = post(*hub_, next_collective_++, rank_, std::move(part));
  return std::make_unique<ThreadRequest>([hub = hub_, slot, t, rank = rank_, what] {
    await(*hub, *slot, rank, "wait(iallreduce_sum)");
    check_same_call(slot->parts, what);
    check_same_dtype_and_numel(slot->parts, what);
    sum_parts(slot->parts, t.dtype(), 0, t.numel(), t.raw_data());
  });
}

void ThreadCommunicator::reduce_scatter_sum(const Tensor& in, Tensor& out) {
  const char* what = "reduce_scatter_sum";
  check_host(in, what);
  check_host(out, what);
  check_sum_dtype(in.dtype(), what);
  MOTLEY_CHECK_KIND(kShape, in.numel() == out.numel() * size_ && in.dtype() == out.dtype(), what,
                    ": in ", in.str(), " must hold ", size_, " blocks of out ", out.str());
  CollectivePart part = tensor_part(what, in);
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  check_same_dtype_and_numel(slot->parts, what);
  sum_parts(slot->parts, in.dtype(), rank_ * out.numel(), out.numel(), out.raw_data());
}

void ThreadCommunicator::allgather(const Tensor& in, Tensor& out) {
  const char* what = "allgather";
  check_host(in, what);
  check_host(out, what);
  MOTLEY_CHECK_KIND(kShape, out.numel() == in.numel() * size_ && in.dtype() == out.dtype(), what,
                    ": out ", out.str(), " must hold ", size_, " copies of ", in.str());
  CollectivePart part = tensor_part(what, in);
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  check_same_dtype_and_numel(slot->parts, what);
  auto* o = static_cast<unsigned char*>(out.raw_data());
  const auto block = static_cast<std::int64_t>(in.nbytes());
  for (int r = 0; r < size_; ++r) copy_to(o + r * block, slot->parts[r].data.data(), block);
}

void ThreadCommunicator::allgatherv(const Tensor& in, Tensor& out,
                                    const std::vector<std::int64_t>& counts) {
  const char* what = "allgatherv";
  check_host(in, what);
  check_host(out, what);
  MOTLEY_CHECK_KIND(kShape,
                    static_cast<int>(counts.size()) == size_ && counts[rank_] == in.numel() &&
                        in.dtype() == out.dtype(),
                    what, ": counts do not match this rank's tensor ", in.str());
  MOTLEY_CHECK_KIND(kShape, total(counts) == out.numel(), what, ": out ", out.str(),
                    " does not hold the sum of counts, ", total(counts));
  CollectivePart part = tensor_part(what, in);
  part.counts = counts;
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  for (int r = 0; r < size_; ++r) {
    const CollectivePart& p = slot->parts[r];
    MOTLEY_CHECK_KIND(kShape, p.counts == slot->parts[0].counts && p.dtype == slot->parts[0].dtype,
                      what, ": rank ", r, " passes other counts or another dtype than rank 0");
  }
  auto* o = static_cast<unsigned char*>(out.raw_data());
  std::int64_t at = 0;
  for (int r = 0; r < size_; ++r) {
    const Bytes& d = slot->parts[r].data;
    copy_to(o + at, d.data(), static_cast<std::int64_t>(d.size()));
    at += static_cast<std::int64_t>(d.size());
  }
}

void ThreadCommunicator::alltoallv(const Tensor& in, const std::vector<std::int64_t>& send_counts,
                                   Tensor& out, const std::vector<std::int64_t>& recv_counts) {
  const char* what = "alltoallv";
  check_host(in, what);
  check_host(out, what);
  MOTLEY_CHECK_KIND(kShape, in.dtype() == out.dtype(), what, ": dtypes differ, ", in.str(), " and ",
                    out.str());
  MOTLEY_CHECK_KIND(kShape, total(send_counts) == in.numel() && total(recv_counts) == out.numel(),
                    what, ": counts sum to ", total(send_counts), " / ", total(recv_counts),
                    " for ", in.str(), " / ", out.str());
  // The same byte exchange as MpiCommunicator's: counts scaled to bytes.
  const auto unit = static_cast<std::int64_t>(dtype_size(in.dtype()));
  std::vector<std::int64_t> sb(send_counts), rb(recv_counts);
  for (auto& c : sb) c *= unit;
  for (auto& c : rb) c *= unit;
  alltoallv_bytes(in.raw_data(), sb, out.raw_data(), rb);
}

void ThreadCommunicator::alltoallv_bytes(const void* in,
                                         const std::vector<std::int64_t>& send_counts, void* out,
                                         const std::vector<std::int64_t>& recv_counts) {
  // Named like MpiCommunicator's errors: both forms are one MPI_Alltoallv.
  const char* what = "alltoallv";
  MOTLEY_CHECK_KIND(kShape,
                    static_cast<int>(send_counts.size()) == size_ &&
                        static_cast<int>(recv_counts.size()) == size_,
                    what, ": need ", size_, " counts per direction, got ", send_counts.size(),
                    " and ", recv_counts.size());
  for (int r = 0; r < size_; ++r) {
    MOTLEY_CHECK_KIND(kShape, send_counts[r] >= 0 && recv_counts[r] >= 0, what,
                      ": negative count for rank ", r);
  }
  CollectivePart part;
  part.call = what;
  part.data = copy_bytes(in, total(send_counts));
  part.counts = send_counts;
  part.recv_counts = recv_counts;
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  // The whole count matrix, so that every rank reports the same mismatch.
  for (int src = 0; src < size_; ++src) {
    for (int dst = 0; dst < size_; ++dst) {
      const std::int64_t sent = slot->parts[src].counts[dst],
                         expected = slot->parts[dst].recv_counts[src];
      MOTLEY_CHECK_KIND(kShape, sent == expected, what, ": rank ", src, " sends ", sent,
                        " bytes to rank ", dst, ", which expects ", expected);
    }
  }
  auto* o = static_cast<unsigned char*>(out);
  std::int64_t at = 0;
  for (int src = 0; src < size_; ++src) {
    const CollectivePart& p = slot->parts[src];
    std::int64_t from = 0;
    for (int dst = 0; dst < rank_; ++dst) from += p.counts[dst];
    copy_to(o + at, p.data.data() + from, recv_counts[src]);
    at += recv_counts[src];
  }
}

void ThreadCommunicator::broadcast(Tensor& t, int root) {
  const char* what = "broadcast";
  check_host(t, what);
  MOTLEY_CHECK_KIND(kRuntime, root >= 0 && root < size_, what, ": root ", root,
                    " is not a rank of a ", size_, "-rank communicator");
  CollectivePart part;
  part.call = what;
  if (rank_ == root) part.data = copy_bytes(t);
  part.numel = static_cast<std::int64_t>(t.nbytes());
  part.arg = root;
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  for (int r = 0; r < size_; ++r) {
    const CollectivePart& p = slot->parts[r];
    MOTLEY_CHECK_KIND(kShape, p.arg == slot->parts[0].arg && p.numel == slot->parts[0].numel, what,
                      ": rank ", r, " passes root ", p.arg, " and ", p.numel,
                      " bytes, rank 0 root ", slot->parts[0].arg, " and ", slot->parts[0].numel,
                      " bytes");
  }
  if (rank_ != root) {
    const Bytes& d = slot->parts[root].data;
    copy_to(t.raw_data(), d.data(), static_cast<std::int64_t>(d.size()));
  }
}

void ThreadCommunicator::barrier() {
  const char* what = "barrier";
  CollectivePart part;
  part.call = what;
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
}

std::unique_ptr<Communicator> ThreadCommunicator::split(int color, int key) {
  const char* what = "split";
  CollectivePart part;
  part.call = what;
  part.arg = color;
  part.key = key;
  const std::shared_ptr<CollectiveSlot> slot =
      collect(*hub_, next_collective_++, rank_, std::move(part));
  for (int r = 0; r < size_; ++r) {
    MOTLEY_CHECK_KIND(kRuntime, slot->parts[r].arg >= 0, what, ": rank ", r, " passes color ",
                      slot->parts[r].arg, "; colors must be >= 0 (MPI_UNDEFINED is not supported)");
  }
  // Members of this color ordered by (key, rank here), as MPI_Comm_split.
  std::vector<std::pair<std::int64_t, int>> members;
  for (int r = 0; r < size_; ++r) {
    if (slot->parts[r].arg == color) members.emplace_back(slot->parts[r].key, r);
  }
  std::sort(members.begin(), members.end());
  std::vector<int> world_ranks;
  int new_rank = -1;
  for (const auto& m : members) {
    if (m.second == rank_) new_rank = static_cast<int>(world_ranks.size());
    world_ranks.push_back(hub_->world_ranks[m.second]);
  }
  std::shared_ptr<ThreadHub> hub;
  {
    // The first member to get here creates the color's hub for all.
    std::lock_guard<std::mutex> lock(hub_->world->mu);
    std::shared_ptr<ThreadHub>& entry = slot->split_hubs[color];
    if (!entry) entry = std::make_shared<ThreadHub>(hub_->world, std::move(world_ranks));
    hub = entry;
  }
  return std::unique_ptr<Communicator>(new ThreadCommunicator(std::move(hub), new_rank));
}

// ---- point to point ------------------------------------------------------------------

namespace {

// Queues a copy of `data` from `src` to `dst` with `tag`, matching the
// oldest posted receive if there is one. With `require_match` (a blocking
// send to the rank itself, which only that rank could receive) a send that
// finds no posted receive throws instead, leaving nothing queued.
std::shared_ptr<Message> post_send(ThreadHub& hub, int src, int dst, int tag, Bytes data,
                                   bool require_match, const std::string& what) {
  ThreadWorld& w = *hub.world;
  std::lock_guard<std::mutex> lock(w.mu);
  auto message = std::make_shared<Message>();
  message->data = std::move(data);
  auto it = hub.channels.try_emplace({src, dst, tag}).first;
  Channel& channel = it->second;
  if (!channel.posted.empty()) {
    channel.posted.front()->message = message;
    channel.posted.pop_front();
    message->matched = true;
  } else if (!require_match) {
    channel.unmatched.push_back(message);
  }
  if (channel.posted.empty() && channel.unmatched.empty()) hub.channels.erase(it);
  MOTLEY_CHECK_KIND(kRuntime, message->matched || !require_match, what,
                    ": a blocking send to this rank itself never completes unless an irecv is "
                    "posted first (use isend)");
  w.changed();
  return message;
}

// Posts a receive from `src` to `dst` with `tag`, matching the oldest
// unmatched message if there is one. `require_match` as for post_send.
std::shared_ptr<PostedRecv> post_recv(ThreadHub& hub, int src, int dst, int tag, bool require_match,
                                      const std::string& what) {
  ThreadWorld& w = *hub.world;
  std::lock_guard<std::mutex> lock(w.mu);
  auto posted = std::make_shared<PostedRecv>();
  auto it = hub.channels.try_emplace({src, dst, tag}).first;
  Channel& channel = it->second;
  if (!channel.unmatched.empty()) {
    posted->message = channel.unmatched.front();
    channel.unmatched.pop_front();
    posted->message->matched = true;
  } else if (!require_match) {
    channel.posted.push_back(posted);
  }
  if (channel.posted.empty() && channel.unmatched.empty()) hub.channels.erase(it);
  MOTLEY_CHECK_KIND(kRuntime, posted->message != nullptr || !require_match, what,
                    ": a blocking recv from this rank itself never completes unless an isend "
                    "was issued first");
  w.changed();
  return posted;
}

// The argument checks of the four point-to-point calls (kRuntime, as
// MPI_ERR_RANK and MPI_ERR_TAG are in MpiCommunicator).
void check_peer(const char* call, int peer, int tag, int size) {
  MOTLEY_CHECK_KIND(kRuntime, peer >= 0 && peer < size, call, ": rank ", peer,
                    " is not a rank of a ", size, "-rank communicator");
  MOTLEY_CHECK_KIND(kRuntime, tag >= 0, call, ": tag ", tag, " is negative");
}

void await_matched(ThreadHub& hub, const Message& message, int rank, const std::string& what) {
  ThreadWorld& w = *hub.world;
  std::unique_lock<std::mutex> lock(w.mu);
  w.wait(lock, hub.world_ranks[rank], what, [&] { return message.matched; });
}

// Waits for the message of `posted` and copies it into `t`.
void finish_recv(ThreadHub& hub, const PostedRecv& posted, const Tensor& t, int rank,
                 const std::string& what) {
  ThreadWorld& w = *hub.world;
  std::unique_lock<std::mutex> lock(w.mu);
  w.wait(lock, hub.world_ranks[rank], what, [&] { return posted.message != nullptr; });
  const Bytes& d = posted.message->data;
  lock.unlock();
  MOTLEY_CHECK_KIND(kRuntime, d.size() == t.nbytes(), what, ": got ", d.size(), " bytes, expected ",
                    t.nbytes(), " (", t.str(),
                    "); a receive's tensor must have the exact size of the message");
  copy_to(t.raw_data(), d.data(), static_cast<std::int64_t>(d.size()));
}

}  // namespace

void ThreadCommunicator::send(const Tensor& t, int dest, int tag) {
  check_host(t, "send");
  check_peer("send", dest, tag, size_);
  const std::string what = p2p_what("send", "to", dest, tag, rank_, size_);
  std::shared_ptr<Message> message =
      post_send(*hub_, rank_, dest, tag, copy_bytes(t), dest == rank_, what);
  await_matched(*hub_, *message, rank_, what);
}

void ThreadCommunicator::recv(Tensor& t, int src, int tag) {
  check_host(t, "recv");
  check_peer("recv", src, tag, size_);
  const std::string what = p2p_what("recv", "from", src, tag, rank_, size_);
  std::shared_ptr<PostedRecv> posted = post_recv(*hub_, src, rank_, tag, src == rank_, what);
  finish_recv(*hub_, *posted, t, rank_, what);
}

Request ThreadCommunicator::isend(Tensor t, int dest, int tag) {
  check_host(t, "isend");
  check_peer("isend", dest, tag, size_);
  std::string what = p2p_what("wait(isend)", "to", dest, tag, rank_, size_);
  // Copied now, so the request need not keep `t`.
  std::shared_ptr<Message> message = post_send(*hub_, rank_, dest, tag, copy_bytes(t), false, what);
  return std::make_unique<ThreadRequest>(
      [hub = hub_, message, rank = rank_, what = std::move(what)] {
        await_matched(*hub, *message, rank, what);
      });
}

Request ThreadCommunicator::irecv(Tensor t, int src, int tag) {
  check_host(t, "irecv");
  check_peer("irecv", src, tag, size_);
  std::string what = p2p_what("wait(irecv)", "from", src, tag, rank_, size_);
  std::shared_ptr<PostedRecv> posted = post_recv(*hub_, src, rank_, tag, false, what);
  return std::make_unique<ThreadRequest>(
      [hub = hub_, posted, t, rank = rank_, what = std::move(what)] {
        finish_recv(*hub, *posted, t, rank, what);
      });
}

// ---- run_ranks -----------------------------------------------------------------------

void run_ranks(int size, const std::function<void(std::shared_ptr<Communicator> world)>& body,
               double timeout_s) {
  std::vector<std::shared_ptr<Communicator>> comms =
      ThreadCommunicator::create_world(size, timeout_s);
  const std::shared_ptr<ThreadWorld> world =
      static_cast<ThreadCommunicator&>(*comms[0]).hub_->world;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size));
  auto fail = [&](const std::string& reason) {
    std::lock_guard<std::mutex> lock(world->mu);
    world->abort(reason);
  };
  auto run = [&](int r) {
    try {
      body(std::move(comms[r]));
      std::lock_guard<std::mutex> lock(world->mu);
      world->finished_rank[r] = true;
      ++world->finished;
      // The ranks still blocked may have been waiting for this one.
      if (world->deadlocked()) world->abort(world->deadlock_report());
    } catch (...) {
      errors[r] = std::current_exception();
      fail(absl::StrCat("world rank ", r, " threw: ", describe(errors[r])));
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(size));
  try {
    for (int r = 0; r < size; ++r) threads.emplace_back(run, r);
  } catch (...) {
    // Could not start every rank: let the started ones fail, then report.
    fail("run_ranks could not start a thread per rank");
    for (std::thread& t : threads) t.join();
    throw;
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < size; ++r) {
    if (errors[r] && !world->failed_by_abort[r]) std::rethrow_exception(errors[r]);
  }
  for (int r = 0; r < size; ++r) {
    if (errors[r]) std::rethrow_exception(errors[r]);
  }
}

}  // namespace motley::parallel
