// Decoding with and without the key/value cache (Decoder::forward_cached; generate.hpp): a
// GPT-2-small-shaped model (12 layers, d 768, 12 heads, vocabulary 50257) in fp32 with LoRA
// (r 8 on c_attn), batch 1, greedy. The decode phase only: each iteration prefills a 256-token
// prompt outside the timing, then times 64 new tokens. With the cache each token is one
// position's work; without it, each token re-runs the whole context (257 ... 320 tokens).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <peft/peft.hpp>
#include <random>
#include <vector>

namespace {

constexpr std::int64_t kPrompt = 256, kNewTokens = 64;

using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;

Model& model() {
  static Model m = [] {
    peft::LoraConfig lora;
    lora.r = 8;
    lora.lora_alpha = 16;
    lora.targets = peft::TargetRules::from_json({{"target_modules", {"c_attn"}}}, "bench");
    Model built(peft::ModelConfig::gpt2(), lora, 1);  // GPT-2 124M sizes
    std::mt19937_64 rng(2);  // B away from 0, so that the low-rank path does work
    std::uniform_real_distribution<float> u(-0.01f, 0.01f);
    for (auto& p : built.adapter().parameters())
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i) p.var.value()[i] += u(rng);
    return built;
  }();
  return m;
}

peft::Batch one_row(const std::vector<std::int64_t>& ids) {
  peft::Batch b;
  b.batch = 1;
  b.seq = static_cast<std::int64_t>(ids.size());
  b.input_ids = ids;
  return b;
}

std::vector<std::int64_t> prompt() {
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<std::int64_t> token(0, 50256);
  std::vector<std::int64_t> ids(kPrompt);
  for (auto& t : ids) t = token(rng);
  return ids;
}

std::int64_t argmax(const float* row, std::int64_t n) {
  std::int64_t best = 0;
  for (std::int64_t v = 1; v < n; ++v)
    if (row[v] > row[best]) best = v;
  return best;
}

void BM_DecodeWithCache(benchmark::State& state) {
  Model& m = model();
  const std::vector<std::int64_t> ids = prompt();
  for (auto _ : state) {
    state.PauseTiming();
    Model::KvCache cache;
    peft::Tensor<float> logits = m.forward_cached(one_row(ids), cache);
    state.ResumeTiming();
    for (std::int64_t n = 0; n < kNewTokens; ++n) {
      const std::int64_t next = argmax(logits.data(), 50257);
      logits = m.forward_cached(one_row({next}), cache);
    }
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(kNewTokens), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DecodeWithCache)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

void BM_DecodeWithoutCache(benchmark::State& state) {
  Model& m = model();
  for (auto _ : state) {
    std::vector<std::int64_t> context = prompt();
    state.PauseTiming();
    peft::Tensor<float> logits = m.logits(one_row(context));  // the prefill's counterpart
    state.ResumeTiming();
    for (std::int64_t n = 0; n < kNewTokens; ++n) {
      context.push_back(argmax(logits.data() + (logits.shape()[1] - 1) * 50257, 50257));
      logits = m.logits(one_row(context));
    }
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(kNewTokens), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DecodeWithoutCache)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);

}  // namespace
