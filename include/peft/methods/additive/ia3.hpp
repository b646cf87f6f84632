#pragma once
// (IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
// In-Context Learning"): a learned vector l rescales a module's output, y = (x Wᵀ + b) ⊙ l, or,
// for modules listed in `feedforward_modules`, its input, y = (x ⊙ l) Wᵀ + b. l starts at 1, so
// the model starts at the base model. Mergeable: the rows (output) or columns (input) of W scale.
//
// Reference layout: `ia3_l` [out, 1] (output scaling) or [1, in] (input scaling) per module,
// keyed "base_model.model.<module>.ia3_l", peft_type "IA3".
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct Ia3Config {
  static constexpr std::string_view peft_type = "IA3";

  /// Empty target_modules: the reference's defaults for the architecture (GPT-2: c_attn,
  /// mlp.c_proj; LLaMA: k_proj, v_proj, down_proj), with its default feedforward_modules.
  TargetRules targets;
  /// A module whose path ends with one of these names (plain suffix, as the reference tests it)
  /// or, given as one string, fully matches it as a regex, has its input scaled.
  ModuleSelector feedforward_modules;
  bool init_ia3_weights = true;  ///< l = 1 (false: l ~ N(0, 1), as the reference's randn)

  struct FeedforwardField {
    void read(Ia3Config& c, const nlohmann::json& j, const std::string& source) const {
      c.feedforward_modules = ModuleSelector::from_json(
          j.value("feedforward_modules", nlohmann::json()), "feedforward_modules", source);
    }
    void write(const Ia3Config& c, nlohmann::json& j, const ModelConfig&) const {
      j["feedforward_modules"] = c.feedforward_modules.to_json();
    }
  };
  static auto fields() {
    return config_fields(targets_field(&Ia3Config::targets), FeedforwardField{},
                         field("init_ia3_weights", &Ia3Config::init_ia3_weights),
                         fixed("modules_to_save", nullptr), fan_in_fan_out());
  }
  /// The reference requires feedforward ⊆ target when both are lists.
  void validate(const std::string& source) const {
    if (targets.target_modules.names.empty()) return;
    for (const std::string& f : feedforward_modules.names) {
      bool listed = false;
      for (const std::string& t : targets.target_modules.names) listed = listed || t == f;
      if (!listed)
        throw ConfigError(source + ": feedforward_modules entry '" + f +
                          "' is not in target_modules");
    }
  }
  static Ia3Config from_json(const nlohmann::json& j, const std::string& source) {
    return read_config<Ia3Config>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    return write_config(resolved(model), model);
  }

  /// The rules in effect on `model`: the reference's per-architecture defaults fill gaps.
  Ia3Config resolved(const ModelConfig& model) const {
    Ia3Config c = *this;
    if (c.targets.target_modules.empty()) {
      const bool gpt2 = model.model_type == "gpt2";
      c.targets.target_modules.names =
          gpt2 ? std::vector<std::string>{"c_attn", "mlp.c_proj"}
               : std::vector<std::string>{"k_proj", "v_proj", "down_proj"};
      if (c.feedforward_modules.empty())
        c.feedforward_modules.names = {gpt2 ? "mlp.c_proj" : "down_proj"};
    }
    return c;
  }

  /// Whether `module_path` has its input (not output) scaled.
  bool is_feedforward(const std::string& module_path) const {
    if (feedforward_modules.regex) return feedforward_modules.regex->matches(module_path);
    for (const std::string& name : feedforward_modules.names)
      if (module_path.ends_with(name)) return true;
    return false;
  }
};

struct IA3 : detail::AdditiveMethod<Ia3Config> {
  static constexpr std::string_view name = "ia3", title = "IA3";
  static constexpr std::string_view paper =
      "Liu et al., 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
      "In-Context Learning";
  static constexpr std::string_view reference = "IA3";  ///< peft_type in HF peft
  using Config = Ia3Config;

  /// l [1, in] for feedforward modules (input scaling), else [out, 1]; `c` resolved.
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    if (c.is_feedforward(std::string(m.name))) return {{"ia3_l", {1, m.in_features}}};
    return {{"ia3_l", {m.out_features, 1}}};
  }
  /// The site table's count, on the rules in effect for `model`.
  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return count_site_tensors<IA3>(linears, config.resolved(model));
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    struct Extra {
      bool feedforward = false;  ///< scales the input
    };
    using Sites = SiteTable<T, Extra>;
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      config_ = config_.resolved(ctx.config);
      sites_.template attach<IA3>(config_, ctx.linears, [&](auto& slot, const nn::Linear<T>& m) {
        slot.extra.feedforward = config_.is_feedforward(m.name);
        if (config_.init_ia3_weights)
          slot[0].value().fill(T(1));
        else
          detail::fill_normal(slot[0].value(), ctx.rng, 1.0);
      });
    }

    void adapt(Projection<T>& p) const {
      const auto* s = sites_.active(p.module());
      if (!s) return;
      if (s->extra.feedforward)
        p.scale_input((*s)[0]);
      else
        p.scale_output((*s)[0]);
    }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    const Sites& sites() const { return sites_; }

    /// Output scaling: W's rows and b scale by l. Input scaling: W's columns scale by l (the
    /// bias is added after the product, so it stays).
    void merge(const std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    /// Divides the scales back out (l must have no zero entry).
    void unmerge(const std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }

   private:
    void fold(const std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        auto* s = sites_.find(*lin);
        if (!s || s->merged == merge) continue;
        const auto factor = detail::merge_factor((*s)[0].value(), merge, IA3::title, s->module);
        detail::rescale_weight(*lin, factor, s->extra.feedforward);
        if (!s->extra.feedforward && lin->bias) lin->bias.value().vector().array() *= factor;
        s->merged = merge;
      }
    }

    Sites sites_;
  };
};

}  // namespace peft
