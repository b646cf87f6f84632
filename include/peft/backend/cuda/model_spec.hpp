#pragma once
// A decoder with LoRA adapters described in plain host data: what the CUDA decoder
// (lora_decoder.cuh) is built from. Plain C++ with standard headers only, so that the
// nvcc-compiled side needs none of the CPU library, and the g++-compiled side fills it from a
// CPU Decoder (export_lora.hpp) without seeing any CUDA header.
#include <cstdint>
#include <string>
#include <vector>

namespace peft::cuda {

enum class DeviceArch { Gpt2, Llama };

/// One projection: y = x Wᵀ + b (+ s · (x Aᵀ) Bᵀ when adapted). W is always [out, in] here,
/// whatever the checkpoint's layout (the exporter transposes GPT-2's [in, out] weights).
struct DeviceLinearSpec {
  std::string name;  ///< module path in the reference model, e.g. "transformer.h.0.attn.c_attn"
  std::int64_t in = 0, out = 0;
  std::vector<float> weight;             ///< [out, in]
  std::vector<float> bias;               ///< [out], empty when the module has none
  int rank = 0;                          ///< 0: not adapted (frozen base product only)
  float scale = 0.f;                     ///< s = α / r (or α / √r with rsLoRA)
  std::vector<float> lora_a;             ///< [rank, in]
  std::vector<float> lora_b;             ///< [out, rank]
  std::string lora_a_name, lora_b_name;  ///< the adapter file's keys (for parity and download)
};

/// One block. linears: GPT-2 {c_attn, attn.c_proj, c_fc, mlp.c_proj}; LLaMA {q, k, v, o, gate,
/// up, down}: the CPU decoder's site order within a block.
struct DeviceBlockSpec {
  std::vector<float> attention_norm_weight, attention_norm_bias;  ///< bias: LayerNorm only
  std::vector<float> mlp_norm_weight, mlp_norm_bias;
  std::vector<DeviceLinearSpec> linears;
};

struct DeviceModelSpec {
  DeviceArch arch = DeviceArch::Gpt2;
  std::int64_t vocab = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t intermediate = 0, max_positions = 0;
  float norm_eps = 1e-5f;
  bool tied_head = true;
  std::vector<float> token_embedding;     ///< [V, d]
  std::vector<float> position_embedding;  ///< [max_positions, d] (GPT-2)
  std::vector<float>
      rope_inverse_frequencies;  ///< [head_dim / 2] (LLaMA), as the CPU computes them
  std::vector<DeviceBlockSpec> blocks;
  std::vector<float> final_norm_weight, final_norm_bias;
  std::vector<float> lm_head;  ///< [V, d] when the head is not tied
};

/// A right-padded batch, as peft::Batch: input_ids [B·T]; attention_mask empty (all tokens) or
/// [B·T] (1 token, 0 padding); labels empty (input_ids with −100 at padding) or [B·T].
struct DeviceBatch {
  std::int64_t batch = 0, seq = 0;
  std::vector<std::int64_t> input_ids, attention_mask, labels;
};

/// torch.optim.AdamW's hyper-parameters (the trainer's defaults are the golden recipe's).
struct DeviceAdamW {
  double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};

/// A named fp32 host tensor (a LoRA A or B, its gradient, or its trained value).
struct NamedHostTensor {
  std::string name;
  std::vector<float> values;
};

}  // namespace peft::cuda
