// Microbenchmarks of the ops a training step spends its time in: the machine's GEMM rate (the
// yardstick of docs/performance.md), the LoRA linear against the frozen base linear, attention,
// the norms, cross-entropy and the fused head + loss.
//
//   build/bin/peft_bench --benchmark_filter=Linear --benchmark_format=json
//
// Threads: OMP_NUM_THREADS (every product and parallel loop of the ops uses OpenMP).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <peft/core/ops.hpp>
#include <random>
#include <vector>

namespace {

using peft::Shape;
using peft::Tape;
using peft::Tensor;
using peft::Var;

Tensor<float> random_tensor(Shape shape, float scale, std::uint64_t seed) {
  Tensor<float> t(std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = normal(rng);
  return t;
}

// Floating-point operations per second, from the work of one iteration.
void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["FLOPS"] =
      benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate,
                         benchmark::Counter::kIs1000);
}

// ---------------------------------------------------------------------------------------------
// The machine's GEMM rate: C = A B, float, through the same product the ops use.
void BM_Gemm(benchmark::State& state) {
  const std::int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  const Tensor<float> a = random_tensor({m, k}, 1.0f, 1), b = random_tensor({k, n}, 1.0f, 2);
  Tensor<float> c({m, n});
  for (auto _ : state) {
    peft::ops::detail::gemm(a.data(), k, false, b.data(), n, false, c.data(), n, m, n, k);
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(state, 2.0 * double(m) * double(n) * double(k));
}
BENCHMARK(BM_Gemm)
    ->Args({2048, 2048, 2048})
    ->Args({1024, 768, 2304})   // GPT-2 c_attn, 4 x 256 tokens
    ->Args({1024, 3072, 768})   // GPT-2 mlp.c_proj
    ->Args({1024, 768, 50257})  // the tied head
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---------------------------------------------------------------------------------------------
// Linear layers: args tokens, in, out, rank. The base weight is frozen and the input requires a
// gradient (as inside a model), so the base backward is dX only; LoRA adds dA and dB.
struct LinearCase {
  Var<float> x, w, bias, a, b;
  Tensor<float> seed;
  float scale;
  LinearCase(std::int64_t tokens, std::int64_t in, std::int64_t out, std::int64_t rank)
      : x(random_tensor({tokens, in}, 1.0f, 3), true),
        w(random_tensor({in, out}, 0.02f, 4)),
        bias(Tensor<float>({out})),
        a(random_tensor({rank, in}, 0.02f, 5), true),
        b(random_tensor({out, rank}, 0.02f, 6), true),  // non-zero, unlike LoRA's init
        seed(random_tensor({tokens, out}, 1.0f, 7)),
        scale(16.0f / float(rank)) {}
};

constexpr auto kGpt2Layout = peft::ops::WeightLayout::InOut;

void linear_flops(benchmark::State& state, bool backward, bool lora) {
  const double n = double(state.range(0)), in = double(state.range(1));
  const double out = double(state.range(2)), r = double(state.range(3));
  double flops = 2 * n * in * out;                                 // base forward
  if (backward) flops += 2 * n * in * out;                         // dX
  if (lora) flops += 2 * n * r * (in + out) * (backward ? 3 : 1);  // h, hBᵀ; gh, dA, dB, dX
  set_flops(state, flops);
}

void BM_LinearBaseForward(benchmark::State& state) {
  LinearCase c(state.range(0), state.range(1), state.range(2), state.range(3));
  for (auto _ : state) {
    Tape<float> tape(false);
    Var<float> y = peft::ops::linear(tape, c.x, c.w, c.bias, kGpt2Layout);
    benchmark::DoNotOptimize(y.value().data());
  }
  linear_flops(state, false, false);
}

void BM_LoraLinearForward(benchmark::State& state) {
  LinearCase c(state.range(0), state.range(1), state.range(2), state.range(3));
  for (auto _ : state) {
    Tape<float> tape(false);
    Var<float> y = peft::ops::lora_linear(tape, c.x, c.w, c.bias, kGpt2Layout, c.a, c.b, c.scale);
    benchmark::DoNotOptimize(y.value().data());
  }
  linear_flops(state, false, true);
}

void BM_LinearBaseForwardBackward(benchmark::State& state) {
  LinearCase c(state.range(0), state.range(1), state.range(2), state.range(3));
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> y = peft::ops::linear(tape, c.x, c.w, c.bias, kGpt2Layout);
    tape.backward(y, c.seed);
  }
  linear_flops(state, true, false);
}

void BM_LoraLinearForwardBackward(benchmark::State& state) {
  LinearCase c(state.range(0), state.range(1), state.range(2), state.range(3));
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> y = peft::ops::lora_linear(tape, c.x, c.w, c.bias, kGpt2Layout, c.a, c.b, c.scale);
    tape.backward(y, c.seed);
  }
  linear_flops(state, true, true);
}

// tokens, in, out, rank: the done-when case (2048, 1024, 1024, 8) over ranks, and GPT-2's
// projections at 4 x 256 tokens.
void linear_sizes(benchmark::internal::Benchmark* b) {
  for (std::int64_t rank : {4, 8, 16, 64}) b->Args({2048, 1024, 1024, rank});
  b->Args({512, 1024, 1024, 8});
  b->Args({1024, 768, 2304, 8});
  b->Args({1024, 768, 3072, 8});
  b->Args({1024, 3072, 768, 8});
  b->ArgNames({"tokens", "in", "out", "r"})->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK(BM_LinearBaseForward)->Apply(linear_sizes);
BENCHMARK(BM_LoraLinearForward)->Apply(linear_sizes);
BENCHMARK(BM_LinearBaseForwardBackward)->Apply(linear_sizes);
BENCHMARK(BM_LoraLinearForwardBackward)->Apply(linear_sizes);

// ---------------------------------------------------------------------------------------------
// Causal attention: args batch, seq, heads, head_dim (GPT-2 124M: 4, 256, 12, 64).
struct AttentionCase {
  Var<float> q, k, v;
  Tensor<float> seed;
  peft::ops::AttentionSpec spec;
  AttentionCase(std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t dim)
      : q(random_tensor({batch, seq, heads * dim}, 1.0f, 8), true),
        k(random_tensor({batch, seq, heads * dim}, 1.0f, 9), true),
        v(random_tensor({batch, seq, heads * dim}, 1.0f, 10), true),
        seed(random_tensor({batch, seq, heads * dim}, 1.0f, 11)) {
    spec.heads = spec.kv_heads = heads;
    spec.head_dim = dim;
  }
};

// The products of the full (unmasked) score matrix: what an implementation that does not skip
// the causal half performs; the counter is this over time, so skipping shows as a higher rate.
void attention_flops(benchmark::State& state, int products) {
  const double b = double(state.range(0)), t = double(state.range(1));
  const double h = double(state.range(2)), d = double(state.range(3));
  set_flops(state, products * 2 * b * h * t * t * d);
}

void BM_AttentionForward(benchmark::State& state) {
  AttentionCase c(state.range(0), state.range(1), state.range(2), state.range(3));
  for (auto _ : state) {
    Tape<float> tape(false);
    Var<float> y = peft::ops::attention(tape, c.q, c.k, c.v, c.spec);
    benchmark::DoNotOptimize(y.value().data());
  }
  attention_flops(state, 2);
}

void BM_AttentionForwardBackward(benchmark::State& state) {
  AttentionCase c(state.range(0), state.range(1), state.range(2), state.range(3));
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> y = peft::ops::attention(tape, c.q, c.k, c.v, c.spec);
    tape.backward(y, c.seed);
  }
  attention_flops(state, 7);  // forward 2, backward recomputes QKᵀ and does 4 more
}
BENCHMARK(BM_AttentionForward)
    ->Args({4, 256, 12, 64})
    ->Args({1, 1024, 12, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_AttentionForwardBackward)
    ->Args({4, 256, 12, 64})
    ->Args({1, 1024, 12, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---------------------------------------------------------------------------------------------
// Norms over [rows, d], input requiring a gradient, weights frozen (as in a PEFT step).
void BM_LayerNormForwardBackward(benchmark::State& state) {
  const std::int64_t rows = state.range(0), d = state.range(1);
  Var<float> x(random_tensor({rows, d}, 1.0f, 12), true);
  Var<float> w(Tensor<float>({d}, 1.0f)), b(Tensor<float>({d}));
  const Tensor<float> seed = random_tensor({rows, d}, 1.0f, 13);
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> y = peft::ops::layer_norm(tape, x, w, b, 1e-5f);
    tape.backward(y, seed);
  }
  state.SetBytesProcessed(state.iterations() * rows * d * 4 * std::int64_t(sizeof(float)));
}
BENCHMARK(BM_LayerNormForwardBackward)->Args({1024, 768})->Args({8192, 1024})->UseRealTime();

void BM_RmsNormForwardBackward(benchmark::State& state) {
  const std::int64_t rows = state.range(0), d = state.range(1);
  Var<float> x(random_tensor({rows, d}, 1.0f, 14), true);
  Var<float> w(Tensor<float>({d}, 1.0f));
  const Tensor<float> seed = random_tensor({rows, d}, 1.0f, 15);
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> y = peft::ops::rms_norm(tape, x, w, 1e-6f);
    tape.backward(y, seed);
  }
  state.SetBytesProcessed(state.iterations() * rows * d * 4 * std::int64_t(sizeof(float)));
}
BENCHMARK(BM_RmsNormForwardBackward)->Args({1024, 768})->Args({8192, 1024})->UseRealTime();

void BM_GeluForwardBackward(benchmark::State& state) {
  const std::int64_t rows = state.range(0), d = state.range(1);
  Var<float> x(random_tensor({rows, d}, 1.0f, 16), true);
  const Tensor<float> seed = random_tensor({rows, d}, 1.0f, 17);
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> y = peft::ops::gelu_tanh(tape, x);
    tape.backward(y, seed);
  }
  state.SetBytesProcessed(state.iterations() * rows * d * 4 * std::int64_t(sizeof(float)));
}
BENCHMARK(BM_GeluForwardBackward)->Args({1024, 3072})->UseRealTime();

// ---------------------------------------------------------------------------------------------
// Cross-entropy over [rows, vocab] logits, and the tied head fused with it.
std::vector<std::int64_t> random_targets(std::int64_t rows, std::int64_t vocab) {
  std::mt19937_64 rng(18);
  std::uniform_int_distribution<std::int64_t> token(0, vocab - 1);
  std::vector<std::int64_t> t(static_cast<std::size_t>(rows));
  for (std::int64_t& y : t) y = token(rng);
  return t;
}

void BM_CrossEntropyForwardBackward(benchmark::State& state) {
  const std::int64_t rows = state.range(0), vocab = state.range(1);
  Var<float> logits(random_tensor({rows, vocab}, 1.0f, 19), true);
  const std::vector<std::int64_t> targets = random_targets(rows, vocab);
  for (auto _ : state) {
    Tape<float> tape;
    Var<float> loss = peft::ops::cross_entropy(tape, logits, targets);
    tape.backward(loss);
  }
  state.SetBytesProcessed(state.iterations() * rows * vocab * 3 * std::int64_t(sizeof(float)));
}
BENCHMARK(BM_CrossEntropyForwardBackward)
    ->Args({1024, 50257})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_HeadCrossEntropyForwardBackward(benchmark::State& state) {
  const std::int64_t rows = state.range(0), d = state.range(1), vocab = state.range(2);
  Var<float> x(random_tensor({rows, d}, 1.0f, 20), true);
  Var<float> embedding(random_tensor({vocab, d}, 0.02f, 21));
  const std::vector<std::int64_t> targets = random_targets(rows, vocab);
  for (auto _ : state) {
    Tape<float> tape;
    auto out = peft::ops::linear_cross_entropy(tape, x, embedding, Var<float>{},
                                               peft::ops::WeightLayout::OutIn, targets);
    out.logits = Var<float>{};  // dropped: backward reuses the logits buffer for the gradient
    tape.backward(out.loss);
  }
  set_flops(state, 4.0 * double(rows) * double(d) * double(vocab));
}
BENCHMARK(BM_HeadCrossEntropyForwardBackward)
    ->Args({1024, 768, 50257})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
