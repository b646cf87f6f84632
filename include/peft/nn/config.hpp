#pragma once
// ModelConfig: the decoder's hyper-parameters, read from a reference `config.json`.
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "peft/core/error.hpp"

namespace peft {

struct ModelConfig {
  std::string model_type;           ///< "gpt2" or "llama"
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;     ///< d
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;    ///< = num_heads without grouped-query attention
  std::int64_t head_dim = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t max_positions = 0;   ///< learned-position rows (GPT-2); a soft bound for LLaMA
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = true;
  bool attention_bias = true;       ///< biases on the attention projections
  bool mlp_bias = true;             ///< biases on the MLP projections

  std::int64_t kv_dim() const { return num_kv_heads * head_dim; }

  /// Checks the invariants the decoder relies on; throws ConfigError naming `source`.
  void validate(const std::string& source) const {
    auto fail = [&](const std::string& what) { throw ConfigError(source + ": " + what); };
    if (model_type != "gpt2" && model_type != "llama")
      fail("unknown architecture '" + model_type + "' (supported: gpt2, llama)");
    if (vocab_size <= 0 || hidden_size <= 0 || num_layers <= 0 || num_heads <= 0 ||
        num_kv_heads <= 0 || head_dim <= 0 || intermediate_size <= 0 || max_positions <= 0)
      fail("sizes must be positive");
    if (num_heads % num_kv_heads != 0)
      fail("num_key_value_heads (" + std::to_string(num_kv_heads) +
           ") must divide num_attention_heads (" + std::to_string(num_heads) + ")");
    if (model_type == "gpt2" && num_heads * head_dim != hidden_size)
      fail("n_embd must be n_head * head_dim");
    if (model_type == "llama" && head_dim % 2 != 0) fail("head_dim must be even for rotary");
    if (norm_eps <= 0 || rope_theta <= 0) fail("eps and rope theta must be positive");
  }

  /// Reads a transformers `config.json` (GPT2LMHeadModel or LlamaForCausalLM).
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source) {
    auto fail = [&](const std::string& what) { throw ConfigError(source + ": " + what); };
    if (!j.is_object()) fail("expected a JSON object");
    auto get_int = [&](const char* key) -> std::int64_t {
      if (!j.contains(key) || !j[key].is_number_integer())
        fail(std::string("field '") + key + "' expected an integer");
      return j[key].get<std::int64_t>();
    };
    auto get_num = [&](const char* key, double fallback) -> double {
      if (!j.contains(key) || j[key].is_null()) return fallback;
      if (!j[key].is_number()) fail(std::string("field '") + key + "' expected a number");
      return j[key].get<double>();
    };
    auto get_bool = [&](const char* key, bool fallback) -> bool {
      if (!j.contains(key) || j[key].is_null()) return fallback;
      if (!j[key].is_boolean()) fail(std::string("field '") + key + "' expected true or false");
      return j[key].get<bool>();
    };
    ModelConfig c;
    if (!j.contains("model_type") || !j["model_type"].is_string()) fail("field 'model_type' missing");
    c.model_type = j["model_type"].get<std::string>();
    if (c.model_type == "gpt2") {
      c.vocab_size = get_int("vocab_size");
      c.hidden_size = get_int("n_embd");
      c.num_layers = get_int("n_layer");
      c.num_heads = get_int("n_head");
      c.num_kv_heads = c.num_heads;
      c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
      c.intermediate_size = j.contains("n_inner") && !j["n_inner"].is_null() ? get_int("n_inner")
                                                                            : 4 * c.hidden_size;
      c.max_positions = get_int("n_positions");
      c.norm_eps = get_num("layer_norm_epsilon", 1e-5);
      c.tie_word_embeddings = get_bool("tie_word_embeddings", true);
      const std::string act = j.value("activation_function", std::string("gelu_new"));
      if (act != "gelu_new" && act != "gelu_pytorch_tanh")
        fail("activation_function '" + act + "' unsupported (gelu_new / gelu_pytorch_tanh)");
      if (!get_bool("scale_attn_weights", true) || get_bool("scale_attn_by_inverse_layer_idx", false))
        fail("only the standard 1/sqrt(head_dim) attention scaling is supported");
      c.attention_bias = c.mlp_bias = true;
    } else if (c.model_type == "llama") {
      c.vocab_size = get_int("vocab_size");
      c.hidden_size = get_int("hidden_size");
      c.num_layers = get_int("num_hidden_layers");
      c.num_heads = get_int("num_attention_heads");
      c.num_kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                           ? get_int("num_key_value_heads")
                           : c.num_heads;
      c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null()
                       ? get_int("head_dim")
                       : (c.num_heads > 0 ? c.hidden_size / c.num_heads : 0);
      c.intermediate_size = get_int("intermediate_size");
      c.max_positions = j.contains("max_position_embeddings") ? get_int("max_position_embeddings")
                                                              : 2048;
      c.norm_eps = get_num("rms_norm_eps", 1e-6);
      c.tie_word_embeddings = get_bool("tie_word_embeddings", false);
      c.attention_bias = get_bool("attention_bias", false);
      c.mlp_bias = get_bool("mlp_bias", false);
      const std::string act = j.value("hidden_act", std::string("silu"));
      if (act != "silu") fail("hidden_act '" + act + "' unsupported (silu)");
      c.rope_theta = get_num("rope_theta", 10000.0);
      if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
        const auto& rp = j["rope_parameters"];
        if (rp.contains("rope_theta")) c.rope_theta = rp["rope_theta"].get<double>();
        const std::string type = rp.value("rope_type", std::string("default"));
        if (type != "default") fail("rope_type '" + type + "' unsupported (default)");
      }
      if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
        fail("rope_scaling is not supported");
    } else {
      fail("unknown architecture '" + c.model_type + "' (supported: gpt2, llama)");
    }
    c.validate(source);
    return c;
  }
};

}  // namespace peft
