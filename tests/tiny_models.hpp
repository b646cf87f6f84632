#pragma once
// Tiny models and a padded batch shared by the method-family tests: small enough for
// finite-difference gradient checks, with GPT-2's biases and tied head and LLaMA's
// grouped-query attention and untied head.
#include <peft/data/tasks.hpp>
#include <peft/peft.hpp>
#include <type_traits>

namespace test_support {

inline peft::ModelConfig tiny_gpt2() {
  peft::ModelConfig c;
  c.model_type = "gpt2";
  c.vocab_size = 12;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.num_heads = 2;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 16;
  c.max_positions = 32;
  c.tie_word_embeddings = true;
  c.attention_bias = c.mlp_bias = true;
  return c;
}

inline peft::ModelConfig tiny_llama() {
  peft::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 12;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.num_heads = 2;
  c.num_kv_heads = 1;  // grouped-query: prefixes use the key/value width
  c.head_dim = 4;
  c.intermediate_size = 12;
  c.max_positions = 32;
  c.norm_eps = 1e-6;
  c.tie_word_embeddings = false;
  c.attention_bias = c.mlp_bias = false;
  return c;
}

template <class Arch>
peft::ModelConfig tiny_config() {
  if constexpr (std::is_same_v<Arch, peft::arch::Gpt2>)
    return tiny_gpt2();
  else
    return tiny_llama();
}

/// Two sequences of 5 tokens, the second right-padded by 2.
inline peft::Batch padded_batch() {
  peft::Batch b;
  b.batch = 2;
  b.seq = 5;
  b.input_ids = {1, 5, 7, 2, 9, 3, 3, 8, 0, 0};
  b.attention_mask = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
  return b;
}

/// A model over the study tasks' vocabulary (copy, reverse, ...), for trainer tests: width 16,
/// 2 heads of 8, `layers` blocks, a tied head; GPT-2's biases or LLaMA's none.
inline peft::ModelConfig task_model(const char* model_type, std::int64_t layers,
                                    std::int64_t positions = 32) {
  peft::ModelConfig c;
  c.model_type = model_type;
  c.vocab_size = peft::data::TaskVocab::size;
  c.hidden_size = 16;
  c.num_layers = layers;
  c.num_heads = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 32;
  c.max_positions = positions;
  c.attention_bias = c.mlp_bias = std::string_view(model_type) == "gpt2";  // tied head: default
  return c;
}

/// Copy and reverse tasks with answer-only labels of different lengths (the rows of a batch have
/// different numbers of labelled positions).
inline const peft::data::TaskMixture& task_mixture() {
  static const peft::data::TaskMixture mix{
      {peft::data::TaskKind::Copy, peft::data::TaskKind::Reverse}, {1, 4, 16, 2, 4}, 0};
  return mix;
}

}  // namespace test_support
