// The matrix product every op goes through (core/ops/gemm.hpp and, on AVX-512 builds, the packed
// kernel of core/ops/gemm_avx512.hpp): all four transposition cases at sizes that are not
// multiples of the register tile, α, accumulate and overwrite, strided C whose padding must stay
// untouched, and the position independence that makes results bit-reproducible.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <peft/peft.hpp>
#include <random>
#include <vector>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_gemm {

namespace {

struct Operands {
  std::int64_t m, n, k, lda, ldb, ldc;
  bool trans_a, trans_b;
  peft::AlignedVector<float> a, b, c;
};

// Random never-zero operands for op(A) [m, k], op(B) [k, n]; C [m, n] with 3 spare columns.
Operands make_operands(std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a, bool trans_b,
                       unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> magnitude(0.1f, 1.0f);
  std::bernoulli_distribution negative(0.5);
  auto draw = [&] { return negative(rng) ? -magnitude(rng) : magnitude(rng); };
  Operands o{m, n, k, trans_a ? m : k, trans_b ? k : n, n + 3, trans_a, trans_b, {}, {}, {}};
  o.a.resize(static_cast<std::size_t>(m * k));
  o.b.resize(static_cast<std::size_t>(k * n));
  o.c.resize(static_cast<std::size_t>(m * o.ldc));
  for (float& x : o.a) x = draw();
  for (float& x : o.b) x = draw();
  for (float& x : o.c) x = draw();
  return o;
}

float a_at(const Operands& o, std::int64_t i, std::int64_t p) {
  return o.trans_a ? o.a[std::size_t(p * o.lda + i)] : o.a[std::size_t(i * o.lda + p)];
}
float b_at(const Operands& o, std::int64_t p, std::int64_t j) {
  return o.trans_b ? o.b[std::size_t(j * o.ldb + p)] : o.b[std::size_t(p * o.ldb + j)];
}

void run_gemm(Operands& o, float alpha, bool accumulate, bool serial) {
  if (serial)
    peft::ops::detail::gemm_serial(o.a.data(), o.lda, o.trans_a, o.b.data(), o.ldb, o.trans_b,
                                   o.c.data(), o.ldc, o.m, o.n, o.k, alpha, accumulate);
  else
    peft::ops::detail::gemm(o.a.data(), o.lda, o.trans_a, o.b.data(), o.ldb, o.trans_b, o.c.data(),
                            o.ldc, o.m, o.n, o.k, alpha, accumulate);
}

}  // namespace

TEST_CASE("float product: four transpositions, awkward sizes, alpha, accumulate, strided C") {
  const std::int64_t sizes[][3] = {{1, 1, 1},      {13, 33, 7},    {12, 32, 300}, {37, 53, 91},
                                   {100, 65, 257}, {131, 97, 513}, {2, 300, 40},  {300, 2, 40}};
  unsigned seed = 1;
  for (const auto& s : sizes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (int accumulate = 0; accumulate < 2; ++accumulate)
          for (int serial = 0; serial < 2; ++serial) {
            CAPTURE(s[0]);
            CAPTURE(s[1]);
            CAPTURE(s[2]);
            CAPTURE(ta);
            CAPTURE(tb);
            CAPTURE(accumulate);
            CAPTURE(serial);
            Operands o = make_operands(s[0], s[1], s[2], ta, tb, seed++);
            const peft::AlignedVector<float> before = o.c;
            if (!accumulate)  // overwrite must never read C: poison what it overwrites
              for (std::int64_t i = 0; i < o.m; ++i)
                for (std::int64_t j = 0; j < o.n; ++j)
                  o.c[std::size_t(i * o.ldc + j)] = std::numeric_limits<float>::quiet_NaN();
            const float alpha = 0.75f;
            run_gemm(o, alpha, accumulate, serial);
            for (std::int64_t i = 0; i < o.m; ++i) {
              for (std::int64_t j = 0; j < o.ldc; ++j) {
                const std::size_t at = std::size_t(i * o.ldc + j);
                if (j >= o.n) {  // the spare columns of a strided C are not C's
                  REQUIRE(o.c[at] == before[at]);
                  continue;
                }
                double expected = 0, magnitude = 0;
                for (std::int64_t p = 0; p < o.k; ++p) {
                  expected += double(a_at(o, i, p)) * double(b_at(o, p, j));
                  magnitude += std::abs(double(a_at(o, i, p)) * double(b_at(o, p, j)));
                }
                expected *= alpha;
                if (accumulate) expected += before[at];
                const double tolerance = 4e-7 * (magnitude + std::abs(double(before[at])) + 1);
                REQUIRE(std::abs(double(o.c[at]) - expected) <= tolerance);
              }
            }
          }
}

TEST_CASE("tensor storage is 64-byte aligned") {
  for (std::int64_t n : {1, 3, 17, 1000}) {
    peft::Tensor<float> t({n});
    CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % peft::tensor_alignment == 0);
    peft::Tensor<double> d({n, 3});
    CHECK(reinterpret_cast<std::uintptr_t>(d.data()) % peft::tensor_alignment == 0);
  }
}

#if defined(__AVX512F__)
// What makes native builds bit-reproducible: an element of C is computed the same way wherever it
// sits, so a row block (a thread's share, or a padded batch's real rows) or a column block gives
// bit-identical values. Eigen's SSE2 product, used without AVX-512, is covered by the decoder's
// padding-invariance tests.
TEST_CASE("packed AVX-512 product: an element's value does not depend on its position") {
  for (int tb = 0; tb < 2; ++tb) {
    Operands whole = make_operands(200, 150, 700, false, tb, 7);
    run_gemm(whole, 1.0f, false, true);
    // Rows 37.. as their own product (m = 163: the tiles now start on other rows).
    Operands rows = whole;
    peft::ops::detail::gemm_serial(rows.a.data() + 37 * rows.lda, rows.lda, false, rows.b.data(),
                                   rows.ldb, rows.trans_b, rows.c.data() + 37 * rows.ldc, rows.ldc,
                                   163, rows.n, rows.k, 1.0f, false);
    // Columns 5.. as their own product (the panels now start on other columns).
    Operands cols = whole;
    const float* b_cols = tb ? cols.b.data() + 5 * cols.ldb : cols.b.data() + 5;
    peft::ops::detail::gemm_serial(cols.a.data(), cols.lda, false, b_cols, cols.ldb, cols.trans_b,
                                   cols.c.data() + 5, cols.ldc, cols.m, 145, cols.k, 1.0f, false);
    CHECK(rows.c == whole.c);
    CHECK(cols.c == whole.c);
  }
}
#endif

}  // namespace test_gemm
