// NcclCommunicator (include/peft/distributed/nccl.hpp) on the GPUs of an MPI job: every rank
// fills a device buffer with rank + 1, sums it in place, and checks N(N+1)/2 in every entry,
// for float and double, then meets the others at the barrier. Built with CUDA, MPI and NCCL;
// run as `mpirun -np N peft_nccl_smoke` (one GPU per rank: device = rank mod the GPU count).
// On the single-GPU machine lent to this project it can only run with N = 1.
#include <cstdio>
#include <vector>

#include "peft/distributed/nccl.hpp"

template <class T>
bool check_sum(peft::NcclCommunicator& nccl) {
  const std::size_t n = 1 << 20;
  std::vector<T> host(n, T(nccl.rank() + 1));
  T* device = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&device), n * sizeof(T)) != cudaSuccess) return false;
  cudaMemcpy(device, host.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  nccl.all_reduce_sum(std::span<T>(device, n));
  cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost);
  cudaFree(device);
  const T expected = T(nccl.size() * (nccl.size() + 1) / 2);
  for (const T x : host)
    if (x != expected) return false;
  return true;
}

int main(int argc, char** argv) {
  peft::MpiSession mpi(&argc, &argv);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 0;
  }
  try {
    peft::NcclCommunicator nccl(MPI_COMM_WORLD, mpi.rank() % devices);
    const bool ok = check_sum<float>(nccl) && check_sum<double>(nccl);
    nccl.barrier();
    std::printf("rank %d of %d: nccl sums %s\n", nccl.rank(), nccl.size(), ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft_nccl_smoke (rank %d): %s\n", mpi.rank(), e.what());
    return 1;
  }
}
