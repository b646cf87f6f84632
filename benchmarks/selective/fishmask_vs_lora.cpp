// FishMask at a 0.5% budget against LoRA at a similar parameter count: training-step time and
// memory on a GPT-2-small-shaped model cut to 2 layers. Also the sparse op's two routes
// (scattered entries added sparsely vs through a dense copy of W) at several densities, which
// is how ops::kDenseDeltaDensity (2%) was chosen. A plain program, not part of the build:
//   g++ -std=c++20 -O2 -fopenmp -DNDEBUG -Iinclude -isystem /usr/include/eigen3 \
//       benchmarks/selective/fishmask_vs_lora.cpp -o /tmp/fishmask_vs_lora
//   /tmp/fishmask_vs_lora fishmask; /tmp/fishmask_vs_lora lora; /tmp/fishmask_vs_lora op
// (one method per process, so that the peak resident memory is the method's own).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <peft/peft.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Peak resident set (VmHWM) in MiB.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

peft::ModelConfig gpt2_small_2_layers() {
  peft::ModelConfig c;
  c.model_type = "gpt2";
  c.vocab_size = 50257;
  c.hidden_size = 768;
  c.num_layers = 2;
  c.num_heads = 12;
  c.num_kv_heads = 12;
  c.head_dim = 64;
  c.intermediate_size = 3072;
  c.max_positions = 1024;
  c.tie_word_embeddings = true;
  c.attention_bias = c.mlp_bias = true;
  return c;
}

peft::Batch random_batch(std::int64_t b, std::int64_t t, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> token(0, 50256);
  peft::Batch batch;
  batch.batch = b;
  batch.seq = t;
  for (std::int64_t i = 0; i < b * t; ++i) batch.input_ids.push_back(token(rng));
  return batch;
}

/// Resets the peak resident set to the current one (Linux: clear_refs 5), so that the training
/// steps' peak is measured apart from the setup's.
void reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
}

template <class Model>
void time_steps(Model& model, const char* name, double setup_s) {
  const double setup_peak = peak_rss_mib();
  reset_peak_rss();
  const peft::Batch batch = random_batch(4, 128, 1);
  peft::AdamW<float> optimizer(model.trainable_parameters(), {});
  std::int64_t trainable = 0, grad_bytes = 0;
  for (auto& p : model.trainable_parameters()) trainable += p.var.value().numel();
  std::vector<double> times;
  for (int step = 0; step < 6; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    peft::Tape<float> tape;
    auto out = model.forward(tape, batch);
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
    if (step > 0) times.push_back(seconds_since(t0));  // the first step allocates
  }
  for (auto& p : model.trainable_parameters())
    if (p.var.has_grad()) grad_bytes += p.var.grad().numel() * std::int64_t(sizeof(float));
  std::sort(times.begin(), times.end());
  std::printf(
      "%s: trainable %lld, step median %.3f s (min %.3f), optimizer state %zu B, "
      "gradients %lld B, setup %.2f s (peak RSS %.0f MiB), training peak RSS %.0f MiB\n",
      name, static_cast<long long>(trainable), times[times.size() / 2], times[0],
      optimizer.state_bytes(), static_cast<long long>(grad_bytes), setup_s, setup_peak,
      peak_rss_mib());
}

// Forward + backward of delta_linear on [512, 768] × [3072, 768] with k random entries.
void time_op(double density, bool force_dense) {
  const std::int64_t n = 512, in = 768, out = 3072;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  peft::Tensor<float> xv(peft::Shape{n, in}), wv(peft::Shape{out, in});
  for (auto* t : {&xv, &wv})
    for (std::int64_t i = 0; i < t->numel(); ++i) (*t)[i] = normal(rng);
  peft::Var<float> x(xv, true), w(wv, false);
  const std::int64_t total = in * out;
  const auto k = static_cast<std::int64_t>(density * double(total));
  std::vector<std::int64_t> ids = peft::detail::sample_ids(total, k, rng);
  auto pattern = std::make_shared<peft::ops::SparsePattern>();
  for (std::int64_t id : ids) {
    pattern->out.push_back(static_cast<std::int32_t>(id / in));
    pattern->in.push_back(static_cast<std::int32_t>(id % in));
  }
  peft::ops::WeightDelta<float> d;
  d.entries = pattern;
  d.entry_values = peft::Var<float>(peft::Tensor<float>(peft::Shape{k}, 0.01f), true);
  std::vector<double> times;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    peft::Tape<float> tape;
    peft::Var<float> y;
    if (force_dense) {
      // The dense alternative: W + scatter(δ) in a scratch copy, a full dW read at k entries.
      peft::Var<float> dense(wv, true);
      for (std::int64_t j = 0; j < k; ++j) dense.value()[ids[std::size_t(j)]] += 0.01f;
      y = peft::ops::linear(tape, x, dense, peft::Var<float>{}, peft::ops::WeightLayout::OutIn);
    } else {
      // Sparse route forced at every density (the op itself switches at kDenseDeltaDensity).
      y = peft::ops::delta_linear(tape, x, w, peft::Var<float>{}, peft::ops::WeightLayout::OutIn, d,
                                  2.0);
    }
    tape.backward(y, peft::Tensor<float>(y.shape(), 1.0f));
    times.push_back(seconds_since(t0));
    x.zero_grad();
  }
  std::sort(times.begin(), times.end());
  std::printf("  density %.3f%% (k %lld): %s %.2f ms\n", 100 * density, static_cast<long long>(k),
              force_dense ? "dense copy + full dW" : "sparse route       ", 1e3 * times[2]);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "fishmask";
  const peft::ModelConfig config = gpt2_small_2_layers();
  if (what == "fishmask") {
    peft::FishMaskConfig c;
    c.budget.density = 0.005;
    const auto t0 = std::chrono::steady_clock::now();
    peft::Decoder<peft::arch::Gpt2, peft::FishMask, float> model(config, c, 1);
    std::vector<peft::Batch> calibration;
    for (int i = 0; i < 4; ++i) calibration.push_back(random_batch(4, 128, 10 + i));
    model.adapter().calibrate(model, calibration);
    time_steps(model, "FishMask 0.5%", seconds_since(t0));
  } else if (what == "lora") {
    peft::LoraConfig c;
    c.r = 3;
    c.lora_alpha = 6;
    c.targets.target_modules.all_linear = true;
    const auto t0 = std::chrono::steady_clock::now();
    peft::Decoder<peft::arch::Gpt2, peft::LoRA, float> model(config, c, 1);
    time_steps(model, "LoRA r=3", seconds_since(t0));
  } else if (what == "base") {
    const auto t0 = std::chrono::steady_clock::now();
    peft::Decoder<peft::arch::Gpt2, peft::NoPeft, float> model(config, {}, 1);
    std::printf("base model built in %.2f s, peak RSS %.0f MiB\n", seconds_since(t0),
                peak_rss_mib());
  } else {
    for (double density : {0.005, 0.02, 0.05, 0.1})
      for (bool dense : {false, true}) time_op(density, dense);
  }
}
