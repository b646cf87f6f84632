#pragma once
// (IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
// In-Context Learning"): a learned vector l rescales a module's output, y = (x Wᵀ + b) ⊙ l, or,
// for modules listed in `feedforward_modules`, its input, y = (x ⊙ l) Wᵀ + b. l starts at 1, so
// the model starts at the base model. Mergeable: the rows (output) or columns (input) of W scale.
//
// Reference layout: `ia3_l` [out, 1] (output scaling) or [1, in] (input scaling) per module,
// keyed "base_model.model.<module>.ia3_l", peft_type "IA3".
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct Ia3Config {
  /// Empty target_modules: the reference's defaults for the architecture (GPT-2: c_attn,
  /// mlp.c_proj; LLaMA: k_proj, v_proj, down_proj), with its default feedforward_modules.
  TargetRules targets;
  /// A module whose path ends with one of these names (plain suffix, as the reference tests it)
  /// or, given as one string, fully matches it as a regex, has its input scaled.
  ModuleSelector feedforward_modules;
  bool init_ia3_weights = true;  ///< l = 1 (false: l ~ N(0, 1), as the reference's randn)

  static Ia3Config from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "IA3", source);
    Ia3Config c;
    c.targets = TargetRules::from_json(j, source);
    c.feedforward_modules = ModuleSelector::from_json(
        j.value("feedforward_modules", nlohmann::json()), "feedforward_modules", source);
    c.init_ia3_weights = detail::json_or<bool>(j, "init_ia3_weights", true, source);
    if (!detail::json_field(j, "modules_to_save").is_null())
      throw ConfigError(source + ": modules_to_save is not supported");
    // The reference requires feedforward ⊆ target when both are lists.
    if (!c.targets.target_modules.names.empty() && !c.feedforward_modules.names.empty())
      for (const std::string& f : c.feedforward_modules.names) {
        bool listed = false;
        for (const std::string& t : c.targets.target_modules.names) listed = listed || t == f;
        if (!listed)
          throw ConfigError(source + ": feedforward_modules entry '" + f +
                            "' is not in target_modules");
      }
    return c;
  }

  /// The rules in effect on `model`: the reference's per-architecture defaults fill gaps.
  Ia3Config resolved(const ModelConfig& model) const {
    Ia3Config c = *this;
    if (c.targets.target_modules.empty()) {
      if (model.model_type == "gpt2") {
        c.targets.target_modules.names = {"c_attn", "mlp.c_proj"};
        if (c.feedforward_modules.empty()) c.feedforward_modules.names = {"mlp.c_proj"};
      } else {
        c.targets.target_modules.names = {"k_proj", "v_proj", "down_proj"};
        if (c.feedforward_modules.empty()) c.feedforward_modules.names = {"down_proj"};
      }
    }
    return c;
  }

  /// Whether `module_path` has its input (not output) scaled.
  bool is_feedforward(const std::string& module_path) const {
    if (feedforward_modules.regex)
      return std::regex_match(module_path, std::regex(*feedforward_modules.regex));
    for (const std::string& name : feedforward_modules.names)
      if (module_path.ends_with(name)) return true;
    return false;
  }

  nlohmann::json to_json(const ModelConfig& model) const {
    const Ia3Config c = resolved(model);
    nlohmann::json j = detail::adapter_config_header("IA3");
    c.targets.to_json(j);
    j["feedforward_modules"] = c.feedforward_modules.to_json();
    j["fan_in_fan_out"] = model.model_type == "gpt2";
    j["init_ia3_weights"] = init_ia3_weights;
    j["modules_to_save"] = nullptr;
    return j;
  }
};

struct IA3 {
  using family = family::Additive;
  static constexpr std::string_view name = "ia3";
  using Config = Ia3Config;

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "IA3";
  }

  /// One scale per output of each targeted module, or per input for feedforward modules.
  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    const Config c = config.resolved(model);
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (c.targets.selects(l.name, l.layer < 0))
        count.trainable += c.is_feedforward(l.name) ? l.in_features : l.out_features;
    return count;
  }

  template <class T>
  class State {
   public:
    struct ModuleScale {
      std::string module;
      bool feedforward = false;  ///< scales the input
      Var<T> l;                  ///< [out, 1] or [1, in]
      bool merged = false;
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      config_ = config_.resolved(ctx.config);
      scales_.assign(ctx.linears.size(), std::nullopt);
      std::size_t attached = 0;
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!config_.targets.selects(lin->name, lin->layer < 0)) continue;
        const bool ff = config_.is_feedforward(lin->name);
        const Shape shape = ff ? Shape{1, lin->in_features} : Shape{lin->out_features, 1};
        ModuleScale m{lin->name, ff, Var<T>(Tensor<T>(shape, T(1)), true)};
        if (!config_.init_ia3_weights) {
          std::normal_distribution<double> n(0.0, 1.0);
          for (std::int64_t i = 0; i < m.l.value().numel(); ++i) m.l.value()[i] = T(n(ctx.rng));
        }
        scales_[static_cast<std::size_t>(lin->site)] = std::move(m);
        ++attached;
      }
      if (attached == 0)
        throw ConfigError("IA3: target_modules " + config_.targets.target_modules.to_json().dump() +
                          " matched no module of this model");
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleScale* m = find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      if (m->feedforward)
        return module.forward_base(tape, ops::mul(tape, x, m->l));  // [1, in] broadcasts
      Var<T> y = module.forward_base(tape, x);
      return ops::mul(tape, y, ops::reshape(tape, m->l, Shape{module.out_features}));
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      for (auto& m : scales_)
        if (m) out.push_back({"base_model.model." + m->module + ".ia3_l", m->l});
      return out;
    }

    /// Output scaling: W's rows and b scale by l. Input scaling: W's columns scale by l (the
    /// bias is added after the product, so it stays).
    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    /// Divides the scales back out (l must have no zero entry).
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }

    const ModuleScale* find(int site) const {
      if (site < 0 || static_cast<std::size_t>(site) >= scales_.size()) return nullptr;
      const auto& m = scales_[static_cast<std::size_t>(site)];
      return m ? &*m : nullptr;
    }

   private:
    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        if (lin->site < 0 || static_cast<std::size_t>(lin->site) >= scales_.size()) continue;
        auto& m = scales_[static_cast<std::size_t>(lin->site)];
        if (!m || m->merged == merge) continue;
        Eigen::Array<T, Eigen::Dynamic, 1> factor = m->l.value().vector().array();
        if (!merge) {
          if ((factor == T(0)).any())
            throw ConfigError("IA3: cannot unmerge " + m->module + ": a scale is zero");
          factor = factor.inverse();
        }
        // W' − W = W ⊙ (factor − 1) along the scaled axis, as the [out, in] delta Linear takes.
        RowMatrix<T> w = lin->weight_out_in();
        RowMatrix<T> delta(w.rows(), w.cols());
        if (m->feedforward)
          delta = (w.array().rowwise() * (factor - T(1)).transpose()).matrix();
        else
          delta = (w.array().colwise() * (factor - T(1))).matrix();
        lin->add_to_weight(delta);
        if (!m->feedforward && lin->bias) lin->bias.value().vector().array() *= factor;
        m->merged = merge;
      }
    }

    Config config_;
    std::vector<std::optional<ModuleScale>> scales_;  // by linear site
  };
};

}  // namespace peft
