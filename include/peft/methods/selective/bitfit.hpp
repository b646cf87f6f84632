#pragma once
// BitFit (Ben Zaken et al., 2022): train only bias terms. Either all of them (every targeted
// projection's bias and, by default, the norms' shifts), or the paper's small subset: the query
// biases and the MLP-intermediate biases (GPT-2: the first d entries of c_attn's fused bias, and
// c_fc; LLaMA with biases: q_proj, gate_proj and up_proj). Projection biases are trained as a
// diff δb (y = x Wᵀ + b + δb, mergeable); norm shifts, which have no hook, in place.
// A model without biases (LLaMA: attention_bias and mlp_bias false, RMSNorm has no shift) has
// nothing to train, and BitFit says so. peft_type "BITFIT".
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "peft/methods/selective/common.hpp"
#include "peft/methods/selective/structured.hpp"

namespace peft {

struct BitFitConfig : TabledConfigIo<BitFitConfig> {
  enum class Subset { All, QueryAndIntermediate };
  static constexpr std::string_view peft_type = "BITFIT";

  Subset subset = Subset::All;
  bool include_norm_biases = true;  ///< with Subset::All: the norms' shifts too (the paper does)
  TargetRules targets = detail::all_linear_targets();

  static auto fields() {
    using C = BitFitConfig;
    return config_fields(choice("bias_subset", &C::subset, std::pair("all", Subset::All),
                                std::pair("query_and_intermediate", Subset::QueryAndIntermediate)),
                         field("include_norm_biases", &C::include_norm_biases),
                         default_targets_field(&C::targets));
  }
};

struct BitFit {
  using family = family::Selective;
  static constexpr std::string_view name = "bitfit", title = "BitFit";
  static constexpr std::string_view paper =
      "Ben Zaken et al., 2022, BitFit: Simple Parameter-efficient Fine-tuning for "
      "Transformer-based Masked Language-models";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = BitFitConfig;

  /// The bias entries BitFit trains in a projection: [0, n) for a count n (0: none). The one
  /// selection of attach and count_parameters.
  static std::int64_t bias_entries(const Config& c, const ModuleSite& site,
                                   const ModelConfig& model) {
    if (!site.has_bias || !method_selects<BitFit>(c, site)) return 0;
    if (c.subset == Config::Subset::All) return site.out_features;
    const std::string name(site.name);
    auto ends = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    const detail::AttentionRole role = detail::attention_role(name);
    if (role == detail::AttentionRole::FusedQkv) return model.num_heads * model.head_dim;  // q
    if (role == detail::AttentionRole::Query) return site.out_features;
    if (ends("mlp.c_fc") || ends("mlp.gate_proj") || ends("mlp.up_proj")) return site.out_features;
    return 0;
  }
  static bool trains_norms(const Config& c, const ModelConfig& model) {
    return c.subset == Config::Subset::All && c.include_norm_biases &&
           detail::norms_have_bias(model);
  }
  [[noreturn]] static void throw_no_biases(const ModelConfig& model) {
    throw ConfigError("BitFit: this " + model.model_type +
                      " model has no bias terms among the targeted modules (attention_bias " +
                      (model.attention_bias ? "true" : "false") + ", mlp_bias " +
                      (model.mlp_bias ? "true" : "false") +
                      (detail::norms_have_bias(model) ? "" : ", and its norms have no shift") +
                      "): nothing would train. Use LN tuning or a mask instead.");
  }

  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      count.trainable += bias_entries(config, ModuleSite::of(l), model);
    if (trains_norms(config, model)) count.trainable += detail::norm_scale_count(model);
    if (count.trainable == 0) throw_no_biases(model);
    return count;
  }
  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, Config::peft_type); }

  template <class T>
  class State : public detail::ProjectionDiffState<BitFit, T> {
   public:
    using detail::ProjectionDiffState<BitFit, T>::ProjectionDiffState;

    /// Projection biases as diffs (merge folds them into the biases); norm shifts in place.
    void attach(AttachContext<T>& ctx) {
      this->diffs_.reset(ctx.linears.size());
      for (nn::Linear<T>* lin : ctx.linears) {
        const std::int64_t n = bias_entries(this->config_, ModuleSite::of(*lin), ctx.config);
        if (n == 0) continue;
        std::vector<std::int32_t> entries(static_cast<std::size_t>(n));
        std::iota(entries.begin(), entries.end(), 0);
        this->diffs_.set_bias_entries(*lin, std::move(entries));
      }
      if (trains_norms(this->config_, ctx.config))
        for (const NamedParameter<T>& p : detail::norm_tensors(ctx))
          if (p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0)
            this->diffs_.train_in_place(p);
      if (this->diffs_.trained_entries() == 0) throw_no_biases(ctx.config);
    }
  };
};

}  // namespace peft
