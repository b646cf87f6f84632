#pragma once
// DoRA's weight norm: n[o] = ‖W[o, :] + s · B[o, :] A‖₂ for every output feature o, the norm
// peft/core/ops/reparameterized.hpp's dora_linear takes (the reference's "weight_norm", a norm
// per row of the [out, in] weight). W [out, in] (float or bf16, frozen), A [r, in], B [out, r]
// fp32. The low-rank update is formed element by element in registers, never as an [out, in]
// matrix: a block takes kDoraRows rows, so each column of A is read once per kDoraRows rows.
#include <cstdint>
#include <string>

#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

namespace detail {

inline constexpr int kDoraRows = 8, kDoraThreads = 256;

template <class TW>
__global__ void dora_weight_norm_kernel(const TW* __restrict__ w, const float* __restrict__ a,
                                        const float* __restrict__ b, float scale,
                                        float* __restrict__ norm, std::int64_t out, std::int64_t in,
                                        std::int64_t rank) {
  extern __shared__ float b_rows[];  // [kDoraRows, rank], pre-scaled by s
  __shared__ float scratch[32];
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kDoraRows;
  for (std::int64_t j = threadIdx.x; j < kDoraRows * rank; j += blockDim.x) {
    const std::int64_t row = row0 + j / rank;
    b_rows[j] = row < out ? scale * b[row * rank + j % rank] : 0.f;
  }
  __syncthreads();
  float acc[kDoraRows] = {};
  for (std::int64_t c = threadIdx.x; c < in; c += blockDim.x) {
    float delta[kDoraRows] = {};
    for (std::int64_t k = 0; k < rank; ++k) {
      const float akc = a[k * in + c];
#pragma unroll
      for (int j = 0; j < kDoraRows; ++j) delta[j] = fmaf(b_rows[j * rank + k], akc, delta[j]);
    }
#pragma unroll
    for (int j = 0; j < kDoraRows; ++j) {
      if (row0 + j >= out) break;
      const float v = to_float(w[(row0 + j) * in + c]) + delta[j];
      acc[j] = fmaf(v, v, acc[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kDoraRows; ++j) {
    const float total = block_sum(acc[j], scratch);
    if (threadIdx.x == 0 && row0 + j < out) norm[row0 + j] = sqrtf(total);
  }
}

}  // namespace detail

/// norm [out] = ‖W + s B A‖ per row. W [out, in]; A [r, in]; B [out, r].
template <class TW>
void dora_weight_norm(const TW* w, const float* a, const float* b, float scale, float* norm,
                      std::int64_t out, std::int64_t in, std::int64_t rank,
                      cudaStream_t stream = nullptr) {
  if (out <= 0) return;
  if (in <= 0 || rank <= 0 || rank > 1024)
    throw ShapeError("dora_weight_norm (CUDA): in " + std::to_string(in) + ", rank " +
                     std::to_string(rank) + ": in must be positive, rank in [1, 1024]");
  const std::size_t shared = sizeof(float) * detail::kDoraRows * static_cast<std::size_t>(rank);
  detail::dora_weight_norm_kernel<TW>
      <<<detail::blocks_for(out, detail::kDoraRows), detail::kDoraThreads, shared, stream>>>(
          w, a, b, scale, norm, out, in, rank);
  PEFT_CUDA_CHECK_LAUNCH("dora_weight_norm_kernel");
}

}  // namespace peft::cuda
