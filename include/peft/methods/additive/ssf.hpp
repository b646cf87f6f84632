#pragma once
// SSF (Lian et al., 2022, "Scaling & Shifting Your Features"): after each chosen linear op,
// y ← y ⊙ γ + β with γ, β [out]; γ = 1 and β = 0 at start, so the model starts at the base model.
// Mergeable into the preceding linear: W ← diag(γ) W, b ← γ ⊙ b + β (a bias-free linear gets a
// bias while merged, since the shift needs one).
//
// The reference ecosystem has no such method; this project's layout (docs/methods/additive.md):
// peft_type "SSF", per module "base_model.model.<module>.ssf_scale" [out] and ".ssf_shift" [out],
// modules chosen by target_modules (default "all-linear") with the usual target rules.
#include <optional>
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct SsfConfig {
  TargetRules targets;  ///< empty target_modules: all-linear

  SsfConfig resolved() const {
    SsfConfig c = *this;
    if (c.targets.target_modules.empty()) c.targets.target_modules.all_linear = true;
    return c;
  }

  static SsfConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "SSF", source);
    SsfConfig c;
    c.targets = TargetRules::from_json(j, source);
    return c;
  }

  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("SSF");
    resolved().targets.to_json(j);
    j["modules_to_save"] = nullptr;
    return j;
  }
};

struct SSF {
  using family = family::Additive;
  static constexpr std::string_view name = "ssf";
  using Config = SsfConfig;

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "SSF";
  }

  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    const Config c = config.resolved();
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (c.targets.selects(l.name, l.layer < 0)) count.trainable += 2 * l.out_features;
    return count;
  }

  template <class T>
  class State {
   public:
    struct ModuleAffine {
      std::string module;
      Var<T> scale, shift;  ///< γ, β [out]
      bool merged = false;
      bool added_bias = false;  ///< merging gave a bias-free linear its bias
    };

    explicit State(const Config& config) : config_(config.resolved()) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      affines_.assign(ctx.linears.size(), std::nullopt);
      std::size_t attached = 0;
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!config_.targets.selects(lin->name, lin->layer < 0)) continue;
        const Shape shape{lin->out_features};
        affines_[static_cast<std::size_t>(lin->site)] = ModuleAffine{
            lin->name, Var<T>(Tensor<T>(shape, T(1)), true), Var<T>(Tensor<T>(shape), true)};
        ++attached;
      }
      if (attached == 0)
        throw ConfigError("SSF: target_modules " + config_.targets.target_modules.to_json().dump() +
                          " matched no module of this model");
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAffine* m = find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      return ops::add(tape, ops::mul(tape, module.forward_base(tape, x), m->scale), m->shift);
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      for (auto& m : affines_)
        if (m) {
          out.push_back({"base_model.model." + m->module + ".ssf_scale", m->scale});
          out.push_back({"base_model.model." + m->module + ".ssf_shift", m->shift});
        }
      return out;
    }

    void merge(std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAffine* m = mutable_find(lin->site);
        if (!m || m->merged) continue;
        const Eigen::Array<T, Eigen::Dynamic, 1> g = m->scale.value().vector().array();
        const RowMatrix<T> w = lin->weight_out_in();
        lin->add_to_weight((w.array().colwise() * (g - T(1))).matrix());
        if (!lin->bias) {
          lin->bias = Var<T>(Tensor<T>(Shape{lin->out_features}));
          m->added_bias = true;
        }
        lin->bias.value().vector().array() =
            lin->bias.value().vector().array() * g + m->shift.value().vector().array();
        m->merged = true;
      }
    }

    /// Undoes merge (γ must have no zero entry).
    void unmerge(std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAffine* m = mutable_find(lin->site);
        if (!m || !m->merged) continue;
        const Eigen::Array<T, Eigen::Dynamic, 1> g = m->scale.value().vector().array();
        if ((g == T(0)).any())
          throw ConfigError("SSF: cannot unmerge " + m->module + ": a scale is zero");
        const RowMatrix<T> w = lin->weight_out_in();
        lin->add_to_weight((w.array().colwise() * (g.inverse() - T(1))).matrix());
        if (m->added_bias) {
          lin->bias = Var<T>{};
          m->added_bias = false;
        } else {
          lin->bias.value().vector().array() =
              (lin->bias.value().vector().array() - m->shift.value().vector().array()) / g;
        }
        m->merged = false;
      }
    }

    const ModuleAffine* find(int site) const {
      if (site < 0 || static_cast<std::size_t>(site) >= affines_.size()) return nullptr;
      const auto& m = affines_[static_cast<std::size_t>(site)];
      return m ? &*m : nullptr;
    }

   private:
    ModuleAffine* mutable_find(int site) { return const_cast<ModuleAffine*>(find(site)); }

    Config config_;
    std::vector<std::optional<ModuleAffine>> affines_;  // by linear site
  };
};

}  // namespace peft
