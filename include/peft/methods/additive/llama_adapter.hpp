#pragma once
// LLaMA-Adapter (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models
// with Zero-init Attention"), HF peft's adaption prompts. In each of the top `adapter_layers`
// blocks, `adapter_len` learned prompt tokens E [1, L, d] are projected by the layer's own key
// and value projections (no rotary), attended by the layer's queries Q (after rotary) with a
// softmax of their own, gated by g [1] and added to the attention output:
//   o ← o + O(g · softmax(Q Kᵀ / √D) V),  K = E W_kᵀ, V = E W_vᵀ (with the layer's biases),
// O the layer's output projection (o_proj) on LLaMA; on GPT-2, as the reference's
// AdaptedAttentionGPT, K and V come from c_attn and the term is added after c_proj unprojected
// (O = identity). Grouped-query attention: kv head j serves query heads j·H/KV … (the
// reference's repeat_interleave). No mask on the prompt keys (padding does not hide them). The
// gate multiplies the probabilities in the reference; (g·P) V = g·(P V) exactly in exact
// arithmetic, and before O, so a bias of O is not scaled. The softmax runs in T (the reference
// upcasts to float32; the models here compute in float32 or double).
// Starts at the base model: g = 0 (E ~ N(0, 1), torch.nn.Embedding's default).
// Reference: peft_type "ADAPTION_PROMPT", fields target_modules ("self_attn" / "attn"),
// adapter_len, adapter_layers; tensors per adapted block
//   base_model.model.<block>.self_attn.adaption_prompt [1, L, d], .adaption_gate [1]
// (GPT-2: <block>.attn.*). Not mergeable (the reference has no merge).
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct AdaptionPromptConfig : ConfigIo<AdaptionPromptConfig> {
  static constexpr std::string_view peft_type = "ADAPTION_PROMPT";

  std::string target_modules;       ///< the attention module's name; "" = the model's
  std::int64_t adapter_len = 0;     ///< L, required
  std::int64_t adapter_layers = 0;  ///< from the top, required

  static auto fields() {
    using C = AdaptionPromptConfig;
    return config_fields(field("target_modules", &C::target_modules),
                         field("adapter_len", &C::adapter_len, check::dimension),
                         field("adapter_layers", &C::adapter_layers, check::dimension));
  }
  /// The attention module's name the reference uses for the model type.
  static std::string attention_module(const ModelConfig& m) {
    return m.model_type == "gpt2" ? "attn" : "self_attn";
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    AdaptionPromptConfig c = *this;
    if (c.target_modules.empty()) c.target_modules = attention_module(model);
    return write_config(c, model);
  }
  void check_model(const ModelConfig& m) const {
    auto fail = [](const std::string& f, const std::string& expected, const std::string& found) {
      throw ConfigError("LLaMA-Adapter: adapter_config.json: field '" + f + "': expected " +
                        expected + ", found " + found);
    };
    if (!target_modules.empty() && target_modules != attention_module(m))
      fail("target_modules",
           "\"" + attention_module(m) + "\" (this " + m.model_type + " model's attention)",
           "\"" + target_modules + "\"");
    if (adapter_len < 1) fail("adapter_len", "a token count >= 1", std::to_string(adapter_len));
    if (adapter_layers < 1 || adapter_layers > m.num_layers)
      fail("adapter_layers", "1 ..= " + std::to_string(m.num_layers) + " (the model's layers)",
           std::to_string(adapter_layers));
  }
};

struct LlamaAdapter : detail::AdditiveMethod<AdaptionPromptConfig> {
  static constexpr std::string_view name = "adaption_prompt", title = "LLaMA-Adapter";
  static constexpr std::string_view paper =
      "Zhang et al., 2023, LLaMA-Adapter: Efficient Fine-tuning of Language Models with "
      "Zero-init Attention";
  static constexpr std::string_view reference = "ADAPTION_PROMPT";  ///< peft_type in HF peft
  using Config = AdaptionPromptConfig;

  static ParameterCount count_parameters(const ModelConfig& m, const std::vector<LinearShape>&,
                                         const Config& c) {
    c.check_model(m);
    return ParameterCount{c.adapter_layers * (c.adapter_len * m.hidden_size + 1), 0};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      config_.check_model(m);
      spec_.heads = m.num_heads;
      spec_.kv_heads = m.num_kv_heads;
      spec_.head_dim = m.head_dim;
      spec_.causal = false;
      project_output_ = m.model_type != "gpt2";
      first_ = static_cast<int>(m.num_layers - config_.adapter_layers);
      const std::string block = m.model_type == "gpt2" ? "transformer.h." : "model.layers.";
      for (int l = first_; l < m.num_layers; ++l) {
        Var<T> prompt(Tensor<T>(Shape{1, config_.adapter_len, m.hidden_size}), true);
        detail::fill_normal(prompt.value(), ctx.rng, 1.0);
        const std::string key = "base_model.model." + block + std::to_string(l) + "." +
                                Config::attention_module(m) + ".adaption_";
        params_.push_back({key + "prompt", prompt});
        params_.push_back({key + "gate", Var<T>(Tensor<T>(Shape{1}), true)});  // zero
      }
    }

    Var<T> adapt_attention(Tape<T>& tape, const AttentionSite<T>& site, const Var<T>& o) const {
      if (site.layer < first_) return o;
      const auto i = static_cast<std::size_t>(2 * (site.layer - first_));
      auto [k, v] = site.key_values(params_[i].var);  // [1, L, kv_dim]
      const std::vector<std::int64_t> rows(static_cast<std::size_t>(site.queries.shape()[0]), 0);
      Var<T> a = ops::attention(tape, site.queries, ops::gather_rows(tape, k, rows),
                                ops::gather_rows(tape, v, rows), spec_);
      a = ops::mul(tape, a, params_[i + 1].var);
      return ops::add(tape, o, project_output_ ? site.output(a) : a);
    }

    std::vector<NamedParameter<T>> parameters() const { return params_; }

   private:
    std::vector<NamedParameter<T>> params_;  // per adapted layer: prompt, gate
    ops::AttentionSpec spec_;
    bool project_output_ = true;
    int first_ = 0;
  };
};

}  // namespace peft
