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

namespace peft {

struct LohaConfig : ConfigIo<LohaConfig> {
  static constexpr std::string_view peft_type = "LOHA";
  detail::LycorisOptions options;

  static auto fields() {
    return config_fields(nested_fields(&LohaConfig::options, detail::LycorisOptions::fields()));
  }
};

struct LoHa {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "loha", title = "LoHa";
  static constexpr std::string_view paper =
      "Hyeon-Woo et al., 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient "
      "Federated Learning";
  static constexpr std::string_view reference = "LOHA";  ///< peft_type in HF peft
  using Config = LohaConfig;

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "LOHA"); }
  static bool selects(const Config& c, const ModuleSite& m) {
    return selects_by_targets(c.options, m);
  }
  /// w1a, w2a [out, r] and w1b, w2b [r, in]: 2 r (in + out) per adapted module.
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t r = c.options.rank_for(std::string(m.name));
    return {{"hada_w1_a", {m.out_features, r}},
            {"hada_w1_b", {r, m.in_features}},
            {"hada_w2_a", {m.out_features, r}},
            {"hada_w2_b", {r, m.in_features}}};
  }

  template <class T>
  class State {
   public:
    struct Extra {
      T scale = T(1);
      bool factored = true;  ///< forward through the rank-r² factors (false: build ΔW)
    };
    using Sites = SiteTable<T, Extra>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const detail::LycorisOptions& o = config_.options;
      sites_.template attach<LoHa>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>& m) {
        const std::int64_t r = o.rank_for(m.name), in = m.in_features, out = m.out_features;
        s.extra = {static_cast<T>(o.scaling_for(m.name)), r * r * (in + out) < in * out};
        // FedPara's He initialisation, as the reference: one factor zero when init_weights.
        detail::kaiming_uniform(s[0].value(), ctx.rng);
        detail::kaiming_uniform(s[1].value(), ctx.rng);
        detail::kaiming_uniform(s[2].value(), ctx.rng);
        if (!o.init_weights) detail::kaiming_uniform(s[3].value(), ctx.rng);
      });
    }

    /// Factored: the low-rank term s (x Vᵀ) Uᵀ; else the delta x ΔWᵀ with ΔW built. In training
    /// mode, module and rank dropout first (detail::lycoris_dropout): a dropped row of ΔW is a
    /// dropped output of the update.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      const detail::LycorisDropout<T> drop = detail::lycoris_dropout<T>(
          config_.options, p.dropout_generator(), p.module().out_features, true);
      if (drop.skip) return;
      const Var<T> rows = drop.rows.empty() ? Var<T>{} : Var<T>(drop.rows);
      Tape<T>& tape = p.tape();
      if (s->extra.factored) {
        Var<T> u = ops::row_kron(tape, (*s)[0], (*s)[2]);  // [out, r²]
        Var<T> vt = ops::row_kron(tape, ops::transpose(tape, (*s)[1], 0, 1),
                                  ops::transpose(tape, (*s)[3], 0, 1));  // [in, r²]
        if (!rows) return p.add_low_rank(ops::transpose(tape, vt, 0, 1), u, s->extra.scale);
        const typename Projection<T>::Contribution term{Projection<T>::Kind::LowRank,
                                                        ops::transpose(tape, vt, 0, 1),
                                                        u,
                                                        s->extra.scale,
                                                        {},
                                                        {},
                                                        0};
        return p.add_delta([term, rows](Tape<T>& t, const Var<T>& x) {
          return ops::mul(t, Projection<T>::low_rank(t, x, term), rows);
        });
      }
      p.add_delta([s, rows](Tape<T>& t, const Var<T>& x) {
        const Slot& m = *s;
        Var<T> delta =
            ops::scale(t, ops::mul(t, ops::matmul(t, m[0], m[1]), ops::matmul(t, m[2], m[3])),
                       m.extra.scale);  // [out, in]
        const Var<T> y = ops::linear(t, x, delta, Var<T>{}, ops::WeightLayout::OutIn);
        return rows ? ops::mul(t, y, rows) : y;
      });
    }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// ΔW = s (w1a w1b) ⊙ (w2a w2b) [out, in].
    static RowMatrix<T> delta_weight(const Slot& s, const nn::Linear<T>&) {
      const RowMatrix<T> first = s[0].value().matrix() * s[1].value().matrix();
      const RowMatrix<T> second = s[2].value().matrix() * s[3].value().matrix();
      return s.extra.scale * first.cwiseProduct(second);
    }
    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta_weight); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta_weight); }
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta_weight); }

    /// Forces the forward path (tests compare the two): factored or with ΔW built.
    void set_factored(bool factored) {
      sites_.for_each([&](Slot& s) { s.extra.factored = factored; });
    }

   private:
    Config config_;
    Sites sites_;
  };
};

}  // namespace peft
