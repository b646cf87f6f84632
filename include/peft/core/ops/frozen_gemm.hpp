#pragma once
// The two products a frozen base weight W [out, in] (row-major) takes part in, with fp32
// accumulation and W kept in its storage format:
//
//   forward    y[n, out]  (+)= x[n, in]   · Wᵀ
//   backward   dx[n, in]  (+)= dy[n, out] · W        (never dW: W is frozen)
//
// for W in bf16 (uint16 bit patterns, as a BF16 checkpoint stores them), W in fp16 (IEEE binary16
// bit patterns, as an F16 checkpoint stores them) and W in NF4 with double quantization
// (quant::Nf4Tensor). No full-size fp32 or bf16 copy of W is ever made: the packed
// kernels widen or dequantize W panel by panel (kKc x kNr values) into the buffer the
// micro-kernel reads, the portable path block by block (portable_cols(k) columns, at most 4 MiB).
//
// Numerics (docs/performance.md, "Frozen-weight kernels"):
//   - bf16 W: the other operand (x, dy) is rounded to bf16 first, round-to-nearest-even with
//     NaN kept a quiet NaN, exactly as PyTorch's CPU autocast rounds a bf16 matmul's fp32 input
//     (c10::BFloat16, round_to_nearest_even). Every product of two bf16 values is exact in fp32;
//     the sum is accumulated in fp32. (vdpbf16ps treats bf16 subnormal inputs as zero and
//     flushes subnormal sums; the portable path keeps them: the two differ by < 2^-126 per term.)
//   - NF4 W: x and dy stay fp32; W is dequantized exactly as Nf4Tensor::dequantize does
//     (bit-identical values) and the product is an fp32 product of those values.
//   - fp16 W: x and dy stay fp32; W is widened exactly (every fp16 value is an fp32 value) and
//     the product is an fp32 product of W's stored values, on the same fp32 panels as NF4.
//   - Threads split the output's columns on multiples of kNr. On the packed kernels each element
//     is then computed the same way whatever thread computes it, so results do not depend on the
//     thread count (the portable path inherits detail::gemm_serial's behaviour).
//
// Paths (cpu::KernelPath, chosen at run time by cpu::kernel_path() or passed explicitly):
//   - avx512bf16: bf16 W on vdpbf16ps (a 12 x 32 register tile of fp32 accumulators, pairs of k
//     per instruction); NF4 W dequantized with AVX-512 permutes into fp32 panels for an fp32 FMA
//     micro-kernel. Compiled with __attribute__((target(...))): no -mavx512bf16 needed, and the
//     code never runs unless CPUID and XCR0 allow it.
//   - amx: bf16 W on the tile unit (tdpbf16ps on 2 x 2 tiles of 16 x 16 fp32: a 32 x 32 block
//     of C per 32-deep k-step; x rounded to bf16 row-major, W in the same VNNI pair panels);
//     NF4 W as on avx512bf16. The tile state is requested from Linux by cpu::cpu_features().
//   - portable: W widened/dequantized portable_cols(k) columns at a time, then the library's fp32
//     product (detail::gemm_serial: Eigen, or the packed AVX-512 kernel in -mavx512f builds).
#include <algorithm>
#include <array>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>

#include "peft/core/cpu_features.hpp"
#include "peft/core/error.hpp"
#include "peft/core/float16.hpp"
#include "peft/core/ops/gemm.hpp"
#include "peft/core/tensor.hpp"
#include "peft/quant/nf4.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace peft::ops {

/// A read-only bf16 matrix W [rows, cols] with row stride ld (elements), as bit patterns.
struct Bf16Matrix {
  const std::uint16_t* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;
  std::string_view name = "W";  ///< named in error messages
};

/// A read-only fp16 (IEEE binary16) matrix W [rows, cols] with row stride ld, as bit patterns.
struct Fp16Matrix {
  const std::uint16_t* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;
  std::string_view name = "W";  ///< named in error messages
};

namespace bf16 {

/// fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rounding).
inline std::uint16_t round(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (value != value) return 0x7FC0;
  const std::uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<std::uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

/// bf16 bits -> fp32 (exact).
inline float to_float(std::uint16_t bits) {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

}  // namespace bf16

namespace frozen_detail {

inline constexpr std::int64_t kMr = 12;   // rows of the register tile
inline constexpr std::int64_t kNr = 32;   // columns of the register tile: two zmm of fp32
inline constexpr std::int64_t kKc = 256;  // depth of one packed block (bf16: 128 pairs)
inline constexpr std::int64_t kMc = 144;  // rows of the other operand per block (a multiple of kMr)
inline constexpr std::int64_t kNc = 1024;  // columns of W's panel block
// The portable path widens W kPortableFloats values at a time (4 MiB of fp32), in blocks of 64
// to 512 columns: wide enough that the other operand is not repacked once per 64 columns, small
// enough that the head's [50257, cols] block stays a bounded buffer.
inline constexpr std::int64_t kPortableFloats = std::int64_t(1) << 20;
inline std::int64_t portable_cols(std::int64_t k) {
  return std::clamp<std::int64_t>(kPortableFloats / std::max<std::int64_t>(k, 1) / 32 * 32, 64,
                                  512);
}

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

/// Per-thread scratch, reused across calls on the same thread.
struct Scratch {
  AlignedVector<std::uint32_t> pairs;  // packed bf16 pairs of W
  AlignedVector<float> panel, block, segment;
  static Scratch& local() {
    thread_local Scratch scratch;
    return scratch;
  }
};

/// Threads for a product of `work` multiply-adds whose `cols` output columns are split on
/// multiples of kNr: as detail::gemm decides (none inside a parallel region or for small work).
inline int column_threads(std::int64_t cols, double work) {
  int threads = 1;
#if defined(_OPENMP)
  if (!omp_in_parallel() && work >= detail::kParallelGemmMinWork) threads = omp_get_max_threads();
#endif
  return static_cast<int>(
      std::max<std::int64_t>(1, std::min<std::int64_t>(threads, ceil_div(cols, kNr))));
}

/// Calls body(begin, end) for contiguous column ranges of [0, cols), one per thread, boundaries
/// on multiples of kNr (so the 32-column panels, and every element's arithmetic, do not depend
/// on the thread count).
template <class Body>
void for_column_blocks(std::int64_t cols, double work, Body body) {
  const int threads = column_threads(cols, work);
  if (threads <= 1) {
    body(std::int64_t(0), cols);
    return;
  }
  const std::int64_t units = ceil_div(cols, kNr);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static, 1) num_threads(threads)
#endif
  for (int id = 0; id < threads; ++id) {
    const std::int64_t begin = std::min(cols, units * id / threads * kNr);
    const std::int64_t end =
        id + 1 == threads ? cols : std::min(cols, units * (id + 1) / threads * kNr);
    if (end > begin) body(begin, end);
  }
}

inline void zero_rows(float* c, std::int64_t ldc, std::int64_t m, std::int64_t n) {
  for (std::int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.0f);
}

/// One bf16 pair as the micro-kernel reads it: element 2q in the low half, 2q+1 in the high.
inline std::uint32_t pair(std::uint16_t low, std::uint16_t high) {
  return static_cast<std::uint32_t>(low) | (static_cast<std::uint32_t>(high) << 16);
}

// Layout of the rounded, packed other operand (x or dy) of a bf16 product, shared by all
// threads: depth block pb (k from pb * kKc) holds ceil(m / kMr) panels, each kp pairs deep,
// stored pair-major (kMr words of pair q, then of pair q + 1, ...); rows past m are zeros.
struct PackedPairs {
  AlignedVector<std::uint32_t> words;
  std::int64_t m_pad = 0;
  const std::uint32_t* block(std::int64_t pb) const {
    return words.data() + pb * (kKc / 2) * m_pad;
  }
};

/// Rounds a[m, k] (row stride lda) to bf16 and packs it as PackedPairs describes.
inline void pack_rounded_pairs(const float* a, std::int64_t lda, std::int64_t m, std::int64_t k,
                               PackedPairs& out) {
  const std::int64_t panels = ceil_div(m, kMr);
  out.m_pad = panels * kMr;
  out.words.assign(static_cast<std::size_t>(out.m_pad * ceil_div(k, 2) + kMr), 0u);
  const std::int64_t blocks = ceil_div(k, kKc);
  const auto pack_panel = [&](std::int64_t panel) {
    for (std::int64_t pb = 0; pb < blocks; ++pb) {
      const std::int64_t p0 = pb * kKc, kc = std::min(kKc, k - p0), kp = ceil_div(kc, 2);
      std::uint32_t* dst = out.words.data() + pb * (kKc / 2) * out.m_pad + panel * kp * kMr;
      for (std::int64_t i = 0; i < kMr; ++i) {
        const std::int64_t row = panel * kMr + i;
        if (row >= m) continue;  // already zero
        const float* src = a + row * lda + p0;
        for (std::int64_t q = 0; q < kp; ++q) {
          const std::uint16_t low = bf16::round(src[2 * q]);
          const std::uint16_t high = 2 * q + 1 < kc ? bf16::round(src[2 * q + 1]) : 0;
          dst[q * kMr + i] = pair(low, high);
        }
      }
    }
  };
  if (column_threads(m, double(m) * double(k) * 8.0) > 1) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (std::int64_t panel = 0; panel < panels; ++panel) pack_panel(panel);
  } else {
    for (std::int64_t panel = 0; panel < panels; ++panel) pack_panel(panel);
  }
}

#if defined(__x86_64__)
/// dst[q * ld_dst + i] = word q of rows[i] for a 16 x 16 block of 32-bit words (i, q < 16):
/// the forward panel's transposition (a word is a pair of consecutive bf16 of W's row).
/// Unpacks within 128-bit lanes, then a 4 x 4 transposition of the lanes.
__attribute__((target("avx512f"))) inline void transpose_words_16x16(
    const std::uint16_t* const* rows, std::uint32_t* dst, std::int64_t ld_dst) {
  // (The maskz forms with full masks: GCC 12's unmasked ones trip -Wuninitialized.)
  const __mmask16 all = 0xFFFF;
  const __mmask8 all8 = 0xFF;
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi32(all, rows[i]);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_maskz_unpacklo_epi32(all, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_epi32(all, r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // r[4g + c], lane L: rows 4g..4g+3 of word 4L + c
    r[4 * g] = _mm512_maskz_unpacklo_epi64(all8, t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_maskz_unpackhi_epi64(all8, t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_maskz_unpacklo_epi64(all8, t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_maskz_unpackhi_epi64(all8, t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i u0 = _mm512_maskz_shuffle_i32x4(all, r[c], r[4 + c], 0x44);
    const __m512i u1 = _mm512_maskz_shuffle_i32x4(all, r[c], r[4 + c], 0xEE);
    const __m512i u2 = _mm512_maskz_shuffle_i32x4(all, r[8 + c], r[12 + c], 0x44);
    const __m512i u3 = _mm512_maskz_shuffle_i32x4(all, r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_si512(dst + (0 + c) * ld_dst, _mm512_maskz_shuffle_i32x4(all, u0, u2, 0x88));
    _mm512_storeu_si512(dst + (4 + c) * ld_dst, _mm512_maskz_shuffle_i32x4(all, u0, u2, 0xDD));
    _mm512_storeu_si512(dst + (8 + c) * ld_dst, _mm512_maskz_shuffle_i32x4(all, u1, u3, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * ld_dst, _mm512_maskz_shuffle_i32x4(all, u1, u3, 0xDD));
  }
}
#endif

/// Packs the bf16 panel of op(W)[p0 : p0+kc, j0 : j0+nc] (forward: op(W) = Wᵀ, so column j is
/// row j of W; backward: op(W) = W) into kNr-column panels of kp_stride >= ceil(kc / 2) pairs
/// (0: exactly that many), each pair-major (kNr words of pair q, then of q + 1); columns past
/// nc, the odd pair's high half and the pairs past ceil(kc / 2) are zeros. The AMX kernel reads
/// these panels as its B tiles (VNNI layout: 16 pairs by 16 columns, 128 bytes a row).
inline void pack_w_pairs(const Bf16Matrix& w, bool forward, std::int64_t p0, std::int64_t kc,
                         std::int64_t j0, std::int64_t nc, std::uint32_t* packed,
                         std::int64_t kp_stride = 0) {
  const std::int64_t kp = ceil_div(kc, 2);
  if (kp_stride < kp) kp_stride = kp;
  for (std::int64_t jr = 0; jr < nc; jr += kNr, packed += kNr * kp_stride) {
    std::fill(packed + kNr * kp, packed + kNr * kp_stride, 0u);
    const std::int64_t cols = std::min(kNr, nc - jr);
    if (forward) {
      std::int64_t q_begin = 0;  // pairs [0, q_begin) of every column already packed
#if defined(__x86_64__)
      // Only the avx512bf16 and amx paths pack pairs, so AVX-512 is there. Whole 16 x 16
      // blocks of complete pairs (2q + 1 < kc) of a full panel are transposed in registers.
      if (cols == kNr) {
        const std::uint16_t* rows[16];
        for (; q_begin + 16 <= kc / 2; q_begin += 16) {
          for (std::int64_t half = 0; half < kNr; half += 16) {
            for (int i = 0; i < 16; ++i)
              rows[i] = w.data + (j0 + jr + half + i) * w.ld + p0 + 2 * q_begin;
            transpose_words_16x16(rows, packed + q_begin * kNr + half, kNr);
          }
        }
      }
#endif
      for (std::int64_t j = 0; j < kNr; ++j) {
        if (j >= cols) {
          for (std::int64_t q = 0; q < kp; ++q) packed[q * kNr + j] = 0u;
          continue;
        }
        const std::uint16_t* row = w.data + (j0 + jr + j) * w.ld + p0;
        for (std::int64_t q = q_begin; q < kp; ++q) {
          packed[q * kNr + j] = pair(row[2 * q], 2 * q + 1 < kc ? row[2 * q + 1] : 0);
        }
      }
    } else {
      for (std::int64_t q = 0; q < kp; ++q) {
        const std::uint16_t* even = w.data + (p0 + 2 * q) * w.ld + j0 + jr;
        const std::uint16_t* odd = 2 * q + 1 < kc ? even + w.ld : nullptr;
        std::uint32_t* dst = packed + q * kNr;
        std::int64_t j = 0;
        for (; j < cols; ++j) dst[j] = pair(even[j], odd != nullptr ? odd[j] : 0);
        for (; j < kNr; ++j) dst[j] = 0u;
      }
    }
  }
}

/// Packs a[i0 : i0+mc, p0 : p0+kc] (fp32, row stride lda) into kMr-row panels, p-major; rows
/// past mc are zeros.
inline void pack_a_f32(const float* a, std::int64_t lda, std::int64_t i0, std::int64_t mc,
                       std::int64_t p0, std::int64_t kc, float* packed) {
  for (std::int64_t ir = 0; ir < mc; ir += kMr, packed += kMr * kc) {
    const std::int64_t rows = std::min(kMr, mc - ir);
    for (std::int64_t i = 0; i < kMr; ++i) {
      if (i < rows) {
        const float* src = a + (i0 + ir + i) * lda + p0;
        for (std::int64_t p = 0; p < kc; ++p) packed[p * kMr + i] = src[p];
      } else {
        for (std::int64_t p = 0; p < kc; ++p) packed[p * kMr + i] = 0.0f;
      }
    }
  }
}

/// Elements [begin, end) of w's flattening, dequantized to out exactly as
/// Nf4Tensor::dequantize computes them (scalar: the portable path and the edges).
inline void nf4_dequantize_scalar(const quant::Nf4Tensor& w, std::int64_t begin, std::int64_t end,
                                  float* out) {
  std::int64_t i = begin;
  while (i < end) {
    const std::int64_t block = i / quant::kNf4BlockSize;
    const std::int64_t block_end = std::min(end, (block + 1) * quant::kNf4BlockSize);
    const float scale = w.block_scale(block);
    for (; i < block_end; ++i) *out++ = quant::kNf4Code[w.code(i)] * scale;
  }
}

#if defined(__x86_64__)
#define PEFT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define PEFT_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

PEFT_TARGET_AVX512 inline __mmask16 low_mask(std::int64_t cols) {
  return static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1u);
}
PEFT_TARGET_AVX512 inline __mmask16 high_mask(std::int64_t cols) {
  return static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1u);
}

/// Dequantizes elements [begin, end) of w's flattening into out, bit-identical to
/// nf4_dequantize_scalar: 32 values at a time where they start on a multiple of 32 (16 code
/// bytes, one 64-block's scale), the 16-entry code book looked up with one permute per 16.
PEFT_TARGET_AVX512 inline void nf4_dequantize_avx512(const quant::Nf4Tensor& w, std::int64_t begin,
                                                     std::int64_t end, float* out) {
  const __m512 book = _mm512_loadu_ps(quant::kNf4Code.data());
  const __m512i nibble = _mm512_set1_epi32(0x0f);
  const __mmask16 all = 0xFFFF;
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const std::uint8_t* codes = w.codes().data();
  std::int64_t i = begin;
  while (i < end) {
    if (i % 32 == 0 && end - i >= 32) {
      const __m512 scale = _mm512_set1_ps(w.block_scale(i / quant::kNf4BlockSize));
      // (The maskz forms with a full mask: GCC 12's unmasked ones trip -Wmaybe-uninitialized.)
      const __m512i bytes = _mm512_maskz_cvtepu8_epi32(
          all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2)));
      const __m512 even =
          _mm512_maskz_permutexvar_ps(all, _mm512_maskz_srli_epi32(all, bytes, 4), book);
      const __m512 odd = _mm512_maskz_permutexvar_ps(all, _mm512_and_si512(bytes, nibble), book);
      _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutex2var_ps(even, first, odd), scale));
      _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(even, second, odd), scale));
      i += 32;
      out += 32;
    } else {
      const std::int64_t stop = std::min(end, (i / 32 + 1) * 32);
      nf4_dequantize_scalar(w, i, stop, out);
      out += stop - i;
      i = stop;
    }
  }
}

/// Packs the fp32 panel of op(W)[p0 : p0+kc, j0 : j0+nc] of an NF4 W (forward: Wᵀ; backward:
/// W) into kNr-column panels, p-major; columns past nc are zeros. `segment` holds kc floats.
PEFT_TARGET_AVX512 inline void pack_w_nf4(const quant::Nf4Tensor& w, bool forward, std::int64_t p0,
                                          std::int64_t kc, std::int64_t j0, std::int64_t nc,
                                          float* segment, float* packed) {
  const std::int64_t in = w.cols();
  for (std::int64_t jr = 0; jr < nc; jr += kNr, packed += kNr * kc) {
    const std::int64_t cols = std::min(kNr, nc - jr);
    if (forward) {
      for (std::int64_t j = 0; j < kNr; ++j) {
        if (j >= cols) {
          for (std::int64_t p = 0; p < kc; ++p) packed[p * kNr + j] = 0.0f;
          continue;
        }
        const std::int64_t start = (j0 + jr + j) * in + p0;
        nf4_dequantize_avx512(w, start, start + kc, segment);
        for (std::int64_t p = 0; p < kc; ++p) packed[p * kNr + j] = segment[p];
      }
    } else {
      for (std::int64_t p = 0; p < kc; ++p) {
        const std::int64_t start = (p0 + p) * in + j0 + jr;
        float* dst = packed + p * kNr;
        nf4_dequantize_avx512(w, start, start + cols, dst);
        std::fill(dst + cols, dst + kNr, 0.0f);
      }
    }
  }
}

// Writes the kMr x kNr accumulators into C[0:rows, 0:cols] (overwrite, or added to C).
#define PEFT_FROZEN_STORE_TILE()                                                                \
  const __mmask16 lo = low_mask(cols), hi = high_mask(cols);                                    \
  _Pragma("GCC unroll 12") for (int i = 0; i < kMr; ++i) {                                      \
    if (i >= rows) break;                                                                       \
    float* row = c + i * ldc;                                                                   \
    if (overwrite) {                                                                            \
      _mm512_mask_storeu_ps(row, lo, acc[i][0]);                                                \
      _mm512_mask_storeu_ps(row + 16, hi, acc[i][1]);                                           \
    } else {                                                                                    \
      _mm512_mask_storeu_ps(row, lo, _mm512_add_ps(_mm512_maskz_loadu_ps(lo, row), acc[i][0])); \
      _mm512_mask_storeu_ps(row + 16, hi,                                                       \
                            _mm512_add_ps(_mm512_maskz_loadu_ps(hi, row + 16), acc[i][1]));     \
    }                                                                                           \
  }

/// C[0:rows, 0:cols] (+)= packed pairs of A (kMr per pair) · packed pairs of B (kNr per pair),
/// kp pairs deep, on vdpbf16ps. Out of line so that the 24 accumulators stay in registers.
[[gnu::noinline]] PEFT_TARGET_AVX512BF16 inline void micro_kernel_bf16(
    std::int64_t kp, const std::uint32_t* __restrict ap, const std::uint32_t* __restrict bp,
    float* c, std::int64_t ldc, bool overwrite, std::int64_t rows, std::int64_t cols) {
  __m512 acc[kMr][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (std::int64_t q = 0; q < kp; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(bp + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
    ap += kMr;
    bp += kNr;
  }
  PEFT_FROZEN_STORE_TILE()
}

/// C[0:rows, 0:cols] (+)= packed A (kMr per k) · packed B (kNr per k), kc deep, fp32 FMA.
[[gnu::noinline]] PEFT_TARGET_AVX512 inline void micro_kernel_f32(
    std::int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c,
    std::int64_t ldc, bool overwrite, std::int64_t rows, std::int64_t cols) {
  __m512 acc[kMr][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
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
  PEFT_FROZEN_STORE_TILE()
}
#undef PEFT_FROZEN_STORE_TILE

/// One thread's share of a bf16 product: output columns [jb, je) of C [m, ...], from the
/// shared packed pairs of A and W's bf16 panels packed here.
PEFT_TARGET_AVX512BF16 inline void bf16_columns(const PackedPairs& a, std::int64_t m,
                                                std::int64_t k, const Bf16Matrix& w, bool forward,
                                                float* c, std::int64_t ldc, std::int64_t jb,
                                                std::int64_t je, bool accumulate) {
  Scratch& scratch = Scratch::local();
  const std::int64_t width = std::min(kNc, ceil_div(je - jb, kNr) * kNr);
  scratch.pairs.resize(static_cast<std::size_t>(width * (kKc / 2)));
  for (std::int64_t j0 = jb; j0 < je; j0 += kNc) {
    const std::int64_t nc = std::min(kNc, je - j0);
    for (std::int64_t pb = 0; pb * kKc < k; ++pb) {
      const std::int64_t p0 = pb * kKc, kc = std::min(kKc, k - p0), kp = ceil_div(kc, 2);
      const bool overwrite = p0 == 0 && !accumulate;
      pack_w_pairs(w, forward, p0, kc, j0, nc, scratch.pairs.data());
      const std::uint32_t* a_block = a.block(pb);
      for (std::int64_t i0 = 0; i0 < m; i0 += kMc) {
        const std::int64_t mc = std::min(kMc, m - i0);
        for (std::int64_t jr = 0; jr < nc; jr += kNr) {
          const std::uint32_t* bp = scratch.pairs.data() + jr * kp;
          for (std::int64_t ir = 0; ir < mc; ir += kMr) {
            micro_kernel_bf16(kp, a_block + (i0 + ir) * kp, bp, c + (i0 + ir) * ldc + j0 + jr, ldc,
                              overwrite, std::min(kMr, mc - ir), std::min(kNr, nc - jr));
          }
        }
      }
    }
  }
}

/// One thread's share of a product on fp32 panels of W: output columns [jb, je) of C [m, ...]
/// (+)= A [m, k] (fp32, row stride lda) · op(W), where pack_panel(p0, kc, j0, nc, segment,
/// panel) writes op(W)[p0 : p0+kc, j0 : j0+nc] as fp32 kNr-column panels, p-major (NF4:
/// dequantized; fp16: widened), and the fp32 FMA micro-kernel multiplies them.
template <class PackPanel>
PEFT_TARGET_AVX512 inline void f32_panel_columns(const float* a, std::int64_t lda, std::int64_t m,
                                                 std::int64_t k, PackPanel pack_panel, float* c,
                                                 std::int64_t ldc, std::int64_t jb, std::int64_t je,
                                                 bool accumulate) {
  Scratch& scratch = Scratch::local();
  const std::int64_t width = std::min(kNc, ceil_div(je - jb, kNr) * kNr);
  scratch.panel.resize(static_cast<std::size_t>(width * kKc));
  scratch.block.resize(static_cast<std::size_t>(std::min(kMc, ceil_div(m, kMr) * kMr) * kKc));
  scratch.segment.resize(static_cast<std::size_t>(kKc));
  for (std::int64_t j0 = jb; j0 < je; j0 += kNc) {
    const std::int64_t nc = std::min(kNc, je - j0);
    for (std::int64_t p0 = 0; p0 < k; p0 += kKc) {
      const std::int64_t kc = std::min(kKc, k - p0);
      const bool overwrite = p0 == 0 && !accumulate;
      pack_panel(p0, kc, j0, nc, scratch.segment.data(), scratch.panel.data());
      for (std::int64_t i0 = 0; i0 < m; i0 += kMc) {
        const std::int64_t mc = std::min(kMc, m - i0);
        pack_a_f32(a, lda, i0, mc, p0, kc, scratch.block.data());
        for (std::int64_t jr = 0; jr < nc; jr += kNr) {
          const float* bp = scratch.panel.data() + jr * kc;
          for (std::int64_t ir = 0; ir < mc; ir += kMr) {
            micro_kernel_f32(kc, scratch.block.data() + ir * kc, bp, c + (i0 + ir) * ldc + j0 + jr,
                             ldc, overwrite, std::min(kMr, mc - ir), std::min(kNr, nc - jr));
          }
        }
      }
    }
  }
}

/// fp16 values src[0:count] (count <= 16) widened exactly to fp32 into dst.
PEFT_TARGET_AVX512 inline void widen_fp16x16(const std::uint16_t* src, std::int64_t count,
                                             float* dst) {
  const __mmask16 lanes = low_mask(count);
  const __m256i halves = _mm256_maskz_loadu_epi16(lanes, src);
  _mm512_mask_storeu_ps(dst, lanes, _mm512_maskz_cvtph_ps(lanes, halves));
}

/// Packs the fp32 panel of op(W)[p0 : p0+kc, j0 : j0+nc] of an fp16 W (forward: Wᵀ; backward:
/// W), widened exactly, into kNr-column panels, p-major; columns past nc are zeros. `segment`
/// holds kc floats.
PEFT_TARGET_AVX512 inline void pack_w_fp16(const Fp16Matrix& w, bool forward, std::int64_t p0,
                                           std::int64_t kc, std::int64_t j0, std::int64_t nc,
                                           float* segment, float* packed) {
  for (std::int64_t jr = 0; jr < nc; jr += kNr, packed += kNr * kc) {
    const std::int64_t cols = std::min(kNr, nc - jr);
    if (forward) {
      for (std::int64_t j = 0; j < kNr; ++j) {
        if (j >= cols) {
          for (std::int64_t p = 0; p < kc; ++p) packed[p * kNr + j] = 0.0f;
          continue;
        }
        const std::uint16_t* row = w.data + (j0 + jr + j) * w.ld + p0;
        for (std::int64_t p = 0; p < kc; p += 16)
          widen_fp16x16(row + p, std::min<std::int64_t>(16, kc - p), segment + p);
        for (std::int64_t p = 0; p < kc; ++p) packed[p * kNr + j] = segment[p];
      }
    } else {
      for (std::int64_t p = 0; p < kc; ++p) {
        const std::uint16_t* row = w.data + (p0 + p) * w.ld + j0 + jr;
        float* dst = packed + p * kNr;
        std::fill(dst, dst + kNr, 0.0f);
        widen_fp16x16(row, std::min<std::int64_t>(16, cols), dst);
        if (cols > 16) widen_fp16x16(row + 16, cols - 16, dst + 16);
      }
    }
  }
}

// ---- AMX (path amx): bf16 W on the tile unit ----------------------------------------------
//
// C [m, cols] (+)= A [m, k] · op(W) as tdpbf16ps on 2 x 2 tiles of 16 x 16 fp32 (a 32 x 32
// block of C), k in steps of 32: A's tiles are 16 rows of 32 rounded bf16 values (PackedRows,
// row-major, zero-padded), W's are the VNNI panels pack_w_pairs writes (16 pairs of 16 columns,
// 128 bytes a row: the left or right half of a kNr-column panel). Each tdpbf16ps adds, per
// element, the 32 exact bf16 products of its k-step to the fp32 accumulator (subnormal inputs
// and results flushed, as vdpbf16ps).
#define PEFT_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

inline constexpr std::int64_t kAmxKc = 512;  // depth of one packed W block (16 k-steps of 32)
inline constexpr std::int64_t kAmxNc = 512;  // columns of one packed W block (16 panels)

/// The rounded other operand of an AMX product: a [m, k] rounded to bf16, rows padded to a
/// multiple of 16 and the depth to a multiple of 32 with zeros; row stride k_pad.
struct PackedRows {
  // Every element is written by pack_rounded_rows: no zero-filling allocation (a head backward
  // packs [n, 50257]); freed with the product, not kept per thread.
  struct Free {
    void operator()(std::uint16_t* p) const noexcept {
      ::operator delete[](p, std::align_val_t(64));
    }
  };
  std::unique_ptr<std::uint16_t[], Free> values;
  std::int64_t m_pad = 0, k_pad = 0;
  const std::uint16_t* data() const { return values.get(); }
};

/// The floats src[0:16] where `lanes` has a bit, rounded to bf16 exactly as bf16::round does
/// (nearest even, NaN to 0x7FC0), stored to dst[0:16] (zeros where `lanes` has none).
PEFT_TARGET_AVX512 inline void round_bf16x16(const float* src, __mmask16 lanes,
                                             std::uint16_t* dst) {
  const __mmask16 all = 0xFFFF;
  const __m512 v = _mm512_maskz_loadu_ps(lanes, src);
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb =
      _mm512_and_si512(_mm512_maskz_srli_epi32(all, bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_maskz_srli_epi32(
      all, _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_maskz_cvtepi32_epi16(all, rounded));
}

/// Rounds a[m, k] (row stride lda) into out as PackedRows describes (threads split the rows).
PEFT_TARGET_AVX512 inline void pack_rounded_rows(const float* a, std::int64_t lda, std::int64_t m,
                                                 std::int64_t k, PackedRows& out) {
  out.m_pad = ceil_div(m, 16) * 16;
  out.k_pad = ceil_div(k, 32) * 32;
  out.values.reset(static_cast<std::uint16_t*>(
      ::operator new[](static_cast<std::size_t>(out.m_pad * out.k_pad) * sizeof(std::uint16_t),
                       std::align_val_t(64))));
  std::uint16_t* values = out.values.get();
  const std::int64_t k_pad = out.k_pad;
  const auto pack_row = [&](std::int64_t row) {
    std::uint16_t* dst = values + row * k_pad;
    if (row >= m) {
      std::fill_n(dst, k_pad, std::uint16_t(0));
      return;
    }
    const float* src = a + row * lda;
    std::int64_t p = 0;
    for (; p + 16 <= k; p += 16) round_bf16x16(src + p, 0xFFFF, dst + p);
    if (p < k) {  // the tail (masked-off lanes load 0, so they round to 0); k_pad - p >= 16
      round_bf16x16(src + p, static_cast<__mmask16>((1u << (k - p)) - 1u), dst + p);
      p += 16;
    }
    std::fill(dst + std::min(p, k_pad), dst + k_pad, std::uint16_t(0));
  };
  if (column_threads(m, double(m) * double(k) * 8.0) > 1) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (std::int64_t row = 0; row < out.m_pad; ++row) pack_row(row);
  } else {
    for (std::int64_t row = 0; row < out.m_pad; ++row) pack_row(row);
  }
}

/// The tile configuration (palette 1): tiles 0-3 accumulate C, 4-5 hold A, 6-7 hold W; every
/// tile 16 rows of 64 bytes.
struct alignas(64) AmxTileConfig {
  std::uint8_t palette = 1, start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
  AmxTileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

/// C[0:rows, 0:cols] (+)= A (RowTiles x 16 rows, row stride lda elements) · the W panel bp
/// (kNr columns, ksteps x 16 pairs), ksteps k-steps of 32. Edges go through a 32 x 32 buffer.
template <int RowTiles>
[[gnu::noinline]] PEFT_TARGET_AMX inline void amx_block(std::int64_t ksteps,
                                                        const std::uint16_t* ap, std::int64_t lda,
                                                        const std::uint32_t* bp, float* c,
                                                        std::int64_t ldc, bool overwrite,
                                                        std::int64_t rows, std::int64_t cols) {
  alignas(64) float edge[32 * 32];
  const bool full = rows == 16 * RowTiles && cols == kNr;
  float* target = full ? c : edge;
  const std::int64_t stride = (full ? ldc : kNr) * std::int64_t(sizeof(float));
  if (overwrite) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (RowTiles == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    if (!full) {
      std::fill_n(edge, 32 * 32, 0.0f);
      for (std::int64_t i = 0; i < rows; ++i) std::copy_n(c + i * ldc, cols, edge + i * kNr);
    }
    _tile_loadd(0, target, stride);
    _tile_loadd(1, target + 16, stride);
    if constexpr (RowTiles == 2) {
      _tile_loadd(2, target + 16 * (stride / 4), stride);
      _tile_loadd(3, target + 16 * (stride / 4) + 16, stride);
    }
  }
  const std::int64_t a_stride = lda * std::int64_t(sizeof(std::uint16_t));
  constexpr std::int64_t b_stride = kNr * std::int64_t(sizeof(std::uint32_t));
  for (std::int64_t s = 0; s < ksteps; ++s) {
    const std::uint32_t* b = bp + s * 16 * kNr;
    _tile_loadd(6, b, b_stride);
    _tile_loadd(7, b + 16, b_stride);
    _tile_loadd(4, ap + s * 32, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (RowTiles == 2) {
      _tile_loadd(5, ap + 16 * lda + s * 32, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, target, stride);
  _tile_stored(1, target + 16, stride);
  if constexpr (RowTiles == 2) {
    _tile_stored(2, target + 16 * (stride / 4), stride);
    _tile_stored(3, target + 16 * (stride / 4) + 16, stride);
  }
  if (!full)
    for (std::int64_t i = 0; i < rows; ++i) std::copy_n(edge + i * kNr, cols, c + i * ldc);
}

/// One thread's share of a bf16 product on AMX: output columns [jb, je) of C [m, ...] from the
/// shared rounded rows of A and W's VNNI panels packed here, kAmxKc x kAmxNc at a time.
PEFT_TARGET_AMX inline void amx_columns(const PackedRows& a, std::int64_t m, std::int64_t k,
                                        const Bf16Matrix& w, bool forward, float* c,
                                        std::int64_t ldc, std::int64_t jb, std::int64_t je,
                                        bool accumulate) {
  Scratch& scratch = Scratch::local();
  const std::int64_t width = std::min(kAmxNc, ceil_div(je - jb, kNr) * kNr);
  scratch.pairs.resize(static_cast<std::size_t>(width * (kAmxKc / 2)));
  const AmxTileConfig config;
  _tile_loadconfig(&config);
  for (std::int64_t j0 = jb; j0 < je; j0 += kAmxNc) {
    const std::int64_t nc = std::min(kAmxNc, je - j0);
    for (std::int64_t p0 = 0; p0 < k; p0 += kAmxKc) {
      const std::int64_t kc = std::min(kAmxKc, k - p0), ksteps = ceil_div(kc, 32);
      const bool overwrite = p0 == 0 && !accumulate;
      pack_w_pairs(w, forward, p0, kc, j0, nc, scratch.pairs.data(), ksteps * 16);
      for (std::int64_t i0 = 0; i0 < m; i0 += 32) {
        const std::int64_t rows = std::min<std::int64_t>(32, m - i0);
        const std::uint16_t* ap = a.data() + i0 * a.k_pad + p0;
        for (std::int64_t jr = 0; jr < nc; jr += kNr) {
          const std::uint32_t* bp = scratch.pairs.data() + jr * ksteps * 16;
          float* cp = c + i0 * ldc + j0 + jr;
          const std::int64_t cols = std::min(kNr, nc - jr);
          if (rows > 16)
            amx_block<2>(ksteps, ap, a.k_pad, bp, cp, ldc, overwrite, rows, cols);
          else
            amx_block<1>(ksteps, ap, a.k_pad, bp, cp, ldc, overwrite, rows, cols);
        }
      }
    }
  }
  _tile_release();
}
#undef PEFT_TARGET_AMX

#undef PEFT_TARGET_AVX512
#undef PEFT_TARGET_AVX512BF16
#endif  // __x86_64__

/// The portable product of a 16-bit W (bf16 or fp16 bit patterns, `widen` one to fp32) on
/// output columns [jb, je): W widened portable_cols(k) columns at a time, then
/// detail::gemm_serial with a [m, k] (row stride lda; for bf16 W the already rounded operand).
template <class F, class Widen>
void half_columns_portable(const F* a, std::int64_t lda, std::int64_t m, std::int64_t k,
                           const std::uint16_t* w_data, std::int64_t w_ld, bool forward, F* c,
                           std::int64_t ldc, std::int64_t jb, std::int64_t je, bool accumulate,
                           Widen widen) {
  AlignedVector<float>& block = Scratch::local().block;
  const std::int64_t width = portable_cols(k);
  block.resize(static_cast<std::size_t>(width * k));
  for (std::int64_t j0 = jb; j0 < je; j0 += width) {
    const std::int64_t nc = std::min(width, je - j0);
    if (forward) {  // block [nc, k]: rows j0.. of W
      for (std::int64_t j = 0; j < nc; ++j)
        for (std::int64_t p = 0; p < k; ++p)
          block[std::size_t(j * k + p)] = widen(w_data[(j0 + j) * w_ld + p]);
      detail::gemm_serial(a, lda, false, block.data(), k, true, c + j0, ldc, m, nc, k, 1.0f,
                          accumulate);
    } else {  // block [k, nc]: columns j0.. of W
      for (std::int64_t p = 0; p < k; ++p)
        for (std::int64_t j = 0; j < nc; ++j)
          block[std::size_t(p * nc + j)] = widen(w_data[p * w_ld + j0 + j]);
      detail::gemm_serial(a, lda, false, block.data(), nc, false, c + j0, ldc, m, nc, k, 1.0f,
                          accumulate);
    }
  }
}

/// The portable NF4 product on output columns [jb, je): W dequantized portable_cols(k) columns
/// at a time, then detail::gemm_serial.
template <class F>
void nf4_columns_portable(const F* a, std::int64_t lda, std::int64_t m, std::int64_t k,
                          const quant::Nf4Tensor& w, bool forward, F* c, std::int64_t ldc,
                          std::int64_t jb, std::int64_t je, bool accumulate) {
  AlignedVector<float>& block = Scratch::local().block;
  const std::int64_t width = portable_cols(k);
  block.resize(static_cast<std::size_t>(width * k));
  const std::int64_t in = w.cols();
  for (std::int64_t j0 = jb; j0 < je; j0 += width) {
    const std::int64_t nc = std::min(width, je - j0);
    if (forward) {  // rows j0.. of W, contiguous in the flattening
      nf4_dequantize_scalar(w, j0 * in, (j0 + nc) * in, block.data());
      detail::gemm_serial(a, lda, false, block.data(), k, true, c + j0, ldc, m, nc, k, 1.0f,
                          accumulate);
    } else {
      for (std::int64_t p = 0; p < k; ++p)
        nf4_dequantize_scalar(w, p * in + j0, p * in + j0 + nc, block.data() + p * nc);
      detail::gemm_serial(a, lda, false, block.data(), nc, false, c + j0, ldc, m, nc, k, 1.0f,
                          accumulate);
    }
  }
}

/// One-line ShapeError for a product's operands (`op` is frozen_forward or frozen_backward).
inline void check_operands(std::string_view op, std::string_view weight, std::int64_t rows,
                           std::int64_t cols, std::int64_t n, const void* a, std::int64_t lda,
                           std::int64_t a_cols, const char* a_name, const void* c, std::int64_t ldc,
                           std::int64_t c_cols, const char* c_name) {
  const std::string where = std::string(op) + ": W '" + std::string(weight) + "' [" +
                            std::to_string(rows) + ", " + std::to_string(cols) + "]";
  const auto fail = [&](const std::string& what) { throw ShapeError(where + ": " + what); };
  if (n < 0) fail("token count n = " + std::to_string(n) + ", expected n >= 0");
  if (n == 0) return;
  if (lda < a_cols)
    fail(std::string(a_name) + " row stride " + std::to_string(lda) + ", expected at least its " +
         std::to_string(a_cols) + " columns");
  if (ldc < c_cols)
    fail(std::string(c_name) + " row stride " + std::to_string(ldc) + ", expected at least its " +
         std::to_string(c_cols) + " columns");
  if ((a == nullptr && a_cols > 0) || (c == nullptr && c_cols > 0))
    fail(std::string(a == nullptr && a_cols > 0 ? a_name : c_name) +
         " is null, expected data for " + std::to_string(n) + " rows");
}

template <class HalfMatrix>  // Bf16Matrix or Fp16Matrix
void check_half(std::string_view op, const HalfMatrix& w) {
  const std::string where = std::string(op) + ": W '" + std::string(w.name) + "' [" +
                            std::to_string(w.rows) + ", " + std::to_string(w.cols) + "]";
  if (w.rows < 0 || w.cols < 0) throw ShapeError(where + ": negative extent, expected >= 0");
  if (w.ld < w.cols)
    throw ShapeError(where + ": row stride " + std::to_string(w.ld) + ", expected at least its " +
                     std::to_string(w.cols) + " columns");
  if (w.data == nullptr && w.rows > 0 && w.cols > 0) throw ShapeError(where + ": data is null");
}

inline void check_nf4(std::string_view op, const quant::Nf4Tensor& w) {
  if (w.shape().size() != 2) {
    throw ShapeError(std::string(op) + ": W '" + w.name() + "' has " +
                     std::to_string(w.shape().size()) + " dimensions, expected a matrix [out, in]");
  }
}

inline void check_path(std::string_view op, cpu::KernelPath path) {
  if (path != cpu::KernelPath::portable) cpu::check_kernel_path(path, cpu::cpu_features(), op);
}

// True (and c overwritten with zeros unless accumulating) when the product has nothing to
// multiply: no rows, no columns, or k = 0.
inline bool empty_product(float* c, std::int64_t ldc, std::int64_t m, std::int64_t k,
                          std::int64_t cols, bool accumulate) {
  if (m == 0 || cols == 0) return true;
  if (k != 0) return false;
  if (!accumulate) zero_rows(c, ldc, m, cols);
  return true;
}

// c [m, cols] (+)= a [m, k] · op(W) for a bf16 W on `path`.
template <class F>
void bf16_product(const F* a, std::int64_t lda, std::int64_t m, std::int64_t k, const Bf16Matrix& w,
                  bool forward, F* c, std::int64_t ldc, std::int64_t cols, bool accumulate,
                  cpu::KernelPath path) {
  if (empty_product(c, ldc, m, k, cols, accumulate)) return;
  const double work = double(m) * double(k) * double(cols);
#if defined(__x86_64__)
  if (path == cpu::KernelPath::amx) {
    PackedRows packed;
    pack_rounded_rows(a, lda, m, k, packed);
    for_column_blocks(cols, work, [&](std::int64_t jb, std::int64_t je) {
      amx_columns(packed, m, k, w, forward, c, ldc, jb, je, accumulate);
    });
    return;
  }
  if (path != cpu::KernelPath::portable) {
    PackedPairs packed;
    pack_rounded_pairs(a, lda, m, k, packed);
    for_column_blocks(cols, work, [&](std::int64_t jb, std::int64_t je) {
      bf16_columns(packed, m, k, w, forward, c, ldc, jb, je, accumulate);
    });
    return;
  }
#endif
  (void)path;
  AlignedVector<float> rounded(static_cast<std::size_t>(m * k));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t p = 0; p < k; ++p)
      rounded[std::size_t(i * k + p)] = bf16::to_float(bf16::round(a[i * lda + p]));
  for_column_blocks(cols, work, [&](std::int64_t jb, std::int64_t je) {
    half_columns_portable(rounded.data(), k, m, k, w.data, w.ld, forward, c, ldc, jb, je,
                          accumulate, bf16::to_float);
  });
}

// c [m, cols] (+)= a [m, k] · op(W) for a W multiplied on fp32 panels (NF4, fp16) on `path`:
// pack_panel(p0, kc, j0, nc, segment, panel) for the packed paths (f32_panel_columns; x86
// only, so `pack_panel` is unused elsewhere), portable(jb, je) otherwise.
template <class F, class PackPanel, class Portable>
void f32_panel_product(const F* a, std::int64_t lda, std::int64_t m, std::int64_t k, F* c,
                       std::int64_t ldc, std::int64_t cols, bool accumulate, cpu::KernelPath path,
                       const PackPanel& pack_panel, const Portable& portable) {
  if (empty_product(c, ldc, m, k, cols, accumulate)) return;
  const double work = double(m) * double(k) * double(cols);
#if defined(__x86_64__)
  if (path != cpu::KernelPath::portable) {
    for_column_blocks(cols, work, [&](std::int64_t jb, std::int64_t je) {
      f32_panel_columns(a, lda, m, k, pack_panel, c, ldc, jb, je, accumulate);
    });
    return;
  }
#endif
  (void)path;
  (void)pack_panel;
  for_column_blocks(cols, work, portable);
}

// c [m, cols] (+)= a [m, k] · op(W) for an NF4 W on `path`.
template <class F>
void nf4_product(const F* a, std::int64_t lda, std::int64_t m, std::int64_t k,
                 const quant::Nf4Tensor& w, bool forward, F* c, std::int64_t ldc, std::int64_t cols,
                 bool accumulate, cpu::KernelPath path) {
#if defined(__x86_64__)
  const auto pack = [&](std::int64_t p0, std::int64_t kc, std::int64_t j0, std::int64_t nc,
                        float* segment,
                        float* panel) { pack_w_nf4(w, forward, p0, kc, j0, nc, segment, panel); };
#else
  const int pack = 0;
#endif
  f32_panel_product(a, lda, m, k, c, ldc, cols, accumulate, path, pack,
                    [&](std::int64_t jb, std::int64_t je) {
                      nf4_columns_portable(a, lda, m, k, w, forward, c, ldc, jb, je, accumulate);
                    });
}

// c [m, cols] (+)= a [m, k] · op(W) for an fp16 W on `path` (x stays fp32: the product is an
// fp32 product of W's stored values).
template <class F>
void fp16_product(const F* a, std::int64_t lda, std::int64_t m, std::int64_t k, const Fp16Matrix& w,
                  bool forward, F* c, std::int64_t ldc, std::int64_t cols, bool accumulate,
                  cpu::KernelPath path) {
#if defined(__x86_64__)
  const auto pack = [&](std::int64_t p0, std::int64_t kc, std::int64_t j0, std::int64_t nc,
                        float* segment,
                        float* panel) { pack_w_fp16(w, forward, p0, kc, j0, nc, segment, panel); };
#else
  const int pack = 0;
#endif
  f32_panel_product(a, lda, m, k, c, ldc, cols, accumulate, path, pack,
                    [&](std::int64_t jb, std::int64_t je) {
                      half_columns_portable(a, lda, m, k, w.data, w.ld, forward, c, ldc, jb, je,
                                            accumulate, float16::f16_bits_to_float);
                    });
}

}  // namespace frozen_detail

// The entry points (and the portable products under them) are templates over the operand type,
// fp32 only: as plain inline functions their calls into detail::gemm_serial instantiated
// Eigen's product in every translation unit that includes this header (1.3 s and 200 MB of
// compiler memory for <peft/peft.hpp> alone), used or not.

/// A 16-bit W: bf16 (the other operand rounded to bf16, as autocast does) or fp16 (the other
/// operand kept fp32, W widened exactly).
template <class W>
concept HalfMatrix = std::same_as<W, Bf16Matrix> || std::same_as<W, Fp16Matrix>;

/// y[n, out] (+)= x[n, in] · Wᵀ, W = w [out, in] in bf16 (x rounded to bf16) or fp16 (x as it
/// is); x has row stride ldx, y row stride ldy; fp32 accumulation. `accumulate` false overwrites
/// y. ShapeError on inconsistent strides, ConfigError when `path` cannot run on this CPU.
template <class F = float, HalfMatrix W>
void frozen_forward(const F* x, std::int64_t ldx, std::int64_t n, const W& w, F* y,
                    std::int64_t ldy, bool accumulate = false,
                    cpu::KernelPath path = cpu::kernel_path()) {
  static_assert(std::is_same_v<F, float>, "the frozen products take fp32 operands");
  frozen_detail::check_half("frozen_forward", w);
  frozen_detail::check_operands("frozen_forward", w.name, w.rows, w.cols, n, x, ldx, w.cols, "x", y,
                                ldy, w.rows, "y");
  frozen_detail::check_path("frozen_forward", path);
  if constexpr (std::same_as<W, Bf16Matrix>)
    frozen_detail::bf16_product(x, ldx, n, w.cols, w, true, y, ldy, w.rows, accumulate, path);
  else
    frozen_detail::fp16_product(x, ldx, n, w.cols, w, true, y, ldy, w.rows, accumulate, path);
}

/// dx[n, in] (+)= dy[n, out] · W, W = w [out, in] in bf16 (dy rounded to bf16) or fp16. As
/// frozen_forward otherwise.
template <class F = float, HalfMatrix W>
void frozen_backward(const F* dy, std::int64_t lddy, std::int64_t n, const W& w, F* dx,
                     std::int64_t lddx, bool accumulate = false,
                     cpu::KernelPath path = cpu::kernel_path()) {
  static_assert(std::is_same_v<F, float>, "the frozen products take fp32 operands");
  frozen_detail::check_half("frozen_backward", w);
  frozen_detail::check_operands("frozen_backward", w.name, w.rows, w.cols, n, dy, lddy, w.rows,
                                "dy", dx, lddx, w.cols, "dx");
  frozen_detail::check_path("frozen_backward", path);
  if constexpr (std::same_as<W, Bf16Matrix>)
    frozen_detail::bf16_product(dy, lddy, n, w.rows, w, false, dx, lddx, w.cols, accumulate, path);
  else
    frozen_detail::fp16_product(dy, lddy, n, w.rows, w, false, dx, lddx, w.cols, accumulate, path);
}

/// y[n, out] (+)= x[n, in] · dequant(W)ᵀ for an NF4 W [out, in] (fp32 x, fp32 accumulation).
template <class F = float>
void frozen_forward(const F* x, std::int64_t ldx, std::int64_t n, const quant::Nf4Tensor& w, F* y,
                    std::int64_t ldy, bool accumulate = false,
                    cpu::KernelPath path = cpu::kernel_path()) {
  static_assert(std::is_same_v<F, float>, "the frozen products take fp32 operands");
  frozen_detail::check_nf4("frozen_forward", w);
  frozen_detail::check_operands("frozen_forward", w.name(), w.rows(), w.cols(), n, x, ldx, w.cols(),
                                "x", y, ldy, w.rows(), "y");
  frozen_detail::check_path("frozen_forward", path);
  frozen_detail::nf4_product(x, ldx, n, w.cols(), w, true, y, ldy, w.rows(), accumulate, path);
}

/// dx[n, in] (+)= dy[n, out] · dequant(W) for an NF4 W [out, in].
template <class F = float>
void frozen_backward(const F* dy, std::int64_t lddy, std::int64_t n, const quant::Nf4Tensor& w,
                     F* dx, std::int64_t lddx, bool accumulate = false,
                     cpu::KernelPath path = cpu::kernel_path()) {
  static_assert(std::is_same_v<F, float>, "the frozen products take fp32 operands");
  frozen_detail::check_nf4("frozen_backward", w);
  frozen_detail::check_operands("frozen_backward", w.name(), w.rows(), w.cols(), n, dy, lddy,
                                w.rows(), "dy", dx, lddx, w.cols(), "dx");
  frozen_detail::check_path("frozen_backward", path);
  frozen_detail::nf4_product(dy, lddy, n, w.rows(), w, false, dx, lddx, w.cols(), accumulate, path);
}

}  // namespace peft::ops
