// Serving many adapters on one base (issue 16, part 5): 32 requests over 8 LoRA adapters (4 a
// request each, interleaved) on a GPT-2-small-shaped model (12 layers, d 768, vocabulary 50257)
// in fp32, LoRA r 8 on every linear layer (c_attn, c_proj, c_fc), greedy, with the key/value
// cache. Each request has a 64-token prompt and decodes 16 tokens.
//
//   BM_ServeDecode/mixed          one batch of 32 whose rows name their adapters
//                                 (Batch::adapter_names: the grouped product)
//   BM_ServeDecode/one_adapter    the same batch, every row with one adapter (the fused product)
//   BM_ServeDecode/base           the same batch on the base model alone
//   BM_ServeDecode/per_adapter    the loop a server without mixed batches runs: for each of the
//                                 8 adapters, set_adapter and its 4 requests as one batch
//   BM_ServePrefill/...           the 64-token prefill of the same 32 requests, the same ways
//
// Decode rows time the decode phase only (the prefill runs outside the timing, paused). Counters:
// tokens/s over all requests. docs/performance.md, "Serving many adapters", has the figures.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <peft/peft.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr std::int64_t kRequests = 32, kAdapters = 8, kPrompt = 64, kNewTokens = 16;
constexpr std::int64_t kVocab = 50257;

using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;

peft::LoraConfig lora() {
  peft::LoraConfig c;
  c.r = 8;
  c.lora_alpha = 16;
  c.targets = peft::TargetRules::from_json({{"target_modules", {"c_attn", "c_proj", "c_fc"}}},
                                           "bench");
  return c;
}

std::string adapter_name(std::int64_t a) { return a == 0 ? "default" : "task" + std::to_string(a); }

Model& model() {
  static Model m = [] {
    Model built(peft::ModelConfig::gpt2(), lora(), 1);  // GPT-2 124M sizes
    for (std::int64_t a = 1; a < kAdapters; ++a)
      built.add_adapter(adapter_name(a), lora(), static_cast<std::uint64_t>(a));
    std::mt19937_64 rng(2);  // B away from 0, so that every low-rank path does work
    std::uniform_real_distribution<float> u(-0.01f, 0.01f);
    for (std::int64_t a = 0; a < kAdapters; ++a)
      for (auto& p : built.adapter(adapter_name(a)).parameters())
        for (std::int64_t i = 0; i < p.var.value().numel(); ++i) p.var.value()[i] += u(rng);
    return built;
  }();
  return m;
}

enum class Mode { Mixed, OneAdapter, Base, PerAdapter };

/// Requests `first`, `first + step`, ... (all 32, or one adapter's 4) as one batch.
peft::Batch requests(const std::vector<std::vector<std::int64_t>>& tokens, Mode mode,
                     std::int64_t first, std::int64_t step) {
  peft::Batch b;
  b.seq = static_cast<std::int64_t>(tokens.front().size());
  for (std::int64_t r = first; r < kRequests; r += step) {
    b.input_ids.insert(b.input_ids.end(), tokens[r].begin(), tokens[r].end());
    if (mode == Mode::Mixed) b.adapter_names.push_back(adapter_name(r % kAdapters));
    if (mode == Mode::Base) b.adapter_names.emplace_back(peft::kBaseAdapterName);
    ++b.batch;
  }
  return b;
}

std::vector<std::vector<std::int64_t>> prompts() {
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<std::int64_t> token(0, kVocab - 1);
  std::vector<std::vector<std::int64_t>> out(kRequests, std::vector<std::int64_t>(kPrompt));
  for (auto& p : out)
    for (auto& t : p) t = token(rng);
  return out;
}

std::vector<std::vector<std::int64_t>> next_tokens(const peft::Tensor<float>& logits) {
  std::vector<std::vector<std::int64_t>> out;
  for (std::int64_t r = 0; r < logits.shape()[0]; ++r) {
    const float* row = logits.data() + r * kVocab;
    std::int64_t best = 0;
    for (std::int64_t v = 1; v < kVocab; ++v)
      if (row[v] > row[best]) best = v;
    out.push_back({best});
  }
  return out;
}

/// The batches a mode runs: one of 32 rows, or (per_adapter) 8 of 4 rows, each with the
/// adapter to set first.
struct Group {
  std::int64_t first, step;
  std::string adapter;
};
std::vector<Group> groups(Mode mode) {
  if (mode != Mode::PerAdapter) return {{0, 1, "default"}};
  std::vector<Group> out;
  for (std::int64_t a = 0; a < kAdapters; ++a) out.push_back({a, kAdapters, adapter_name(a)});
  return out;
}

void BM_ServeDecode(benchmark::State& state, Mode mode) {
  Model& m = model();
  const auto tokens = prompts();
  for (auto _ : state) {
    for (const Group& g : groups(mode)) {
      state.PauseTiming();
      m.set_adapter(g.adapter);
      Model::KvCache cache;
      peft::Tensor<float> logits = m.forward_cached(requests(tokens, mode, g.first, g.step), cache);
      state.ResumeTiming();
      for (std::int64_t n = 0; n < kNewTokens; ++n) {
        // next_tokens gives one row per request of this batch, in order; the batch keeps the
        // rows' adapters.
        auto next = next_tokens(logits);
        peft::Batch b = requests(tokens, mode, g.first, g.step);
        b.seq = 1;
        b.input_ids.clear();
        for (const auto& t : next) b.input_ids.push_back(t[0]);
        logits = m.forward_cached(b, cache);
      }
      benchmark::DoNotOptimize(logits.data());
    }
  }
  m.set_adapter("default");
  state.counters["tokens/s"] = benchmark::Counter(double(kRequests * kNewTokens),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

void BM_ServePrefill(benchmark::State& state, Mode mode) {
  Model& m = model();
  const auto tokens = prompts();
  for (auto _ : state) {
    for (const Group& g : groups(mode)) {
      m.set_adapter(g.adapter);
      Model::KvCache cache;
      peft::Tensor<float> logits = m.forward_cached(requests(tokens, mode, g.first, g.step), cache);
      benchmark::DoNotOptimize(logits.data());
    }
  }
  m.set_adapter("default");
  state.counters["tokens/s"] = benchmark::Counter(double(kRequests * kPrompt),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK_CAPTURE(BM_ServeDecode, mixed, Mode::Mixed)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServeDecode, one_adapter, Mode::OneAdapter)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServeDecode, base, Mode::Base)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServeDecode, per_adapter, Mode::PerAdapter)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServePrefill, mixed, Mode::Mixed)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServePrefill, one_adapter, Mode::OneAdapter)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServePrefill, base, Mode::Base)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK_CAPTURE(BM_ServePrefill, per_adapter, Mode::PerAdapter)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);

}  // namespace
