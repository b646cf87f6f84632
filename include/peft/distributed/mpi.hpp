#pragma once
// MPI as a data-parallel transport (docs/distributed.md): MpiSession initialises MPI for the
// life of a program, MpiCommunicator is a Communicator (train/data_parallel.hpp) over a
// communicator of it. Opt-in: not in <peft/peft.hpp>; needs <mpi.h> and MPI's library (CMake:
// find_package(MPI REQUIRED COMPONENTS CXX), then link MPI::MPI_CXX beside peft::peft).
//
//   peft::MpiSession mpi(argc, argv);               // MPI_Init_thread ... MPI_Finalize
//   peft::TrainerOptions options;
//   options.process_group = mpi.world();            // every rank of `mpirun -np N`
//
// Errors: the communicators return errors instead of aborting (MPI_ERRORS_RETURN) and every
// failed call throws DistributedError naming the call and this rank. A rank that dies is seen by
// the launcher: Open MPI's mpirun then ends the job's other processes and names the lost rank.
// A program that stops on an exception while its peers may still be inside a collective should
// call MpiSession::abort (MPI_Abort), so that they end too instead of waiting for it.
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>

#include "peft/train/process_group.hpp"

namespace peft {

namespace detail {
inline void check_mpi(int code, const char* call, int rank) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw DistributedError(std::string(call) + " failed on rank " + std::to_string(rank) + ": " +
                         std::string(text, static_cast<std::size_t>(length)));
}
}  // namespace detail

/// A Communicator over an MPI communicator (MPI_COMM_WORLD by default). MPI_Allreduce with
/// MPI_SUM: Open MPI picks its algorithm from the communicator's size and the message's length
/// alone, so for a fixed job the reduction order, and every bit of the result, is the same on
/// every rank and in every run.
class MpiCommunicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) throw DistributedError("MpiCommunicator: MPI is not initialised (MpiSession)");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", -1);
    detail::check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size", rank_);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  void all_reduce_sum(std::span<float> x) { sum(x.data(), x.size(), MPI_FLOAT); }
  void all_reduce_sum(std::span<double> x) { sum(x.data(), x.size(), MPI_DOUBLE); }
  void barrier() { detail::check_mpi(MPI_Barrier(comm_), "MPI_Barrier", rank_); }
  MPI_Comm comm() const { return comm_; }

 private:
  void sum(void* data, std::size_t count, MPI_Datatype type) {
    // MPI counts are ints: long buffers go in pieces (each piece reduced alike on every rank).
    constexpr std::size_t kMaxCount = std::size_t(1) << 30;
    const std::size_t element = type == MPI_FLOAT ? sizeof(float) : sizeof(double);
    for (std::size_t done = 0; done < count; done += kMaxCount) {
      const auto n = static_cast<int>(std::min(kMaxCount, count - done));
      detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, static_cast<char*>(data) + done * element, n,
                                      type, MPI_SUM, comm_),
                        "MPI_Allreduce", rank_);
    }
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

/// MPI for the life of the object: MPI_Init_thread (funneled: only the thread that made the
/// session calls MPI; OpenMP threads inside the ops never do) and MPI_Finalize. If MPI is
/// already initialised (by the program), it is left as it is and not finalised here.
class MpiSession {
 public:
  MpiSession() : MpiSession(nullptr, nullptr) {}
  MpiSession(int* argc, char*** argv) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) {
      int provided = 0;
      const int code = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
      if (code != MPI_SUCCESS) throw DistributedError("MPI_Init_thread failed");
      owns_ = true;
    }
    world_ = std::make_shared<MpiCommunicator>(MPI_COMM_WORLD);
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (owns_ && !finalised) MPI_Finalize();
  }

  /// Every rank of the job, as the trainer's process group.
  ProcessGroup world() const { return ProcessGroup(world_); }
  int rank() const { return world_->rank(); }
  int size() const { return world_->size(); }

  /// Ends every rank of the job with `status` (MPI_Abort): for a program that stops on an error
  /// while its peers may be waiting in a collective for it.
  [[noreturn]] void abort(int status) const {
    MPI_Abort(MPI_COMM_WORLD, status);
    std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] true if it ever does
  }

 private:
  bool owns_ = false;
  std::shared_ptr<MpiCommunicator> world_;
};

}  // namespace peft
