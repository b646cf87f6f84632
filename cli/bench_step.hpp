#pragma once
// `peft bench-step [FLAGS]`: times a PEFT training step on a frozen random GPT-2-style decoder,
// the same work as ../shared/peers/torch_lora_step.py (the PyTorch peer) with the same flags
// and defaults: GPT-2 124M, batch 4, sequence 256, LoRA r=8 with alpha 16 on qkv, proj, fc and
// fc2. One step = forward, cross-entropy, backward, AdamW on the adapter's tensors only.
// The last line is `median_ms X min_ms Y peak_rss_mb Z`.
//
// `--device cuda` runs the same step on the GPU (include/peft/backend/cuda/lora_decoder.cuh,
// through cli/cuda_commands.cu): frozen weights in `--dtype bf16` (default there) or fp32 (no
// TF32), LoRA tensors and AdamW state fp32; the last line is then
// `median_ms X min_ms Y peak_mem_mb Z` (Z: device memory in use, cudaMemGetInfo).
//
// `StepWorkload<Policy>` is the step itself, templated over the PEFT policy, so that
// benchmarks/ can time a full step of any method family with the same code.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <peft/methods/reparameterized/lora.hpp>
#include <peft/nn/decoder.hpp>
#include <peft/train/optimizer.hpp>

#if defined(PEFT_WITH_CUDA)
#include <peft/backend/cuda/export_lora.hpp>

#include "cuda_commands.hpp"
#endif

namespace peft::cli {

/// The peer's flags (same names, same defaults) plus ours.
struct StepOptions {
  std::int64_t layers = 12;
  std::int64_t d = 768;
  std::int64_t heads = 12;
  std::int64_t vocab = 50257;
  std::int64_t seq = 256;
  std::int64_t batch = 4;
  int rank = 8;
  double alpha = 16;
  std::string targets = "qkv,proj,fc,fc2";
  int steps = 5;
  int warmup = 2;           ///< untimed steps before the timed ones (the peer drops its first 2)
  int threads = 0;          ///< 0: OMP_NUM_THREADS, else the OpenMP default
  bool checkpoint = false;  ///< activation checkpointing: recompute each block in backward
  std::uint64_t seed = 0;
  std::string device = "cpu";  ///< cpu or cuda
  std::string dtype;           ///< fp32 or bf16 (CUDA only); empty: fp32 on the CPU, bf16 on CUDA
};

/// The GPT-2-style config of the peer: learned positions for exactly `seq` tokens, tied head.
inline ModelConfig gpt2_config(const StepOptions& o) {
  ModelConfig c;
  c.model_type = "gpt2";
  c.vocab_size = o.vocab;
  c.hidden_size = o.d;
  c.num_layers = o.layers;
  c.num_heads = o.heads;
  c.num_kv_heads = o.heads;
  c.head_dim = o.heads > 0 ? o.d / o.heads : 0;
  c.intermediate_size = 4 * o.d;
  c.max_positions = o.seq;
  c.norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  c.attention_bias = c.mlp_bias = true;
  c.validate("bench-step");
  return c;
}

/// The peer's projection names → our GPT-2 module names (suffix rules of target_modules).
inline std::vector<std::string> gpt2_target_modules(const std::string& peer_targets) {
  std::vector<std::string> out;
  std::stringstream list(peer_targets);
  std::string name;
  while (std::getline(list, name, ',')) {
    if (name == "qkv")
      out.push_back("c_attn");
    else if (name == "proj")
      out.push_back("attn.c_proj");
    else if (name == "fc")
      out.push_back("c_fc");
    else if (name == "fc2")
      out.push_back("mlp.c_proj");
    else if (!name.empty())
      throw ConfigError("bench-step: unknown target '" + name + "' (qkv, proj, fc, fc2)");
  }
  if (out.empty()) throw ConfigError("bench-step: --targets names no projection");
  return out;
}

/// The policy's config for the step. LoRA: rank, alpha and targets from the options. Other
/// policies get their default config unless they specialise this.
template <class Policy>
typename Policy::Config step_policy_config(const StepOptions& o) {
  typename Policy::Config c{};
  if constexpr (requires {
                  c.r;
                  c.lora_alpha;
                  c.targets.target_modules.names;
                }) {
    c.r = o.rank;
    c.lora_alpha = o.alpha;
    c.targets.target_modules.names = gpt2_target_modules(o.targets);
  }
  return c;
}

/// The step's batch: random token ids and random labels (as the peer's targets; the decoder
/// shifts them by one position), from seed + 1.
inline Batch random_step_batch(const StepOptions& o) {
  Batch batch;
  std::mt19937_64 rng(o.seed + 1);
  std::uniform_int_distribution<std::int64_t> token(0, o.vocab - 1);
  batch.batch = o.batch;
  batch.seq = o.seq;
  for (std::int64_t i = 0; i < o.batch * o.seq; ++i) batch.input_ids.push_back(token(rng));
  for (std::int64_t i = 0; i < o.batch * o.seq; ++i) batch.labels.push_back(token(rng));
  return batch;
}

/// A frozen random GPT-2 decoder with `Policy` attached, one random batch, and AdamW over the
/// trainable tensors: `step()` runs one training step.
template <class Policy, class T = float>
class StepWorkload {
 public:
  explicit StepWorkload(const StepOptions& o)
      : model_(gpt2_config(o), step_policy_config<Policy>(o), o.seed),
        optimizer_(model_.trainable_parameters(), AdamWOptions{.lr = 1e-3}),
        batch_(random_step_batch(o)) {
    model_.set_activation_checkpointing(o.checkpoint);
  }

  /// One step; returns the loss.
  T step() {
    Tape<T> tape;
    ForwardResult<T> r = model_.forward(tape, batch_);
    const T loss = r.loss.value()[0];
    r.logits = Var<T>{};  // the logits die with the tape's last reference, during backward
    tape.backward(r.loss);
    optimizer_.step();
    optimizer_.zero_grad();
    return loss;
  }

  Decoder<arch::Gpt2, Policy, T>& model() { return model_; }
  std::int64_t trainable_count() {
    std::int64_t n = 0;
    for (const NamedParameter<T>& p : model_.trainable_parameters()) n += p.var.value().numel();
    return n;
  }
  std::int64_t total_count() {
    std::int64_t n = trainable_count();
    for (const NamedParameter<T>& p : model_.base_parameters())
      if (!p.var.requires_grad()) n += p.var.value().numel();
    return n;
  }

 private:
  Decoder<arch::Gpt2, Policy, T> model_;
  AdamW<T> optimizer_;
  Batch batch_;
};

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

inline void print_bench_step_usage(std::ostream& out) {
  out << "usage: peft bench-step [--layers N] [--d N] [--heads N] [--vocab N] [--seq N]\n"
         "                       [--batch N] [--rank N] [--alpha X] [--targets qkv,proj,fc,fc2]\n"
         "                       [--steps N] [--warmup N] [--threads N] [--checkpoint] [--seed N]\n"
         "                       [--device cpu|cuda] [--dtype fp32|bf16]\n"
         "defaults: the PyTorch peer's (GPT-2 124M, batch 4, seq 256, LoRA r 8 alpha 16 on\n"
         "qkv, proj, fc, fc2, 5 timed steps after 2 warm-up steps, threads from OMP_NUM_THREADS);\n"
         "--device cpu; --dtype: fp32 on the CPU (the only one there), bf16 on CUDA\n";
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

inline int run_bench_step(const std::vector<std::string>& args, std::ostream& out,
                          std::ostream& err) {
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
    try {
      if (flag == "--layers")
        o.layers = std::stoll(value);
      else if (flag == "--d")
        o.d = std::stoll(value);
      else if (flag == "--heads")
        o.heads = std::stoll(value);
      else if (flag == "--vocab")
        o.vocab = std::stoll(value);
      else if (flag == "--seq")
        o.seq = std::stoll(value);
      else if (flag == "--batch")
        o.batch = std::stoll(value);
      else if (flag == "--rank")
        o.rank = std::stoi(value);
      else if (flag == "--alpha")
        o.alpha = std::stod(value);
      else if (flag == "--targets")
        o.targets = value;
      else if (flag == "--steps")
        o.steps = std::stoi(value);
      else if (flag == "--warmup")
        o.warmup = std::stoi(value);
      else if (flag == "--threads")
        o.threads = std::stoi(value);
      else if (flag == "--seed")
        o.seed = std::stoull(value);
      else if (flag == "--device")
        o.device = value;
      else if (flag == "--dtype")
        o.dtype = value;
      else {
        err << "bench-step: unknown flag " << flag << '\n';
        print_bench_step_usage(err);
        return 2;
      }
    } catch (const std::logic_error&) {
      err << "bench-step: " << flag << " expects a number, got '" << value << "'\n";
      return 2;
    }
  }
  if (o.steps < 1 || o.warmup < 0 || o.layers < 1 || o.batch < 1 || o.seq < 1 || o.rank < 1) {
    err << "bench-step: steps, layers, batch, seq and rank must be positive\n";
    return 2;
  }
  if (o.device != "cpu" && o.device != "cuda") {
    err << "bench-step: --device " << o.device << ": cpu or cuda\n";
    return 2;
  }
  if (!o.dtype.empty() && o.dtype != "fp32" && o.dtype != "bf16") {
    err << "bench-step: --dtype " << o.dtype << ": fp32 or bf16\n";
    return 2;
  }
  if (o.device == "cuda") return run_bench_step_cuda(o, out, err);
  if (o.dtype == "bf16") {
    err << "bench-step: --dtype bf16 runs on --device cuda only (the CPU step is fp32)\n";
    return 2;
  }
  const int threads = apply_threads(o.threads);

  StepWorkload<LoRA> work(o);
  out << "peft bench-step: gpt2 layers " << o.layers << " d " << o.d << " heads " << o.heads
      << " vocab " << o.vocab << ", batch " << o.batch << " x seq " << o.seq << ", LoRA r "
      << o.rank << " alpha " << o.alpha << " on " << o.targets << ", threads " << threads
      << (o.checkpoint ? ", activation checkpointing" : "") << '\n';
  out << "trainable " << work.trainable_count() << " total " << work.total_count() << '\n';

  std::vector<double> times;
  float loss = 0;
  for (int i = 0; i < o.warmup + o.steps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    loss = work.step();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (i >= o.warmup) times.push_back(ms);
    out << (i < o.warmup ? "warm-up" : "step") << ' ' << i << ": " << std::fixed
        << std::setprecision(1) << ms << " ms, loss " << std::setprecision(4) << loss << '\n';
  }
  std::sort(times.begin(), times.end());
  out << std::fixed << std::setprecision(1) << "median_ms " << times[times.size() / 2] << " min_ms "
      << times.front() << " peak_rss_mb " << std::setprecision(0) << peak_rss_mb() << '\n';
  return 0;
}

}  // namespace peft::cli
