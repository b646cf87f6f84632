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
// benchmarks/ can time a full step of any method family with the same code; the command itself
// (run_bench_step, commands.hpp) is in bench_step.cpp.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <peft/io/json.hpp>
#include <peft/methods/reparameterized/lora.hpp>
#include <peft/nn/decoder.hpp>
#include <peft/train/optimizer.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

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
  /// the frozen weights' storage on the CPU: fp32, bf16, fp16, nf4
  std::string base_dtype = "fp32";
  std::string config;               ///< a config.json to build instead of the peer's GPT-2
  std::string model_type = "gpt2";  ///< the config's architecture (set from --config)
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

/// The step's model config: --config's file, else the peer's GPT-2 (gpt2_config).
inline ModelConfig step_config(const StepOptions& o) {
  if (o.config.empty()) return gpt2_config(o);
  return ModelConfig::from_json(io::load_json(o.config), o.config);
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

/// --targets as a target_modules rule: "all-linear"; for GPT-2 the peer's names (qkv, proj,
/// fc, fc2); for other architectures a comma list of module names (q_proj,v_proj,...).
inline ModuleSelector step_target_modules(const StepOptions& o) {
  ModuleSelector rule;
  if (o.targets == "all-linear") {
    rule.all_linear = true;
  } else if (o.model_type == "gpt2") {
    rule.names = gpt2_target_modules(o.targets);
  } else {
    std::stringstream list(o.targets);
    std::string name;
    while (std::getline(list, name, ','))
      if (!name.empty()) rule.names.push_back(name);
    if (rule.names.empty()) throw ConfigError("bench-step: --targets names no module");
  }
  return rule;
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
    c.targets.target_modules = step_target_modules(o);
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

/// A frozen random decoder (the peer's GPT-2, or --config's model of architecture Arch) with
/// `Policy` attached and its base in --base-dtype, one random batch, and AdamW over the
/// trainable tensors: `step()` runs one training step.
template <class Policy, class T = float, class Arch = arch::Gpt2>
class StepWorkload {
 public:
  explicit StepWorkload(const StepOptions& o) : StepWorkload(o, step_policy_config<Policy>(o)) {}
  /// The same step with the policy's config given (a benchmark sweeping one of its fields).
  StepWorkload(const StepOptions& o, const typename Policy::Config& config)
      : model_(step_config(o), config, o.seed, parse_base_format(o.base_dtype, "--base-dtype")),
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

  Decoder<Arch, Policy, T>& model() { return model_; }
  std::int64_t trainable_count() {
    std::int64_t n = 0;
    for (const NamedParameter<T>& p : model_.trainable_parameters()) n += p.var.value().numel();
    return n;
  }
  std::int64_t total_count() {
    std::int64_t n = trainable_count();
    for (const NamedParameter<T>& p : model_.base_parameters())
      if (!p.var.requires_grad()) n += p.var.value().numel();
    return n + model_.frozen_base_elements();
  }

 private:
  Decoder<Arch, Policy, T> model_;
  AdamW<T> optimizer_;
  Batch batch_;
};

}  // namespace peft::cli
