#pragma once
// One term of a sum of matrix products, shared by the generic product (gemm.hpp) and the packed
// AVX-512 kernel (gemm_avx512.hpp), so that a sum passes from one to the other as it is.
#include <cstdint>

namespace peft::ops::detail {

/// op(A) [m, k] op(B) [k, n], A stored [m, k] (or [k, m] when trans_a) with row stride lda, B
/// stored [k, n] (or [n, k] when trans_b) with row stride ldb; op(B) is multiplied by b_scale.
template <class T>
struct GemmTerm {
  const T* a;
  std::int64_t lda;
  bool trans_a;
  const T* b;
  std::int64_t ldb;
  bool trans_b;
  std::int64_t k;
  T b_scale = T(1);
};

}  // namespace peft::ops::detail
