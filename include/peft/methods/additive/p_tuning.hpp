#pragma once
// P-tuning (Liu et al., 2021, "GPT Understands, Too"): prompt tuning whose P virtual-token
// embeddings come from a prompt encoder over learned inputs E [P, hidden]. The reference's
// MLP encoder: Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d); its LSTM encoder
// (a bidirectional LSTM, then Linear(2h, 2h) → ReLU → Linear(2h, d)) is counted but not trained
// here.
//
// Reference layout: the reference saves only the encoder's output, `prompt_embeddings`
// [P, hidden] (peft_type "P_TUNING"), and loads it as plain prompt embeddings; a config read
// from a file therefore holds plain embeddings, and fold() turns a trained encoder into them.
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct PTuningConfig : detail::PromptLearningConfig {
  enum class Encoder { Mlp, Lstm };
  static constexpr std::string_view peft_type = "P_TUNING";

  Encoder encoder = Encoder::Mlp;
  std::int64_t encoder_hidden_size = 0;  ///< h; 0: the hidden size, as the reference
  std::int64_t encoder_num_layers = 2;   ///< LSTM layers (the MLP always has its fixed shape)
  /// The reference passes it to its LSTM encoder only (its MLP encoder has no dropout), and
  /// this library does not train the LSTM encoder: recorded and written back.
  double encoder_dropout = 0.0;
  bool folded = false;  ///< plain embeddings (always so when read from a file)

  static auto fields() {
    using C = PTuningConfig;
    return config_fields(
        prompt_learning_fields(),
        choice("encoder_reparameterization_type", &C::encoder, std::pair("MLP", Encoder::Mlp),
               std::pair("LSTM", Encoder::Lstm)),
        field("encoder_hidden_size", &C::encoder_hidden_size, check::dimension_or_zero),
        field("encoder_num_layers", &C::encoder_num_layers, check::dimension_or_zero),
        float_field("encoder_dropout", &C::encoder_dropout, check::probability));
  }
  static PTuningConfig from_json(const nlohmann::json& j, const std::string& source) {
    PTuningConfig c = read_config<PTuningConfig>(j, source);
    c.folded = true;
    return c;
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    PTuningConfig c = recording(*this, model.num_layers, model.hidden_size, model.num_heads);
    c.encoder_hidden_size = hidden_for(model);
    return write_config(c, model);
  }

  std::int64_t hidden_for(const ModelConfig& model) const {
    return encoder_hidden_size > 0 ? encoder_hidden_size : model.hidden_size;
  }
};

struct PTuning : detail::AdditiveMethod<PTuningConfig> {
  static constexpr std::string_view name = "p_tuning", title = "P-tuning";
  static constexpr std::string_view paper = "Liu et al., 2021, GPT Understands, Too";
  static constexpr std::string_view reference = "P_TUNING";  ///< peft_type in HF peft
  using Config = PTuningConfig;

  /// The embedding and the encoder, as the reference prints them while training.
  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    const std::int64_t d = model.hidden_size, h = config.hidden_for(model);
    std::int64_t n = config.num_virtual_tokens * d;
    if (config.encoder == Config::Encoder::Mlp) {
      n += (d * h + h) + (h * h + h) + (h * d + d);
    } else {
      // Bidirectional torch.nn.LSTM: per layer and direction 4h·in + 4h·h weights, two 4h biases.
      for (std::int64_t layer = 0; layer < config.encoder_num_layers; ++layer) {
        const std::int64_t in = layer == 0 ? d : 2 * h;
        n += 2 * (4 * h * in + 4 * h * h + 8 * h);
      }
      n += (2 * h * 2 * h + 2 * h) + (2 * h * d + d);
    }
    return ParameterCount{n, 0};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      // Only the width shapes the tensors; layers and heads are informational here.
      config_.check_recorded(title, -1, m.hidden_size, -1);
      const std::int64_t P = config_.num_virtual_tokens, d = m.hidden_size;
      Var<T> embedding(Tensor<T>(Shape{P, d}), true);
      detail::fill_normal(embedding.value(), ctx.rng, 1.0);  // torch.nn.Embedding's init
      if (config_.folded) {
        table_ = embedding;
        return;
      }
      if (config_.encoder == Config::Encoder::Lstm)
        throw ConfigError(
            "P-tuning: training an LSTM prompt encoder is not supported (use MLP; "
            "adapters trained with LSTM load, as their saved embeddings)");
      const std::int64_t h = config_.hidden_for(m);
      encoder_.embedding = embedding;
      encoder_.layers.emplace_back(d, h, ctx.rng);
      encoder_.layers.emplace_back(h, h, ctx.rng);
      encoder_.layers.emplace_back(h, d, ctx.rng);
      encoder_.head = "mlp_head";
    }

    std::int64_t num_virtual_tokens() const { return config_.num_virtual_tokens; }
    Var<T> prepend_virtual_tokens(Tape<T>& tape, const Var<T>& embeddings) {
      return detail::prepend_rows(tape, encoding() ? encoder_.forward(tape) : table_, embeddings);
    }

    /// Plain: the embeddings (the reference's saved tensor). Encoding: the encoder's inputs and
    /// layers, keyed as the reference's module names.
    std::vector<NamedParameter<T>> parameters() const { return encoder_.parameters_or(table_); }
    bool encoding() const { return encoder_.active(); }
    /// The virtual-token embeddings [P, hidden] the adapter produces now.
    Tensor<T> prompt_embeddings() const { return encoder_.output_or(table_); }
    /// Replaces the encoder by its output: plain trainable embeddings, as saved and loaded.
    void fold() {
      if (encoder_.fold_into(table_)) config_.folded = true;
    }

   private:
    Var<T> table_;                      // [P, hidden]: the plain prompts
    detail::PromptEncoder<T> encoder_;  // E [P, hidden] → h → h → hidden while encoding
  };
};

}  // namespace peft
