#pragma once
// Prefix tuning (Li & Liang, 2021): P learned key and value vectors per layer, prepended to
// every layer's attention. Every query sees every prefix position; prefix keys get no rotary
// embedding; the real tokens take positions P.. (the decoder does both, given
// num_prefix_tokens()).
//
// Reference layout: one tensor `prompt_embeddings` [P, L·2·kv_dim], viewed [P, L·2, kv_heads,
// head_dim]; row block 2l holds layer l's keys, 2l+1 its values (grouped-query models use their
// key/value heads). peft_type "PREFIX_TUNING".
//
// With `prefix_projection` the table is re-parameterised while training: E [P, kv_dim] →
// Linear(kv_dim, h) → tanh → Linear(h, L·2·kv_dim). The reference saves only the result (the
// folded table), so a config read from a file holds plain prefixes; fold() turns a projected
// adapter into plain prefixes after training.
#include <string>
#include <utility>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct PrefixTuningConfig : detail::PromptLearningConfig {
  static constexpr std::string_view peft_type = "PREFIX_TUNING";

  bool prefix_projection = false;
  std::int64_t encoder_hidden_size = 0;  ///< h of the projection; 0: kv_dim, as the reference
  /// The table is already folded (always so when read from an adapter file, which holds only
  /// the projection's output).
  bool folded = false;

  static auto fields() {
    using C = PrefixTuningConfig;
    return config_fields(
        prompt_learning_fields(), field("prefix_projection", &C::prefix_projection),
        field("encoder_hidden_size", &C::encoder_hidden_size, check::dimension_or_zero),
        constants({{"init_weights", nullptr}}));
  }
  static PrefixTuningConfig from_json(const nlohmann::json& j, const std::string& source) {
    PrefixTuningConfig c = read_config<PrefixTuningConfig>(j, source);
    c.folded = true;
    return c;
  }
  /// The reference's adapter_config.json: token_dim and num_attention_heads are the key/value
  /// width and head count (the reference adjusts them so for grouped-query models).
  nlohmann::json to_json(const ModelConfig& model) const {
    PrefixTuningConfig c = recording(*this, model.num_layers, model.kv_dim(), model.num_kv_heads);
    c.encoder_hidden_size = hidden_for(model);
    return write_config(c, model);
  }

  std::int64_t hidden_for(const ModelConfig& model) const {
    return encoder_hidden_size > 0 ? encoder_hidden_size : model.kv_dim();
  }
};

struct PrefixTuning : detail::AdditiveMethod<PrefixTuningConfig> {
  static constexpr std::string_view name = "prefix_tuning", title = "prefix tuning";
  static constexpr std::string_view paper =
      "Li and Liang, 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation";
  static constexpr std::string_view reference = "PREFIX_TUNING";  ///< peft_type in HF peft
  using Config = PrefixTuningConfig;

  /// As the reference prints it while training: the table, or with prefix_projection the
  /// embedding and both projection layers.
  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    const std::int64_t P = config.num_virtual_tokens, td = model.kv_dim();
    const std::int64_t table = model.num_layers * 2 * td;
    ParameterCount count;
    if (!config.prefix_projection) {
      count.trainable = P * table;
    } else {
      const std::int64_t h = config.hidden_for(model);
      count.trainable = P * td + (td * h + h) + (h * table + table);
    }
    return count;
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      config_.check_recorded(title, m.num_layers, m.kv_dim(), m.num_kv_heads);
      layers_ = m.num_layers;
      kv_dim_ = m.kv_dim();
      const std::int64_t P = config_.num_virtual_tokens, width = layers_ * 2 * kv_dim_;
      if (config_.prefix_projection && !config_.folded) {
        encoder_.embedding = Var<T>(Tensor<T>(Shape{P, kv_dim_}), true);
        detail::fill_normal(encoder_.embedding.value(), ctx.rng, 1.0);  // torch's Embedding init
        const std::int64_t h = config_.hidden_for(m);
        encoder_.layers.emplace_back(kv_dim_, h, ctx.rng);
        encoder_.layers.emplace_back(h, width, ctx.rng);
        encoder_.activation = detail::Activation::Tanh;
        encoder_.head = "transform";
      } else {
        table_ = Var<T>(Tensor<T>(Shape{P, width}), true);
        detail::fill_normal(table_.value(), ctx.rng, 1.0);
      }
    }

    std::int64_t num_prefix_tokens() const { return config_.num_virtual_tokens; }

    /// Layer `layer`'s keys and values [B, P, kv_dim]: columns [2l·kv, (2l+2)·kv) of the table.
    /// Each layer reads only its own slice, and nothing is cached between calls, so the hook
    /// also holds when the decoder re-runs a block in backward (activation checkpointing). With
    /// the projection, only the rows of the second layer that produce this slice are applied.
    std::pair<Var<T>, Var<T>> prefix_key_values(Tape<T>& tape, int layer, std::int64_t batch) {
      const std::int64_t begin = 2 * layer * kv_dim_;
      Var<T> both;  // [P, 2·kv_dim]
      if (projected()) {
        const detail::DenseLayer<T>& last = encoder_.layers.back();
        both = ops::linear(
            tape, encoder_.hidden(tape), ops::slice(tape, last.weight, 0, begin, 2 * kv_dim_),
            ops::slice(tape, last.bias, 0, begin, 2 * kv_dim_), ops::WeightLayout::OutIn);
      } else {
        both = ops::slice(tape, table_, 1, begin, 2 * kv_dim_);
      }
      return {detail::repeat_over_batch(tape, ops::slice(tape, both, 1, 0, kv_dim_), batch),
              detail::repeat_over_batch(tape, ops::slice(tape, both, 1, kv_dim_, kv_dim_), batch)};
    }

    /// The reference's tensors: the folded table, or while projecting, the encoder's.
    std::vector<NamedParameter<T>> parameters() const { return encoder_.parameters_or(table_); }
    bool projected() const { return encoder_.active(); }
    /// The table [P, L·2·kv_dim] the adapter computes now (what the reference saves).
    Tensor<T> prefix_table() const { return encoder_.output_or(table_); }
    /// Replaces the projection by its output: plain trainable prefixes, as saved and loaded.
    void fold() {
      if (encoder_.fold_into(table_)) config_.folded = true;
    }

   private:
    std::int64_t layers_ = 0, kv_dim_ = 0;
    Var<T> table_;                      // [P, L·2·kv_dim], plain or folded
    detail::PromptEncoder<T> encoder_;  // E [P, kv_dim] → h → L·2·kv_dim while projecting
  };
};

}  // namespace peft
