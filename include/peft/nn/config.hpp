#pragma once
// ModelConfig: the decoder's hyper-parameters, read from a reference `config.json`.
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

/// Throws the ConfigError every config reader gives for a bad field: "<source>: field '<key>':
/// expected <what>, found <json>" (the found value cut at 80 characters). config.json's reader
/// below and the adapter configs' field tables (methods/config_fields.hpp) share it.
[[noreturn]] inline void throw_field_error(const std::string& source, std::string_view key,
                                           const std::string& expected,
                                           const nlohmann::json& found) {
  std::string shown = found.dump();
  if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
  throw ConfigError(source + ": field '" + std::string(key) + "': expected " + expected +
                    ", found " + shown);
}

/// Rotary frequency scaling, as transformers' rope_parameters / rope_scaling give it.
struct RopeScaling {
  std::string type = "default";  ///< "default", "linear" or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;                    ///< llama3
  double high_freq_factor = 4.0;                   ///< llama3
  double original_max_position_embeddings = 8192;  ///< llama3
};

/// A default-constructed ModelConfig has no architecture and GPT-2's flags (biases, tied head,
/// eps 1e-5), whatever model_type is set to afterwards: start from ModelConfig::llama() or
/// ModelConfig::gpt2() (or for_model_type) to get the reference's defaults for that type.
/// from_json applies the same per-type defaults to the fields a config.json leaves out.
struct ModelConfig {
  std::string model_type;  ///< "gpt2" or "llama"
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;  ///< d
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;  ///< = num_heads without grouped-query attention
  std::int64_t head_dim = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t max_positions = 0;  ///< learned-position rows (GPT-2); a soft bound for LLaMA
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = true;
  bool attention_bias = true;  ///< biases on the attention projections
  bool mlp_bias = true;        ///< biases on the MLP projections

  std::int64_t kv_dim() const { return num_kv_heads * head_dim; }

  /// transformers' LlamaConfig() (Llama-2-7B sizes): no biases, untied head, rms_norm_eps 1e-6,
  /// rope_theta 10000, 2048 positions. Change the sizes, keep the flags.
  static ModelConfig llama() {
    ModelConfig c;
    c.model_type = "llama";
    c.vocab_size = 32000;
    c.hidden_size = 4096;
    c.num_layers = 32;
    c.num_heads = c.num_kv_heads = 32;
    c.head_dim = 128;
    c.intermediate_size = 11008;
    c.max_positions = 2048;
    c.norm_eps = 1e-6;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = false;
    c.attention_bias = c.mlp_bias = false;
    return c;
  }

  /// transformers' GPT2Config() (GPT-2 124M sizes): biases, tied head, layer_norm_epsilon 1e-5,
  /// n_inner = 4 n_embd, 1024 positions.
  static ModelConfig gpt2() {
    ModelConfig c;
    c.model_type = "gpt2";
    c.vocab_size = 50257;
    c.hidden_size = 768;
    c.num_layers = 12;
    c.num_heads = c.num_kv_heads = 12;
    c.head_dim = 64;
    c.intermediate_size = 4 * 768;
    c.max_positions = 1024;
    c.norm_eps = 1e-5;
    c.tie_word_embeddings = true;
    c.attention_bias = c.mlp_bias = true;
    return c;
  }

  /// llama() or gpt2() by name; throws ConfigError naming `source` for any other type.
  static ModelConfig for_model_type(const std::string& model_type,
                                    const std::string& source = "model config") {
    if (model_type == "llama") return llama();
    if (model_type == "gpt2") return gpt2();
    throw ConfigError(source + ": unknown architecture '" + model_type +
                      "' (supported: gpt2, llama)");
  }

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
    if (!(norm_eps > 0) || !(rope_theta > 0) || !std::isfinite(norm_eps) ||
        !std::isfinite(rope_theta))
      fail("eps and rope theta must be positive and finite");
  }

  /// The config.json transformers would write for this config (LLaMA: LlamaConfig's fields;
  /// GPT-2: GPT2Config's), so that a model this library builds loads like a reference one.
  nlohmann::json to_json() const {
    if (model_type == "gpt2")
      return {{"model_type", "gpt2"},
              {"architectures", {"GPT2LMHeadModel"}},
              {"vocab_size", vocab_size},
              {"n_embd", hidden_size},
              {"n_layer", num_layers},
              {"n_head", num_heads},
              {"n_inner", intermediate_size},
              {"n_positions", max_positions},
              {"layer_norm_epsilon", norm_eps},
              {"activation_function", "gelu_new"},
              {"tie_word_embeddings", tie_word_embeddings}};
    nlohmann::json j = {{"model_type", "llama"},
                        {"architectures", {"LlamaForCausalLM"}},
                        {"vocab_size", vocab_size},
                        {"hidden_size", hidden_size},
                        {"num_hidden_layers", num_layers},
                        {"num_attention_heads", num_heads},
                        {"num_key_value_heads", num_kv_heads},
                        {"head_dim", head_dim},
                        {"intermediate_size", intermediate_size},
                        {"max_position_embeddings", max_positions},
                        {"rms_norm_eps", norm_eps},
                        {"rope_theta", rope_theta},
                        {"tie_word_embeddings", tie_word_embeddings},
                        {"attention_bias", attention_bias},
                        {"mlp_bias", mlp_bias},
                        {"hidden_act", "silu"}};
    if (rope_scaling.type != "default") {
      // As transformers 4 writes it; from_json reads it back (as it reads rope_parameters).
      nlohmann::json rs = {{"rope_type", rope_scaling.type}, {"factor", rope_scaling.factor}};
      if (rope_scaling.type == "llama3") {
        rs["low_freq_factor"] = rope_scaling.low_freq_factor;
        rs["high_freq_factor"] = rope_scaling.high_freq_factor;
        rs["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
      }
      j["rope_scaling"] = std::move(rs);
    }
    return j;
  }

  /// Upper bounds on a config.json's sizes, checked before anything is computed from them: far
  /// above any released decoder (vocabularies reach ~256k, widths ~16k, depths ~128), low enough
  /// that every product of two sizes (a weight's element count) fits in 64 bits with room to
  /// spare. A value above a bound is a typo or a hostile file, not a model.
  struct Limits {
    static constexpr std::int64_t vocab_size = std::int64_t(1) << 24;     // 16.8M tokens
    static constexpr std::int64_t width = std::int64_t(1) << 20;          // hidden, inner
    static constexpr std::int64_t num_layers = std::int64_t(1) << 16;     // 65,536
    static constexpr std::int64_t heads = std::int64_t(1) << 16;          // heads, head_dim
    static constexpr std::int64_t max_positions = std::int64_t(1) << 24;  // 16.8M
  };

  /// Reads a transformers `config.json` (GPT2LMHeadModel or LlamaForCausalLM). Every field is
  /// checked for its type and range before it is used; an error names `source` and the field:
  /// "<source>: field 'n_embd': expected an integer in [1, 1048576], found 1e+300".
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source) {
    auto fail = [&](const std::string& what) { throw ConfigError(source + ": " + what); };
    auto fail_field = [&](const std::string& key, const std::string& expected,
                          const nlohmann::json& found) {
      throw_field_error(source, key, expected, found);
    };
    if (!j.is_object()) fail("expected a JSON object");
    auto get_int = [&](const char* key, std::int64_t max) -> std::int64_t {
      const std::string range = "an integer in [1, " + std::to_string(max) + "]";
      if (!j.contains(key)) fail(std::string("field '") + key + "' missing (" + range + ")");
      const nlohmann::json& v = j[key];
      if (!v.is_number_integer()) fail_field(key, range, v);
      // A parsed non-negative integer is stored unsigned: both bounds apply to either kind.
      if (v.is_number_unsigned()
              ? (v.get<std::uint64_t>() < 1 || v.get<std::uint64_t>() > std::uint64_t(max))
              : (v.get<std::int64_t>() < 1 || v.get<std::int64_t>() > max))
        fail_field(key, range, v);
      return v.get<std::int64_t>();
    };
    auto get_optional_int = [&](const char* key, std::int64_t max, std::int64_t fallback) {
      return j.contains(key) && !j[key].is_null() ? get_int(key, max) : fallback;
    };
    // `prefix` names the enclosing object in messages ("rope_scaling.").
    auto get_num = [&](const nlohmann::json& o, const std::string& key, double fallback,
                       const std::string& prefix = "") -> double {
      if (!o.contains(key) || o[key].is_null()) return fallback;
      if (!o[key].is_number() || !std::isfinite(o[key].get<double>()))
        fail_field(prefix + key, "a finite number", o[key]);
      return o[key].get<double>();
    };
    auto get_bool = [&](const char* key, bool fallback) -> bool {
      if (!j.contains(key) || j[key].is_null()) return fallback;
      if (!j[key].is_boolean()) fail_field(key, "true or false", j[key]);
      return j[key].get<bool>();
    };
    auto get_string = [&](const nlohmann::json& o, const std::string& key,
                          const std::string& fallback,
                          const std::string& prefix = "") -> std::string {
      if (!o.contains(key) || o[key].is_null()) return fallback;
      if (!o[key].is_string()) fail_field(prefix + key, "a string", o[key]);
      return o[key].get<std::string>();
    };
    ModelConfig c;
    if (!j.contains("model_type")) fail("field 'model_type' missing (\"gpt2\" or \"llama\")");
    c.model_type = get_string(j, "model_type", "");
    if (c.model_type == "gpt2") {
      c.vocab_size = get_int("vocab_size", Limits::vocab_size);
      c.hidden_size = get_int("n_embd", Limits::width);
      c.num_layers = get_int("n_layer", Limits::num_layers);
      c.num_heads = get_int("n_head", Limits::heads);
      c.num_kv_heads = c.num_heads;
      c.head_dim = c.hidden_size / c.num_heads;
      c.intermediate_size = get_optional_int("n_inner", Limits::width, 4 * c.hidden_size);
      c.max_positions = get_int("n_positions", Limits::max_positions);
      c.norm_eps = get_num(j, "layer_norm_epsilon", 1e-5);
      c.tie_word_embeddings = get_bool("tie_word_embeddings", true);
      const std::string act = get_string(j, "activation_function", "gelu_new");
      if (act != "gelu_new" && act != "gelu_pytorch_tanh")
        fail("activation_function '" + act + "' unsupported (gelu_new / gelu_pytorch_tanh)");
      if (!get_bool("scale_attn_weights", true) ||
          get_bool("scale_attn_by_inverse_layer_idx", false))
        fail("only the standard 1/sqrt(head_dim) attention scaling is supported");
      c.attention_bias = c.mlp_bias = true;
    } else if (c.model_type == "llama") {
      c.vocab_size = get_int("vocab_size", Limits::vocab_size);
      c.hidden_size = get_int("hidden_size", Limits::width);
      c.num_layers = get_int("num_hidden_layers", Limits::num_layers);
      c.num_heads = get_int("num_attention_heads", Limits::heads);
      c.num_kv_heads = get_optional_int("num_key_value_heads", Limits::heads, c.num_heads);
      c.head_dim = get_optional_int("head_dim", Limits::heads, c.hidden_size / c.num_heads);
      c.intermediate_size = get_int("intermediate_size", Limits::width);
      c.max_positions = get_optional_int("max_position_embeddings", Limits::max_positions, 2048);
      c.norm_eps = get_num(j, "rms_norm_eps", 1e-6);
      c.tie_word_embeddings = get_bool("tie_word_embeddings", false);
      c.attention_bias = get_bool("attention_bias", false);
      c.mlp_bias = get_bool("mlp_bias", false);
      const std::string act = get_string(j, "hidden_act", "silu");
      if (act != "silu") fail("hidden_act '" + act + "' unsupported (silu)");
      c.rope_theta = get_num(j, "rope_theta", 10000.0);
      // transformers 5 writes rope_parameters (theta and scaling together); older files write
      // rope_theta and rope_scaling.
      for (const char* key : {"rope_scaling", "rope_parameters"}) {
        if (!j.contains(key) || j[key].is_null()) continue;
        const auto& rp = j[key];
        if (!rp.is_object()) fail_field(key, "an object", rp);
        auto number = [&](const char* field, double fallback) {
          return get_num(rp, field, fallback, std::string(key) + ".");
        };
        c.rope_theta = number("rope_theta", c.rope_theta);
        RopeScaling& rs = c.rope_scaling;
        const std::string prefix = std::string(key) + ".";
        rs.type = get_string(rp, "rope_type", get_string(rp, "type", "default", prefix), prefix);
        if (rs.type != "default" && rs.type != "linear" && rs.type != "llama3")
          fail("rope_type '" + rs.type + "' unsupported (default, linear, llama3)");
        rs.factor = number("factor", 1.0);
        rs.low_freq_factor = number("low_freq_factor", 1.0);
        rs.high_freq_factor = number("high_freq_factor", 4.0);
        rs.original_max_position_embeddings = number("original_max_position_embeddings", 8192);
        if (rs.factor <= 0 || (rs.type == "llama3" && rs.high_freq_factor <= rs.low_freq_factor))
          fail(std::string(key) + ": invalid scaling factors");
      }
    } else {
      fail("unknown architecture '" + c.model_type + "' (supported: gpt2, llama)");
    }
    c.validate(source);
    return c;
  }
};

/// The rotary inverse frequencies θ^(−2i/D), i < D/2, with the config's scaling applied, in
/// float32 as the reference computes them (its cos and sin then come from float32 angles).
inline std::vector<float> rope_inverse_frequencies(const ModelConfig& c) {
  const std::int64_t half = c.head_dim / 2;
  std::vector<float> inv(static_cast<std::size_t>(half));
  for (std::int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
    inv[static_cast<std::size_t>(i)] =
        1.0f / static_cast<float>(std::pow(static_cast<float>(c.rope_theta), exponent));
  }
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type == "linear") {
    for (float& f : inv) f = static_cast<float>(f / rs.factor);
  } else if (rs.type == "llama3") {
    // Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    const double low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor;
    const double high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2.0 * 3.14159265358979323846 / f;
      const float slowed = wavelen > low_wavelen ? static_cast<float>(f / rs.factor) : f;
      if (wavelen >= high_wavelen && wavelen <= low_wavelen) {
        const double smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) /
                              (rs.high_freq_factor - rs.low_freq_factor);
        f = static_cast<float>((1 - smooth) * slowed / rs.factor + smooth * slowed);
      } else {
        f = slowed;
      }
    }
  }
  return inv;
}

}  // namespace peft
