#pragma once
// A model's modules described from its config alone, allocating no weights: what `peft count`
// needs to count a 7B model in microseconds. The order of linear_shapes() is the decoder's site
// order (tests check that the two agree).
#include <string>
#include <vector>

#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/nn/config.hpp"

namespace peft {

struct LinearShape {
  std::string name;  ///< module path, as nn::Linear::name
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  int layer = -1;  ///< -1 for the output head
  bool bias = false;
};

template <class Arch>
std::vector<LinearShape> linear_shapes(const ModelConfig& c) {
  std::vector<LinearShape> out;
  const std::int64_t d = c.hidden_size, kv = c.kv_dim(), qd = c.num_heads * c.head_dim;
  const std::int64_t ff = c.intermediate_size;
  for (int i = 0; i < static_cast<int>(c.num_layers); ++i) {
    if constexpr (Arch::fused_qkv) {
      out.push_back({Arch::qkv(i), d, qd + 2 * kv, i, c.attention_bias});
    } else {
      out.push_back({Arch::q(i), d, qd, i, c.attention_bias});
      out.push_back({Arch::k(i), d, kv, i, c.attention_bias});
      out.push_back({Arch::v(i), d, kv, i, c.attention_bias});
    }
    out.push_back({Arch::attention_out(i), qd, d, i, c.attention_bias});
    if constexpr (Arch::gated_mlp) {
      out.push_back({Arch::gate(i), d, ff, i, c.mlp_bias});
      out.push_back({Arch::up(i), d, ff, i, c.mlp_bias});
      out.push_back({Arch::down(i), ff, d, i, c.mlp_bias});
    } else {
      out.push_back({Arch::mlp_in(i), d, ff, i, c.mlp_bias});
      out.push_back({Arch::mlp_out(i), ff, d, i, c.mlp_bias});
    }
  }
  if (!c.tie_word_embeddings) out.push_back({Arch::lm_head(), d, c.vocab_size, -1, false});
  return out;
}

/// Parameters of the base model as the reference counts them (a tied head counted once).
template <class Arch>
std::int64_t base_parameter_count(const ModelConfig& c) {
  std::int64_t n = c.vocab_size * c.hidden_size;
  if constexpr (Arch::learned_positions) n += c.max_positions * c.hidden_size;
  for (const LinearShape& l : linear_shapes<Arch>(c))
    n += l.in_features * l.out_features + (l.bias ? l.out_features : 0);
  const std::int64_t norm =
      Arch::learned_positions ? 2 * c.hidden_size : c.hidden_size;  // scale (+ shift)
  n += (2 * c.num_layers + 1) * norm;
  return n;
}

/// What a method adds, from shapes alone.
struct ParameterCount {
  std::int64_t trainable = 0;  ///< trainable adapter parameters
  std::int64_t frozen = 0;     ///< adapter parameters that are not trained but count in "all"
};

}  // namespace peft
