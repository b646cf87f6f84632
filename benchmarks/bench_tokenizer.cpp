// Encoding English text with GPT-2's byte-level BPE (include/peft/data/tokenizer.hpp), one
// thread: the bar is 10 MB in at most 2 s on one core. The text is the file named by
// PEFT_BENCH_TEXT, or else the project's own docs and README repeated to 10 MB (repetition
// favours the word cache: docs/tokenizer.md gives the figure for 10 MB of distinct text).
//
//   build/bin/peft_bench --benchmark_filter=Tokenizer
//   PEFT_BENCH_TEXT=corpus.txt build/bin/peft_bench --benchmark_filter=Tokenizer
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <peft/data/tokenizer.hpp>
#include <string>

#ifndef PEFT_GPT2_TOKENIZER_DIR
#define PEFT_GPT2_TOKENIZER_DIR "../shared/data/gpt2"
#endif
#ifndef PEFT_SOURCE_DIR
#define PEFT_SOURCE_DIR "."
#endif

namespace {

std::string read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string bench_text() {
  constexpr std::size_t kBytes = 10'000'000;
  if (const char* path = std::getenv("PEFT_BENCH_TEXT")) return read_all(path).substr(0, kBytes);
  std::string docs = read_all(std::filesystem::path(PEFT_SOURCE_DIR) / "README.md");
  for (const auto& entry :
       std::filesystem::directory_iterator(std::filesystem::path(PEFT_SOURCE_DIR) / "docs"))
    if (entry.path().extension() == ".md") docs += read_all(entry.path());
  std::string text;
  while (!docs.empty() && text.size() < kBytes) text += docs;
  return text;
}

void BM_TokenizerEncodeGpt2(benchmark::State& state) {
  const std::filesystem::path dir = PEFT_GPT2_TOKENIZER_DIR;
  if (!std::filesystem::exists(dir / "vocab.json")) {
    state.SkipWithError("GPT-2's vocab.json is not at PEFT_GPT2_TOKENIZER_DIR");
    return;
  }
  const peft::data::BpeTokenizer tok = peft::data::BpeTokenizer::load(dir);
  const std::string text = bench_text();
  std::size_t tokens = 0;
  for (auto _ : state) {
    const std::vector<std::int32_t> ids = tok.encode(text);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * text.size()));
  state.counters["tokens"] = static_cast<double>(tokens);
  state.counters["MB"] = static_cast<double>(text.size()) / 1e6;
}
BENCHMARK(BM_TokenizerEncodeGpt2)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace
