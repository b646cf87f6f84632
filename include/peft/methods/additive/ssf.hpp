#pragma once
// SSF (Lian et al., 2022, "Scaling & Shifting Your Features"): after each chosen linear op,
// y ← y ⊙ γ + β with γ, β [out]; γ = 1 and β = 0 at start, so the model starts at the base model.
// Mergeable into the preceding linear: W ← diag(γ) W, b ← γ ⊙ b + β (a bias-free linear gets a
// bias while merged, since the shift needs one).
//
// The reference ecosystem has no such method; this project's layout (docs/methods/additive.md):
// peft_type "SSF", per module "base_model.model.<module>.ssf_scale" [out] and ".ssf_shift" [out],
// modules chosen by target_modules (default "all-linear") with the usual target rules.
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct SsfConfig {
  static constexpr std::string_view peft_type = "SSF";

  TargetRules targets;  ///< empty target_modules: all-linear

  SsfConfig resolved() const {
    SsfConfig c = *this;
    if (c.targets.target_modules.empty()) c.targets.target_modules.all_linear = true;
    return c;
  }

  static auto fields() {
    return config_fields(targets_field(&SsfConfig::targets), fixed("modules_to_save", nullptr));
  }
  static SsfConfig from_json(const nlohmann::json& j, const std::string& source) {
    return read_config<SsfConfig>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const { return write_config(resolved(), model); }
};

struct SSF : detail::AdditiveMethod<SsfConfig> {
  static constexpr std::string_view name = "ssf", title = "SSF";
  static constexpr std::string_view paper =
      "Lian et al., 2022, Scaling & Shifting Your Features: A New Baseline for Efficient Model "
      "Tuning";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = SsfConfig;

  static bool selects(const Config& c, const ModuleSite& m) {
    return selects_by_targets(c.resolved(), m);
  }
  static SiteTensors site_tensors(const Config&, const ModuleSite& m) {
    return {{"ssf_scale", {m.out_features}}, {"ssf_shift", {m.out_features}}};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    struct Extra {
      bool added_bias = false;  ///< merging gave a bias-free linear its bias
    };
    using Sites = SiteTable<T, Extra>;

    explicit State(const Config& config) : detail::ConfiguredState<Config>(config.resolved()) {}

    void attach(AttachContext<T>& ctx) {
      sites_.template attach<SSF>(config_, ctx.linears, [](auto& slot, const nn::Linear<T>&) {
        slot[0].value().fill(T(1));
      });
    }

    void adapt(Projection<T>& p) const {
      if (const auto* s = sites_.active(p.module())) {
        p.scale_output((*s)[0]);
        p.shift_output((*s)[1]);
      }
    }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    const Sites& sites() const { return sites_; }

    void merge(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        auto* s = sites_.find(*lin);
        if (!s || s->merged) continue;
        const auto g = detail::merge_factor((*s)[0].value(), true, SSF::title, s->module);
        detail::rescale_weight(*lin, g, /*columns=*/false);
        if (!lin->bias) {
          lin->bias = Var<T>(Tensor<T>(Shape{lin->out_features}));
          s->extra.added_bias = true;
        }
        lin->bias.value().vector().array() =
            lin->bias.value().vector().array() * g + (*s)[1].value().vector().array();
        s->merged = true;
      }
    }

    /// Undoes merge (γ must have no zero entry).
    void unmerge(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        auto* s = sites_.find(*lin);
        if (!s || !s->merged) continue;
        const auto inverse = detail::merge_factor((*s)[0].value(), false, SSF::title, s->module);
        detail::rescale_weight(*lin, inverse, /*columns=*/false);
        if (s->extra.added_bias) {
          lin->bias = Var<T>{};
          s->extra.added_bias = false;
        } else {
          lin->bias.value().vector().array() =
              (lin->bias.value().vector().array() - (*s)[1].value().vector().array()) /
              (*s)[0].value().vector().array();
        }
        s->merged = false;
      }
    }

   private:
    Sites sites_;
  };
};

}  // namespace peft
