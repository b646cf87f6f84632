#pragma once
// LayerNorm and RMSNorm over the last dimension, forward and backward, matching
// peft/core/ops/normalization.hpp:
//   LayerNorm: y = (x − μ) · rstd · w + b,   rstd = 1 / √(mean((x − μ)²) + eps)
//   RMSNorm:   y = x · rstd · w,             rstd = 1 / √(mean(x²) + eps)
// x and y are T (float or bf16) [rows, d]; w, b and the statistics are fp32. One warp per row;
// the row is read from memory once per pass and the later passes hit L1.
// Backward keeps only μ and rstd per row, as the CPU op does, and rebuilds x̂ from x:
//   dx = rstd · (g w − mean(g w) − x̂ · mean(g w x̂))       (RMSNorm: no mean(g w) term)
//   dw += Σ_rows g x̂,  db += Σ_rows g                      (two-stage column sums: no atomics,
//                                                          so the result is deterministic)
#include <cstdint>
#include <string>

#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

namespace detail {

inline constexpr int kNormWarps = 8;

template <class T, bool kLayerNorm>
__global__ void norm_forward_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ b, float eps, T* __restrict__ y,
                                    float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                    std::int64_t rows, std::int64_t d) {
  const std::int64_t row = std::int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * d;
  float mean = 0.f;
  if constexpr (kLayerNorm) {
    float sum = 0.f;
    for (std::int64_t c = lane; c < d; c += 32) sum += to_float(xr[c]);
    mean = warp_sum(sum) / float(d);
  }
  float sq = 0.f;
  for (std::int64_t c = lane; c < d; c += 32) {
    const float v = to_float(xr[c]) - mean;
    sq = fmaf(v, v, sq);
  }
  const float rstd = rsqrtf(warp_sum(sq) / float(d) + eps);
  T* yr = y + row * d;
  for (std::int64_t c = lane; c < d; c += 32) {
    float v = (to_float(xr[c]) - mean) * rstd * w[c];
    if (b) v += b[c];
    yr[c] = from_float<T>(v);
  }
  if (lane == 0) {
    if (mean_out) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <class T, bool kLayerNorm>
__global__ void norm_backward_input_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                           const float* __restrict__ w,
                                           const float* __restrict__ mean_in,
                                           const float* __restrict__ rstd_in, T* __restrict__ dx,
                                           bool accumulate, std::int64_t rows, std::int64_t d) {
  const std::int64_t row = std::int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* gr = g + row * d;
  const T* xr = x + row * d;
  const float mean = kLayerNorm ? mean_in[row] : 0.f, rstd = rstd_in[row];
  float sum_gw = 0.f, sum_gwx = 0.f;
  for (std::int64_t c = lane; c < d; c += 32) {
    const float gw = to_float(gr[c]) * w[c];
    sum_gw += gw;
    sum_gwx = fmaf(gw, (to_float(xr[c]) - mean) * rstd, sum_gwx);
  }
  const float mean_gw = kLayerNorm ? warp_sum(sum_gw) / float(d) : 0.f;
  const float mean_gwx = warp_sum(sum_gwx) / float(d);
  T* dr = dx + row * d;
  for (std::int64_t c = lane; c < d; c += 32) {
    const float xhat = (to_float(xr[c]) - mean) * rstd;
    float v = rstd * (to_float(gr[c]) * w[c] - mean_gw - xhat * mean_gwx);
    if (accumulate) v += to_float(dr[c]);
    dr[c] = from_float<T>(v);
  }
}

inline constexpr int kColumnTile = 32, kColumnRowLanes = 8, kColumnRowsPerSplit = 64;

// partial[split, c] = Σ over the split's rows of g x̂ (and of g for the bias).
template <class T, bool kLayerNorm>
__global__ void norm_param_partial_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                          const float* __restrict__ mean_in,
                                          const float* __restrict__ rstd_in,
                                          float* __restrict__ partial_w,
                                          float* __restrict__ partial_b, std::int64_t rows,
                                          std::int64_t d) {
  __shared__ float sw[kColumnRowLanes][kColumnTile + 1], sb[kColumnRowLanes][kColumnTile + 1];
  const std::int64_t c = std::int64_t(blockIdx.x) * kColumnTile + threadIdx.x;
  const std::int64_t r0 = std::int64_t(blockIdx.y) * kColumnRowsPerSplit;
  const std::int64_t r1 = r0 + kColumnRowsPerSplit < rows ? r0 + kColumnRowsPerSplit : rows;
  float acc_w = 0.f, acc_b = 0.f;
  if (c < d) {
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kColumnRowLanes) {
      const float gv = to_float(g[r * d + c]);
      const float mean = kLayerNorm ? mean_in[r] : 0.f;
      acc_w = fmaf(gv, (to_float(x[r * d + c]) - mean) * rstd_in[r], acc_w);
      acc_b += gv;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    for (int j = 1; j < kColumnRowLanes; ++j) {
      acc_w += sw[j][threadIdx.x];
      acc_b += sb[j][threadIdx.x];
    }
    partial_w[std::int64_t(blockIdx.y) * d + c] = acc_w;
    if (partial_b) partial_b[std::int64_t(blockIdx.y) * d + c] = acc_b;
  }
}

// out[c] += Σ_split partial[split, c], summed in a fixed order. (A template only so that the
// header can be included by several translation units.)
template <class Unused = void>
__global__ void column_sum_finish_kernel(const float* __restrict__ partial, int splits,
                                         std::int64_t d, float* __restrict__ out) {
  const std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float acc = 0.f;
  for (int s = 0; s < splits; ++s) acc += partial[s * d + c];
  out[c] += acc;
}

template <class T, bool kLayerNorm>
void norm_forward(const T* x, const float* w, const float* b, float eps, T* y, float* mean,
                  float* rstd, std::int64_t rows, std::int64_t d, cudaStream_t stream) {
  if (rows <= 0) return;
  if (d <= 0) throw ShapeError("norm (CUDA): d = " + std::to_string(d));
  norm_forward_kernel<T, kLayerNorm><<<blocks_for(rows, kNormWarps), 32 * kNormWarps, 0, stream>>>(
      x, w, b, eps, y, mean, rstd, rows, d);
  PEFT_CUDA_CHECK_LAUNCH("norm_forward_kernel");
}

template <class T, bool kLayerNorm>
void norm_backward(const T* g, const T* x, const float* w, const float* mean, const float* rstd,
                   T* dx, bool accumulate_dx, float* dw, float* db, std::int64_t rows,
                   std::int64_t d, cudaStream_t stream) {
  if (rows <= 0) return;
  if (dx) {
    norm_backward_input_kernel<T, kLayerNorm>
        <<<blocks_for(rows, kNormWarps), 32 * kNormWarps, 0, stream>>>(g, x, w, mean, rstd, dx,
                                                                       accumulate_dx, rows, d);
    PEFT_CUDA_CHECK_LAUNCH("norm_backward_input_kernel");
  }
  if (!dw && !db) return;
  const int splits = static_cast<int>(blocks_for(rows, kColumnRowsPerSplit));
  float* partial = nullptr;
  const std::size_t count = static_cast<std::size_t>(splits) * static_cast<std::size_t>(d);
  PEFT_CUDA_CHECK(cudaMallocAsync(&partial, 2 * count * sizeof(float), stream));
  norm_param_partial_kernel<T, kLayerNorm>
      <<<dim3(blocks_for(d, kColumnTile), splits), dim3(kColumnTile, kColumnRowLanes), 0, stream>>>(
          g, x, mean, rstd, partial, db ? partial + count : nullptr, rows, d);
  PEFT_CUDA_CHECK_LAUNCH("norm_param_partial_kernel");
  if (dw) {
    column_sum_finish_kernel<<<blocks_for(d, 256), 256, 0, stream>>>(partial, splits, d, dw);
    PEFT_CUDA_CHECK_LAUNCH("column_sum_finish_kernel");
  }
  if (db) {
    column_sum_finish_kernel<<<blocks_for(d, 256), 256, 0, stream>>>(partial + count, splits, d,
                                                                     db);
    PEFT_CUDA_CHECK_LAUNCH("column_sum_finish_kernel");
  }
  PEFT_CUDA_CHECK(cudaFreeAsync(partial, stream));
}

}  // namespace detail

/// y = LayerNorm(x) · w + b. x, y [rows, d]; w, b [d] (b may be null); mean, rstd [rows] out.
template <class T>
void layer_norm_forward(const T* x, const float* w, const float* b, float eps, T* y, float* mean,
                        float* rstd, std::int64_t rows, std::int64_t d,
                        cudaStream_t stream = nullptr) {
  detail::norm_forward<T, true>(x, w, b, eps, y, mean, rstd, rows, d, stream);
}

/// dx (= or += with accumulate_dx), dw +=, db += (each skipped when null). g = dL/dy.
template <class T>
void layer_norm_backward(const T* g, const T* x, const float* w, const float* mean,
                         const float* rstd, T* dx, bool accumulate_dx, float* dw, float* db,
                         std::int64_t rows, std::int64_t d, cudaStream_t stream = nullptr) {
  detail::norm_backward<T, true>(g, x, w, mean, rstd, dx, accumulate_dx, dw, db, rows, d, stream);
}

/// y = x · rstd · w. rstd [rows] out.
template <class T>
void rms_norm_forward(const T* x, const float* w, float eps, T* y, float* rstd, std::int64_t rows,
                      std::int64_t d, cudaStream_t stream = nullptr) {
  detail::norm_forward<T, false>(x, w, nullptr, eps, y, nullptr, rstd, rows, d, stream);
}

template <class T>
void rms_norm_backward(const T* g, const T* x, const float* w, const float* rstd, T* dx,
                       bool accumulate_dx, float* dw, std::int64_t rows, std::int64_t d,
                       cudaStream_t stream = nullptr) {
  detail::norm_backward<T, false>(g, x, w, nullptr, rstd, dx, accumulate_dx, dw, nullptr, rows, d,
                                  stream);
}

}  // namespace peft::cuda
