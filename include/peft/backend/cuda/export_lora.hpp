#pragma once
// Fills a DeviceModelSpec (model_spec.hpp) from a CPU Decoder<Arch, LoRA, T>: the bridge between
// the CPU library (compiled by the host compiler) and the CUDA decoder (lora_decoder.cuh),
// which never sees the CPU types. Host code only; includes no CUDA header.
#include <string>
#include <vector>

#include "peft/backend/cuda/model_spec.hpp"
#include "peft/core/error.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/decoder.hpp"

namespace peft::cuda {

namespace detail {

template <class T>
std::vector<float> host_floats(const Tensor<T>& t) {
  return std::vector<float>(t.values().begin(), t.values().end());
}

template <class T>
const Var<T>& find_base_parameter(std::vector<NamedParameter<T>>& params, const std::string& name) {
  for (NamedParameter<T>& p : params)
    if (p.name == name) return p.var;
  throw ConfigError("export to CUDA: the model has no tensor '" + name + "'");
}

template <class T>
DeviceLinearSpec export_linear(const nn::Linear<T>& lin, const typename LoRA::State<T>& adapter) {
  DeviceLinearSpec s;
  s.name = lin.name;
  s.in = lin.in_features;
  s.out = lin.out_features;
  const RowMatrix<T> w = lin.weight_out_in();  // [out, in] whatever the checkpoint layout
  s.weight.resize(static_cast<std::size_t>(s.out * s.in));
  for (std::int64_t o = 0; o < s.out; ++o)
    for (std::int64_t i = 0; i < s.in; ++i)
      s.weight[static_cast<std::size_t>(o * s.in + i)] = static_cast<float>(w(o, i));
  if (lin.bias) s.bias = host_floats(lin.bias.value());
  if (const auto* m = adapter.find(lin.site)) {
    if (m->merged)
      throw ConfigError("export to CUDA: the adapter of " + lin.name +
                        " is merged into the base weight; unmerge it first");
    s.rank = static_cast<int>((*m)[0].value().dim(0));
    s.scale = static_cast<float>(m->extra.scale);
    s.lora_a = host_floats((*m)[0].value());
    s.lora_b = host_floats((*m)[1].value());
    s.lora_a_name = "base_model.model." + m->module + ".lora_A.weight";
    s.lora_b_name = "base_model.model." + m->module + ".lora_B.weight";
  }
  return s;
}

}  // namespace detail

/// The spec of `model` (base weights, LoRA tensors and scalings, config). Throws ConfigError for
/// what the CUDA decoder does not run: LoRA on the untied lm_head, a merged adapter.
template <class Arch, class T>
DeviceModelSpec export_lora_model(Decoder<Arch, LoRA, T>& model) {
  const ModelConfig& c = model.config();
  DeviceModelSpec s;
  s.arch = Arch::learned_positions ? DeviceArch::Gpt2 : DeviceArch::Llama;
  s.vocab = c.vocab_size;
  s.hidden = c.hidden_size;
  s.layers = c.num_layers;
  s.heads = c.num_heads;
  s.kv_heads = c.num_kv_heads;
  s.head_dim = c.head_dim;
  s.intermediate = c.intermediate_size;
  s.max_positions = c.max_positions;
  s.norm_eps = static_cast<float>(c.norm_eps);
  s.tied_head = c.tie_word_embeddings;

  std::vector<NamedParameter<T>> base = model.base_parameters();
  s.token_embedding = detail::host_floats(
      detail::find_base_parameter(base, Arch::token_embedding() + ".weight").value());
  if constexpr (Arch::learned_positions)
    s.position_embedding = detail::host_floats(
        detail::find_base_parameter(base, Arch::position_embedding() + ".weight").value());
  else
    s.rope_inverse_frequencies = rope_inverse_frequencies(c);
  s.final_norm_weight = detail::host_floats(
      detail::find_base_parameter(base, Arch::final_norm() + ".weight").value());
  if constexpr (Arch::learned_positions)
    s.final_norm_bias = detail::host_floats(
        detail::find_base_parameter(base, Arch::final_norm() + ".bias").value());

  const auto& adapter = model.adapter();
  for (auto& b : model.blocks()) {
    DeviceBlockSpec block;
    block.attention_norm_weight = detail::host_floats(b.attention_norm.weight.value());
    block.mlp_norm_weight = detail::host_floats(b.mlp_norm.weight.value());
    if constexpr (Arch::learned_positions) {
      block.attention_norm_bias = detail::host_floats(b.attention_norm.bias.value());
      block.mlp_norm_bias = detail::host_floats(b.mlp_norm.bias.value());
    }
    if constexpr (Arch::fused_qkv && !Arch::gated_mlp) {
      for (const nn::Linear<T>* lin : {&b.qkv, &b.attention_out, &b.mlp_in, &b.mlp_out})
        block.linears.push_back(detail::export_linear(*lin, adapter));
    } else {
      for (const nn::Linear<T>* lin : {&b.q, &b.k, &b.v, &b.attention_out, &b.gate, &b.up, &b.down})
        block.linears.push_back(detail::export_linear(*lin, adapter));
    }
    s.blocks.push_back(std::move(block));
  }
  if (!s.tied_head) {
    for (nn::Linear<T>* lin : model.linear_modules())
      if (lin->layer < 0 && adapter.find(lin->site))
        throw ConfigError("export to CUDA: LoRA on " + lin->name +
                          " (the untied head) is not supported by the CUDA decoder");
    s.lm_head = detail::host_floats(detail::find_base_parameter(base, "lm_head.weight").value());
  }
  return s;
}

/// A CPU Batch as the device decoder takes it.
inline DeviceBatch device_batch(const Batch& b) {
  return DeviceBatch{b.batch, b.seq, b.input_ids, b.attention_mask, b.labels};
}

}  // namespace peft::cuda
