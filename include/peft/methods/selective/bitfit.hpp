#pragma once
// BitFit (Ben Zaken et al., 2022): train only bias terms. Either all of them (every targeted
// projection's bias and, by default, the norms' shifts), or the paper's small subset: the query
// biases and the MLP-intermediate biases (GPT-2: the first d entries of c_attn's fused bias, and
// c_fc; LLaMA with biases: q_proj, gate_proj and up_proj). Projection biases are trained as a
// diff δb (y = x Wᵀ + b + δb, mergeable); norm shifts, which have no hook, in place.
// A model without biases (LLaMA: attention_bias and mlp_bias false, RMSNorm has no shift) has
// nothing to train, and BitFit says so. peft_type "BITFIT".
#include <string>
#include <vector>

#include "peft/methods/selective/common.hpp"
#include "peft/methods/selective/structured.hpp"

namespace peft {

struct BitFitConfig {
  enum class Subset { All, QueryAndIntermediate };

  Subset subset = Subset::All;
  bool include_norm_biases = true;  ///< with Subset::All: the norms' shifts too (the paper does)
  TargetRules targets = detail::all_linear_targets();

  static BitFitConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "BITFIT", source);
    BitFitConfig c;
    const std::string subset = detail::json_or<std::string>(j, "bias_subset", "all", source);
    if (subset == "all")
      c.subset = Subset::All;
    else if (subset == "query_and_intermediate")
      c.subset = Subset::QueryAndIntermediate;
    else
      throw ConfigError(source + ": bias_subset '" + subset +
                        "' unsupported (all, query_and_intermediate)");
    c.include_norm_biases = detail::json_or<bool>(j, "include_norm_biases", true, source);
    if (!detail::json_field(j, "target_modules").is_null())
      c.targets = TargetRules::from_json(j, source);
    return c;
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("BITFIT");
    j["bias_subset"] = subset == Subset::All ? "all" : "query_and_intermediate";
    j["include_norm_biases"] = include_norm_biases;
    targets.to_json(j);
    return j;
  }
};

namespace detail {

/// The bias entries BitFit trains in a projection: [0, n) for a count n (0: none).
inline std::int64_t bitfit_bias_entries(const BitFitConfig& c, const std::string& name,
                                        std::int64_t out_features, const ModelConfig& model) {
  if (c.subset == BitFitConfig::Subset::All) return out_features;
  auto ends = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  const AttentionRole role = attention_role(name);
  if (role == AttentionRole::FusedQkv) return model.num_heads * model.head_dim;  // query part
  if (role == AttentionRole::Query) return out_features;
  if (ends("mlp.c_fc") || ends("mlp.gate_proj") || ends("mlp.up_proj")) return out_features;
  return 0;
}

inline bool bitfit_trains_norms(const BitFitConfig& c, const ModelConfig& model) {
  return c.subset == BitFitConfig::Subset::All && c.include_norm_biases && norms_have_bias(model);
}

inline void throw_no_biases(const ModelConfig& model) {
  throw ConfigError("BitFit: this " + model.model_type +
                    " model has no bias terms among the targeted modules (attention_bias " +
                    (model.attention_bias ? "true" : "false") + ", mlp_bias " +
                    (model.mlp_bias ? "true" : "false") +
                    (norms_have_bias(model) ? "" : ", and its norms have no shift") +
                    "): nothing would train. Use LN tuning or a mask instead.");
}

}  // namespace detail

struct BitFit {
  using family = family::Selective;
  static constexpr std::string_view name = "bitfit";
  using Config = BitFitConfig;

  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (l.bias && config.targets.selects(l.name, l.layer < 0))
        count.trainable += detail::bitfit_bias_entries(config, l.name, l.out_features, model);
    if (detail::bitfit_trains_norms(config, model))
      count.trainable += detail::norm_scale_count(model);
    if (count.trainable == 0) detail::throw_no_biases(model);
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "BITFIT";
  }

  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      diffs_.reset(ctx.linears.size());
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!lin->bias || !config_.targets.selects(lin->name, lin->layer < 0)) continue;
        const std::int64_t n =
            detail::bitfit_bias_entries(config_, lin->name, lin->out_features, ctx.config);
        if (n == 0) continue;
        std::vector<std::int32_t> entries(static_cast<std::size_t>(n));
        std::iota(entries.begin(), entries.end(), 0);
        diffs_.set_bias_entries(*lin, std::move(entries));
      }
      if (detail::bitfit_trains_norms(config_, ctx.config))
        for (const NamedParameter<T>& p : detail::norm_tensors(ctx))
          if (p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0)
            diffs_.train_in_place(p);
      if (diffs_.trained_entries() == 0) detail::throw_no_biases(ctx.config);
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return diffs_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      return diffs_.linear(tape, module, x);
    }
    std::vector<NamedParameter<T>> parameters() { return diffs_.parameters(); }
    /// Folds the projection-bias diffs into the biases (norm shifts are trained in place).
    void merge(std::vector<nn::Linear<T>*>& modules) { diffs_.merge(modules); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { diffs_.unmerge(modules); }
    void write_tensors(io::SafetensorsWriter& w) const { diffs_.write_tensors(w); }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      diffs_.read_tensors(f, linears);
    }
    std::int64_t trained_entries() const { return diffs_.trained_entries(); }

   private:
    Config config_;
    detail::SelectiveDiffs<T> diffs_;
  };
};

}  // namespace peft
