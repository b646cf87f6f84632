// `peft bench-step [FLAGS]` (bench_step.hpp: the step it times, shared with benchmarks/).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iomanip>
#include <ostream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(PEFT_WITH_CUDA)
#include <peft/backend/cuda/export_lora.hpp>

#include "cuda_commands.hpp"
#endif

#include <peft/io/parse_text.hpp>

#include "bench_step.hpp"
#include "commands.hpp"

namespace peft::cli {

/// The process's peak resident set in MiB: VmHWM from /proc/self/status (getrusage otherwise).
inline double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}

/// Sets the OpenMP (and so Eigen's) thread count; 0 keeps OMP_NUM_THREADS or the default.
inline int apply_threads(int threads) {
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
  return omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

/// Throws when the step's weights and activations would not fit in this machine's memory: the
/// frozen weights (float32), the logits of the whole batch with their softmax and gradient, and
/// each layer's saved activations and attention scores. An estimate, a few times generous.
template <class Arch>
void require_step_fits(const StepOptions& o, const ModelConfig& c) {
  const std::size_t element_bytes =
      base_element_bytes(parse_base_format(o.base_dtype, "--base-dtype"), sizeof(float));
  const long double tokens = static_cast<long double>(o.batch) * static_cast<long double>(o.seq);
  const long double activations =
      tokens *
      (3.0L * o.vocab + static_cast<long double>(o.layers) *
                            (20.0L * o.d + 2.0L * o.heads * static_cast<long double>(o.seq)));
  const long double bytes =
      static_cast<long double>(base_weight_bytes<Arch>(c, element_bytes)) + 4.0L * activations;
  const long double memory = static_cast<long double>(plausible_model_bytes());
  if (memory > 0 && bytes > memory) {
    char what[128];
    std::snprintf(what, sizeof what, "about %.3Lg GB, more than this machine's %.3Lg GB of memory",
                  bytes / 1e9L, memory / 1e9L);
    throw io::ArgumentError("--layers " + std::to_string(o.layers) + " --d " + std::to_string(o.d) +
                            " --vocab " + std::to_string(o.vocab) + " --seq " +
                            std::to_string(o.seq) + " --batch " + std::to_string(o.batch) +
                            ": the step needs " + what);
  }
}

inline void print_bench_step_usage(std::ostream& out) {
  out << "usage: peft bench-step [--layers N] [--d N] [--heads N] [--vocab N] [--seq N]\n"
         "                       [--batch N] [--rank N] [--alpha X] [--targets qkv,proj,fc,fc2]\n"
         "                       [--steps N] [--warmup N] [--threads N] [--checkpoint] [--seed N]\n"
         "                       [--device cpu|cuda] [--dtype fp32|bf16] [--base-dtype "
         "fp32|bf16|fp16|nf4]\n"
         "                       [--config config.json] [--targets all-linear]\n"
         "defaults: the PyTorch peer's (GPT-2 124M, batch 4, seq 256, LoRA r 8 alpha 16 on\n"
         "qkv, proj, fc, fc2, 5 timed steps after 2 warm-up steps, threads from OMP_NUM_THREADS);\n"
         "--device cpu; --dtype: fp32 on the CPU (the only one there), bf16 on CUDA;\n"
         "--base-dtype (CPU): the frozen weights' storage, fp32 (default), bf16, fp16 or nf4;\n"
         "--config: build a model of that config.json (gpt2 or llama) with random weights in\n"
         "--base-dtype instead of the peer's GPT-2 (--layers, --d, --heads, --vocab are then\n"
         "the config's); --targets: all-linear, the peer's names for GPT-2, or module names\n";
}

/// `bench-step --device cuda`: the same model (built on the CPU, with the CPU's initialisation)
/// and batch, exported to the GPU decoder.
inline int run_bench_step_cuda(const StepOptions& o, std::ostream& out, std::ostream& err) {
#if defined(PEFT_WITH_CUDA)
  if (o.checkpoint) {
    err << "bench-step: --checkpoint is not implemented on CUDA\n";
    return 2;
  }
  if (cuda_commands::device_count() == 0) {
    err << "bench-step: error: no CUDA device (the driver reports none)\n";
    return 2;
  }
  cuda_commands::StepRun run;
  run.bf16 = o.dtype != "fp32";
  run.warmup = o.warmup;
  run.steps = o.steps;
  cuda::DeviceModelSpec spec;
  std::int64_t trainable = 0, total = 0;
  {
    // The CPU model lives only as long as the export needs it.
    Decoder<arch::Gpt2, LoRA, float> model(gpt2_config(o), step_policy_config<LoRA>(o), o.seed);
    spec = cuda::export_lora_model(model);
    for (const NamedParameter<float>& p : model.trainable_parameters())
      trainable += p.var.value().numel();
    total = trainable;
    for (const NamedParameter<float>& p : model.base_parameters()) total += p.var.value().numel();
  }
  out << "peft bench-step: gpt2 layers " << o.layers << " d " << o.d << " heads " << o.heads
      << " vocab " << o.vocab << ", batch " << o.batch << " x seq " << o.seq << ", LoRA r "
      << o.rank << " alpha " << o.alpha << " on " << o.targets << ", cuda "
      << (run.bf16 ? "bf16" : "fp32 (no TF32)") << " on " << cuda_commands::device_name() << '\n';
  out << "trainable " << trainable << " total " << total << '\n';
  return cuda_commands::bench_step(spec, cuda::device_batch(random_step_batch(o)), run, out);
#else
  (void)o;
  (void)out;
  err << "bench-step: this build has no CUDA (configure with -DPEFT_WITH_CUDA=ON)\n";
  return 2;
#endif
}

int run_bench_step(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  StepOptions o;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      print_bench_step_usage(out);
      return 0;
    }
    if (flag == "--checkpoint") {
      o.checkpoint = true;
      continue;
    }
    if (i + 1 >= args.size()) {
      err << "bench-step: " << flag << " needs a value\n";
      print_bench_step_usage(err);
      return 2;
    }
    const std::string& value = args[++i];
    // Bounds (docs/cli.md, "Bounds"): generous for a CPU or one GPU, and refused before anything
    // is allocated; the memory the whole step needs is checked below.
    const auto integer = [&](std::int64_t lo, std::int64_t hi) {
      return io::parse_integer(value, flag, {.min = lo, .max = hi});
    };
    if (flag == "--layers")
      o.layers = integer(1, 10000);
    else if (flag == "--d")
      o.d = integer(1, 65536);
    else if (flag == "--heads")
      o.heads = integer(1, 65536);
    else if (flag == "--vocab")
      o.vocab = integer(1, 10000000);
    else if (flag == "--seq")
      o.seq = integer(1, 65536);
    else if (flag == "--batch")
      o.batch = integer(1, 65536);
    else if (flag == "--rank")
      o.rank = static_cast<int>(integer(1, 65536));
    else if (flag == "--alpha")
      o.alpha = io::parse_number(value, flag, {.min = 0, .max = 1e6, .min_exclusive = true});
    else if (flag == "--targets")
      o.targets = value;
    else if (flag == "--steps")
      o.steps = static_cast<int>(integer(1, 100000));
    else if (flag == "--warmup")
      o.warmup = static_cast<int>(integer(0, 100000));
    else if (flag == "--threads")
      o.threads = static_cast<int>(integer(0, 1024));
    else if (flag == "--seed")
      o.seed = io::parse_unsigned(value, flag);
    else if (flag == "--device")
      o.device = value;
    else if (flag == "--dtype")
      o.dtype = value;
    else if (flag == "--base-dtype")
      o.base_dtype = value;
    else if (flag == "--config")
      o.config = value;
    else {
      err << "bench-step: error: unknown option '" << flag << "'\n";
      print_bench_step_usage(err);
      return 2;
    }
  }
  try {
    parse_base_format(o.base_dtype, "--base-dtype");
  } catch (const ConfigError& e) {
    throw io::ArgumentError(e.what());
  }
  ModelConfig config;
  if (!o.config.empty()) {
    config = step_config(o);  // a bad file is a ConfigError/FileError naming it
    o.model_type = config.model_type;
    o.layers = config.num_layers;
    o.d = config.hidden_size;
    o.heads = config.num_heads;
    o.vocab = config.vocab_size;
    if (config.model_type == "gpt2" && config.max_positions < o.seq)
      throw io::ArgumentError("--seq " + std::to_string(o.seq) + ": more than " + o.config +
                              "'s n_positions " + std::to_string(config.max_positions));
  }
  if (o.d % o.heads != 0)
    throw io::ArgumentError("--heads: expected a divisor of --d " + std::to_string(o.d) +
                            ", found " + std::to_string(o.heads));
  try {
    step_target_modules(o);  // a bad --targets fails before the model is built
  } catch (const ConfigError& e) {
    throw io::ArgumentError(std::string("--targets: ") + e.what());
  }
  if (o.config.empty()) config = gpt2_config(o);
  if (o.model_type == "gpt2")
    require_step_fits<arch::Gpt2>(o, config);
  else
    require_step_fits<arch::Llama>(o, config);
  if (o.device != "cpu" && o.device != "cuda") {
    err << "bench-step: --device " << o.device << ": cpu or cuda\n";
    return 2;
  }
  if (!o.dtype.empty() && o.dtype != "fp32" && o.dtype != "bf16") {
    err << "bench-step: --dtype " << o.dtype << ": fp32 or bf16\n";
    return 2;
  }
  if (o.device == "cuda" && (o.base_dtype != "fp32" || !o.config.empty())) {
    err << "bench-step: --base-dtype and --config are CPU options (on CUDA: --dtype)\n";
    return 2;
  }
  if (o.device == "cuda") return run_bench_step_cuda(o, out, err);
  if (o.dtype == "bf16") {
    err << "bench-step: --dtype bf16 runs on --device cuda only (the CPU step is fp32)\n";
    return 2;
  }
  const int threads = apply_threads(o.threads);

  const auto run = [&]<class Arch>() {
    StepWorkload<LoRA, float, Arch> work(o);
    out << "peft bench-step: " << o.model_type << " layers " << o.layers << " d " << o.d
        << " heads " << o.heads << " vocab " << o.vocab << ", batch " << o.batch << " x seq "
        << o.seq << ", LoRA r " << o.rank << " alpha " << o.alpha << " on " << o.targets
        << ", threads " << threads << (o.checkpoint ? ", activation checkpointing" : "")
        << ", base " << o.base_dtype << '\n';
    out << "trainable " << work.trainable_count() << " total " << work.total_count() << '\n';

    std::vector<double> times;
    float loss = 0;
    for (int i = 0; i < o.warmup + o.steps; ++i) {
      const auto start = std::chrono::steady_clock::now();
      loss = work.step();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      if (i >= o.warmup) times.push_back(ms);
      out << (i < o.warmup ? "warm-up" : "step") << ' ' << i << ": " << std::fixed
          << std::setprecision(1) << ms << " ms, loss " << std::setprecision(4) << loss << '\n';
    }
    std::sort(times.begin(), times.end());
    out << "base_weight_bytes " << work.model().base_weight_bytes() << " (" << o.base_dtype
        << ")\n";
    out << std::fixed << std::setprecision(1) << "median_ms " << times[times.size() / 2]
        << " min_ms " << times.front() << " peak_rss_mb " << std::setprecision(0) << peak_rss_mb()
        << '\n';
    return 0;
  };
  if (o.model_type == "gpt2") return run.template operator()<arch::Gpt2>();
  if (o.model_type == "llama") return run.template operator()<arch::Llama>();
  throw io::ArgumentError("--config: model_type '" + o.model_type + "' (supported: gpt2, llama)");
}

}  // namespace peft::cli
