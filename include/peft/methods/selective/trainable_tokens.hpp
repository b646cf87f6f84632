#pragma once
// Trainable tokens (HF peft's TrainableTokensConfig): only the rows `token_indices` of the token
// embedding train. The method holds their values R [n, d] and the model runs with the table
//   W' = W with rows token_indices replaced by R
// (the reference's index_copy), for the lookup and, where the head is tied to the embedding
// (GPT-2), for the head too, as the reference's tied lm_head adapter does; an untied lm_head
// (the LLaMA here) is unchanged. R starts as those rows of W (init_weights true), so the model
// starts at the base model; init_weights false draws R ~ N(0, 1).
// W' is built as W + scatter(R − W[rows]) from the row ops (no op of its own): R − W[rows] is 0
// at start, so the start is the base exactly. The table is rebuilt per forward, as the
// reference's forward rebuilds it. Mergeable: merge writes R into W's rows (unmerge restores
// them), as the reference merges.
// Reference: peft_type "TRAINABLE_TOKENS", fields token_indices, target_modules (the input
// embedding's module, written "model.embed_tokens" / "transformer.wte"), init_weights; tensor
//   base_model.model.<embedding>.trainable_tokens_delta [n, d]
// and, with a tied head, the same values again under base_model.model.lm_head.
// trainable_tokens_delta (a copy here, not trained, refreshed by parameters()).
// Indices must be distinct (the reference's index_copy leaves duplicates undefined).
#include <set>
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/selective/common.hpp"

namespace peft {

struct TrainableTokensConfig : TabledConfigIo<TrainableTokensConfig> {
  static constexpr std::string_view peft_type = "TRAINABLE_TOKENS";

  std::vector<std::int64_t> token_indices;
  std::string target_modules;  ///< the input embedding's module path; "" = the model's
  bool init_weights = true;

  static auto fields() {
    using C = TrainableTokensConfig;
    return config_fields(field("token_indices", &C::token_indices, check::all_non_negative),
                         field("target_modules", &C::target_modules),
                         field("init_weights", &C::init_weights));
  }
  static std::string embedding_module(const ModelConfig& m) {
    return m.model_type == "gpt2" ? "transformer.wte" : "model.embed_tokens";
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    TrainableTokensConfig c = *this;
    if (c.target_modules.empty()) c.target_modules = embedding_module(model);
    return write_config(c, model);
  }
  void check_model(const ModelConfig& m) const {
    auto fail = [](const std::string& f, const std::string& expected, const std::string& found) {
      throw ConfigError("trainable tokens: adapter_config.json: field '" + f + "': expected " +
                        expected + ", found " + found);
    };
    const std::string e = embedding_module(m);
    if (!target_modules.empty() && target_modules != e &&
        target_modules != e.substr(e.find('.') + 1))
      fail("target_modules", "\"" + e + "\" (this model's input embedding)",
           "\"" + target_modules + "\"");
    if (token_indices.empty()) fail("token_indices", "at least one token index", "[]");
    std::set<std::int64_t> seen;
    for (std::int64_t i : token_indices)
      if (i >= m.vocab_size || !seen.insert(i).second)
        fail("token_indices",
             "distinct indices below the vocabulary size " + std::to_string(m.vocab_size),
             std::to_string(i));
  }
};

struct TrainableTokens {
  using family = family::Selective;
  static constexpr std::string_view name = "trainable_tokens", title = "trainable tokens";
  static constexpr std::string_view paper = "";
  static constexpr std::string_view reference = "TRAINABLE_TOKENS";  ///< peft_type in HF peft
  using Config = TrainableTokensConfig;

  static ParameterCount count_parameters(const ModelConfig& m, const std::vector<LinearShape>&,
                                         const Config& c) {
    c.check_model(m);
    return ParameterCount{static_cast<std::int64_t>(c.token_indices.size()) * m.hidden_size, 0};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      config_.check_model(m);
      table_ = detail::find_token_embedding(ctx.base_parameters);
      if (!table_) throw ConfigError("trainable tokens: the model has no token embedding table");
      const auto n = static_cast<std::int64_t>(config_.token_indices.size());
      rows_ = Var<T>(Tensor<T>(Shape{n, m.hidden_size}), true);
      if (!config_.init_weights) detail::fill_normal(rows_.value(), ctx.rng, 1.0);
      on_base_weights_loaded({});
      key_ = "base_model.model." + Config::embedding_module(m) + ".trainable_tokens_delta";
      if (m.tie_word_embeddings) tied_copy_ = Var<T>(rows_.value());
    }
    /// R from the loaded base weights (init_weights true), as the reference initialises it.
    void on_base_weights_loaded(const std::vector<nn::Linear<T>*>&) {
      if (config_.init_weights) rows_.value() = base_rows();
    }

    Var<T> token_embedding(Tape<T>& tape, const Var<T>& table) const {
      if (merged_) return table;
      const Var<T> base = ops::gather_rows(tape, table, config_.token_indices);
      const Var<T> diff = ops::add(tape, rows_, ops::scale(tape, base, T(-1)));
      return ops::index_add_rows(tape, table, {config_.token_indices}, {diff});
    }

    std::vector<NamedParameter<T>> parameters() const {
      if (!tied_copy_) return {{key_, rows_}};
      tied_copy_.value() = rows_.value();
      return {{key_, rows_}, {"base_model.model.lm_head.trainable_tokens_delta", tied_copy_}};
    }

    void merge(const std::vector<nn::Linear<T>*>&) {
      if (merged_) return;
      originals_ = base_rows();
      write_rows(rows_.value());
      merged_ = true;
    }
    void unmerge(const std::vector<nn::Linear<T>*>&) {
      if (!merged_) return;
      write_rows(originals_);
      merged_ = false;
    }

   private:
    Tensor<T> base_rows() const {
      const std::int64_t d = table_.value().dim(1);
      Tensor<T> rows(Shape{static_cast<std::int64_t>(config_.token_indices.size()), d});
      for (std::size_t i = 0; i < config_.token_indices.size(); ++i)
        std::copy_n(table_.value().data() + config_.token_indices[i] * d, d,
                    rows.data() + static_cast<std::int64_t>(i) * d);
      return rows;
    }
    void write_rows(const Tensor<T>& rows) {
      const std::int64_t d = rows.dim(1);
      for (std::size_t i = 0; i < config_.token_indices.size(); ++i)
        std::copy_n(rows.data() + static_cast<std::int64_t>(i) * d, d,
                    table_.value().data() + config_.token_indices[i] * d);
    }

    Var<T> table_;              // the base model's token table (frozen)
    Var<T> rows_;               // R [n, d], trainable
    mutable Var<T> tied_copy_;  // R again under the tied head's key (files only)
    Tensor<T> originals_;       // W's rows while merged
    std::string key_;
    bool merged_ = false;
  };
};

}  // namespace peft
