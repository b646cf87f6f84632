#pragma once
// DoRA (Liu et al., 2024): the weight split into magnitude and direction,
//   W' = m ⊙ (W + s B A) / n,   n = row-wise ‖W + s B A‖₂ (one norm per output feature),
// trained as y = base(x) + (m/n − 1) ⊙ (x Wᵀ) + (m/n) ⊙ s (x Aᵀ) Bᵀ. As in the reference, n is
// a constant in backward (the paper's memory-saving choice) and the bias is not rescaled.
// Trains A, B and m; m starts at ‖W‖ per row, so the model starts at the base model.
// The reference stores it as a LoRA adapter with `use_dora: true` and an extra
// `lora_magnitude_vector` [out] per module.
#include <cmath>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/reparameterized/lora.hpp"

namespace peft {

namespace detail {
/// Row norms ‖W + s B A‖ [out] without forming the [out, in] sum:
/// ‖w_o‖² + 2s Σ_k B_ok (W Aᵀ)_ok + s² Σ_k (B (A Aᵀ))_ok B_ok.
template <class T>
Tensor<T> dora_weight_norm(const nn::Linear<T>& lin, const Tensor<T>& a, const Tensor<T>& b, T s) {
  ConstMatrixMap<T> w = lin.weight.value().matrix();
  ConstMatrixMap<T> am = a.matrix();
  ConstMatrixMap<T> bm = b.matrix();
  const bool out_in = lin.layout == ops::WeightLayout::OutIn;
  const RowMatrix<T> wa = out_in ? RowMatrix<T>(w * am.transpose())
                                 : RowMatrix<T>(w.transpose() * am.transpose());  // [out, r]
  const RowMatrix<T> gram = am * am.transpose();                                  // [r, r]
  const RowMatrix<T> bg = bm * gram;                                              // [out, r]
  Tensor<T> norm(Shape{lin.out_features});
  for (std::int64_t o = 0; o < lin.out_features; ++o) {
    const T w2 = out_in ? w.row(o).squaredNorm() : w.col(o).squaredNorm();
    const T squared = w2 + T(2) * s * bm.row(o).dot(wa.row(o)) + s * s * bg.row(o).dot(bm.row(o));
    norm[o] = std::sqrt(std::max(squared, T(0)));
  }
  return norm;
}

/// Sets W from an [out, in] matrix, whatever the storage layout.
template <class T>
void set_weight_out_in(nn::Linear<T>& lin, const RowMatrix<T>& w) {
  if (lin.layout == ops::WeightLayout::OutIn)
    lin.weight.value().matrix() = w;
  else
    lin.weight.value().matrix() = w.transpose();
}
}  // namespace detail

/// DoRA's config: LoRA's fields with use_dora true (PiSSA initialisation is not combined).
struct DoraConfig {
  LoraConfig lora;

  static DoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    if (!detail::json_or<bool>(j, "use_dora", false, source))
      throw ConfigError(source + ": use_dora is false: load it with the LoRA policy");
    DoraConfig c{LoraConfig::parse(j, source)};
    if (c.lora.init == LoraConfig::Init::Pissa)
      throw ConfigError(source + ": DoRA with init_lora_weights \"pissa\" is not supported");
    return c;
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = lora.to_json(model);
    j["use_dora"] = true;
    return j;
  }
};

struct DoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "dora";
  using Config = DoraConfig;

  /// LoRA's r (in + out) per module, plus the magnitude vector [out].
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.lora.targets.selects(l.name, l.layer < 0))
        count.trainable +=
            config.lora.rank_for(l.name) * (l.in_features + l.out_features) + l.out_features;
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "LORA" && j.contains("use_dora") &&
           j["use_dora"].is_boolean() && j["use_dora"].get<bool>();
  }

  template <class T>
  class State {
   public:
    struct ModuleAdapter {
      std::string module;
      Var<T> a;          ///< [r, in]
      Var<T> b;          ///< [out, r]
      Var<T> magnitude;  ///< m [out]
      T scale;
      bool merged = false;
      Tensor<T> merged_norm;  ///< n at merge time, to undo it exactly as it was done
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const LoraConfig& lc = config_.lora;
      adapters_.reset(ctx.linears.size());
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!lc.targets.selects(lin->name, lin->layer < 0)) continue;
        const int r = lc.rank_for(lin->name);
        ModuleAdapter m{lin->name,
                        Var<T>(Tensor<T>(Shape{r, lin->in_features}), true),
                        Var<T>(Tensor<T>(Shape{lin->out_features, r}), true),
                        Var<T>(Tensor<T>(Shape{lin->out_features}), true),
                        static_cast<T>(lc.scaling(r, lc.alpha_for(lin->name))),
                        false,
                        {}};
        if (lc.init == LoraConfig::Init::Default)
          detail::kaiming_uniform(m.a.value(), ctx.rng);
        else if (lc.init == LoraConfig::Init::Gaussian)
          detail::normal_fill(m.a.value(), ctx.rng, 1.0 / r);
        adapters_.put(lin->site, std::move(m));
      }
      if (adapters_.size() == 0) detail::throw_no_target("DoRA", lc.targets, ctx.linears);
      initialise_magnitude(ctx.linears);
    }

    /// m = ‖W + s B A‖ per row (= ‖W‖ while B = 0): the model then equals the base model.
    /// Runs at attach; a model whose base weights are loaded afterwards (Decoder::load) and
    /// that is not given a trained adapter calls it again once they are in place.
    void on_base_weights_loaded(std::vector<nn::Linear<T>*>& modules) {
      initialise_magnitude(modules);
    }
    void initialise_magnitude(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules)
        if (ModuleAdapter* m = adapters_.find(lin->site); m && !m->merged)
          m->magnitude.value() =
              detail::dora_weight_norm(*lin, m->a.value(), m->b.value(), m->scale);
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return adapters_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = adapters_.find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      const Tensor<T> norm = detail::dora_weight_norm(module, m->a.value(), m->b.value(), m->scale);
      return ops::dora_linear(tape, x, module.weight, module.bias, module.layout, m->a, m->b,
                              m->magnitude, norm, m->scale);
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        const std::string prefix = "base_model.model." + m.module + ".";
        out.push_back({prefix + "lora_A.weight", m.a});
        out.push_back({prefix + "lora_B.weight", m.b});
        out.push_back({prefix + "lora_magnitude_vector", m.magnitude});
      });
      return out;
    }

    /// W ← (m/n) ⊙ (W + s B A), n = ‖W + s B A‖ per row, kept for unmerge.
    void merge(std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || m->merged) continue;
        RowMatrix<T> w = lin->weight_out_in();
        w.noalias() += m->scale * (m->b.value().matrix() * m->a.value().matrix());
        m->merged_norm = Tensor<T>(Shape{lin->out_features});
        m->merged_norm.vector() = w.rowwise().norm();
        const Eigen::Matrix<T, Eigen::Dynamic, 1> factor =
            m->magnitude.value().vector().array() / m->merged_norm.vector().array();
        w = factor.asDiagonal() * w;
        detail::set_weight_out_in(*lin, w);
        m->merged = true;
      }
    }
    /// W ← W' / (m/n) − s B A with the n of the merge.
    void unmerge(std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || !m->merged) continue;
        const Eigen::Matrix<T, Eigen::Dynamic, 1> inverse =
            m->merged_norm.vector().array() / m->magnitude.value().vector().array();
        RowMatrix<T> w = inverse.asDiagonal() * lin->weight_out_in();
        w.noalias() -= m->scale * (m->b.value().matrix() * m->a.value().matrix());
        detail::set_weight_out_in(*lin, w);
        m->merged = false;
      }
    }
    void unload(std::vector<nn::Linear<T>*>& modules) {
      merge(modules);
      adapters_.clear();
    }

    std::size_t attached_modules() const { return adapters_.size(); }
    const ModuleAdapter* find(int site) const { return adapters_.find(site); }

   private:
    Config config_;
    detail::SiteTable<ModuleAdapter> adapters_;
  };
};

}  // namespace peft
