// Data-parallel training steps over MPI (docs/distributed.md, "Measured"): run as
//
//   mpirun -np N peft_bench_data_parallel --method lora|ia3|full [--layers 12 --d 768 --heads 12
//          --vocab 50257 --seq 256 --batch 4 --steps 3 --warmup 1 --threads T]
//
// A GPT-2 124M-shaped decoder with random frozen weights (the peer's model of bench-step),
// trained by the Trainer on random tokens with global batch --batch shared out over the N ranks:
// LoRA r 8 (alpha 16) on c_attn, c_proj, c_fc and the MLP's c_proj; IA3 on c_attn and the MLP's
// c_proj (its feed-forward scale); or full fine-tuning (every base tensor trainable). Rank 0
// prints one line:
//   method M ranks N trainable P reduced_bytes B full_ft_bytes F ratio R median_step_ms S
//   reduce_ms_per_step C peak_rss_mb Z
// where B is what each rank contributes to the sum of a step (the trainable gradients, a flag a
// tensor and two scalars, in fp32), F the same for full fine-tuning of the model, and C the time
// of the sums within a step. benchmarks/distributed/run.sh runs the table of the docs.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "../../cli/bench_step.hpp"
#include "peft/distributed/mpi.hpp"
#include "peft/io/parse_text.hpp"
#include "peft/methods/additive/ia3.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/trainer.hpp"
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

struct Options {
  std::string method = "lora";
  peft::cli::StepOptions model;  ///< the peer's model and batch: --layers --d --heads --vocab --seq --batch
  std::int64_t steps = 3, warmup = 1;
  int threads = 0;
};

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;
}

template <class Model>
int run(Model& model, const Options& o, peft::MpiSession& mpi, std::int64_t full_ft_entries,
        std::size_t full_ft_tensors) {
  peft::TrainerOptions t;
  t.max_steps = o.warmup + o.steps;
  t.adamw.lr = 1e-4;
  t.eval_at_start = false;
  t.process_group = mpi.world();
  const std::int64_t vocab = o.model.vocab, rows = o.model.batch, seq = o.model.seq;
  peft::Trainer<Model> trainer(model, t, [=](std::mt19937_64& rng) {
    peft::Batch b;
    b.batch = rows;
    b.seq = seq;
    std::uniform_int_distribution<std::int64_t> token(0, vocab - 1);
    for (std::int64_t i = 0; i < rows * seq; ++i) b.input_ids.push_back(token(rng));
    return b;
  });
  std::vector<double> step_ms;
  auto started = std::chrono::steady_clock::now();
  double reduce_before = 0;
  trainer.on_step = [&](const peft::StepInfo& s) {
    const auto now = std::chrono::steady_clock::now();
    if (s.step > o.warmup)
      step_ms.push_back(std::chrono::duration<double, std::milli>(now - started).count());
    started = now;
    if (s.step == o.warmup) reduce_before = trainer.result().reduce_seconds;
  };
  const peft::TrainResult r = trainer.run();
  std::sort(step_ms.begin(), step_ms.end());
  const double median = step_ms.empty() ? 0 : step_ms[step_ms.size() / 2];
  // The sums' time of the timed steps (reduce_seconds covers every step).
  const double reduce_ms = 1e3 * (r.reduce_seconds - reduce_before) / double(std::max<std::int64_t>(1, o.steps));
  std::int64_t trainable = 0;
  std::size_t tensors = 0;
  for (auto& p : model.trainable_parameters()) {
    trainable += p.var.value().numel();
    ++tensors;
  }
  const std::size_t reduced = (std::size_t(trainable) + tensors + 2) * sizeof(float);
  const std::size_t full = (std::size_t(full_ft_entries) + full_ft_tensors + 2) * sizeof(float);
  // The peak over the ranks (each holds its own copy of the frozen model).
  std::vector<double> rss = {peak_rss_mb()};
  std::vector<double> worst(static_cast<std::size_t>(mpi.size()), 0.0);
  worst[static_cast<std::size_t>(mpi.rank())] = rss[0];
  mpi.world().all_reduce_sum(std::span<double>(worst));
  if (mpi.rank() == 0) {
    std::printf(
        "method %s ranks %d trainable %lld reduced_bytes %zu full_ft_bytes %zu ratio %.4f%% "
        "median_step_ms %.1f reduce_ms_per_step %.2f peak_rss_mb %.0f\n",
        o.method.c_str(), mpi.size(), static_cast<long long>(trainable),
        mpi.size() > 1 ? reduced : std::size_t(0), full, 100.0 * double(reduced) / double(full),
        median, reduce_ms, *std::max_element(worst.begin(), worst.end()));
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  peft::MpiSession mpi(&argc, &argv);
  try {
    Options o;
    for (int i = 1; i < argc; ++i) {
      const std::string flag = argv[i];
      if (i + 1 >= argc) throw peft::io::ArgumentError(flag + " needs a value");
      const std::string v = argv[++i];
      const peft::io::IntegerRange size{.min = 1, .max = 1 << 20};
      if (flag == "--method")
        o.method = v;
      else if (flag == "--layers")
        o.model.layers = peft::io::parse_integer(v, flag, size);
      else if (flag == "--d")
        o.model.d = peft::io::parse_integer(v, flag, size);
      else if (flag == "--heads")
        o.model.heads = peft::io::parse_integer(v, flag, size);
      else if (flag == "--vocab")
        o.model.vocab = peft::io::parse_integer(v, flag, size);
      else if (flag == "--seq")
        o.model.seq = peft::io::parse_integer(v, flag, size);
      else if (flag == "--batch")
        o.model.batch = peft::io::parse_integer(v, flag, size);
      else if (flag == "--steps")
        o.steps = peft::io::parse_integer(v, flag, size);
      else if (flag == "--warmup")
        o.warmup = peft::io::parse_integer(v, flag, {.min = 0, .max = 1 << 20});
      else if (flag == "--threads")
        o.threads = static_cast<int>(peft::io::parse_integer(v, flag, {.min = 1, .max = 1024}));
      else
        throw peft::io::ArgumentError("unknown option '" + flag + "'");
    }
#if defined(_OPENMP)
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
    const peft::ModelConfig config = peft::cli::gpt2_config(o.model);  // bench-step's model
    // Full fine-tuning's count: every base tensor.
    std::int64_t full_entries = 0;
    std::size_t full_tensors = 0;
    {
      peft::Decoder<peft::arch::Gpt2, peft::NoPeft, float> shapes(config, {}, 1);
      for (auto& p : shapes.base_parameters()) {
        full_entries += p.var.value().numel();
        ++full_tensors;
      }
    }
    if (o.method == "lora") {
      peft::LoraConfig c;
      c.r = 8;
      c.lora_alpha = 16;
      c.targets.target_modules.names = {"c_attn", "c_proj", "c_fc"};
      peft::Decoder<peft::arch::Gpt2, peft::LoRA, float> model(config, c, 1);
      return run(model, o, mpi, full_entries, full_tensors);
    }
    if (o.method == "ia3") {
      peft::Ia3Config c;  // the reference's GPT-2 defaults: c_attn, mlp.c_proj (feed-forward)
      peft::Decoder<peft::arch::Gpt2, peft::IA3, float> model(config, c, 1);
      return run(model, o, mpi, full_entries, full_tensors);
    }
    if (o.method == "full") {
      peft::Decoder<peft::arch::Gpt2, peft::NoPeft, float> model(config, {}, 1);
      model.set_base_trainable(true);
      return run(model, o, mpi, full_entries, full_tensors);
    }
    throw peft::io::ArgumentError("--method: expected lora, ia3 or full, found '" + o.method + "'");
  } catch (const std::exception& e) {
    std::cerr << "bench_data_parallel (rank " << mpi.rank() << "): error: " << e.what() << '\n';
    if (mpi.size() > 1) mpi.abort(1);
    return 1;
  }
}
