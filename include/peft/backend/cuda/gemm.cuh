#pragma once
// Row-major matrix products through cuBLAS.
//
// cuBLAS is column-major; a row-major matrix X [rows, cols] with leading dimension ld is the
// column-major matrix Xᵀ. So the row-major C = op(A) op(B) is computed as the column-major
// Cᵀ = op(B)ᵀ op(A)ᵀ: the same transpose flags, the operands swapped, m and n swapped.
//
// Precision: fp32 products use CUBLAS_COMPUTE_32F_PEDANTIC (no TF32, no reduced-precision
// tricks), so they can be held to fp32 tolerances against a CPU reference. bf16 products take
// bf16 operands, accumulate in fp32 (CUBLAS_COMPUTE_32F) and write bf16 or fp32.
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "peft/backend/cuda/check.cuh"
#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

/// One cuBLAS handle bound to a stream. Pointer mode host: alpha and beta are host floats.
class Cublas {
 public:
  explicit Cublas(cudaStream_t stream = nullptr) {
    PEFT_CUBLAS_CHECK(cublasCreate(&handle_));
    PEFT_CUBLAS_CHECK(cublasSetStream(handle_, stream));
    PEFT_CUBLAS_CHECK(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST));
  }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
  ~Cublas() {
    if (handle_) (void)cublasDestroy(handle_);
  }
  cublasHandle_t get() const { return handle_; }
  void set_stream(cudaStream_t stream) { PEFT_CUBLAS_CHECK(cublasSetStream(handle_, stream)); }

 private:
  cublasHandle_t handle_ = nullptr;
};

template <class T>
struct CudaDataType;
template <>
struct CudaDataType<float> {
  static constexpr cudaDataType_t value = CUDA_R_32F;
};
template <>
struct CudaDataType<bf16> {
  static constexpr cudaDataType_t value = CUDA_R_16BF;
};

/// C [m, n] = alpha · op(A) op(B) + beta · C, all row-major. op(A) is [m, k]: A is [m, k]
/// (lda ≥ k) or, transposed, [k, m] (lda ≥ m); likewise op(B) [k, n].
/// TA, TB: float or bf16 (both the same); TC: float or bf16. fp32 operands use the pedantic
/// fp32 compute type; bf16 operands accumulate in fp32.
template <class TA, class TB, class TC>
void gemm(const Cublas& blas, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
          std::int64_t k, float alpha, const TA* a, std::int64_t lda, const TB* b, std::int64_t ldb,
          float beta, TC* c, std::int64_t ldc) {
  static_assert(std::is_same_v<TA, TB>, "peft::cuda::gemm: both operands share one type");
  constexpr cublasComputeType_t compute =
      std::is_same_v<TA, float> ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
  if (m == 0 || n == 0) return;
  PEFT_CUBLAS_CHECK(
      cublasGemmEx(blas.get(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                   trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                   static_cast<int>(k), &alpha, b, CudaDataType<TB>::value, static_cast<int>(ldb),
                   a, CudaDataType<TA>::value, static_cast<int>(lda), &beta, c,
                   CudaDataType<TC>::value, static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

/// y [n, out] = x [n, in] · Wᵀ (W [out, in], the torch Linear layout) + beta · y.
template <class T, class TC>
void linear(const Cublas& blas, std::int64_t n, std::int64_t in, std::int64_t out, const T* x,
            const T* w, TC* y, float beta = 0.f) {
  gemm(blas, false, true, n, out, in, 1.f, x, in, w, in, beta, y, out);
}

}  // namespace peft::cuda
