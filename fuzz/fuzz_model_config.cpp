// libFuzzer harness: a base model's config.json, parsed as the library parses the file
// (io::detail::parse_json_strict, as io::load_json does) and read by peft::ModelConfig::from_json.
// An accepted config must survive a round trip through to_json, and what the decoder computes
// from it before allocating any weight (the rotary frequencies) must not fail outside the
// library's errors. Expected outcomes and findings: fuzz/harness.hpp.
#include <cstdint>

#include "harness.hpp"
#include "json_mutator.hpp"
#include "peft/io/json.hpp"
#include "peft/nn/config.hpp"

namespace {

void check(bool ok, const char* what) {
  if (!ok) peft::fuzz::finding("config.json round trip", "check", what);
}

void run(const std::uint8_t* data, std::size_t size) {
  const nlohmann::json j =
      peft::io::detail::parse_json_strict(peft::fuzz::as_text(data, size), "config.json");
  const peft::ModelConfig c = peft::ModelConfig::from_json(j, "config.json");
  const peft::ModelConfig again = peft::ModelConfig::from_json(c.to_json(), "config.json (again)");
  check(again.to_json() == c.to_json(), "to_json(from_json(to_json(c))) != to_json(c)");
  // The decoder computes these from a validated config: head_dim must already be bounded.
  (void)peft::rope_inverse_frequencies(c);
}

// Keys and values of config.json worth trying (json_mutator.hpp).
constexpr std::string_view kStrings[] = {"model_type",
                                         "gpt2",
                                         "llama",
                                         "vocab_size",
                                         "n_embd",
                                         "n_layer",
                                         "n_head",
                                         "n_inner",
                                         "n_positions",
                                         "layer_norm_epsilon",
                                         "activation_function",
                                         "gelu_new",
                                         "gelu_pytorch_tanh",
                                         "scale_attn_weights",
                                         "scale_attn_by_inverse_layer_idx",
                                         "tie_word_embeddings",
                                         "hidden_size",
                                         "num_hidden_layers",
                                         "num_attention_heads",
                                         "num_key_value_heads",
                                         "head_dim",
                                         "intermediate_size",
                                         "max_position_embeddings",
                                         "rms_norm_eps",
                                         "attention_bias",
                                         "mlp_bias",
                                         "hidden_act",
                                         "silu",
                                         "rope_theta",
                                         "rope_scaling",
                                         "rope_parameters",
                                         "rope_type",
                                         "type",
                                         "default",
                                         "linear",
                                         "llama3",
                                         "factor",
                                         "low_freq_factor",
                                         "high_freq_factor",
                                         "original_max_position_embeddings"};

}  // namespace

extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size,
                                               std::size_t max_size, unsigned seed) {
  return peft::fuzz::mutate_json(data, size, max_size, seed, kStrings);
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  peft::fuzz::expect_peft_errors_only([&] { run(data, size); });
  return 0;
}
