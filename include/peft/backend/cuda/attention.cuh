#pragma once
// Fused multi-head attention, forward and backward, fp32: softmax(Q Kᵀ/√D + mask) V with a
// causal mask (query t sees keys s ≤ query_offset + t), a key-padding mask and grouped-query
// heads, with peft/core/ops/attention.hpp's semantics (including: a query that sees no key
// attends uniformly to all S keys; its log-sum-exp is recorded as +inf).
//
// Layouts: q [B, T, H·D]; k, v [B, S, KV·D]; out [B, T, H·D]; lse [B, H, T]; key_visible
// [B·S] (1 = visible) or null. D ≤ 128.
//
// Forward: a warp per query row, online softmax over chunks of 32 keys that the block's warps
// share through shared memory (each lane scores one key of the chunk, so the row's max and sum
// need one warp reduction per chunk, not per key). The [T, S] probabilities never reach memory.
// Backward recomputes them from lse: one kernel for dq (a warp per query row, which also writes
// Dᵢ = dOᵢ·Oᵢ), one for dk and dv (a warp per key row, looping over the query heads it serves).
// No atomics, so results are deterministic.
#include <cmath>
#include <cstdint>
#include <string>

#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

struct AttentionDims {
  std::int64_t batch = 1;     ///< B
  std::int64_t queries = 1;   ///< T
  std::int64_t keys = 1;      ///< S
  std::int64_t heads = 1;     ///< H
  std::int64_t kv_heads = 1;  ///< KV; divides H
  std::int64_t head_dim = 1;  ///< D ≤ 128
  bool causal = true;
  std::int64_t query_offset = 0;

  void validate() const {
    if (batch < 0 || queries < 0 || keys <= 0 || heads <= 0 || kv_heads <= 0 ||
        heads % kv_heads != 0 || head_dim <= 0 || head_dim > 128)
      throw ShapeError("attention (CUDA): B " + std::to_string(batch) + ", T " +
                       std::to_string(queries) + ", S " + std::to_string(keys) + ", H " +
                       std::to_string(heads) + ", KV " + std::to_string(kv_heads) + ", D " +
                       std::to_string(head_dim) + ": needs KV | H and 1 ≤ D ≤ 128");
  }
};

namespace detail {

inline constexpr int kAttentionWarps = 8;
inline constexpr int kAttentionMaxDimPerLane = 4;  // D ≤ 128 = 32 lanes · 4

// First visible key of batch row b (S when none is); every lane gets it.
__device__ inline std::int64_t first_visible_key(const std::uint8_t* visible, std::int64_t b,
                                                 std::int64_t S) {
  if (!visible) return 0;
  const int lane = threadIdx.x % 32;
  for (std::int64_t s0 = 0; s0 < S; s0 += 32) {
    const bool seen = s0 + lane < S && visible[b * S + s0 + lane];
    const unsigned mask = __ballot_sync(0xffffffffu, seen);
    if (mask) return s0 + __ffs(mask) - 1;
  }
  return S;
}

// Whether query t sees any key (else it attends uniformly).
__device__ inline bool sees_any_key(std::int64_t first_visible, std::int64_t t,
                                    const AttentionDims& d) {
  return first_visible < d.keys && (!d.causal || first_visible <= d.query_offset + t);
}

// Loads rows [s0, s0 + 32) of head `head` of x [B, S, heads·D] into tile [32][stride] (rows past S
// are zero).
__device__ inline void load_key_tile(const float* x, std::int64_t b, std::int64_t s0,
                                     std::int64_t head, std::int64_t heads_total,
                                     const AttentionDims& d, float* tile, int stride) {
  const int D = static_cast<int>(d.head_dim);
  for (int e = threadIdx.x; e < 32 * D; e += blockDim.x) {
    const int j = e / D, c = e % D;
    const std::int64_t s = s0 + j;
    tile[j * stride + c] =
        s < d.keys ? x[((b * d.keys + s) * heads_total + head) * d.head_dim + c] : 0.f;
  }
}

}  // namespace detail
}  // namespace peft::cuda

// Kernels are templates (an unused parameter) so that the header can be included by several
// translation units without duplicate definitions.
namespace peft::cuda::detail {

template <class Unused = void>
__global__ void attention_forward_tkernel(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v,
                                          const std::uint8_t* __restrict__ visible,
                                          float* __restrict__ out, float* __restrict__ lse,
                                          AttentionDims d, float scale) {
  extern __shared__ float shared[];
  const int D = static_cast<int>(d.head_dim), stride = D + 1;  // +1: no bank conflicts
  float* k_tile = shared;                                      // [32][D + 1]
  float* v_tile = k_tile + 32 * stride;                        // [32][D]
  float* q_rows = v_tile + 32 * D;                             // [warps][D]
  __shared__ std::int64_t warp_end[kAttentionWarps];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t b = blockIdx.z, h = blockIdx.y;
  const std::int64_t t = std::int64_t(blockIdx.x) * kAttentionWarps + warp;
  const std::int64_t kvh = h / (d.heads / d.kv_heads);
  const bool row_valid = t < d.queries;
  const std::int64_t first_visible = first_visible_key(visible, b, d.keys);
  const bool uniform = row_valid && !sees_any_key(first_visible, t, d);
  std::int64_t my_end = 0;
  if (row_valid) {
    my_end = d.keys;
    if (!uniform && d.causal && d.query_offset + t + 1 < d.keys) my_end = d.query_offset + t + 1;
  }
  if (lane == 0) warp_end[warp] = my_end;
  float* q_row = q_rows + warp * D;
  for (int c = lane; c < D; c += 32)
    q_row[c] = row_valid ? scale * q[((b * d.queries + t) * d.heads + h) * D + c] : 0.f;
  __syncthreads();
  std::int64_t block_end = 0;
  for (int w = 0; w < kAttentionWarps; ++w)
    block_end = warp_end[w] > block_end ? warp_end[w] : block_end;

  float m = -INFINITY, l = 0.f, acc[kAttentionMaxDimPerLane] = {};
  for (std::int64_t s0 = 0; s0 < block_end; s0 += 32) {
    __syncthreads();  // the previous chunk is no longer read
    load_key_tile(k, b, s0, kvh, d.kv_heads, d, k_tile, stride);
    load_key_tile(v, b, s0, kvh, d.kv_heads, d, v_tile, D);
    __syncthreads();
    if (s0 >= my_end) continue;  // warp-uniform
    const std::int64_t s = s0 + lane;
    float score = -INFINITY;
    if (s < my_end) {
      if (uniform) {
        score = 0.f;
      } else if (!visible || visible[b * d.keys + s]) {
        const float* kr = k_tile + lane * stride;
        float dot = 0.f;
        for (int c = 0; c < D; ++c) dot = fmaf(q_row[c], kr[c], dot);
        score = dot;
      }
    }
    const float m_new = fmaxf(m, warp_max(score));
    if (m_new == -INFINITY) continue;  // nothing visible yet (warp-uniform)
    const float p = score == -INFINITY ? 0.f : __expf(score - m_new);
    const float correction = m == -INFINITY ? 0.f : __expf(m - m_new);
    l = l * correction + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kAttentionMaxDimPerLane; ++i) acc[i] *= correction;
    for (int j = 0; j < 32; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      if (pj == 0.f) continue;  // warp-uniform
#pragma unroll
      for (int i = 0; i < kAttentionMaxDimPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < D) acc[i] = fmaf(pj, v_tile[j * D + c], acc[i]);
      }
    }
    m = m_new;
  }
  if (!row_valid) return;
  float* out_row = out + ((b * d.queries + t) * d.heads + h) * D;
#pragma unroll
  for (int i = 0; i < kAttentionMaxDimPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < D) out_row[c] = acc[i] / l;
  }
  if (lane == 0) lse[(b * d.heads + h) * d.queries + t] = uniform ? INFINITY : m + logf(l);
}

// dq for one query row per warp, and delta[b, h, t] = dO·O.
template <class Unused = void>
__global__ void attention_backward_dq_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const std::uint8_t* __restrict__ visible, const float* __restrict__ out,
    const float* __restrict__ dout, const float* __restrict__ lse, float* __restrict__ delta,
    float* __restrict__ dq, bool accumulate, AttentionDims d, float scale) {
  extern __shared__ float shared[];
  const int D = static_cast<int>(d.head_dim), stride = D + 1;
  float* k_tile = shared;                         // [32][D + 1]
  float* v_tile = k_tile + 32 * stride;           // [32][D + 1]
  float* q_rows = v_tile + 32 * stride;           // [warps][D]
  float* do_rows = q_rows + kAttentionWarps * D;  // [warps][D]
  __shared__ std::int64_t warp_end[kAttentionWarps];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t b = blockIdx.z, h = blockIdx.y;
  const std::int64_t t = std::int64_t(blockIdx.x) * kAttentionWarps + warp;
  const std::int64_t kvh = h / (d.heads / d.kv_heads);
  const bool row_valid = t < d.queries;
  const std::int64_t row_offset = ((b * d.queries + t) * d.heads + h) * D;
  const std::int64_t stat = (b * d.heads + h) * d.queries + t;
  const float row_lse = row_valid ? lse[stat] : INFINITY;
  const bool uniform = row_lse == INFINITY;  // also true for rows past T: they do nothing
  std::int64_t my_end = 0;
  if (!uniform)
    my_end = d.causal && d.query_offset + t + 1 < d.keys ? d.query_offset + t + 1 : d.keys;
  if (lane == 0) warp_end[warp] = my_end;
  float* q_row = q_rows + warp * D;
  float* do_row = do_rows + warp * D;
  float di = 0.f;
  for (int c = lane; c < D; c += 32) {
    q_row[c] = row_valid ? q[row_offset + c] : 0.f;
    const float g = row_valid ? dout[row_offset + c] : 0.f;
    do_row[c] = g;
    di = fmaf(g, row_valid ? out[row_offset + c] : 0.f, di);
  }
  di = warp_sum(di);
  if (row_valid && lane == 0) delta[stat] = di;
  __syncthreads();
  std::int64_t block_end = 0;
  for (int w = 0; w < kAttentionWarps; ++w)
    block_end = warp_end[w] > block_end ? warp_end[w] : block_end;

  float acc[kAttentionMaxDimPerLane] = {};
  for (std::int64_t s0 = 0; s0 < block_end; s0 += 32) {
    __syncthreads();
    load_key_tile(k, b, s0, kvh, d.kv_heads, d, k_tile, stride);
    load_key_tile(v, b, s0, kvh, d.kv_heads, d, v_tile, stride);
    __syncthreads();
    if (s0 >= my_end) continue;
    const std::int64_t s = s0 + lane;
    float ds = 0.f;
    if (s < my_end && (!visible || visible[b * d.keys + s])) {
      const float* kr = k_tile + lane * stride;
      const float* vr = v_tile + lane * stride;
      float dot = 0.f, dp = 0.f;
      for (int c = 0; c < D; ++c) {
        dot = fmaf(q_row[c], kr[c], dot);
        dp = fmaf(do_row[c], vr[c], dp);
      }
      const float p = __expf(scale * dot - row_lse);
      ds = p * (dp - di);
    }
    for (int j = 0; j < 32; ++j) {
      const float dsj = __shfl_sync(0xffffffffu, ds, j);
      if (dsj == 0.f) continue;
#pragma unroll
      for (int i = 0; i < kAttentionMaxDimPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < D) acc[i] = fmaf(dsj, k_tile[j * stride + c], acc[i]);
      }
    }
  }
  if (!row_valid) return;
#pragma unroll
  for (int i = 0; i < kAttentionMaxDimPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < D) {
      const float g = scale * acc[i];
      dq[row_offset + c] = accumulate ? dq[row_offset + c] + g : g;
    }
  }
}

// dk and dv for one key row (of one kv head) per warp, summed over the query heads it serves.
template <class Unused = void>
__global__ void attention_backward_dkv_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const std::uint8_t* __restrict__ visible, const float* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dk,
    float* __restrict__ dv, bool accumulate, AttentionDims d, float scale) {
  extern __shared__ float shared[];
  const int D = static_cast<int>(d.head_dim), stride = D + 1;
  float* q_tile = shared;                        // [32][D + 1]
  float* do_tile = q_tile + 32 * stride;         // [32][D + 1]
  float* k_rows = do_tile + 32 * stride;         // [warps][D]
  float* v_rows = k_rows + kAttentionWarps * D;  // [warps][D]
  __shared__ float lse_tile[32], delta_tile[32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t b = blockIdx.z, kvh = blockIdx.y;
  const std::int64_t s = std::int64_t(blockIdx.x) * kAttentionWarps + warp;
  const bool key_valid = s < d.keys;
  const bool key_visible = key_valid && (!visible || visible[b * d.keys + s]);
  const std::int64_t key_offset = ((b * d.keys + s) * d.kv_heads + kvh) * D;
  float* k_row = k_rows + warp * D;
  float* v_row = v_rows + warp * D;
  for (int c = lane; c < D; c += 32) {
    k_row[c] = key_valid ? k[key_offset + c] : 0.f;
    v_row[c] = key_valid ? v[key_offset + c] : 0.f;
  }
  const std::int64_t group = d.heads / d.kv_heads;
  const float uniform_p = 1.f / float(d.keys);
  float acc_k[kAttentionMaxDimPerLane] = {}, acc_v[kAttentionMaxDimPerLane] = {};
  for (std::int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (std::int64_t t0 = 0; t0 < d.queries; t0 += 32) {
      __syncthreads();
      for (int e = threadIdx.x; e < 32 * D; e += blockDim.x) {
        const int j = e / D, c = e % D;
        const std::int64_t t = t0 + j;
        const std::int64_t off = ((b * d.queries + t) * d.heads + h) * D + c;
        q_tile[j * stride + c] = t < d.queries ? q[off] : 0.f;
        do_tile[j * stride + c] = t < d.queries ? dout[off] : 0.f;
      }
      if (threadIdx.x < 32) {
        const std::int64_t t = t0 + threadIdx.x;
        const std::int64_t stat = (b * d.heads + h) * d.queries + t;
        lse_tile[threadIdx.x] = t < d.queries ? lse[stat] : 0.f;
        delta_tile[threadIdx.x] = t < d.queries ? delta[stat] : 0.f;
      }
      __syncthreads();
      if (!key_valid) continue;
      const std::int64_t t = t0 + lane;
      float p = 0.f, ds = 0.f;
      if (t < d.queries) {
        const float row_lse = lse_tile[lane];
        if (row_lse == INFINITY) {
          p = uniform_p;  // a uniform row: output independent of q and k, so ds = 0
        } else if (key_visible && (!d.causal || s <= d.query_offset + t)) {
          const float* qr = q_tile + lane * stride;
          const float* dor = do_tile + lane * stride;
          float dot = 0.f, dp = 0.f;
          for (int c = 0; c < D; ++c) {
            dot = fmaf(qr[c], k_row[c], dot);
            dp = fmaf(dor[c], v_row[c], dp);
          }
          p = __expf(scale * dot - row_lse);
          ds = p * (dp - delta_tile[lane]);
        }
      }
      for (int j = 0; j < 32; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const float dsj = __shfl_sync(0xffffffffu, ds, j);
        if (pj == 0.f && dsj == 0.f) continue;
#pragma unroll
        for (int i = 0; i < kAttentionMaxDimPerLane; ++i) {
          const int c = lane + 32 * i;
          if (c < D) {
            acc_v[i] = fmaf(pj, do_tile[j * stride + c], acc_v[i]);
            acc_k[i] = fmaf(dsj, q_tile[j * stride + c], acc_k[i]);
          }
        }
      }
    }
  }
  if (!key_valid) return;
#pragma unroll
  for (int i = 0; i < kAttentionMaxDimPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < D) {
      const float gk = scale * acc_k[i], gv = acc_v[i];
      dk[key_offset + c] = accumulate ? dk[key_offset + c] + gk : gk;
      dv[key_offset + c] = accumulate ? dv[key_offset + c] + gv : gv;
    }
  }
}

inline dim3 attention_block() { return dim3(32 * kAttentionWarps); }

}  // namespace peft::cuda::detail

namespace peft::cuda {

/// out [B, T, H·D] and lse [B, H, T] from q, k, v (layouts above).
inline void attention_forward(const AttentionDims& d, const float* q, const float* k,
                              const float* v, const std::uint8_t* key_visible, float* out,
                              float* lse, cudaStream_t stream = nullptr) {
  d.validate();
  if (d.batch == 0 || d.queries == 0) return;
  const int D = static_cast<int>(d.head_dim);
  const std::size_t shared = sizeof(float) * (32 * (D + 1) + 32 * D + detail::kAttentionWarps * D);
  const dim3 grid(detail::blocks_for(d.queries, detail::kAttentionWarps),
                  static_cast<unsigned>(d.heads), static_cast<unsigned>(d.batch));
  detail::attention_forward_tkernel<<<grid, detail::attention_block(), shared, stream>>>(
      q, k, v, key_visible, out, lse, d, 1.f / std::sqrt(float(d.head_dim)));
  PEFT_CUDA_CHECK_LAUNCH("attention_forward_tkernel");
}

/// dq, dk, dv (= or += with accumulate) from dout and the forward's out and lse.
/// delta: scratch [B, H, T].
inline void attention_backward(const AttentionDims& d, const float* q, const float* k,
                               const float* v, const std::uint8_t* key_visible, const float* out,
                               const float* lse, const float* dout, float* delta, float* dq,
                               float* dk, float* dv, bool accumulate,
                               cudaStream_t stream = nullptr) {
  d.validate();
  if (d.batch == 0 || d.queries == 0) return;
  const int D = static_cast<int>(d.head_dim);
  const float scale = 1.f / std::sqrt(float(d.head_dim));
  const std::size_t shared = sizeof(float) * (2 * 32 * (D + 1) + 2 * detail::kAttentionWarps * D);
  const dim3 grid_q(detail::blocks_for(d.queries, detail::kAttentionWarps),
                    static_cast<unsigned>(d.heads), static_cast<unsigned>(d.batch));
  detail::attention_backward_dq_kernel<<<grid_q, detail::attention_block(), shared, stream>>>(
      q, k, v, key_visible, out, dout, lse, delta, dq, accumulate, d, scale);
  PEFT_CUDA_CHECK_LAUNCH("attention_backward_dq_kernel");
  const dim3 grid_kv(detail::blocks_for(d.keys, detail::kAttentionWarps),
                     static_cast<unsigned>(d.kv_heads), static_cast<unsigned>(d.batch));
  detail::attention_backward_dkv_kernel<<<grid_kv, detail::attention_block(), shared, stream>>>(
      q, k, v, key_visible, dout, lse, delta, dk, dv, accumulate, d, scale);
  PEFT_CUDA_CHECK_LAUNCH("attention_backward_dkv_kernel");
}

}  // namespace peft::cuda
