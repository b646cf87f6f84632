// The frozen-weight products (core/ops/frozen_gemm.hpp) against the fp32 product the ops use
// (detail::gemm), at the shapes of a GPT-2 124M LoRA step: n = 4 x 256 tokens, W [out, in] for
// attn.c_attn (2304 x 768), attn.c_proj (768 x 768), mlp.c_fc (3072 x 768), mlp.c_proj
// (768 x 3072) and the tied head (50257 x 768); forward y = x Wᵀ and backward dx = dy W. Also
// the core's peak rates (fp32 FMA and vdpbf16ps in independent chains), the yardsticks of the
// "fraction of peak" in docs/performance.md, "Frozen-weight kernels".
//
//   build/bin/peft_bench --benchmark_filter='Frozen|Peak'
//
// Threads: OMP_NUM_THREADS. Rows: BM_Frozen<format>/<path>/out/in/backward (format Fp32, Bf16,
// Fp16, Nf4; the fp16 and NF4 products run on fp32 panels on every path but portable).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <peft/core/cpu_features.hpp>
#include <peft/core/ops/frozen_gemm.hpp>
#include <random>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using peft::cpu::KernelPath;

constexpr std::int64_t kTokens = 4 * 256;

std::vector<float> random_values(std::size_t count, float scale, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(count);
  for (float& v : values) v = normal(rng);
  return values;
}

void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["FLOPS"] =
      benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::kIs1000);
}

// The operands of one product: a [n, k] and c [n, cols] with k, cols = in, out (forward) or
// out, in (backward).
struct Product {
  std::int64_t out, in, k, cols;
  bool backward;
  std::vector<float> w, a, c;
  explicit Product(const benchmark::State& state)
      : out(state.range(0)), in(state.range(1)), backward(state.range(2) != 0) {
    k = backward ? out : in;
    cols = backward ? in : out;
    w = random_values(std::size_t(out * in), 0.02f, 1);
    a = random_values(std::size_t(kTokens * k), 1.0f, 2);
    c.assign(std::size_t(kTokens * cols), 0.0f);
  }
};

bool path_runs(benchmark::State& state, KernelPath path) {
  if (path == KernelPath::portable) return true;
  const std::string missing = peft::cpu::missing_for(path, peft::cpu::cpu_features());
  if (missing.empty()) return true;
  state.SkipWithError(("this CPU lacks " + missing).c_str());
  return false;
}

void BM_FrozenFp32(benchmark::State& state) {
  Product p(state);
  for (auto _ : state) {
    if (p.backward)  // dx = dy W: W [out, in] is op(B) = B
      peft::ops::detail::gemm(p.a.data(), p.k, false, p.w.data(), p.in, false, p.c.data(), p.cols,
                              kTokens, p.cols, p.k);
    else  // y = x Wᵀ
      peft::ops::detail::gemm(p.a.data(), p.k, false, p.w.data(), p.in, true, p.c.data(), p.cols,
                              kTokens, p.cols, p.k);
    benchmark::DoNotOptimize(p.c.data());
  }
  set_flops(state, 2.0 * double(kTokens) * double(p.out) * double(p.in));
}

// A 16-bit W (Matrix: Bf16Matrix or Fp16Matrix) from the fp32 values through `encode`.
template <class Matrix, KernelPath Path, std::uint16_t (*Encode)(float)>
void frozen_half(benchmark::State& state) {
  if (!path_runs(state, Path)) return;
  Product p(state);
  std::vector<std::uint16_t> bits(p.w.size());
  for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = Encode(p.w[i]);
  const Matrix w{bits.data(), p.out, p.in, p.in, "bench"};
  for (auto _ : state) {
    if (p.backward)
      peft::ops::frozen_backward(p.a.data(), p.k, kTokens, w, p.c.data(), p.cols, false, Path);
    else
      peft::ops::frozen_forward(p.a.data(), p.k, kTokens, w, p.c.data(), p.cols, false, Path);
    benchmark::DoNotOptimize(p.c.data());
  }
  set_flops(state, 2.0 * double(kTokens) * double(p.out) * double(p.in));
}

template <KernelPath Path>
void BM_FrozenBf16(benchmark::State& state) {
  frozen_half<peft::ops::Bf16Matrix, Path, peft::ops::bf16::round>(state);
}

template <KernelPath Path>
void BM_FrozenFp16(benchmark::State& state) {
  frozen_half<peft::ops::Fp16Matrix, Path, peft::float16::f16_bits_from>(state);
}

template <KernelPath Path>
void BM_FrozenNf4(benchmark::State& state) {
  if (!path_runs(state, Path)) return;
  Product p(state);
  const auto w = peft::quant::Nf4Tensor::quantize(p.w, {p.out, p.in}, "bench");
  for (auto _ : state) {
    if (p.backward)
      peft::ops::frozen_backward(p.a.data(), p.k, kTokens, w, p.c.data(), p.cols, false, Path);
    else
      peft::ops::frozen_forward(p.a.data(), p.k, kTokens, w, p.c.data(), p.cols, false, Path);
    benchmark::DoNotOptimize(p.c.data());
  }
  set_flops(state, 2.0 * double(kTokens) * double(p.out) * double(p.in));
}

// out, in, backward: the GPT-2 124M step's frozen products.
void step_shapes(benchmark::internal::Benchmark* b) {
  for (const std::int64_t backward : {0, 1}) {
    b->Args({2304, 768, backward});   // attn.c_attn
    b->Args({768, 768, backward});    // attn.c_proj
    b->Args({3072, 768, backward});   // mlp.c_fc
    b->Args({768, 3072, backward});   // mlp.c_proj
    b->Args({50257, 768, backward});  // the tied head
  }
  b->ArgNames({"out", "in", "backward"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_FrozenFp32)->Apply(step_shapes);
BENCHMARK(BM_FrozenBf16<KernelPath::amx>)->Apply(step_shapes);
BENCHMARK(BM_FrozenBf16<KernelPath::avx512bf16>)->Apply(step_shapes);
BENCHMARK(BM_FrozenBf16<KernelPath::portable>)->Apply(step_shapes);
BENCHMARK(BM_FrozenFp16<KernelPath::avx512bf16>)->Apply(step_shapes);
BENCHMARK(BM_FrozenFp16<KernelPath::portable>)->Apply(step_shapes);
BENCHMARK(BM_FrozenNf4<KernelPath::avx512bf16>)->Apply(step_shapes);
BENCHMARK(BM_FrozenNf4<KernelPath::portable>)->Apply(step_shapes);

#if defined(__x86_64__)
// Peak rates of one core: 24 independent accumulator chains (as the 12 x 32 tile has), 1 << 20
// instructions per iteration, no memory traffic. FLOPS counts 2 per multiply-add.
__attribute__((target("avx512f"), noinline)) void fma_chains(float* out, std::int64_t steps) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-4f);
  for (std::int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  for (int i = 1; i < 24; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  _mm512_storeu_ps(out, acc[0]);
}

__attribute__((target("avx512f,avx512bf16"), noinline)) void dpbf16_chains(float* out,
                                                                           std::int64_t steps) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0);
  for (std::int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  for (int i = 1; i < 24; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  _mm512_storeu_ps(out, acc[0]);
}

void BM_PeakFp32Fma(benchmark::State& state) {
  if (!peft::cpu::cpu_features().avx512_usable()) {
    state.SkipWithError("no AVX-512");
    return;
  }
  alignas(64) float out[16];
  const std::int64_t steps = (1 << 20) / 24;
  for (auto _ : state) {
    fma_chains(out, steps);
    benchmark::DoNotOptimize(out);
  }
  set_flops(state, double(steps) * 24 * 16 * 2);  // 16 lanes, one multiply-add each
}
BENCHMARK(BM_PeakFp32Fma)->UseRealTime();

void BM_PeakBf16Dot(benchmark::State& state) {
  if (!peft::cpu::cpu_features().avx512bf16_usable()) {
    state.SkipWithError("no AVX512-BF16");
    return;
  }
  alignas(64) float out[16];
  const std::int64_t steps = (1 << 20) / 24;
  for (auto _ : state) {
    dpbf16_chains(out, steps);
    benchmark::DoNotOptimize(out);
  }
  set_flops(state, double(steps) * 24 * 32 * 2);  // 16 lanes, two multiply-adds each
}
BENCHMARK(BM_PeakBf16Dot)->UseRealTime();

// tdpbf16ps on four independent 16 x 16 accumulator tiles from operand tiles loaded once: the
// tile unit's peak (16 x 16 x 32 multiply-adds per instruction).
__attribute__((target("amx-tile,amx-bf16"), noinline)) void amx_chains(float* out,
                                                                       std::int64_t steps) {
  alignas(64) static const std::uint16_t operand[16 * 32] = {};
  const peft::ops::frozen_detail::AmxTileConfig config;
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, operand, 64);
  _tile_loadd(5, operand, 64);
  _tile_loadd(6, operand, 64);
  _tile_loadd(7, operand, 64);
  for (std::int64_t s = 0; s < steps; ++s) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
}

void BM_PeakAmxBf16(benchmark::State& state) {
  if (!path_runs(state, KernelPath::amx)) return;
  alignas(64) float out[16 * 16];
  const std::int64_t steps = (1 << 14) / 4;
  for (auto _ : state) {
    amx_chains(out, steps);
    benchmark::DoNotOptimize(out);
  }
  set_flops(state, double(steps) * 4 * 16 * 16 * 32 * 2);
}
BENCHMARK(BM_PeakAmxBf16)->UseRealTime();
#endif

}  // namespace
