#pragma once
// LoHa (Hyeon-Woo et al., FedPara, 2022; as in LyCORIS): the update is the Hadamard product of
// two rank-r products,
//   ΔW = s · (w1a w1b) ⊙ (w2a w2b),  w1a, w2a [out, r], w1b, w2b [r, in],  s = α / r.
// The Hadamard product of two rank-r matrices has rank ≤ r², and factors as
//   ΔW = U V,  U = row_kron(w1a, w2a) [out, r²],  V = row_kron(w1bᵀ, w2bᵀ)ᵀ [r², in],
// so the forward computes s (x Vᵀ) Uᵀ and never forms ΔW while r²(out + in) < out·in. Above
// that (r² comparable to the layer's dimensions) ΔW is built, as the reference always does.
// w2b starts at 0, so the model starts at the base model.
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct LohaConfig {
  detail::LycorisOptions options;

  static LohaConfig from_json(const nlohmann::json& j, const std::string& source) {
    return LohaConfig{detail::LycorisOptions::parse(j, "LOHA", source)};
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("LOHA");
    options.write(j);
    return j;
  }
};

struct LoHa {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "loha";
  using Config = LohaConfig;

  /// 2 r (in + out) per adapted module.
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.options.targets.selects(l.name, l.layer < 0))
        count.trainable += 2 * config.options.rank_for(l.name) * (l.in_features + l.out_features);
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "LOHA";
  }

  template <class T>
  class State {
   public:
    struct ModuleAdapter {
      std::string module;
      Var<T> w1a, w1b, w2a, w2b;  ///< [out, r], [r, in], [out, r], [r, in]
      T scale;
      bool factored;  ///< forward through the rank-r² factors (false: build ΔW)
      bool merged = false;
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const detail::LycorisOptions& o = config_.options;
      adapters_.reset(ctx.linears.size());
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!o.targets.selects(lin->name, lin->layer < 0)) continue;
        const std::int64_t r = o.rank_for(lin->name), in = lin->in_features,
                           out = lin->out_features;
        ModuleAdapter m{lin->name,
                        Var<T>(Tensor<T>(Shape{out, r}), true),
                        Var<T>(Tensor<T>(Shape{r, in}), true),
                        Var<T>(Tensor<T>(Shape{out, r}), true),
                        Var<T>(Tensor<T>(Shape{r, in}), true),
                        static_cast<T>(o.scaling_for(lin->name)),
                        r * r * (in + out) < in * out};
        // FedPara's He initialisation, as the reference: one factor zero when init_weights.
        detail::kaiming_uniform(m.w1a.value(), ctx.rng);
        detail::kaiming_uniform(m.w1b.value(), ctx.rng);
        detail::kaiming_uniform(m.w2a.value(), ctx.rng);
        if (!o.init_weights) detail::kaiming_uniform(m.w2b.value(), ctx.rng);
        adapters_.put(lin->site, std::move(m));
      }
      if (adapters_.size() == 0) detail::throw_no_target("LoHa", o.targets, ctx.linears);
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return adapters_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = adapters_.find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      if (m->factored) {
        Var<T> u = ops::row_kron(tape, m->w1a, m->w2a);  // [out, r²]
        Var<T> vt = ops::row_kron(tape, ops::transpose(tape, m->w1b, 0, 1),
                                  ops::transpose(tape, m->w2b, 0, 1));  // [in, r²]
        Var<T> v = ops::transpose(tape, vt, 0, 1);                      // [r², in]
        return ops::lora_linear(tape, x, module.weight, module.bias, module.layout, v, u, m->scale);
      }
      Var<T> delta = ops::scale(
          tape,
          ops::mul(tape, ops::matmul(tape, m->w1a, m->w1b), ops::matmul(tape, m->w2a, m->w2b)),
          m->scale);  // [out, in]
      return ops::add(tape, module.forward_base(tape, x),
                      ops::linear(tape, x, delta, Var<T>{}, ops::WeightLayout::OutIn));
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        const std::string prefix = "base_model.model." + m.module + ".";
        out.push_back({prefix + "hada_w1_a", m.w1a});
        out.push_back({prefix + "hada_w1_b", m.w1b});
        out.push_back({prefix + "hada_w2_a", m.w2a});
        out.push_back({prefix + "hada_w2_b", m.w2b});
      });
      return out;
    }

    /// ΔW = s (w1a w1b) ⊙ (w2a w2b) [out, in].
    RowMatrix<T> delta_weight(int site) const {
      const ModuleAdapter* m = adapters_.find(site);
      if (!m) throw Error("LoHa: no adapter at site " + std::to_string(site));
      const RowMatrix<T> first = m->w1a.value().matrix() * m->w1b.value().matrix();
      const RowMatrix<T> second = m->w2a.value().matrix() * m->w2b.value().matrix();
      return m->scale * first.cwiseProduct(second);
    }

    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }
    void unload(std::vector<nn::Linear<T>*>& modules) {
      fold(modules, true);
      adapters_.clear();
    }
    std::size_t attached_modules() const { return adapters_.size(); }
    /// Forces the forward path (tests compare the two): factored or with ΔW built.
    void set_factored(bool factored) {
      adapters_.for_each([&](ModuleAdapter& m) { m.factored = factored; });
    }

   private:
    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || m->merged == merge) continue;
        RowMatrix<T> delta = delta_weight(lin->site);
        if (!merge) delta = -delta;
        lin->add_to_weight(delta);
        m->merged = merge;
      }
    }

    Config config_;
    detail::SiteTable<ModuleAdapter> adapters_;
  };
};

}  // namespace peft
