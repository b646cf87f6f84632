#pragma once
// LLaMA flavour: RMSNorm, rotary positions, separate q/k/v with grouped-query heads, SwiGLU MLP,
// no biases, [out, in] weights, tied or untied head.
#include <string>
#include <string_view>

#include "peft/nn/modules.hpp"

namespace peft::arch {

struct Llama {
  static constexpr std::string_view model_type = "llama";
  template <class T>
  using Norm = nn::RmsNorm<T>;
  static constexpr bool learned_positions = false;
  static constexpr bool fused_qkv = false;
  static constexpr bool gated_mlp = true;  ///< down(silu(gate(x)) ⊙ up(x))
  static constexpr ops::WeightLayout layout = ops::WeightLayout::OutIn;

  static std::string token_embedding() { return "model.embed_tokens"; }
  static std::string final_norm() { return "model.norm"; }
  static std::string lm_head() { return "lm_head"; }
  static std::string block(int i) { return "model.layers." + std::to_string(i); }
  static std::string attention_norm(int i) { return block(i) + ".input_layernorm"; }
  static std::string mlp_norm(int i) { return block(i) + ".post_attention_layernorm"; }
  static std::string q(int i) { return block(i) + ".self_attn.q_proj"; }
  static std::string k(int i) { return block(i) + ".self_attn.k_proj"; }
  static std::string v(int i) { return block(i) + ".self_attn.v_proj"; }
  static std::string attention_out(int i) { return block(i) + ".self_attn.o_proj"; }
  static std::string gate(int i) { return block(i) + ".mlp.gate_proj"; }
  static std::string up(int i) { return block(i) + ".mlp.up_proj"; }
  static std::string down(int i) { return block(i) + ".mlp.down_proj"; }
};

}  // namespace peft::arch
