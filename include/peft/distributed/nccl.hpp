#pragma once
// NCCL as the data-parallel transport of GPU buffers (docs/distributed.md, "GPUs"): a
// Communicator (train/data_parallel.hpp) whose spans are device memory, one rank per GPU,
// bootstrapped over MPI (rank 0 makes the NCCL id, MPI_Bcast sends it to the others). Sums are
// ncclAllReduce with ncclSum on the communicator's stream, synchronised before returning, so the
// contract's "in place, the result on return" holds.
//
// Opt-in and for CUDA builds: needs <nccl.h>, <cuda_runtime.h>, <mpi.h> and linking NCCL, the
// CUDA runtime and MPI. Status: it compiles against CUDA 13's NCCL (tests/cuda/nccl_compile.cu);
// it has not run here: the GPU machine lent to this project has one GPU, and the trainer's GPU
// path (every method on CUDA through the one Decoder) is not built yet, so nothing hands it
// device gradients today. Untested across GPUs.
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <span>
#include <string>

#include "peft/distributed/mpi.hpp"

namespace peft {

class NcclCommunicator {
 public:
  /// One rank per GPU of `comm`'s job: this rank uses device `device` (e.g. the node-local rank).
  NcclCommunicator(MPI_Comm comm, int device) {
    detail::check_mpi(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank", -1);
    detail::check_mpi(MPI_Comm_size(comm, &size_), "MPI_Comm_size", rank_);
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id{};
    if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    detail::check_mpi(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, comm), "MPI_Bcast", rank_);
    check_nccl(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  ~NcclCommunicator() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  /// `x` is device memory.
  void all_reduce_sum(std::span<float> x) { sum(x.data(), x.size(), ncclFloat32); }
  void all_reduce_sum(std::span<double> x) { sum(x.data(), x.size(), ncclFloat64); }
  void barrier() {
    // A one-element sum: returns once every rank has joined it.
    float* one = nullptr;
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&one), sizeof(float), stream_),
               "cudaMallocAsync");
    check_cuda(cudaMemsetAsync(one, 0, sizeof(float), stream_), "cudaMemsetAsync");
    sum(one, 1, ncclFloat32);
    check_cuda(cudaFreeAsync(one, stream_), "cudaFreeAsync");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  cudaStream_t stream() const { return stream_; }

 private:
  void sum(void* data, std::size_t count, ncclDataType_t type) {
    check_nccl(ncclAllReduce(data, data, count, type, ncclSum, comm_, stream_), "ncclAllReduce");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  void check_nccl(ncclResult_t r, const char* call) const {
    if (r != ncclSuccess)
      throw DistributedError(std::string(call) + " failed on rank " + std::to_string(rank_) +
                             ": " + ncclGetErrorString(r));
  }
  void check_cuda(cudaError_t e, const char* call) const {
    if (e != cudaSuccess)
      throw DistributedError(std::string(call) + " failed on rank " + std::to_string(rank_) +
                             ": " + cudaGetErrorString(e));
  }
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

static_assert(Communicator<NcclCommunicator>);

}  // namespace peft
