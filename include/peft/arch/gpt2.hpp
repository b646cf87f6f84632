#pragma once
// GPT-2 flavour: LayerNorm, learned positions, fused qkv, tanh-GELU MLP, biases, [in, out]
// weights (Conv1D), head tied to the token embedding.
#include <string>
#include <string_view>

#include "peft/nn/modules.hpp"

namespace peft::arch {

struct Gpt2 {
  static constexpr std::string_view model_type = "gpt2";
  template <class T>
  using Norm = nn::LayerNorm<T>;
  static constexpr bool learned_positions = true;  ///< else rotary
  static constexpr bool fused_qkv = true;          ///< one c_attn producing q, k, v
  static constexpr bool gated_mlp = false;         ///< GELU MLP (fc, proj)
  static constexpr ops::WeightLayout layout = ops::WeightLayout::InOut;

  // Module paths in the reference checkpoint.
  static std::string token_embedding() { return "transformer.wte"; }
  static std::string position_embedding() { return "transformer.wpe"; }
  static std::string final_norm() { return "transformer.ln_f"; }
  static std::string lm_head() { return "lm_head"; }
  static std::string block(int i) { return "transformer.h." + std::to_string(i); }
  static std::string attention_norm(int i) { return block(i) + ".ln_1"; }
  static std::string mlp_norm(int i) { return block(i) + ".ln_2"; }
  static std::string qkv(int i) { return block(i) + ".attn.c_attn"; }
  static std::string attention_out(int i) { return block(i) + ".attn.c_proj"; }
  static std::string mlp_in(int i) { return block(i) + ".mlp.c_fc"; }
  static std::string mlp_out(int i) { return block(i) + ".mlp.c_proj"; }
};

}  // namespace peft::arch
