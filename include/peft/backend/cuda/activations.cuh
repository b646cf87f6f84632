#pragma once
// Bias + activation, fused: y = act(x + b) over x [rows, d] (b [d] fp32, may be null), with
// act GELU (tanh approximation, GPT-2's "gelu_new") or SiLU, as peft/core/ops/elementwise.hpp.
// Backward recomputes act'(x + b) from the saved pre-activation x instead of storing it:
//   dx = dy · act'(x + b)   (written, or added with accumulate; dx may be dy itself)
//   db += Σ_rows dx         (two-stage column sums, deterministic)
#include <cstdint>

#include "peft/backend/cuda/memory.cuh"
#include "peft/backend/cuda/norms.cuh"

namespace peft::cuda {

enum class Activation { GeluTanh, Silu };

namespace detail {

template <Activation kAct>
__device__ inline float activation_value(float z) {
  if constexpr (kAct == Activation::GeluTanh) {
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    return 0.5f * z * (1.f + tanhf(u));
  } else {
    return z / (1.f + expf(-z));
  }
}

template <Activation kAct>
__device__ inline float activation_derivative(float z) {
  if constexpr (kAct == Activation::GeluTanh) {
    const float k0 = 0.7978845608028654f;
    const float t = tanhf(k0 * (z + 0.044715f * z * z * z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * k0 * (1.f + 3.f * 0.044715f * z * z);
  } else {
    const float sig = 1.f / (1.f + expf(-z));
    return sig * (1.f + z * (1.f - sig));
  }
}

template <class T, Activation kAct>
__global__ void bias_activation_forward_kernel(const T* x, const float* __restrict__ b, T* y,
                                               std::int64_t rows, std::int64_t d) {
  const std::int64_t total = rows * d;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float z = to_float(x[i]) + (b ? b[i % d] : 0.f);
    y[i] = from_float<T>(activation_value<kAct>(z));
  }
}

// Not __restrict__: dx may be dy (each element is read before it is written, by one thread).
template <class T, Activation kAct>
__global__ void bias_activation_backward_kernel(const T* dy, const T* __restrict__ x,
                                                const float* __restrict__ b, T* dx, bool accumulate,
                                                std::int64_t rows, std::int64_t d) {
  const std::int64_t total = rows * d;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float z = to_float(x[i]) + (b ? b[i % d] : 0.f);
    float v = to_float(dy[i]) * activation_derivative<kAct>(z);
    if (accumulate) v += to_float(dx[i]);
    dx[i] = from_float<T>(v);
  }
}

template <class T, Activation kAct>
__global__ void bias_activation_db_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                  const float* __restrict__ b,
                                                  float* __restrict__ partial, std::int64_t rows,
                                                  std::int64_t d) {
  __shared__ float sums[kColumnRowLanes][kColumnTile + 1];
  const std::int64_t c = std::int64_t(blockIdx.x) * kColumnTile + threadIdx.x;
  const std::int64_t r0 = std::int64_t(blockIdx.y) * kColumnRowsPerSplit;
  const std::int64_t r1 = r0 + kColumnRowsPerSplit < rows ? r0 + kColumnRowsPerSplit : rows;
  float acc = 0.f;
  if (c < d) {
    const float bc = b ? b[c] : 0.f;
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kColumnRowLanes)
      acc = fmaf(to_float(dy[r * d + c]), activation_derivative<kAct>(to_float(x[r * d + c]) + bc),
                 acc);
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    for (int j = 1; j < kColumnRowLanes; ++j) acc += sums[j][threadIdx.x];
    partial[std::int64_t(blockIdx.y) * d + c] = acc;
  }
}

inline unsigned elementwise_blocks(std::int64_t total) {
  const std::int64_t blocks = (total + 255) / 256;
  return static_cast<unsigned>(blocks < 8192 ? (blocks > 0 ? blocks : 1) : 8192);
}

}  // namespace detail

/// y = act(x + b). x, y [rows, d] (may be the same buffer); b [d] or null.
template <Activation kAct, class T>
void bias_activation_forward(const T* x, const float* b, T* y, std::int64_t rows, std::int64_t d,
                             cudaStream_t stream = nullptr) {
  if (rows * d <= 0) return;
  detail::bias_activation_forward_kernel<T, kAct>
      <<<detail::elementwise_blocks(rows * d), 256, 0, stream>>>(x, b, y, rows, d);
  PEFT_CUDA_CHECK_LAUNCH("bias_activation_forward_kernel");
}

/// dx = (or += with accumulate) dy · act'(x + b); db += Σ_rows dy · act'(x + b) (db may be
/// null). x is the saved pre-activation. dx may be dy.
template <Activation kAct, class T>
void bias_activation_backward(const T* dy, const T* x, const float* b, T* dx, bool accumulate,
                              float* db, std::int64_t rows, std::int64_t d,
                              cudaStream_t stream = nullptr) {
  if (rows * d <= 0) return;
  if (db) {  // before dx: dx may overwrite dy
    const int splits = static_cast<int>(detail::blocks_for(rows, detail::kColumnRowsPerSplit));
    float* partial = nullptr;
    PEFT_CUDA_CHECK(cudaMallocAsync(&partial, sizeof(float) * splits * d, stream));
    detail::bias_activation_db_partial_kernel<T, kAct>
        <<<dim3(detail::blocks_for(d, detail::kColumnTile), splits),
           dim3(detail::kColumnTile, detail::kColumnRowLanes), 0, stream>>>(dy, x, b, partial, rows,
                                                                            d);
    PEFT_CUDA_CHECK_LAUNCH("bias_activation_db_partial_kernel");
    detail::column_sum_finish_kernel<<<detail::blocks_for(d, 256), 256, 0, stream>>>(partial,
                                                                                     splits, d, db);
    PEFT_CUDA_CHECK_LAUNCH("column_sum_finish_kernel");
    PEFT_CUDA_CHECK(cudaFreeAsync(partial, stream));
  }
  if (dx) {
    detail::bias_activation_backward_kernel<T, kAct>
        <<<detail::elementwise_blocks(rows * d), 256, 0, stream>>>(dy, x, b, dx, accumulate, rows,
                                                                   d);
    PEFT_CUDA_CHECK_LAUNCH("bias_activation_backward_kernel");
  }
}

}  // namespace peft::cuda
