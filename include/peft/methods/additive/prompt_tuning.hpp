#pragma once
// Prompt tuning (Lester et al., 2021): P learned embeddings ("soft tokens") prepended to the
// token embeddings. The sequence through the model is P + T long with positions 0..P+T−1; the
// logits cover the virtual positions too, and the loss ignores them (the decoder does this,
// given num_virtual_tokens()).
//
// Reference layout: `prompt_embeddings` [P, hidden], peft_type "PROMPT_TUNING".
// Initialisation (`prompt_tuning_init`): RANDOM (N(0, 1), torch.nn.Embedding's default),
// SAMPLE_VOCAB (embeddings of tokens drawn uniformly from the vocabulary) or TEXT (embeddings of
// the tokens of `prompt_tuning_init_text`, repeated or cut to P). There is no tokenizer here:
// TEXT takes the token ids in `prompt_tuning_init_token_ids` (this project's field); without
// them the embeddings start at random, to be loaded from a file.
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct PromptTuningConfig : detail::PromptLearningConfig {
  enum class Init { Random, SampleVocab, Text };
  static constexpr std::string_view peft_type = "PROMPT_TUNING";

  Init init = Init::Random;
  std::string init_text;                     ///< recorded and written back
  std::vector<std::int64_t> init_token_ids;  ///< the tokens of init_text (TEXT init)

  static auto fields() {
    using C = PromptTuningConfig;
    return config_fields(
        prompt_learning_fields(),
        choice("prompt_tuning_init", &C::init, std::pair("RANDOM", Init::Random),
               std::pair("SAMPLE_VOCAB", Init::SampleVocab), std::pair("TEXT", Init::Text)),
        detail::empty_as_null("prompt_tuning_init_text", &C::init_text),
        detail::empty_as_null("prompt_tuning_init_token_ids", &C::init_token_ids, /*omit=*/true),
        constants({{"tokenizer_name_or_path", nullptr}, {"tokenizer_kwargs", nullptr}}));
  }
  static PromptTuningConfig from_json(const nlohmann::json& j, const std::string& source) {
    return read_config<PromptTuningConfig>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    return write_config(recording(*this, model.num_layers, model.hidden_size, model.num_heads),
                        model);
  }
};

namespace detail {
/// Rows of `embeddings` [V, d] at `ids`, repeated and cut to `count` rows, as the reference
/// builds a TEXT initialisation.
template <class T>
Tensor<T> embedding_rows(const Tensor<T>& embeddings, std::vector<std::int64_t> ids,
                         std::int64_t count, const std::string& method) {
  if (ids.empty()) throw ConfigError(method + ": no token ids to initialise from");
  const std::int64_t V = embeddings.dim(0), d = embeddings.dim(1);
  Tensor<T> out(Shape{count, d});
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t id = ids[static_cast<std::size_t>(i) % ids.size()];
    if (id < 0 || id >= V)
      throw ConfigError(method + ": init token id " + std::to_string(id) + " outside [0, " +
                        std::to_string(V) + ")");
    std::copy_n(embeddings.data() + id * d, d, out.data() + i * d);
  }
  return out;
}
}  // namespace detail

struct PromptTuning : detail::AdditiveMethod<PromptTuningConfig> {
  static constexpr std::string_view name = "prompt_tuning", title = "prompt tuning";
  static constexpr std::string_view paper =
      "Lester et al., 2021, The Power of Scale for Parameter-Efficient Prompt Tuning";
  static constexpr std::string_view reference = "PROMPT_TUNING";  ///< peft_type in HF peft
  using Config = PromptTuningConfig;

  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    return ParameterCount{config.num_virtual_tokens * model.hidden_size, 0};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      // Only the width shapes the tensors; layers and heads are informational here.
      config_.check_recorded(title, -1, m.hidden_size, -1);
      prompt_ = Var<T>(Tensor<T>(Shape{config_.num_virtual_tokens, m.hidden_size}), true);
      token_embedding_ = detail::find_token_embedding(ctx.base_parameters);
      if (config_.init == Config::Init::SampleVocab) {
        std::uniform_int_distribution<std::int64_t> pick(0, m.vocab_size - 1);
        for (std::int64_t i = 0; i < config_.num_virtual_tokens; ++i)
          sampled_ids_.push_back(pick(ctx.rng));
      }
      if (!initialise_from_vocabulary()) detail::fill_normal(prompt_.value(), ctx.rng, 1.0);
    }

    /// Called by the decoder once real base weights are in: TEXT and SAMPLE_VOCAB take the
    /// embeddings of the loaded model, not of the random one the adapter was attached to.
    void on_base_weights_loaded(const std::vector<nn::Linear<T>*>&) {
      initialise_from_vocabulary();
    }

    std::int64_t num_virtual_tokens() const { return config_.num_virtual_tokens; }
    Var<T> prepend_virtual_tokens(Tape<T>& tape, const Var<T>& embeddings) {
      return detail::prepend_rows(tape, prompt_, embeddings);
    }

    std::vector<NamedParameter<T>> parameters() const { return {{"prompt_embeddings", prompt_}}; }

   private:
    bool initialise_from_vocabulary() {
      const std::vector<std::int64_t>& ids =
          config_.init == Config::Init::Text ? config_.init_token_ids : sampled_ids_;
      if (config_.init == Config::Init::Random || ids.empty() || !token_embedding_) return false;
      prompt_.value() = detail::embedding_rows(token_embedding_.value(), ids,
                                               config_.num_virtual_tokens, std::string(title));
      return true;
    }

    Var<T> prompt_;           // [P, hidden]
    Var<T> token_embedding_;  // the base model's table (frozen), for TEXT / SAMPLE_VOCAB
    std::vector<std::int64_t> sampled_ids_;
  };
};

}  // namespace peft
