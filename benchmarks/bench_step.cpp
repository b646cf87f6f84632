// Full training steps, one per method family, and inference with an adapter merged into the
// base weights against the unmerged adapter.
//
// The step is cli/bench_step.hpp's StepWorkload<Policy> (the work `peft bench-step` times):
// frozen random GPT-2 decoder, forward, cross-entropy, backward, AdamW on the trainable
// tensors. Adding a family is one line: BENCHMARK_TEMPLATE(BM_TrainingStep, peft::SomePolicy)
// ->Apply(step_sizes), with a step_policy_config<SomePolicy> specialisation when its default
// config does not attach anywhere.
#include "../cli/bench_step.hpp"

#include <benchmark/benchmark.h>

#include <cstdint>
#include <peft/methods/hybrid/adapter_drop.hpp>
#include <peft/peft.hpp>
#include <random>

// The hybrid row: LoRA (the step's rank and targets) composed with a serial adapter.
using LoraWithSerialAdapter = peft::Compose<peft::LoRA, peft::SerialAdapter>;
template <>
inline LoraWithSerialAdapter::Config peft::cli::step_policy_config<LoraWithSerialAdapter>(
    const StepOptions& o) {
  return LoraWithSerialAdapter::Config(step_policy_config<peft::LoRA>(o),
                                       peft::SerialAdapter::Config{});
}

namespace {

using peft::cli::StepOptions;

// args: layers, d, batch, seq (heads d / 64, vocab 50257, LoRA r 8 alpha 16 on all four
// projections). {12, 768, 4, 256} is the peer's default GPT-2 124M step.
StepOptions step_options(const benchmark::State& state) {
  StepOptions o;
  o.layers = state.range(0);
  o.d = state.range(1);
  o.heads = o.d / 64;
  o.batch = state.range(2);
  o.seq = state.range(3);
  return o;
}

void step_sizes(benchmark::internal::Benchmark* b) {
  b->Args({2, 768, 4, 256});
  b->Args({12, 768, 4, 256});
  b->ArgNames({"layers", "d", "batch", "seq"})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(3);
}

template <class Policy>
void BM_TrainingStep(benchmark::State& state) {
  peft::cli::StepWorkload<Policy> work(step_options(state));
  work.step();  // warm-up: optimizer state, first-touch of the allocator's pages
  for (auto _ : state) benchmark::DoNotOptimize(work.step());
  state.counters["trainable"] = double(work.trainable_count());
}
BENCHMARK_TEMPLATE(BM_TrainingStep, peft::LoRA)->Apply(step_sizes);

// One step of each other family at the 2-layer size, with default configs: IA3 on c_attn and
// mlp.c_proj (the reference's GPT-2 default), a serial bottleneck adapter after each block's
// attention and MLP, BitFit on every bias, and LoRA (as in the LoRA step) composed with a serial
// adapter. (Prefix-based methods need max_positions > seq, which the peer's model does not have.)
void family_step_sizes(benchmark::internal::Benchmark* b) {
  b->Args({2, 768, 4, 256});
  b->ArgNames({"layers", "d", "batch", "seq"})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(3);
}
BENCHMARK_TEMPLATE(BM_TrainingStep, peft::IA3)->Apply(family_step_sizes);              // additive
BENCHMARK_TEMPLATE(BM_TrainingStep, peft::SerialAdapter)->Apply(family_step_sizes);    // additive
BENCHMARK_TEMPLATE(BM_TrainingStep, peft::BitFit)->Apply(family_step_sizes);           // selective
BENCHMARK_TEMPLATE(BM_TrainingStep, LoraWithSerialAdapter)->Apply(family_step_sizes);  // hybrid

// Inference (no tape) of a LoRA model, adapter unmerged (base product + low-rank path) or
// merged into W (base product only). args: layers, d, batch, seq.
void inference(benchmark::State& state, bool merged) {
  StepOptions o = step_options(state);
  peft::cli::StepWorkload<peft::LoRA> work(o);
  work.step();  // B moves away from 0, so the merge changes the weights
  if (merged) work.model().merge();
  peft::Batch batch;
  batch.batch = o.batch;
  batch.seq = o.seq;
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<std::int64_t> token(0, o.vocab - 1);
  for (std::int64_t i = 0; i < o.batch * o.seq; ++i) batch.input_ids.push_back(token(rng));
  for (auto _ : state) {
    peft::Tensor<float> logits = work.model().logits(batch);
    benchmark::DoNotOptimize(logits.data());
  }
}
void BM_InferenceUnmerged(benchmark::State& state) { inference(state, false); }
void BM_InferenceMerged(benchmark::State& state) { inference(state, true); }
void inference_sizes(benchmark::internal::Benchmark* b) {
  b->Args({2, 768, 4, 256});
  b->Args({2, 768, 1, 64});
  b->ArgNames({"layers", "d", "batch", "seq"})->Unit(benchmark::kMillisecond)->UseRealTime();
}
BENCHMARK(BM_InferenceUnmerged)->Apply(inference_sizes);
BENCHMARK(BM_InferenceMerged)->Apply(inference_sizes);

// AdapterDrop (Rücklé et al., 2021), the speed it buys (docs/methods/hybrid.md quotes the
// table): Pfeiffer adapters after every block's MLP against AdapterDrop's fixed n (no adapter in
// the lowest n blocks), on the peer's 12-block GPT-2. A training step (the backward stops at the
// lowest adapter: nothing below it needs a gradient) and an inference forward (n fewer adapters
// to run). args: dropped blocks n, batch, seq.
using DroppedPfeiffer = peft::AdapterDrop<peft::PfeifferAdapter>;
StepOptions adapter_drop_options(const benchmark::State& state) {
  StepOptions o;
  o.batch = state.range(1);
  o.seq = state.range(2);
  return o;
}
DroppedPfeiffer::Config dropped_config(std::int64_t n) {
  DroppedPfeiffer::Config c;
  c.drop_layers = static_cast<int>(n);
  return c;
}
void BM_AdapterDropStep(benchmark::State& state) {
  peft::cli::StepWorkload<DroppedPfeiffer> work(adapter_drop_options(state),
                                                dropped_config(state.range(0)));
  work.step();
  for (auto _ : state) benchmark::DoNotOptimize(work.step());
  state.counters["trainable"] = double(work.trainable_count());
}
void BM_AdapterDropInference(benchmark::State& state) {
  const StepOptions o = adapter_drop_options(state);
  peft::cli::StepWorkload<DroppedPfeiffer> work(o, dropped_config(state.range(0)));
  const peft::Batch batch = peft::cli::random_step_batch(o);
  for (auto _ : state) {
    peft::Tensor<float> logits = work.model().logits(batch);
    benchmark::DoNotOptimize(logits.data());
  }
}
void adapter_drop_sizes(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {0, 3, 6, 9}) b->Args({n, 4, 256});
  b->ArgNames({"n", "batch", "seq"})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);
}
BENCHMARK(BM_AdapterDropStep)->Apply(adapter_drop_sizes);
BENCHMARK(BM_AdapterDropInference)->Apply(adapter_drop_sizes);

}  // namespace
