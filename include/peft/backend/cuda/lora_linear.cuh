#pragma once
// The fused LoRA linear on the GPU: y = x Wᵀ + s·(x Aᵀ) Bᵀ, and its backward, with the
// low-rank path folded into the one full-size product ("augmented operands").
//
// With R = r rounded up to a multiple of 8 (cuBLAS wants 16-byte aligned leading dimensions):
//
//   w_aug  [N + R, K + R] = [[ W, s·B ],      x_aug  [M, K + R] = [ x | h ],  h = x Aᵀ
//                            [ A,  0   ]]     gy_aug [M, N + R] = [ dy | g ],  g = dy (s·B)
//
// forward:   h  = x Aᵀ                     (a thin product, reading x once)
//            y  = x_aug · w_aug[:N, :]ᵀ    (= x Wᵀ + s h Bᵀ: one product, K + R deep)
// backward:  g  = dy (s·B)                 (thin, reads dy once)
//            dx = gy_aug · w_aug[:, :K]    (= dy W + g A: one product, N + R deep)
//            dA += gᵀ x,  dB += s·dyᵀ h    (thin, fp32 results)
//
// So there is no full-size temporary and no second pass over y or dx: the extra work is R/K of
// the base product plus one read of x (forward) or of dy and x (backward). h stays in x_aug for
// backward, so nothing else is saved. The price is a layout contract: the caller allocates x
// (and dy) with R spare columns per row, which the op before the linear writes around.
//
// W is frozen: no dW is ever formed. A and B are trainable and kept in fp32 (with fp32
// gradients); `lora_pack_adapter` rounds them into w_aug (bf16 for a bf16 layer) after each
// optimizer step, which costs (N + K)·r element copies.
#include <cstdint>
#include <string>

#include "peft/backend/cuda/gemm.cuh"
#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

/// The sizes of one LoRA linear and the leading dimensions of its augmented operands.
struct LoraLinearDims {
  std::int64_t tokens = 0;  ///< M: rows of x
  std::int64_t in = 0;      ///< K: input features
  std::int64_t out = 0;     ///< N: output features
  std::int64_t rank = 0;    ///< r

  __host__ __device__ std::int64_t rank_padded() const { return (rank + 7) / 8 * 8; }
  __host__ __device__ std::int64_t x_ld() const {
    return in + rank_padded();
  }  ///< x_aug [M, K + R]
  __host__ __device__ std::int64_t w_ld() const {
    return in + rank_padded();
  }  ///< w_aug [N + R, K + R]
  __host__ __device__ std::int64_t w_rows() const { return out + rank_padded(); }
  __host__ __device__ std::int64_t gy_ld() const {
    return out + rank_padded();
  }  ///< gy_aug [M, N + R]

  void validate() const {
    // Any positive sizes are correct; K and N multiples of 8 keep every row 16-byte aligned,
    // which cuBLAS needs for its tensor-core kernels with bf16.
    if (tokens < 0 || in <= 0 || out <= 0 || rank <= 0)
      throw ShapeError("lora_linear (CUDA): tokens " + std::to_string(tokens) + ", in " +
                       std::to_string(in) + ", out " + std::to_string(out) + ", rank " +
                       std::to_string(rank) + ": sizes must be positive");
  }
};

namespace detail {

// w_aug[:N, :K] = W (converted), w_aug[N:, K:] = 0.
template <class TW, class T>
__global__ void lora_pack_base_kernel(const TW* __restrict__ w, T* __restrict__ w_aug,
                                      LoraLinearDims d) {
  const std::int64_t total = d.out * d.in + d.rank_padded() * d.rank_padded();
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    if (i < d.out * d.in) {
      const std::int64_t row = i / d.in, col = i % d.in;
      w_aug[row * d.w_ld() + col] = from_float<T>(to_float(w[i]));
    } else {
      const std::int64_t j = i - d.out * d.in, R = d.rank_padded();
      w_aug[(d.out + j / R) * d.w_ld() + d.in + j % R] = from_float<T>(0.f);
    }
  }
}

// w_aug[:N, K:] = s·B (columns ≥ r zero), w_aug[N:, :K] = A (rows ≥ r zero).
template <class T>
__global__ void lora_pack_adapter_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                         float scale, T* __restrict__ w_aug, LoraLinearDims d) {
  const std::int64_t R = d.rank_padded();
  const std::int64_t b_part = d.out * R, total = b_part + R * d.in;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    if (i < b_part) {
      const std::int64_t row = i / R, k = i % R;
      const float v = k < d.rank ? scale * b[row * d.rank + k] : 0.f;
      w_aug[row * d.w_ld() + d.in + k] = from_float<T>(v);
    } else {
      const std::int64_t j = i - b_part, k = j / d.in, col = j % d.in;
      const float v = k < d.rank ? a[k * d.in + col] : 0.f;
      w_aug[(d.out + k) * d.w_ld() + col] = from_float<T>(v);
    }
  }
}

inline unsigned grid_stride_blocks(std::int64_t total) {
  const std::int64_t blocks = (total + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

}  // namespace detail

/// Copies the frozen base weight W [N, K] (TW: float or bf16) into w_aug and zeroes its
/// bottom-right block. Once per model load.
template <class TW, class T>
void lora_pack_base(const LoraLinearDims& d, const TW* w, T* w_aug, cudaStream_t stream = nullptr) {
  d.validate();
  const std::int64_t total = d.out * d.in + d.rank_padded() * d.rank_padded();
  detail::lora_pack_base_kernel<<<detail::grid_stride_blocks(total), 256, 0, stream>>>(w, w_aug, d);
  PEFT_CUDA_CHECK_LAUNCH("lora_pack_base_kernel");
}

/// Writes the fp32 adapter (A [r, K], B [N, r], scale s) into w_aug, rounded to T. After every
/// optimizer step that changed A or B.
template <class T>
void lora_pack_adapter(const LoraLinearDims& d, const float* a, const float* b, float scale,
                       T* w_aug, cudaStream_t stream = nullptr) {
  d.validate();
  const std::int64_t total = d.rank_padded() * (d.out + d.in);
  detail::lora_pack_adapter_kernel<<<detail::grid_stride_blocks(total), 256, 0, stream>>>(
      a, b, scale, w_aug, d);
  PEFT_CUDA_CHECK_LAUNCH("lora_pack_adapter_kernel");
}

/// Forward. x_aug [M, K + R]: x in its first K columns; the op writes h into the other R.
/// y [M, N] = x Wᵀ + s (x Aᵀ) Bᵀ + beta·y. T: float (fp32 throughout, no TF32) or bf16 (fp32
/// accumulation). Both products run on blas's stream.
template <class T>
void lora_linear_forward(const Cublas& blas, const LoraLinearDims& d, T* x_aug, const T* w_aug,
                         T* y, float beta = 0.f) {
  d.validate();
  const std::int64_t R = d.rank_padded();
  // h = x Aᵀ into x_aug's spare columns (the zero rows of A past r give zero columns).
  gemm(blas, false, true, d.tokens, R, d.in, 1.f, x_aug, d.x_ld(), w_aug + d.out * d.w_ld(),
       d.w_ld(), 0.f, x_aug + d.in, d.x_ld());
  // y = [x | h] [W | s·B]ᵀ
  gemm(blas, false, true, d.tokens, d.out, d.in + R, 1.f, x_aug, d.x_ld(), w_aug, d.w_ld(), beta, y,
       d.out);
}

/// Backward. gy_aug [M, N + R]: dy in its first N columns; the op writes g = dy (s·B) into the
/// other R. x_aug as left by the forward (h inside).
///   dx = dy W + g A + dx_beta · dx   (skipped when dx is null)
///   dA += gᵀ x   [r, K] fp32         (skipped when da is null)
///   dB += s·dyᵀ h [N, r] fp32        (skipped when db is null)
template <class T>
void lora_linear_backward(const Cublas& blas, const LoraLinearDims& d, const T* x_aug,
                          const T* w_aug, T* gy_aug, float scale, T* dx, float dx_beta, float* da,
                          float* db) {
  d.validate();
  const std::int64_t R = d.rank_padded();
  if (dx || da)  // g = dy · (s·B): w_aug[:N, K:] is [N, R]
    gemm(blas, false, false, d.tokens, R, d.out, 1.f, gy_aug, d.gy_ld(), w_aug + d.in, d.w_ld(),
         0.f, gy_aug + d.out, d.gy_ld());
  if (dx)  // dx = [dy | g] [[W], [A]]
    gemm(blas, false, false, d.tokens, d.in, d.out + R, 1.f, gy_aug, d.gy_ld(), w_aug, d.w_ld(),
         dx_beta, dx, d.in);
  if (da)  // dA [r, K] += gᵀ x: only the first r columns of g
    gemm(blas, true, false, d.rank, d.in, d.tokens, 1.f, gy_aug + d.out, d.gy_ld(), x_aug, d.x_ld(),
         1.f, da, d.in);
  if (db)  // dB [N, r] += s dyᵀ h
    gemm(blas, true, false, d.out, d.rank, d.tokens, scale, gy_aug, d.gy_ld(), x_aug + d.in,
         d.x_ld(), 1.f, db, d.rank);
}

}  // namespace peft::cuda
