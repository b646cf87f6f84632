#pragma once
// Process groups: the ranks that train one model together (docs/distributed.md). Light on
// purpose (no model code): the transports (distributed/mpi.hpp, distributed/nccl.hpp) include
// it, and train/data_parallel.hpp adds what the trainer does with a group.
//
//   Communicator   the contract of a transport (rank, size, in-place sums, barrier)
//   ProcessGroup   any Communicator behind one value type: what TrainerOptions holds, so that a
//                  program picks the transport at run time (mpirun or not)
//   LocalGroup     N ranks as threads of one process (tests, and checks without MPI)
//   launcher_world_size / launcher_local_size   what an MPI launcher tells a process
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

/// A collective operation failed (a lost rank, a transport error): names the operation and the
/// rank that saw it.
struct DistributedError : Error {
  using Error::Error;
};

/// The contract of a data-parallel transport (docs/distributed.md, "The contract"):
/// - `rank()` in [0, size()), `size()` ≥ 1, fixed for the object's life;
/// - `all_reduce_sum(span)` for float and double: in place, every rank passes a span of the same
///   length and receives the element-wise sum over the ranks; every rank gets the same bits (a
///   fixed reduction order for a fixed size and length), so the ranks' models never drift apart;
/// - `barrier()`: returns once every rank has entered it;
/// - failures throw (DistributedError), they never hang silently where the transport can tell.
template <class C>
concept Communicator = requires(C& c, const C& cc, std::span<float> f, std::span<double> d) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_reduce_sum(f);
  c.all_reduce_sum(d);
  c.barrier();
};

/// Any Communicator as one value type (shared: copies are the same group). Default-constructed:
/// a single process, whose operations do nothing. Not on a hot path: a handful of calls a step.
class ProcessGroup {
 public:
  ProcessGroup() = default;

  template <class C>
  explicit ProcessGroup(std::shared_ptr<C> communicator) {
    static_assert(Communicator<C>,
                  "ProcessGroup: the type is not a Communicator: it needs rank(), size(), "
                  "all_reduce_sum(std::span<float>), all_reduce_sum(std::span<double>) and "
                  "barrier() (docs/distributed.md, \"The contract\")");
    if (!communicator) throw ConfigError("ProcessGroup: null communicator");
    rank_ = communicator->rank();
    size_ = communicator->size();
    if (size_ < 1 || rank_ < 0 || rank_ >= size_)
      throw ConfigError("ProcessGroup: rank " + std::to_string(rank_) + " of " +
                        std::to_string(size_) + " is not a rank of the group");
    sum_f32_ = [](void* c, std::span<float> x) { static_cast<C*>(c)->all_reduce_sum(x); };
    sum_f64_ = [](void* c, std::span<double> x) { static_cast<C*>(c)->all_reduce_sum(x); };
    barrier_ = [](void* c) { static_cast<C*>(c)->barrier(); };
    impl_ = std::move(communicator);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool single() const { return size_ == 1; }
  /// The rank that writes checkpoints, adapters and logs.
  bool is_root() const { return rank_ == 0; }

  void all_reduce_sum(std::span<float> x) {
    if (impl_) sum_f32_(impl_.get(), x);
  }
  void all_reduce_sum(std::span<double> x) {
    if (impl_) sum_f64_(impl_.get(), x);
  }
  void barrier() {
    if (impl_) barrier_(impl_.get());
  }

 private:
  std::shared_ptr<void> impl_;
  int rank_ = 0, size_ = 1;
  void (*sum_f32_)(void*, std::span<float>) = nullptr;
  void (*sum_f64_)(void*, std::span<double>) = nullptr;
  void (*barrier_)(void*) = nullptr;
};

/// N ranks as N threads of one process, over shared memory: each rank's communicator is
/// `LocalGroup::member(r)`. Sums add the ranks' values in rank order (0, 1, ..., N−1), so the
/// result is the same on every rank and from run to run. For tests and for checking a
/// data-parallel setup without MPI; each thread must call every collective, in the same order.
class LocalGroup {
  struct Shared {
    explicit Shared(int n) : size(n), sync(std::max(n, 1)), spans(std::size_t(std::max(n, 1))) {}
    int size;
    std::barrier<> sync;
    std::vector<std::pair<const void*, std::size_t>> spans;  ///< each rank's input, in bytes
  };

 public:
  explicit LocalGroup(int size) : shared_(std::make_shared<Shared>(size)) {
    if (size < 1) throw ConfigError("LocalGroup: size must be ≥ 1, found " + std::to_string(size));
  }

  /// One rank's end of the group (a Communicator).
  class Member {
   public:
    Member(std::shared_ptr<Shared> shared, int rank) : shared_(std::move(shared)), rank_(rank) {}
    int rank() const { return rank_; }
    int size() const { return shared_->size; }
    void all_reduce_sum(std::span<float> x) { sum(x); }
    void all_reduce_sum(std::span<double> x) { sum(x); }
    void barrier() { shared_->sync.arrive_and_wait(); }

   private:
    template <class T>
    void sum(std::span<T> x) {
      Shared& s = *shared_;
      const std::size_t bytes = x.size() * sizeof(T);
      s.spans[static_cast<std::size_t>(rank_)] = {x.data(), bytes};
      s.sync.arrive_and_wait();  // every rank's input is published
      // Every rank sees every length, so all of them throw together on a mismatch.
      for (int r = 0; r < s.size; ++r)
        if (s.spans[static_cast<std::size_t>(r)].second != bytes)
          throw DistributedError("LocalGroup: rank " + std::to_string(r) +
                                 " passed another length to all_reduce_sum than rank " +
                                 std::to_string(rank_));
      std::vector<T> total(x.size(), T(0));
      for (int r = 0; r < s.size; ++r) {
        const T* in = static_cast<const T*>(s.spans[static_cast<std::size_t>(r)].first);
        for (std::size_t i = 0; i < x.size(); ++i) total[i] += in[i];
      }
      s.sync.arrive_and_wait();  // every rank has read every input
      std::copy(total.begin(), total.end(), x.begin());
    }
    std::shared_ptr<Shared> shared_;
    int rank_;
  };

  int size() const { return shared_->size; }
  ProcessGroup member(int rank) const {
    if (rank < 0 || rank >= shared_->size)
      throw ConfigError("LocalGroup: no rank " + std::to_string(rank) + " in a group of " +
                        std::to_string(shared_->size));
    return ProcessGroup(std::make_shared<Member>(shared_, rank));
  }

 private:
  std::shared_ptr<Shared> shared_;
};

namespace detail {
/// The first of the variables that holds a count in [1, 2^20]; 1 when none does.
inline int first_count_in_environment(std::initializer_list<const char*> names) {
  for (const char* name : names)
    if (const char* v = std::getenv(name); v != nullptr && *v != '\0') {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      if (end != nullptr && *end == '\0' && n >= 1 && n <= 1 << 20) return static_cast<int>(n);
    }
  return 1;
}
}  // namespace detail

/// The size of the job the process was started in, as its launcher tells it (Open MPI's
/// OMPI_COMM_WORLD_SIZE, PMIx's PMIX_SIZE... , MPICH/Hydra's PMI_SIZE); 1 when started alone.
/// Lets a program decide whether to initialise MPI at all.
inline int launcher_world_size() {
  return detail::first_count_in_environment(
      {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"});
}

/// How many of the job's ranks run on this machine (OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS,
/// MV2_COMM_WORLD_LOCAL_SIZE); 1 when the launcher does not say.
inline int launcher_local_size() {
  return detail::first_count_in_environment(
      {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"});
}

}  // namespace peft
