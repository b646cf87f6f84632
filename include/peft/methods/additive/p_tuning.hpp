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
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct PTuningConfig {
  enum class Encoder { Mlp, Lstm };

  std::int64_t num_virtual_tokens = 20;
  Encoder encoder = Encoder::Mlp;
  std::int64_t encoder_hidden_size = 0;  ///< h; 0: the hidden size, as the reference
  std::int64_t encoder_num_layers = 2;   ///< LSTM layers (the MLP always has its fixed shape)
  double encoder_dropout = 0.0;          ///< recorded and written back; not applied
  bool folded = false;                   ///< plain embeddings (always so when read from a file)
  detail::PromptLearningDims recorded;

  static PTuningConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "P_TUNING", source);
    PTuningConfig c;
    c.num_virtual_tokens = detail::json_or<std::int64_t>(j, "num_virtual_tokens", 20, source);
    const std::string type =
        detail::json_or<std::string>(j, "encoder_reparameterization_type", "MLP", source);
    if (type == "MLP")
      c.encoder = Encoder::Mlp;
    else if (type == "LSTM")
      c.encoder = Encoder::Lstm;
    else
      throw ConfigError(source + ": encoder_reparameterization_type '" + type +
                        "' unsupported (MLP, LSTM)");
    c.encoder_hidden_size = detail::json_or<std::int64_t>(j, "encoder_hidden_size", 0, source);
    c.encoder_num_layers = detail::json_or<std::int64_t>(j, "encoder_num_layers", 2, source);
    c.encoder_dropout = detail::json_or<double>(j, "encoder_dropout", 0.0, source);
    c.folded = true;
    c.recorded = detail::PromptLearningDims::from_json(j, source);
    if (c.num_virtual_tokens <= 0)
      throw ConfigError(source + ": num_virtual_tokens must be positive");
    return c;
  }

  std::int64_t hidden_for(const ModelConfig& model) const {
    return encoder_hidden_size > 0 ? encoder_hidden_size : model.hidden_size;
  }

  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = detail::adapter_config_header("P_TUNING");
    detail::prompt_learning_to_json(j, num_virtual_tokens, model.num_layers, model.hidden_size,
                                    model.num_heads);
    j["encoder_reparameterization_type"] = encoder == Encoder::Mlp ? "MLP" : "LSTM";
    j["encoder_hidden_size"] = hidden_for(model);
    j["encoder_num_layers"] = encoder_num_layers;
    j["encoder_dropout"] = encoder_dropout;
    return j;
  }
};

struct PTuning {
  using family = family::Additive;
  static constexpr std::string_view name = "p_tuning";
  using Config = PTuningConfig;

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "P_TUNING";
  }

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
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      // Only the width shapes the tensors; layers and heads are informational here.
      config_.recorded.check("P-tuning", -1, m.hidden_size, -1);
      const std::int64_t P = config_.num_virtual_tokens, d = m.hidden_size;
      embedding_ = Var<T>(Tensor<T>(Shape{P, d}), true);
      detail::fill_normal(embedding_.value(), ctx.rng, 1.0);  // torch.nn.Embedding's init
      if (config_.folded) return;
      if (config_.encoder == Config::Encoder::Lstm)
        throw ConfigError(
            "P-tuning: training an LSTM prompt encoder is not supported (use MLP; "
            "adapters trained with LSTM load, as their saved embeddings)");
      const std::int64_t h = config_.hidden_for(m);
      mlp_ = {detail::DenseLayer<T>(d, h, ctx.rng), detail::DenseLayer<T>(h, h, ctx.rng),
              detail::DenseLayer<T>(h, d, ctx.rng)};
    }

    std::int64_t num_virtual_tokens() const { return config_.num_virtual_tokens; }

    Var<T> prepend_virtual_tokens(Tape<T>& tape, const Var<T>& embeddings) {
      return ops::concat(
          tape,
          {detail::repeat_over_batch(tape, prompts(tape), embeddings.value().dim(0)), embeddings},
          1);
    }

    /// Plain: the embeddings (the reference's saved tensor). Encoding: the encoder's inputs and
    /// layers, keyed as the reference's module names.
    std::vector<NamedParameter<T>> parameters() {
      if (!encoding()) return {{"prompt_embeddings", embedding_}};
      std::vector<NamedParameter<T>> out{{"prompt_encoder.embedding.weight", embedding_}};
      for (std::size_t i = 0; i < mlp_.size(); ++i)
        mlp_[i].name_parameters("prompt_encoder.mlp_head." + std::to_string(2 * i), out);
      return out;
    }

    bool encoding() const { return !mlp_.empty(); }

    /// The virtual-token embeddings [P, hidden] the adapter produces now.
    Tensor<T> prompt_embeddings() {
      Tape<T> tape(false);
      return prompts(tape).value();
    }

    /// Replaces the encoder by its output: plain trainable embeddings, as saved and loaded.
    void fold() {
      if (!encoding()) return;
      embedding_ = Var<T>(prompt_embeddings(), true);
      mlp_.clear();
      config_.folded = true;
    }

   private:
    Var<T> prompts(Tape<T>& tape) {
      if (!encoding()) return embedding_;
      Var<T> h = ops::relu(tape, mlp_[0].forward(tape, embedding_));
      h = ops::relu(tape, mlp_[1].forward(tape, h));
      return mlp_[2].forward(tape, h);
    }

    Config config_;
    Var<T> embedding_;                        // [P, hidden]: encoder input, or the plain prompts
    std::vector<detail::DenseLayer<T>> mlp_;  // d → h → h → d while encoding
  };
};

}  // namespace peft
