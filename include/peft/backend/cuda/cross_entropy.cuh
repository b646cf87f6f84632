#pragma once
// Cross-entropy over logits [rows, V] with integer targets, torch's semantics as in
// peft/core/ops/loss.hpp: the mean over counted rows of lse(logits_n) − logits_n[target_n];
// a row whose target is −100 is not counted; NaN when no row is. A target outside [0, V) (other
// than −100) makes that row's loss NaN, so the mean is NaN rather than silently wrong.
// Backward keeps each row's log-sum-exp and writes dlogits = dloss/count · (softmax − onehot),
// zero on ignored rows; it may overwrite the logits in place.
#include <cmath>
#include <cstdint>

#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

inline constexpr std::int64_t kIgnoreIndex = -100;

namespace detail {

inline constexpr int kCrossEntropyThreads = 512;

// Block per row: row_loss[n] and lse[n] (0 for an ignored row).
template <class T>
__global__ void cross_entropy_rows_kernel(const T* __restrict__ logits,
                                          const std::int64_t* __restrict__ targets,
                                          float* __restrict__ row_loss, float* __restrict__ lse,
                                          std::int64_t vocab) {
  __shared__ float scratch[32];
  const std::int64_t n = blockIdx.x;
  const std::int64_t target = targets[n];
  if (target == kIgnoreIndex) {
    if (threadIdx.x == 0) row_loss[n] = lse[n] = 0.f;
    return;
  }
  const T* row = logits + n * vocab;
  float mx = -INFINITY;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, to_float(row[v]));
  mx = block_max(mx, scratch);
  float sum = 0.f;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) sum += expf(to_float(row[v]) - mx);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    const float l = mx + logf(sum);
    lse[n] = l;
    row_loss[n] = (target >= 0 && target < vocab) ? l - to_float(row[target]) : NAN;
  }
}

// One block: loss[0] = Σ row_loss / count (fixed summation order), count[0] = counted rows.
template <class Unused = void>
__global__ void cross_entropy_mean_kernel(const float* __restrict__ row_loss,
                                          const std::int64_t* __restrict__ targets,
                                          std::int64_t rows, float* __restrict__ loss,
                                          float* __restrict__ count_out) {
  __shared__ float scratch[32];
  float sum = 0.f, count = 0.f;
  for (std::int64_t n = threadIdx.x; n < rows; n += blockDim.x) {
    if (targets[n] == kIgnoreIndex) continue;
    sum += row_loss[n];
    count += 1.f;
  }
  sum = block_sum(sum, scratch);
  count = block_sum(count, scratch);
  if (threadIdx.x == 0) {
    loss[0] = count > 0.f ? sum / count : NAN;
    count_out[0] = count;
  }
}

// Not __restrict__: dlogits may be the logits.
template <class T>
__global__ void cross_entropy_backward_kernel(const T* logits,
                                              const std::int64_t* __restrict__ targets,
                                              const float* __restrict__ lse,
                                              const float* __restrict__ dloss,
                                              const float* __restrict__ count, T* dlogits,
                                              bool accumulate, std::int64_t vocab) {
  const std::int64_t n = blockIdx.x;
  const std::int64_t target = targets[n];
  const T* row = logits + n * vocab;
  T* out = dlogits + n * vocab;
  const bool ignored = target == kIgnoreIndex;
  const float g = ignored ? 0.f : dloss[0] / count[0];
  const float l = lse[n];
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    float d = ignored ? 0.f : g * (expf(to_float(row[v]) - l) - (v == target ? 1.f : 0.f));
    if (accumulate) d += to_float(out[v]);
    out[v] = from_float<T>(d);
  }
}

}  // namespace detail

/// Forward. logits [rows, V]; targets [rows] (device, int64). Writes lse [rows] and
/// row_loss [rows] (scratch the backward does not need), loss [1] and count [1] (fp32).
template <class T>
void cross_entropy_forward(const T* logits, const std::int64_t* targets, std::int64_t rows,
                           std::int64_t vocab, float* row_loss, float* lse, float* loss,
                           float* count, cudaStream_t stream = nullptr) {
  if (rows > 0) {
    detail::cross_entropy_rows_kernel<T>
        <<<static_cast<unsigned>(rows), detail::kCrossEntropyThreads, 0, stream>>>(
            logits, targets, row_loss, lse, vocab);
    PEFT_CUDA_CHECK_LAUNCH("cross_entropy_rows_kernel");
  }
  detail::cross_entropy_mean_kernel<<<1, 1024, 0, stream>>>(row_loss, targets, rows, loss, count);
  PEFT_CUDA_CHECK_LAUNCH("cross_entropy_mean_kernel");
}

/// Backward. dloss [1] (device) is dL/dloss; count and lse from the forward. dlogits = (or +=
/// with accumulate) the gradient; dlogits may be logits (the logits are then consumed).
template <class T>
void cross_entropy_backward(const T* logits, const std::int64_t* targets, std::int64_t rows,
                            std::int64_t vocab, const float* lse, const float* dloss,
                            const float* count, T* dlogits, bool accumulate,
                            cudaStream_t stream = nullptr) {
  if (rows <= 0) return;
  detail::cross_entropy_backward_kernel<T>
      <<<static_cast<unsigned>(rows), detail::kCrossEntropyThreads, 0, stream>>>(
          logits, targets, lse, dloss, count, dlogits, accumulate, vocab);
  PEFT_CUDA_CHECK_LAUNCH("cross_entropy_backward_kernel");
}

}  // namespace peft::cuda
