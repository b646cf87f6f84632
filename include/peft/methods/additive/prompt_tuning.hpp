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
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct PromptTuningConfig {
  enum class Init { Random, SampleVocab, Text };

  std::int64_t num_virtual_tokens = 20;
  Init init = Init::Random;
  std::string init_text;                     ///< recorded and written back
  std::vector<std::int64_t> init_token_ids;  ///< the tokens of init_text (TEXT init)
  detail::PromptLearningDims recorded;

  static Init init_from_name(const std::string& name, const std::string& source) {
    if (name == "RANDOM") return Init::Random;
    if (name == "SAMPLE_VOCAB") return Init::SampleVocab;
    if (name == "TEXT") return Init::Text;
    throw ConfigError(source + ": prompt_tuning_init '" + name +
                      "' unsupported (RANDOM, SAMPLE_VOCAB, TEXT)");
  }
  static std::string init_name(Init init) {
    return init == Init::Random ? "RANDOM" : init == Init::SampleVocab ? "SAMPLE_VOCAB" : "TEXT";
  }

  static PromptTuningConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "PROMPT_TUNING", source);
    PromptTuningConfig c;
    c.num_virtual_tokens = detail::json_or<std::int64_t>(j, "num_virtual_tokens", 20, source);
    c.init = init_from_name(detail::json_or<std::string>(j, "prompt_tuning_init", "RANDOM", source),
                            source);
    c.init_text = detail::json_or<std::string>(j, "prompt_tuning_init_text", "", source);
    c.init_token_ids =
        detail::json_or<std::vector<std::int64_t>>(j, "prompt_tuning_init_token_ids", {}, source);
    c.recorded = detail::PromptLearningDims::from_json(j, source);
    if (c.num_virtual_tokens <= 0)
      throw ConfigError(source + ": num_virtual_tokens must be positive");
    return c;
  }

  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = detail::adapter_config_header("PROMPT_TUNING");
    detail::prompt_learning_to_json(j, num_virtual_tokens, model.num_layers, model.hidden_size,
                                    model.num_heads);
    j["prompt_tuning_init"] = init_name(init);
    j["prompt_tuning_init_text"] =
        init_text.empty() ? nlohmann::json(nullptr) : nlohmann::json(init_text);
    if (!init_token_ids.empty()) j["prompt_tuning_init_token_ids"] = init_token_ids;
    j["tokenizer_name_or_path"] = nullptr;
    j["tokenizer_kwargs"] = nullptr;
    return j;
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

struct PromptTuning {
  using family = family::Additive;
  static constexpr std::string_view name = "prompt_tuning";
  using Config = PromptTuningConfig;

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "PROMPT_TUNING";
  }

  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    return ParameterCount{config.num_virtual_tokens * model.hidden_size, 0};
  }

  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      // Only the width shapes the tensors; layers and heads are informational here.
      config_.recorded.check("prompt tuning", -1, m.hidden_size, -1);
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
    void on_base_weights_loaded() { initialise_from_vocabulary(); }

    std::int64_t num_virtual_tokens() const { return config_.num_virtual_tokens; }

    Var<T> prepend_virtual_tokens(Tape<T>& tape, const Var<T>& embeddings) {
      return ops::concat(
          tape, {detail::repeat_over_batch(tape, prompt_, embeddings.value().dim(0)), embeddings},
          1);
    }

    std::vector<NamedParameter<T>> parameters() { return {{"prompt_embeddings", prompt_}}; }

   private:
    bool initialise_from_vocabulary() {
      const std::vector<std::int64_t>& ids =
          config_.init == Config::Init::Text ? config_.init_token_ids : sampled_ids_;
      if (config_.init == Config::Init::Random || ids.empty() || !token_embedding_) return false;
      prompt_.value() = detail::embedding_rows(token_embedding_.value(), ids,
                                               config_.num_virtual_tokens, "prompt tuning");
      return true;
    }

    Config config_;
    Var<T> prompt_;           // [P, hidden]
    Var<T> token_embedding_;  // the base model's table (frozen), for TEXT / SAMPLE_VOCAB
    std::vector<std::int64_t> sampled_ids_;
  };
};

}  // namespace peft
