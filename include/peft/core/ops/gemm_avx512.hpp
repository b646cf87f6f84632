#pragma once
// A packed single-precision matrix product for AVX-512: C (+)= α op(A) op(B) on one thread.
//
// Why: Eigen 3.4's float product reaches about 60% of an AVX-512 core's FMA rate (159 of 266
// GFLOP/s measured on the Zen 5 of docs/performance.md); a register-blocked micro-kernel over
// packed panels reaches about 85-90%, and the products are most of a training step's time.
// Double precision (gradient checks, the golden parity runs) stays on Eigen.
//
// The structure is the usual one (Goto & van de Geijn, "Anatomy of high-performance matrix
// multiplication", 2008): B is packed kc x nc into column panels of kNr, A is packed mc x kc into
// row panels of kMr, and the micro-kernel keeps a kMr x kNr tile of C in 24 zmm registers while
// it streams kc rank-1 updates through them. Packing reads A and B with or without transposition,
// so all four op() cases share one kernel. Edges are zero-padded in the packed panels and
// written back with masked stores.
//
// Every element of C is the same sequence of operations whatever its position, the size of C or
// the thread that owns it: zero, then kc-long FMA chains in order of k, each added to C. Results
// are therefore bit-identical under padding, row splitting between threads, and heap placement.
#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <span>

#include "peft/core/ops/gemm_term.hpp"
#include "peft/core/tensor.hpp"

namespace peft::ops::detail::avx512 {

inline constexpr std::int64_t kMr = 12;    // rows of the register tile
inline constexpr std::int64_t kNr = 32;    // columns of the register tile: two zmm of floats
inline constexpr std::int64_t kKc = 256;   // depth of one packed block: B's panel stays in L1
inline constexpr std::int64_t kMc = 144;   // rows of A packed at once (144 x 256 floats: in L2)
inline constexpr std::int64_t kNc = 1024;  // columns of B packed at once (256 x 1024 floats: in L2)

// Masks for the first `cols` of a 32-wide panel row, as two halves of 16.
inline __mmask16 low_mask(std::int64_t cols) {
  return static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1u);
}
inline __mmask16 high_mask(std::int64_t cols) {
  return static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1u);
}

// Packs op(A)[i0 : i0+mc, p0 : p0+count] into consecutive kMr-row panels of depth `depth`, each
// stored p-major (kMr values of column p, then of column p+1, ...), at depth `offset` inside each
// panel; rows past mc are zeros. (offset and depth let two operands share one packed block.)
inline void pack_a(const float* a, std::int64_t lda, bool trans, std::int64_t i0, std::int64_t mc,
                   std::int64_t p0, std::int64_t count, std::int64_t depth, std::int64_t offset,
                   float* packed) {
  for (std::int64_t ir = 0; ir < mc; ir += kMr, packed += kMr * depth) {
    const std::int64_t rows = std::min(kMr, mc - ir);
    float* dst = packed + offset * kMr;
    if (!trans) {
      for (std::int64_t i = 0; i < kMr; ++i) {
        if (i < rows) {
          const float* src = a + (i0 + ir + i) * lda + p0;
          for (std::int64_t p = 0; p < count; ++p) dst[p * kMr + i] = src[p];
        } else {
          for (std::int64_t p = 0; p < count; ++p) dst[p * kMr + i] = 0.0f;
        }
      }
    } else {
      for (std::int64_t p = 0; p < count; ++p) {
        const float* src = a + (p0 + p) * lda + i0 + ir;
        std::int64_t i = 0;
        for (; i < rows; ++i) dst[p * kMr + i] = src[i];
        for (; i < kMr; ++i) dst[p * kMr + i] = 0.0f;
      }
    }
  }
}

// Packs scale · op(B)[p0 : p0+count, j0 : j0+nc] into consecutive kNr-column panels of depth
// `depth`, each stored p-major (kNr values of row p, then of row p+1, ...), at depth `offset`
// inside each panel; columns past nc are zeros.
inline void pack_b(const float* b, std::int64_t ldb, bool trans, std::int64_t p0,
                   std::int64_t count, std::int64_t j0, std::int64_t nc, std::int64_t depth,
                   std::int64_t offset, float scale, float* packed) {
  const __m512 factor = _mm512_set1_ps(scale);
  // Gathers address rows by 32-bit offsets; absurdly long rows take the scalar path.
  const bool gather = ldb <= std::int64_t(1) << 25;
  for (std::int64_t jr = 0; jr < nc; jr += kNr, packed += kNr * depth) {
    const std::int64_t cols = std::min(kNr, nc - jr);
    const __mmask16 lo = low_mask(cols), hi = high_mask(cols);
    float* dst = packed + offset * kNr;
    if (!trans) {
      for (std::int64_t p = 0; p < count; ++p) {
        const float* src = b + (p0 + p) * ldb + j0 + jr;
        _mm512_store_ps(dst + p * kNr, _mm512_mul_ps(factor, _mm512_maskz_loadu_ps(lo, src)));
        _mm512_store_ps(dst + p * kNr + 16,
                        _mm512_mul_ps(factor, _mm512_maskz_loadu_ps(hi, src + 16)));
      }
    } else if (gather) {
      // op(B) = Bᵀ: column j of the panel is row j0+jr+j of B. Gather the 32 rows' p-th values.
      const __m512i row_offsets = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32(static_cast<int>(ldb)));
      const float* rows_lo = b + (j0 + jr) * ldb + p0;
      const float* rows_hi = rows_lo + 16 * ldb;
      for (std::int64_t p = 0; p < count; ++p) {
        const __m512 low =
            _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lo, row_offsets, rows_lo + p, 4);
        const __m512 high =
            hi ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), hi, row_offsets, rows_hi + p, 4)
               : _mm512_setzero_ps();
        _mm512_store_ps(dst + p * kNr, _mm512_mul_ps(factor, low));
        _mm512_store_ps(dst + p * kNr + 16, _mm512_mul_ps(factor, high));
      }
    } else {
      for (std::int64_t p = 0; p < count; ++p)
        for (std::int64_t j = 0; j < kNr; ++j)
          dst[p * kNr + j] = j < cols ? scale * b[(j0 + jr + j) * ldb + p0 + p] : 0.0f;
    }
  }
}

// C[0:rows, 0:cols] = (overwrite ? 0 : C) + α · (packed A panel · packed B panel), kc deep.
// Kept out of line: inlined into the packing loops, GCC 12 spills the 24 accumulators.
[[gnu::noinline]] inline void micro_kernel(std::int64_t kc, const float* __restrict ap,
                                           const float* __restrict bp, float* c, std::int64_t ldc,
                                           float alpha, bool overwrite, std::int64_t rows,
                                           std::int64_t cols) {
  __m512 acc[kMr][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) {
    acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    // The tile of C is read at the end: start bringing it in now.
    if (!overwrite && i < rows) {
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
    }
  }
  for (std::int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_load_ps(bp);
    const __m512 b1 = _mm512_load_ps(bp + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512 ai = _mm512_set1_ps(ap[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
    ap += kMr;
    bp += kNr;
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  const __mmask16 lo = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1u);
  const __mmask16 hi = static_cast<__mmask16>(cols >= 32   ? 0xFFFF
                                              : cols <= 16 ? 0
                                                           : (1u << (cols - 16)) - 1u);
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) {
    if (i >= rows) break;
    float* row = c + i * ldc;
    if (overwrite) {
      _mm512_mask_storeu_ps(row, lo, _mm512_mul_ps(scale, acc[i][0]));
      _mm512_mask_storeu_ps(row + 16, hi, _mm512_mul_ps(scale, acc[i][1]));
    } else {
      _mm512_mask_storeu_ps(row, lo,
                            _mm512_fmadd_ps(scale, acc[i][0], _mm512_maskz_loadu_ps(lo, row)));
      _mm512_mask_storeu_ps(row + 16, hi,
                            _mm512_fmadd_ps(scale, acc[i][1], _mm512_maskz_loadu_ps(hi, row + 16)));
    }
  }
}

/// Per-thread packing buffers, reused across calls on the same thread (thread_local: no state
/// is shared between threads, and a product never allocates after a thread's first).
struct PackBuffers {
  AlignedVector<float> a, b;
  static PackBuffers& local() {
    thread_local PackBuffers buffers;
    return buffers;
  }
};

using Term = GemmTerm<float>;

/// C (+)= α Σ_t op(A_t) op(B_t) on this thread, one pass over C for all terms: the terms are
/// concatenated along k (a LoRA linear's x W and s·h Bᵀ share the register tile, so C is
/// written once). Terms with k = 0 are skipped; with no k at all, C is zeroed or left as is.
inline void gemm_terms(std::span<const Term> terms, float* c, std::int64_t ldc, std::int64_t m,
                       std::int64_t n, float alpha, bool accumulate) {
  std::int64_t total_k = 0;
  for (const Term& t : terms) total_k += t.k;
  if (m <= 0 || n <= 0) return;
  if (total_k == 0) {
    if (!accumulate)
      for (std::int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.0f);
    return;
  }
  // Depth blocks: as few as kKc allows, of equal depth, and a short remainder (a LoRA rank after
  // a base product's k) joins the last block instead of costing one more pass over C.
  std::int64_t blocks = (total_k + kKc - 1) / kKc;
  if (blocks > 1 && total_k - (blocks - 1) * kKc <= kKc / 4) --blocks;
  const std::int64_t kc_max = (total_k + blocks - 1) / blocks;
  PackBuffers& buffers = PackBuffers::local();
  const std::int64_t nc_max = std::min(kNc, (n + kNr - 1) / kNr * kNr);
  const std::int64_t mc_max = std::min(kMc, (m + kMr - 1) / kMr * kMr);
  buffers.b.resize(static_cast<std::size_t>(kc_max * nc_max));
  buffers.a.resize(static_cast<std::size_t>(kc_max * mc_max));
  // Calls pack(term, first k of the term, count, depth offset) for the terms' pieces that fall
  // in the block [p0, p0 + kc) of the concatenated k.
  auto for_pieces = [&](std::int64_t p0, std::int64_t kc, auto pack) {
    std::int64_t start = 0;
    for (const Term& t : terms) {
      const std::int64_t from = std::max(p0, start), to = std::min(p0 + kc, start + t.k);
      if (to > from) pack(t, from - start, to - from, from - p0);
      start += t.k;
    }
  };
  for (std::int64_t j0 = 0; j0 < n; j0 += kNc) {
    const std::int64_t nc = std::min(kNc, n - j0);
    for (std::int64_t p0 = 0; p0 < total_k; p0 += kc_max) {
      const std::int64_t kc = std::min(kc_max, total_k - p0);
      const bool overwrite = p0 == 0 && !accumulate;
      for_pieces(p0, kc,
                 [&](const Term& t, std::int64_t first, std::int64_t count, std::int64_t offset) {
                   pack_b(t.b, t.ldb, t.trans_b, first, count, j0, nc, kc, offset, t.b_scale,
                          buffers.b.data());
                 });
      for (std::int64_t i0 = 0; i0 < m; i0 += kMc) {
        const std::int64_t mc = std::min(kMc, m - i0);
        for_pieces(p0, kc,
                   [&](const Term& t, std::int64_t first, std::int64_t count, std::int64_t offset) {
                     pack_a(t.a, t.lda, t.trans_a, i0, mc, first, count, kc, offset,
                            buffers.a.data());
                   });
        for (std::int64_t jr = 0; jr < nc; jr += kNr) {
          const float* bp = buffers.b.data() + jr * kc;
          for (std::int64_t ir = 0; ir < mc; ir += kMr) {
            micro_kernel(kc, buffers.a.data() + ir * kc, bp, c + (i0 + ir) * ldc + j0 + jr, ldc,
                         alpha, overwrite, std::min(kMr, mc - ir), std::min(kNr, nc - jr));
          }
        }
      }
    }
  }
}

/// C (+)= α op(A) op(B) on this thread; the same contract as detail::gemm_serial.
inline void gemm(const float* a, std::int64_t lda, bool trans_a, const float* b, std::int64_t ldb,
                 bool trans_b, float* c, std::int64_t ldc, std::int64_t m, std::int64_t n,
                 std::int64_t k, float alpha, bool accumulate) {
  const Term term{a, lda, trans_a, b, ldb, trans_b, k};
  gemm_terms(std::span<const Term>(&term, 1), c, ldc, m, n, alpha, accumulate);
}

}  // namespace peft::ops::detail::avx512
#endif  // __AVX512F__
