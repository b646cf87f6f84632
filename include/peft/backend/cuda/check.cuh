#pragma once
// Status checks for every CUDA runtime and cuBLAS call. A failed call throws peft::CudaError
// naming the call, the file and line, and the library's own description of the status, so a
// failure far from its cause (an asynchronous kernel fault) is still reported, never ignored.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "peft/core/error.hpp"

namespace peft {

/// A CUDA runtime or cuBLAS call returned an error status.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace cuda::detail {

[[noreturn]] inline void throw_cuda_error(const char* library, const std::string& status,
                                          const char* call, const char* file, int line) {
  throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + library + " call `" +
                  call + "` failed: " + status);
}

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess)
    throw_cuda_error(
        "CUDA", std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")",
        call, file, line);
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw_cuda_error("cuBLAS", cublasGetStatusString(status), call, file, line);
}

}  // namespace cuda::detail

namespace cuda {

/// Number of usable CUDA devices; 0 where there is no driver or no GPU (never throws, so code
/// can ask before it decides to skip).
inline int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" status for later calls
    return 0;
  }
  return count;
}

}  // namespace cuda
}  // namespace peft

/// Checks a CUDA runtime call: PEFT_CUDA_CHECK(cudaMemcpy(...)).
#define PEFT_CUDA_CHECK(call) ::peft::cuda::detail::check_cuda((call), #call, __FILE__, __LINE__)
/// Checks a cuBLAS call.
#define PEFT_CUBLAS_CHECK(call) \
  ::peft::cuda::detail::check_cublas((call), #call, __FILE__, __LINE__)
/// Checks the launch just made (bad configuration, no kernel image for this device).
#define PEFT_CUDA_CHECK_LAUNCH(kernel_name) \
  ::peft::cuda::detail::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
