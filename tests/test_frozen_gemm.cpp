// The frozen-weight products (core/ops/frozen_gemm.hpp) and the run-time dispatch
// (core/cpu_features.hpp): every path this machine can run, forced by argument, against a double
// reference; odd shapes; accumulate on and off; strided operands whose padding must stay
// untouched; thread-count invariance; and the errors.
//
// The error bound. The reference is the exact (double) sum r = y0 + Σ_p a_p w_p of the values
// the kernel is defined to multiply: for bf16 W, a_p = bf16(x_p) (round to nearest even) and
// w_p = W's bf16 value; for NF4 W, a_p = x_p and w_p = Nf4Tensor::dequantize's fp32 value. For
// bf16 each product a_p w_p is exact in fp32 (8 + 8 significant bits); for NF4 an FMA rounds
// once per term, a separate multiply and add twice. Any order of fp32 additions of k + 1 terms
// whose longest chain has d roundings satisfies |ŷ - r| <= γ_d · (|y0| + Σ|a_p w_p|), with
// γ_d = d·u / (1 - d·u), u = 2^-24 (Higham, Accuracy and Stability, eq. 3.5 and §4.2). Here
// d <= 2k + 2: at most one rounding per term for the running sum, one more per term for a
// rounded product (NF4 without FMA) or for adding a depth block's partial sum into y (blocking
// puts at most one such addition per term), and two for y0 and the final store. vdpbf16ps also
// treats subnormal inputs as zero and flushes subnormal results: each term can then move by
// less than 2^-126 · max|w| (a subnormal bf16(x)) and each rounding by 2^-126, which adds
// (k · max|w| + d) · 2^-126. The bound is checked element by element.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <peft/core/cpu_features.hpp>
#include <peft/core/ops/frozen_gemm.hpp>
#include <random>
#include <string>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_frozen_gemm {
#endif

namespace {

using peft::cpu::KernelPath;
using peft::ops::Bf16Matrix;
using peft::quant::Nf4Tensor;

// The paths this machine can run (portable always).
std::vector<KernelPath> runnable_paths() {
  std::vector<KernelPath> paths{KernelPath::portable};
  const auto& f = peft::cpu::cpu_features();
  if (f.avx512bf16_usable()) paths.push_back(KernelPath::avx512bf16);
  if (f.amx_usable()) paths.push_back(KernelPath::amx);
  return paths;
}

constexpr float kSentinel = 12345.0f;  // padding columns of y / dx must keep it

struct Case {
  std::int64_t n, out, in;
  bool forward, accumulate;
};

std::string describe(const Case& c, KernelPath path, const char* format) {
  return std::string(format) + (c.forward ? " forward" : " backward") +
         " n=" + std::to_string(c.n) + " out=" + std::to_string(c.out) +
         " in=" + std::to_string(c.in) + (c.accumulate ? " accumulate" : " overwrite") +
         " path=" + std::string(peft::cpu::to_string(path));
}

std::vector<float> random_values(std::size_t count, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(count);
  for (float& v : values) v = normal(rng);
  return values;
}

// The operands of one product: a [n, k] with 5 spare columns, c [n, cols] with 3 spare columns
// filled with kSentinel; k and cols are in / out (forward) or out / in (backward).
struct Operands {
  std::int64_t k, cols, lda, ldc;
  std::vector<float> a, c0;
};

Operands make_operands(const Case& cs, std::mt19937& rng) {
  Operands o;
  o.k = cs.forward ? cs.in : cs.out;
  o.cols = cs.forward ? cs.out : cs.in;
  o.lda = o.k + 5;
  o.ldc = o.cols + 3;
  o.a = random_values(std::size_t(cs.n * o.lda), 1.0f, rng);
  o.c0 = random_values(std::size_t(cs.n * o.ldc), 2.0f, rng);
  for (std::int64_t i = 0; i < cs.n; ++i)
    for (std::int64_t j = o.cols; j < o.ldc; ++j) o.c0[std::size_t(i * o.ldc + j)] = kSentinel;
  return o;
}

// Checks c against y0 + a · op(W) computed in double, W given by weight(row, col) of W [out, in]
// and a's values by a_value(x); bound as derived at the top of this file.
template <class Weight, class AValue>
void check_against_reference(const Case& cs, const Operands& o, const std::vector<float>& c,
                             Weight weight, AValue a_value, const std::string& what) {
  const double u = std::ldexp(1.0, -24), tiny = std::ldexp(1.0, -126);
  const double d = 2.0 * double(o.k) + 2.0;
  const double gamma = d * u / (1.0 - d * u);
  double w_max = 0.0;
  for (std::int64_t r = 0; r < cs.out; ++r)
    for (std::int64_t q = 0; q < cs.in; ++q) w_max = std::max(w_max, std::fabs(weight(r, q)));
  std::int64_t failures = 0;
  double worst_ratio = 0.0;
  for (std::int64_t i = 0; i < cs.n; ++i) {
    for (std::int64_t j = 0; j < o.ldc; ++j) {
      const float got = c[std::size_t(i * o.ldc + j)];
      if (j >= o.cols) {
        if (got != kSentinel) ++failures;
        continue;
      }
      const double y0 = cs.accumulate ? o.c0[std::size_t(i * o.ldc + j)] : 0.0;
      double sum = y0, magnitude = std::fabs(y0);
      for (std::int64_t p = 0; p < o.k; ++p) {
        const double w = cs.forward ? weight(j, p) : weight(p, j);
        const double term = a_value(o.a[std::size_t(i * o.lda + p)]) * w;
        sum += term;
        magnitude += std::fabs(term);
      }
      const double bound = gamma * magnitude + (double(o.k) * w_max + d) * tiny;
      const double error = std::fabs(double(got) - sum);
      if (!(error <= bound)) ++failures;
      if (bound > 0) worst_ratio = std::max(worst_ratio, error / bound);
    }
  }
  INFO(what << ": worst error / bound = " << worst_ratio);
  CHECK(failures == 0);
}

struct Bf16Weights {
  std::vector<std::uint16_t> bits;
  std::int64_t ld;
  Bf16Matrix view(std::int64_t out, std::int64_t in) const {
    return Bf16Matrix{bits.data(), out, in, ld, "test.weight"};
  }
};

Bf16Weights random_bf16(std::int64_t out, std::int64_t in, std::mt19937& rng) {
  Bf16Weights w;
  w.ld = in + 7;  // strided: the padding holds NaN, which must never be read
  w.bits.assign(std::size_t(out * w.ld), 0x7FC0);
  const std::vector<float> values = random_values(std::size_t(out * in), 0.05f, rng);
  for (std::int64_t r = 0; r < out; ++r)
    for (std::int64_t q = 0; q < in; ++q)
      w.bits[std::size_t(r * w.ld + q)] = peft::ops::bf16::round(values[std::size_t(r * in + q)]);
  return w;
}

template <class W>  // Bf16Matrix, Fp16Matrix or Nf4Tensor
std::vector<float> run_product(const Case& cs, const Operands& o, const W& w, KernelPath path) {
  std::vector<float> c = o.c0;
  if (cs.forward)
    peft::ops::frozen_forward(o.a.data(), o.lda, cs.n, w, c.data(), o.ldc, cs.accumulate, path);
  else
    peft::ops::frozen_backward(o.a.data(), o.lda, cs.n, w, c.data(), o.ldc, cs.accumulate, path);
  return c;
}

std::vector<float> run_bf16(const Case& cs, const Operands& o, const Bf16Matrix& w,
                            KernelPath path) {
  return run_product(cs, o, w, path);
}

std::vector<float> run_nf4(const Case& cs, const Operands& o, const Nf4Tensor& w, KernelPath path) {
  return run_product(cs, o, w, path);
}

// n = 1, out = 1, in = 1; in odd, not a multiple of 32 or 64; depth past one block (256);
// rows past one row block (144); columns past one column block (1024); NF4 blocks straddling
// rows (in % 64 != 0).
const std::vector<std::array<std::int64_t, 3>>
    kShapes = {{1, 1, 1},     {1, 33, 70},   {3, 1, 97},    {5, 70, 33},
               {13, 45, 300}, {37, 97, 513}, {150, 40, 64}, {2, 1100, 40},
               {25, 64, 1},   {12, 32, 256}, {33, 530, 600}};  // AMX: 16 + 16 + 1 rows, two
                                                               // 512-deep and two 512-wide blocks
                                                               // each way

double bf16_input(float x) { return peft::ops::bf16::to_float(peft::ops::bf16::round(x)); }

}  // namespace

TEST_CASE("bf16 rounding is round-to-nearest-even with NaN kept quiet, as c10::BFloat16") {
  using peft::ops::bf16::round;
  CHECK(round(1.0f) == 0x3F80);
  CHECK(round(std::nextafter(1.0f, 2.0f)) == 0x3F80);  // below half an ulp: down
  CHECK(round(1.0f + 0x1p-8f) == 0x3F80);              // a tie, to the even 0x3F80
  CHECK(round(1.0f + 3 * 0x1p-8f) == 0x3F82);          // a tie, to the even 0x3F82
  CHECK(round(1.0f + 0x1p-8f + 0x1p-20f) == 0x3F81);   // above the tie: up
  CHECK(round(-2.5f) == 0xC020);
  CHECK(round(std::numeric_limits<float>::infinity()) == 0x7F80);
  CHECK(round(std::numeric_limits<float>::max()) == 0x7F80);  // rounds up to infinity
  CHECK(round(std::numeric_limits<float>::quiet_NaN()) == 0x7FC0);
  CHECK(round(0x1p-130f) == 0x0008);  // subnormals are kept
  CHECK(peft::ops::bf16::to_float(0x3F81) == 1.0f + 0x1p-7f);
}

TEST_CASE("kernel paths: parsing, checking and the PEFT_CPU_KERNELS override") {
  using namespace peft::cpu;
  CHECK(parse_kernel_path("portable", "t") == KernelPath::portable);
  CHECK(parse_kernel_path("avx512bf16", "t") == KernelPath::avx512bf16);
  CHECK(parse_kernel_path("amx", "t") == KernelPath::amx);
  CHECK_THROWS_WITH_AS(parse_kernel_path("avx2", "PEFT_CPU_KERNELS"),
                       "PEFT_CPU_KERNELS: kernel path 'avx2', expected one of portable, "
                       "avx512bf16, amx",
                       peft::ConfigError);
  const CpuFeatures& f = cpu_features();
  CHECK(choose_kernel_path(nullptr, f) == best_kernel_path(f));
  CHECK(choose_kernel_path("", f) == best_kernel_path(f));
  CHECK(choose_kernel_path("portable", f) == KernelPath::portable);
  CHECK_THROWS_AS(choose_kernel_path("fast", f), peft::ConfigError);

  // A machine without anything runs only the portable path, and says what it lacks.
  const CpuFeatures none;
  CHECK(best_kernel_path(none) == KernelPath::portable);
  CHECK_NOTHROW(check_kernel_path(KernelPath::portable, none, "t"));
  CHECK_THROWS_WITH_AS(check_kernel_path(KernelPath::avx512bf16, none, "t"),
                       "t: kernel path 'avx512bf16' cannot run on this CPU, which lacks avx512f, "
                       "avx512bw, avx512vl, avx512_bf16; expected a path it supports (best here: "
                       "portable)",
                       peft::ConfigError);
  CpuFeatures denied = none;  // AMX present, but Linux refused the tile data permission
  denied.avx512f = denied.avx512bw = denied.avx512vl = denied.avx512_bf16 = denied.os_avx512 = true;
  denied.amx_tile = denied.amx_bf16 = denied.os_amx = true;
  denied.amx_note = "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: Invalid argument";
  CHECK(best_kernel_path(denied) == KernelPath::avx512bf16);
  CHECK_THROWS_WITH_AS(choose_kernel_path("amx", denied),
                       "PEFT_CPU_KERNELS: kernel path 'amx' cannot run on this CPU, which lacks "
                       "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: Invalid "
                       "argument; expected a path it supports (best here: avx512bf16)",
                       peft::ConfigError);
  denied.amx_permitted = true;
  denied.amx_note.clear();
  CHECK(best_kernel_path(denied) == KernelPath::amx);

#if defined(__x86_64__) && defined(__GNUC__)
  // CPUID as the compiler's own runtime reads it (XCR0 included) agrees with ours.
  __builtin_cpu_init();
  CHECK(f.avx512f == bool(__builtin_cpu_supports("avx512f")));
  CHECK(f.avx512_usable() ==
        (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl")));
  CHECK(f.avx512bf16_usable() == (f.avx512_usable() && bool(__builtin_cpu_supports("avx512bf16"))));
#endif
  // A forced path the machine lacks is an error, never an illegal instruction.
  if (!f.amx_usable()) {
    CHECK_THROWS_AS(check_kernel_path(KernelPath::amx, f, "t"), peft::ConfigError);
  }
  const std::string note = "this machine: best kernel path " +
                           std::string(to_string(best_kernel_path(f))) +
                           (f.amx_note.empty() ? std::string() : "; AMX: " + f.amx_note);
  MESSAGE(note);
}

TEST_CASE("bf16 W: every runnable path matches the double product of the bf16 operands") {
  std::mt19937 rng(7);
  for (const auto& shape : kShapes) {
    for (const bool forward : {true, false}) {
      for (const bool accumulate : {false, true}) {
        const Case cs{shape[0], shape[1], shape[2], forward, accumulate};
        const Operands o = make_operands(cs, rng);
        const Bf16Weights w = random_bf16(cs.out, cs.in, rng);
        const auto weight = [&](std::int64_t r, std::int64_t q) {
          return double(peft::ops::bf16::to_float(w.bits[std::size_t(r * w.ld + q)]));
        };
        std::vector<float> portable;
        for (const KernelPath path : runnable_paths()) {
          const std::vector<float> c = run_bf16(cs, o, w.view(cs.out, cs.in), path);
          check_against_reference(cs, o, c, weight, bf16_input, describe(cs, path, "bf16"));
          if (path == KernelPath::portable) portable = c;
        }
      }
    }
  }
}

TEST_CASE("fp16 W: every runnable path matches the double product of fp32 x and W's values") {
  std::mt19937 rng(13);
  for (const auto& shape : kShapes) {
    for (const bool forward : {true, false}) {
      for (const bool accumulate : {false, true}) {
        const Case cs{shape[0], shape[1], shape[2], forward, accumulate};
        const Operands o = make_operands(cs, rng);
        // Strided, the padding NaN (0x7E00), which must never be read; subnormals included.
        const std::int64_t ld = cs.in + 7;
        std::vector<std::uint16_t> bits(std::size_t(cs.out * ld), 0x7E00);
        const std::vector<float> values = random_values(std::size_t(cs.out * cs.in), 0.05f, rng);
        for (std::int64_t r = 0; r < cs.out; ++r)
          for (std::int64_t q = 0; q < cs.in; ++q)
            bits[std::size_t(r * ld + q)] = peft::float16::f16_bits_from(
                (r + q) % 11 == 0 ? values[std::size_t(r * cs.in + q)] * 1e-4f
                                  : values[std::size_t(r * cs.in + q)]);
        const peft::ops::Fp16Matrix w{bits.data(), cs.out, cs.in, ld, "test.fp16"};
        const auto weight = [&](std::int64_t r, std::int64_t q) {
          return double(peft::float16::f16_bits_to_float(bits[std::size_t(r * ld + q)]));
        };
        const auto identity = [](float x) { return double(x); };
        for (const KernelPath path : runnable_paths()) {
          check_against_reference(cs, o, run_product(cs, o, w, path), weight, identity,
                                  describe(cs, path, "fp16"));
        }
      }
    }
  }
}

TEST_CASE("NF4 W: every runnable path matches the double product of the dequantized weights") {
  std::mt19937 rng(11);
  for (const auto& shape : kShapes) {
    for (const bool forward : {true, false}) {
      for (const bool accumulate : {false, true}) {
        const Case cs{shape[0], shape[1], shape[2], forward, accumulate};
        const Operands o = make_operands(cs, rng);
        const Nf4Tensor w = Nf4Tensor::quantize(
            random_values(std::size_t(cs.out * cs.in), 0.05f, rng), {cs.out, cs.in}, "test.nf4");
        const std::vector<float> dequantized = w.dequantize();
        const auto weight = [&](std::int64_t r, std::int64_t q) {
          return double(dequantized[std::size_t(r * cs.in + q)]);
        };
        const auto identity = [](float x) { return double(x); };
        for (const KernelPath path : runnable_paths()) {
          check_against_reference(cs, o, run_nf4(cs, o, w, path), weight, identity,
                                  describe(cs, path, "nf4"));
        }
      }
    }
  }
}

TEST_CASE(
    "portable and AVX512-BF16 paths agree within twice the bound, and are thread-count "
    "invariant") {
  if (!peft::cpu::cpu_features().avx512bf16_usable()) {
    MESSAGE("no AVX512-BF16 on this CPU: only the portable path runs here");
    return;
  }
  std::mt19937 rng(3);
  const Case cs{64, 96, 768, true, false};
  const Operands o = make_operands(cs, rng);
  const Bf16Weights w = random_bf16(cs.out, cs.in, rng);
  const std::vector<float> fast = run_bf16(cs, o, w.view(cs.out, cs.in), KernelPath::avx512bf16);
  const std::vector<float> slow = run_bf16(cs, o, w.view(cs.out, cs.in), KernelPath::portable);
  const double u = std::ldexp(1.0, -24), d = 2.0 * double(cs.in) + 2.0;
  std::int64_t disagree = 0;
  for (std::int64_t i = 0; i < cs.n; ++i) {
    for (std::int64_t j = 0; j < cs.out; ++j) {
      double magnitude = 0.0;
      for (std::int64_t p = 0; p < cs.in; ++p)
        magnitude += std::fabs(bf16_input(o.a[std::size_t(i * o.lda + p)]) *
                               peft::ops::bf16::to_float(w.bits[std::size_t(j * w.ld + p)]));
      const std::size_t at = std::size_t(i * o.ldc + j);
      if (std::fabs(double(fast[at]) - double(slow[at])) > 2.0 * d * u / (1 - d * u) * magnitude)
        ++disagree;
    }
  }
  CHECK(disagree == 0);
#if defined(_OPENMP)
  // Big enough to be split between threads: bit-identical to the one-thread run.
  const Case big{40, 640, 512, false, true};
  const Operands ob = make_operands(big, rng);
  const Bf16Weights wb = random_bf16(big.out, big.in, rng);
  const Nf4Tensor wn = Nf4Tensor::quantize(random_values(std::size_t(big.out * big.in), 0.05f, rng),
                                           {big.out, big.in}, "big.nf4");
  const int before = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> one =
      run_bf16(big, ob, wb.view(big.out, big.in), KernelPath::avx512bf16);
  const std::vector<float> one_nf4 = run_nf4(big, ob, wn, KernelPath::avx512bf16);
  omp_set_num_threads(3);
  const std::vector<float> three =
      run_bf16(big, ob, wb.view(big.out, big.in), KernelPath::avx512bf16);
  const std::vector<float> three_nf4 = run_nf4(big, ob, wn, KernelPath::avx512bf16);
  if (peft::cpu::cpu_features().amx_usable()) {
    omp_set_num_threads(1);
    const std::vector<float> one_amx = run_bf16(big, ob, wb.view(big.out, big.in), KernelPath::amx);
    omp_set_num_threads(3);
    const std::vector<float> three_amx =
        run_bf16(big, ob, wb.view(big.out, big.in), KernelPath::amx);
    CHECK(one_amx == three_amx);
  }
  omp_set_num_threads(before);
  CHECK(one == three);
  CHECK(one_nf4 == three_nf4);
#endif
}

TEST_CASE("NF4 AVX-512 dequantization is bit-identical to Nf4Tensor::dequantize") {
  if (!peft::cpu::cpu_features().avx512_usable()) return;
#if defined(__x86_64__)
  std::mt19937 rng(5);
  std::vector<float> values = random_values(1000, 3.0f, rng);
  values[100] = 0.0f, values[101] = 1e30f;  // one huge value in a block
  const Nf4Tensor w = Nf4Tensor::quantize(values, {1000}, "flat");
  const std::vector<float> expected = w.dequantize();
  for (const auto& range : std::vector<std::array<std::int64_t, 2>>{
           {0, 1000}, {1, 999}, {31, 97}, {64, 128}, {63, 65}, {990, 1000}, {5, 5}}) {
    std::vector<float> got(std::size_t(range[1] - range[0]));
    peft::ops::frozen_detail::nf4_dequantize_avx512(w, range[0], range[1], got.data());
    CHECK(got == std::vector<float>(expected.begin() + range[0], expected.begin() + range[1]));
  }
#endif
}

TEST_CASE("frozen products: degenerate sizes and errors") {
  std::mt19937 rng(1);
  const Bf16Weights w = random_bf16(4, 6, rng);
  std::vector<float> x(2 * 6, 1.0f), y(2 * 4, 5.0f);
  for (const KernelPath path : runnable_paths()) {
    y.assign(8, 5.0f);
    // n = 0 touches nothing; in = 0 gives zeros (or leaves y when accumulating).
    peft::ops::frozen_forward(x.data(), 6, 0, w.view(4, 6), y.data(), 4, false, path);
    CHECK(y == std::vector<float>(8, 5.0f));
    const Bf16Matrix empty{w.bits.data(), 4, 0, 0, "empty"};
    peft::ops::frozen_forward(x.data(), 0, 2, empty, y.data(), 4, true, path);
    CHECK(y == std::vector<float>(8, 5.0f));
    peft::ops::frozen_forward(x.data(), 0, 2, empty, y.data(), 4, false, path);
    CHECK(y == std::vector<float>(8, 0.0f));
  }
  CHECK_THROWS_WITH_AS(
      peft::ops::frozen_forward(x.data(), 5, 2, w.view(4, 6), y.data(), 4, false,
                                KernelPath::portable),
      "frozen_forward: W 'test.weight' [4, 6]: x row stride 5, expected at least its 6 columns",
      peft::ShapeError);
  CHECK_THROWS_WITH_AS(
      peft::ops::frozen_backward(y.data(), 4, 2, w.view(4, 6), x.data(), 3, false,
                                 KernelPath::portable),
      "frozen_backward: W 'test.weight' [4, 6]: dx row stride 3, expected at least its 6 columns",
      peft::ShapeError);
  CHECK_THROWS_WITH_AS(
      peft::ops::frozen_forward(x.data(), 6, 2, Bf16Matrix{w.bits.data(), 4, 6, 2, "bad"}, y.data(),
                                4, false, KernelPath::portable),
      "frozen_forward: W 'bad' [4, 6]: row stride 2, expected at least its 6 columns",
      peft::ShapeError);
  const Nf4Tensor flat = Nf4Tensor::quantize(std::vector<float>(6, 1.0f), {6}, "flat.nf4");
  CHECK_THROWS_WITH_AS(
      peft::ops::frozen_forward(x.data(), 6, 1, flat, y.data(), 4, false, KernelPath::portable),
      "frozen_forward: W 'flat.nf4' has 1 dimensions, expected a matrix [out, in]",
      peft::ShapeError);
  if (!peft::cpu::cpu_features().amx_usable()) {
    CHECK_THROWS_AS(peft::ops::frozen_forward(x.data(), 6, 2, w.view(4, 6), y.data(), 4, false,
                                              KernelPath::amx),
                    peft::ConfigError);
  }
}

}  // namespace test_frozen_gemm
