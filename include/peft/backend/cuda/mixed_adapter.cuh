#pragma once
// Mixed-adapter batches (Punica's BGMV): one base model, a stack of LoRA adapters, and a batch
// in which each row (request) uses its own adapter:
//
//   y_i = x_i Wᵀ + s · (x_i A_{idx_i}ᵀ) B_{idx_i}ᵀ
//
// The base product runs once for the whole batch (cuBLAS). The low-rank part is two
// memory-bound kernels that read each row's adapter directly from the stack: `shrink`
// h_i = A_{idx_i} x_i ([M, r], fp32) and `expand` y_i += s · B_{idx_i} h_i. No gather of
// adapter copies, no per-adapter loop, no sort: rows that share an adapter re-read it from L2.
// A row whose index is negative gets no adapter (its y is the base output).
#include <cstdint>
#include <string>

#include "peft/backend/cuda/gemm.cuh"
#include "peft/backend/cuda/memory.cuh"
#include "peft/backend/cuda/vector_load.cuh"

namespace peft::cuda {

struct MixedAdapterDims {
  std::int64_t rows = 0;      ///< M: requests (rows of x)
  std::int64_t in = 0;        ///< K
  std::int64_t out = 0;       ///< N
  std::int64_t rank = 0;      ///< r (every adapter of the stack has this rank)
  std::int64_t adapters = 0;  ///< size of the stack

  void validate() const {
    if (rows < 0 || in <= 0 || out <= 0 || rank <= 0 || rank > 1024 || adapters <= 0)
      throw ShapeError("mixed_adapter (CUDA): rows " + std::to_string(rows) + ", in " +
                       std::to_string(in) + ", out " + std::to_string(out) + ", rank " +
                       std::to_string(rank) + ", adapters " + std::to_string(adapters) +
                       ": sizes must be positive, rank at most 1024");
  }
};

namespace detail {

inline constexpr int kShrinkWarps = 4;  // ranks per block of the shrink kernel

// Block (row i, rank group): warp w computes h[i, k] = A[idx_i, k, :] · x_i for one rank k.
template <class T, bool kVectorized>
__global__ void mixed_adapter_shrink_kernel(const T* __restrict__ x, const T* __restrict__ a_stack,
                                            const std::int32_t* __restrict__ index,
                                            float* __restrict__ h, MixedAdapterDims d) {
  const std::int64_t i = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const std::int64_t k = std::int64_t(blockIdx.y) * kShrinkWarps + threadIdx.x / 32;
  if (k >= d.rank) return;
  const std::int32_t adapter = index[i];
  if (adapter < 0 || adapter >= d.adapters) {
    if (lane == 0) h[i * d.rank + k] = 0.f;
    return;
  }
  const T* xi = x + i * d.in;
  const T* ak = a_stack + (std::int64_t(adapter) * d.rank + k) * d.in;
  float acc = 0.f;
  if constexpr (kVectorized) {
    constexpr int kW = kVectorWidth<T>;
    for (std::int64_t c = std::int64_t(lane) * kW; c < d.in; c += 32 * kW) {
      float xv[kW], av[kW];
      load_vector(xi + c, xv);
      load_vector(ak + c, av);
#pragma unroll
      for (int j = 0; j < kW; ++j) acc = fmaf(xv[j], av[j], acc);
    }
  } else {
    for (std::int64_t c = lane; c < d.in; c += 32)
      acc = fmaf(to_float(xi[c]), to_float(ak[c]), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) h[i * d.rank + k] = acc;
}

// Block (column tile, row i): thread n adds s · B[idx_i, n, :] · h_i to y[i, n].
template <class T, bool kVectorized>
__global__ void mixed_adapter_expand_kernel(const float* __restrict__ h,
                                            const T* __restrict__ b_stack,
                                            const std::int32_t* __restrict__ index, float scale,
                                            T* __restrict__ y, MixedAdapterDims d) {
  extern __shared__ float h_row[];  // [r]
  const std::int64_t i = blockIdx.y;
  const std::int32_t adapter = index[i];
  if (adapter < 0 || adapter >= d.adapters) return;  // uniform over the block: no barrier skipped
  for (int k = threadIdx.x; k < d.rank; k += blockDim.x) h_row[k] = h[i * d.rank + k];
  __syncthreads();
  const std::int64_t n = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= d.out) return;
  const T* bn = b_stack + (std::int64_t(adapter) * d.out + n) * d.rank;
  float acc = 0.f;
  if constexpr (kVectorized) {
    constexpr int kW = kVectorWidth<T>;
    for (std::int64_t k = 0; k < d.rank; k += kW) {
      float bv[kW];
      load_vector(bn + k, bv);
#pragma unroll
      for (int j = 0; j < kW; ++j) acc = fmaf(bv[j], h_row[k + j], acc);
    }
  } else {
    for (std::int64_t k = 0; k < d.rank; ++k) acc = fmaf(to_float(bn[k]), h_row[k], acc);
  }
  T* yi = y + i * d.out;
  yi[n] = from_float<T>(to_float(yi[n]) + scale * acc);
}

}  // namespace detail

/// h [M, r] (fp32) = per row i, A_{idx_i} x_i. x [M, K]; a_stack [adapters, r, K]; index [M].
template <class T>
void mixed_adapter_shrink(const MixedAdapterDims& d, const T* x, const T* a_stack,
                          const std::int32_t* index, float* h, cudaStream_t stream = nullptr) {
  d.validate();
  if (d.rows == 0) return;
  const dim3 grid(
      static_cast<unsigned>(d.rows),
      static_cast<unsigned>((d.rank + detail::kShrinkWarps - 1) / detail::kShrinkWarps));
  const dim3 block(32 * detail::kShrinkWarps);
  if (detail::vector_aligned(x, d.in) && detail::vector_aligned(a_stack, d.in))
    detail::mixed_adapter_shrink_kernel<T, true>
        <<<grid, block, 0, stream>>>(x, a_stack, index, h, d);
  else
    detail::mixed_adapter_shrink_kernel<T, false>
        <<<grid, block, 0, stream>>>(x, a_stack, index, h, d);
  PEFT_CUDA_CHECK_LAUNCH("mixed_adapter_shrink_kernel");
}

/// y [M, N] += s · h_i B_{idx_i}ᵀ per row. b_stack [adapters, N, r].
template <class T>
void mixed_adapter_expand(const MixedAdapterDims& d, const float* h, const T* b_stack,
                          const std::int32_t* index, float scale, T* y,
                          cudaStream_t stream = nullptr) {
  d.validate();
  if (d.rows == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid(detail::blocks_for(d.out, kThreads), static_cast<unsigned>(d.rows));
  const std::size_t shared = static_cast<std::size_t>(d.rank) * sizeof(float);
  if (detail::vector_aligned(b_stack, d.rank))
    detail::mixed_adapter_expand_kernel<T, true>
        <<<grid, kThreads, shared, stream>>>(h, b_stack, index, scale, y, d);
  else
    detail::mixed_adapter_expand_kernel<T, false>
        <<<grid, kThreads, shared, stream>>>(h, b_stack, index, scale, y, d);
  PEFT_CUDA_CHECK_LAUNCH("mixed_adapter_expand_kernel");
}

/// The whole layer: y = x Wᵀ (W [N, K], cuBLAS), then shrink and expand on blas's stream.
/// h: scratch [M, r] fp32.
template <class T>
void mixed_adapter_linear(const Cublas& blas, cudaStream_t stream, const MixedAdapterDims& d,
                          const T* x, const T* w, const T* a_stack, const T* b_stack,
                          const std::int32_t* index, float scale, float* h, T* y) {
  d.validate();
  linear(blas, d.rows, d.in, d.out, x, w, y);
  mixed_adapter_shrink(d, x, a_stack, index, h, stream);
  mixed_adapter_expand(d, h, b_stack, index, scale, y, stream);
}

}  // namespace peft::cuda
