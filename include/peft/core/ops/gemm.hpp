#pragma once
// The matrix product every op goes through: C (+)= α op(A) op(B) on row-major strided storage.
//
// Threads split C into contiguous blocks of rows (or of columns, when C is short and wide) and
// each runs Eigen's single-threaded product on its block. Eigen's own parallel product shares
// packed panels between threads and spin-waits on them, which collapses when the cores are
// shared with other work; independent blocks only meet at the end of the parallel region. Each
// thread packs its own copy of the shared operand, which costs O(k·n) against O(m·k·n / p) of
// arithmetic. Inside an OpenMP region (per-head attention products), the product is serial.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <type_traits>

#include "peft/core/ops/gemm_avx512.hpp"
#include "peft/core/ops/gemm_term.hpp"
#include "peft/core/tensor.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace peft::ops::detail {

template <class T>
using StridedConstMatrixMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using StridedMatrixMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

// Whether a float product of this size goes to the packed AVX-512 kernel: below a third of its
// 12 x 32 tile or about 64^3 multiply-adds, packing costs more than it saves and Eigen's product
// is as fast. (m = 8, a LoRA rank, fills 2/3 of the tile and still beats Eigen's skinny product.)
inline bool use_packed_avx512(std::int64_t m, std::int64_t n, std::int64_t k) {
#if defined(__AVX512F__)
  return m >= 4 && n >= 32 && k >= 8 && double(m) * double(n) * double(k) >= double(1 << 18);
#else
  (void)m, (void)n, (void)k;
  return false;
#endif
}

// One thread's product. A is stored [m, k] (or [k, m] with trans_a) with row stride lda; B is
// stored [k, n] (or [n, k] with trans_b) with row stride ldb; C is [m, n] with row stride ldc.
template <class T>
void gemm_serial(const T* a, std::int64_t lda, bool trans_a, const T* b, std::int64_t ldb,
                 bool trans_b, T* c, std::int64_t ldc, std::int64_t m, std::int64_t n,
                 std::int64_t k, T alpha, bool accumulate) {
  if (m <= 0 || n <= 0) return;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (use_packed_avx512(m, n, k)) {
      avx512::gemm(a, lda, trans_a, b, ldb, trans_b, c, ldc, m, n, k, alpha, accumulate);
      return;
    }
  }
#endif
  StridedMatrixMap<T> cm(c, m, n, Eigen::OuterStride<>(ldc));
  if (!accumulate) cm.setZero();
  if (k <= 0) return;
  const StridedConstMatrixMap<T> as(a, trans_a ? k : m, trans_a ? m : k, Eigen::OuterStride<>(lda));
  const StridedConstMatrixMap<T> bs(b, trans_b ? n : k, trans_b ? k : n, Eigen::OuterStride<>(ldb));
  // α is folded into Eigen's product kernel (a scalar factor of an operand is extracted).
  if (!trans_a && !trans_b)
    cm.noalias() += alpha * as * bs;
  else if (!trans_a && trans_b)
    cm.noalias() += alpha * as * bs.transpose();
  else if (trans_a && !trans_b)
    cm.noalias() += alpha * as.transpose() * bs;
  else
    cm.noalias() += alpha * as.transpose() * bs.transpose();
}

/// C (+)= α Σ_t b_scale_t op(A_t) op(B_t) on one thread. On AVX-512 float builds the terms share
/// one packed product (concatenated along k), so C is read and written once instead of once per
/// term: a LoRA linear's base and low-rank products cost one pass over the output.
template <class T>
void gemm_serial_sum(std::initializer_list<GemmTerm<T>> terms, T* c, std::int64_t ldc,
                     std::int64_t m, std::int64_t n, T alpha, bool accumulate) {
  if (m <= 0 || n <= 0) return;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    std::int64_t total_k = 0;
    for (const GemmTerm<T>& t : terms) total_k += t.k;
    if (use_packed_avx512(m, n, total_k)) {
      avx512::gemm_terms(std::span<const GemmTerm<T>>(terms.begin(), terms.size()), c, ldc, m, n,
                         alpha, accumulate);
      return;
    }
  }
#endif
  bool first = true;
  for (const GemmTerm<T>& t : terms) {
    gemm_serial(t.a, t.lda, t.trans_a, t.b, t.ldb, t.trans_b, c, ldc, m, n, t.k, alpha * t.b_scale,
                accumulate || !first);
    first = false;
  }
  if (first && !accumulate)
    for (std::int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, T(0));
}

// Below this many multiply-adds a product runs on one thread: starting a team costs more.
inline constexpr double kParallelGemmMinWork = 1 << 20;

/// C (+)= α op(A) op(B): op(A) [m, k], op(B) [k, n], C [m, n], all row-major with the given
/// row strides (see gemm_serial). `accumulate` false overwrites C.
template <class T>
void gemm(const T* a, std::int64_t lda, bool trans_a, const T* b, std::int64_t ldb, bool trans_b,
          T* c, std::int64_t ldc, std::int64_t m, std::int64_t n, std::int64_t k, T alpha = T(1),
          bool accumulate = false) {
  int threads = 1;
#if defined(_OPENMP)
  if (!omp_in_parallel() && double(m) * double(n) * double(k) >= kParallelGemmMinWork)
    threads = omp_get_max_threads();
#endif
  // Split the longer side of C; a side shorter than 16 per thread is not worth splitting.
  const bool split_rows = m >= n || n < 16 * threads;
  const std::int64_t extent = split_rows ? m : n;
  if (threads > 1 && extent < 16 * threads) threads = std::max<std::int64_t>(1, extent / 16);
  if (threads <= 1) {
    gemm_serial(a, lda, trans_a, b, ldb, trans_b, c, ldc, m, n, k, alpha, accumulate);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const std::int64_t p = omp_get_num_threads(), id = omp_get_thread_num();
    // Block boundaries on multiples of 16 (a vector of floats), the last block takes the rest.
    const std::int64_t units = (extent + 15) / 16;
    const std::int64_t begin = std::min(extent, units * id / p * 16);
    const std::int64_t end = id + 1 == p ? extent : std::min(extent, units * (id + 1) / p * 16);
    if (end > begin) {
      if (split_rows) {
        const T* a_block = trans_a ? a + begin : a + begin * lda;
        gemm_serial(a_block, lda, trans_a, b, ldb, trans_b, c + begin * ldc, ldc, end - begin, n, k,
                    alpha, accumulate);
      } else {
        const T* b_block = trans_b ? b + begin * ldb : b + begin;
        gemm_serial(a, lda, trans_a, b_block, ldb, trans_b, c + begin, ldc, m, end - begin, k,
                    alpha, accumulate);
      }
    }
  }
#endif
}

/// Threads for a row-blocked computation over `rows` rows doing `work` multiply-adds: one
/// below kParallelGemmMinWork or inside a parallel region, and at least 16 rows per thread.
inline int row_block_threads(std::int64_t rows, double work) {
  int threads = 1;
#if defined(_OPENMP)
  if (!omp_in_parallel() && work >= kParallelGemmMinWork) threads = omp_get_max_threads();
#endif
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, rows / 16)));
}

/// Calls body(first_row, row_count, block_index) for row_block_threads(rows, work) contiguous
/// blocks of [0, rows), one per thread, in one parallel region. Block i always covers the same
/// rows for the same thread count, so per-block partial sums add up deterministically.
template <class Body>
void parallel_row_blocks(std::int64_t rows, double work, Body body) {
  const int threads = row_block_threads(rows, work);
  if (threads <= 1) {
    body(std::int64_t(0), rows, 0);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static, 1) num_threads(threads)
#endif
  for (int id = 0; id < threads; ++id) {
    const std::int64_t begin = rows * id / threads, end = rows * (id + 1) / threads;
    if (end > begin) body(begin, end - begin, id);
  }
}

/// Number of OpenMP threads a parallel loop of the ops would use (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace peft::ops::detail
