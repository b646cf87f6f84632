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
#include "peft/core/ops/frozen_linear.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/reparameterized/lora.hpp"

namespace peft {

namespace detail {
/// Row norms ‖W + s B A‖ [out] without forming the [out, in] sum:
/// ‖w_o‖² + 2s Σ_k B_ok (W Aᵀ)_ok + s² Σ_k (B (A Aᵀ))_ok B_ok.
template <class T>
Tensor<T> dora_weight_norm(const nn::Linear<T>& lin, const Tensor<T>& a, const Tensor<T>& b, T s) {
  ConstMatrixMap<T> am = a.matrix();
  ConstMatrixMap<T> bm = b.matrix();
  const RowMatrix<T> gram = am * am.transpose();  // [r, r]
  const RowMatrix<T> bg = bm * gram;              // [out, r]
  Tensor<T> norm(Shape{lin.out_features});
  // ‖W_o + s B_o A‖² = ‖W_o‖² + 2 s B_o · (W_o Aᵀ) + s² B_o (A Aᵀ) B_oᵀ, for rows of W [out, in]
  // given as `w` (rows o0 ..), wa = w Aᵀ.
  const auto rows = [&](std::int64_t o0, const auto& w, const RowMatrix<T>& wa) {
    for (std::int64_t i = 0; i < wa.rows(); ++i) {
      const std::int64_t o = o0 + i;
      const T squared = w.row(i).squaredNorm() + T(2) * s * bm.row(o).dot(wa.row(i)) +
                        s * s * bg.row(o).dot(bm.row(o));
      norm[o] = std::sqrt(std::max(squared, T(0)));
    }
  };
  if (lin.frozen) {
    // A bf16, fp16 or NF4 base: its read-only view, 256 rows at a time (no full-size copy).
    constexpr std::int64_t kRows = 256;
    RowMatrix<T> w;
    for (std::int64_t o0 = 0; o0 < lin.out_features; o0 += kRows) {
      const std::int64_t o1 = std::min(lin.out_features, o0 + kRows);
      w.resize(o1 - o0, lin.in_features);
      lin.frozen->template rows_as<T>(o0, o1, w.data());
      rows(o0, w, RowMatrix<T>(w * am.transpose()));
    }
    return norm;
  }
  // Before a loaded model's weights arrive (Decoder::load attaches first), there is no weight:
  // the norms are recomputed once they are in (on_base_weights_loaded).
  if (!lin.weight.defined()) return norm;
  ConstMatrixMap<T> w = lin.weight.value().matrix();
  if (lin.layout == ops::WeightLayout::OutIn)
    rows(0, w, RowMatrix<T>(w * am.transpose()));
  else
    rows(0, w.transpose(), RowMatrix<T>(w.transpose() * am.transpose()));
  return norm;
}

/// x Wᵀ for the module's base weight, dense or frozen (bf16, fp16, NF4), without the bias.
template <class T>
Var<T> dora_base_product(Tape<T>& tape, const Var<T>& x, const nn::Linear<T>& m) {
  if (m.frozen) return ops::frozen_linear(tape, x, m.frozen, Var<T>{});
  return ops::linear(tape, x, m.dense_weight("DoRA"), Var<T>{}, m.layout);
}

/// Sets W from an [out, in] matrix, whatever the storage layout.
template <class T>
void set_weight_out_in(nn::Linear<T>& lin, const RowMatrix<T>& w) {
  (void)lin.dense_weight("DoRA");  // merging: a clear error for a bf16/NF4 base
  if (lin.layout == ops::WeightLayout::OutIn)
    lin.weight.value().matrix() = w;
  else
    lin.weight.value().matrix() = w.transpose();
}
}  // namespace detail

/// DoRA's config: LoRA's fields with use_dora true (PiSSA initialisation is not combined).
struct DoraConfig : LoraConfig {
  static auto fields() { return lora_fields<LoraConfig>(true); }
  void validate(const std::string& source) const {
    LoraConfig::validate(source);
    if (init == Init::Pissa)
      throw ConfigError(source + ": DoRA with init_lora_weights \"pissa\" is not supported");
  }
  static DoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    if (is_peft_type(j, "LORA", "use_dora"))
      throw ConfigError(source + ": use_dora is false: load it with the LoRA policy");
    return read_config<DoraConfig>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const { return write_config(*this, model); }
};

struct DoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "dora", title = "DoRA";
  static constexpr std::string_view paper =
      "Liu et al., 2024, DoRA: Weight-Decomposed Low-Rank Adaptation";
  static constexpr std::string_view reference = "LORA (use_dora)";  ///< peft_type in HF peft
  using Config = DoraConfig;

  static bool accepts(const nlohmann::json& j) {
    return is_peft_type(j, "LORA") && !is_peft_type(j, "LORA", "use_dora");
  }
  /// LoRA's factors plus the magnitude vector m [out].
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    SiteTensors t = LoRA::site_tensors(c, m);
    t.push_back({"lora_magnitude_vector", {m.out_features}});
    return t;
  }

  template <class T>
  class State {
   public:
    struct Extra {
      T scale = T(1);
      Tensor<T> merged_norm;  ///< n at merge time, to undo it exactly as it was done
    };
    using Sites = SiteTable<T, Extra>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }
    const Slot* find(int site) const { return sites_.find(site); }

    void attach(AttachContext<T>& ctx) {
      sites_.template attach<DoRA>(config_, ctx.linears, [&](Slot& slot, const nn::Linear<T>& m) {
        const int r = config_.rank_for(m.name);
        slot.extra.scale = static_cast<T>(config_.scaling(r, config_.alpha_for(m.name)));
        if (config_.init == LoraConfig::Init::Default)
          detail::kaiming_uniform(slot[0].value(), ctx.rng);
        else if (config_.init == LoraConfig::Init::Gaussian)
          detail::normal_fill(slot[0].value(), ctx.rng, 1.0 / r);
      });
      on_base_weights_loaded(ctx.linears);
    }

    /// m = ‖W + s B A‖ per row (= ‖W‖ while B = 0): the model then equals the base model.
    /// Runs at attach, and again once real base weights are loaded (Decoder::load).
    void on_base_weights_loaded(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules)
        if (Slot* s = sites_.active(*lin))
          (*s)[2].value() =
              detail::dora_weight_norm(*lin, (*s)[0].value(), (*s)[1].value(), s->extra.scale);
    }

    /// A replacement of the product, as DoRA truly is one: (m/n) ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b.
    /// In training mode with lora_dropout, the reference's form on the dropped input x_d:
    /// x Wᵀ + b + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s (x_d Aᵀ) Bᵀ, c = m/n (n detached), which is the
    /// replacement above when x_d = x.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      if (p.dropout_generator() && config_.lora_dropout > 0) {
        const nn::Linear<T>& module = p.module();
        const Tensor<T> norm =
            detail::dora_weight_norm(module, (*s)[0].value(), (*s)[1].value(), s->extra.scale);
        Tensor<T> inverse(norm.shape()), minus_one(norm.shape());
        for (std::int64_t i = 0; i < norm.numel(); ++i)
          inverse[i] = T(1) / norm[i], minus_one[i] = T(-1);
        return p.add_delta(
            [s, &module, inverse = Var<T>(inverse), minus_one = Var<T>(minus_one)](
                Tape<T>& t, const Var<T>& xd) {
              const std::int64_t out = module.out_features;
              const Var<T> c = ops::mul(t, Projection<T>::flat(t, (*s)[2], out), inverse);
              const Var<T> base = detail::dora_base_product(t, xd, module);
              const typename Projection<T>::Contribution term{
                  Projection<T>::Kind::LowRank, (*s)[0], (*s)[1], s->extra.scale, {}, {}, 0};
              return ops::add(t, ops::mul(t, base, ops::add(t, c, minus_one)),
                              ops::mul(t, Projection<T>::low_rank(t, xd, term), c));
            },
            config_.lora_dropout);
      }
      p.replace_product([s](Tape<T>& tape, const nn::Linear<T>& m, const Var<T>& x) {
        const Slot& slot = *s;
        const T scale = slot.extra.scale;
        const Tensor<T> norm = detail::dora_weight_norm(m, slot[0].value(), slot[1].value(), scale);
        if (!m.frozen)
          return ops::dora_linear(tape, x, m.dense_weight("DoRA"), m.bias, m.layout, slot[0],
                                  slot[1], slot[2], norm, scale);
        // A frozen base: the same function from the frozen product, n a constant as above.
        Tensor<T> inverse(norm.shape());
        for (std::int64_t i = 0; i < norm.numel(); ++i) inverse[i] = T(1) / norm[i];
        const Var<T> c =
            ops::mul(tape, Projection<T>::flat(tape, slot[2], m.out_features), Var<T>(inverse));
        const typename Projection<T>::Contribution term{
            Projection<T>::Kind::LowRank, slot[0], slot[1], scale, {}, {}, 0};
        const Var<T> y = ops::mul(tape,
                                  ops::add(tape, detail::dora_base_product(tape, x, m),
                                           Projection<T>::low_rank(tape, x, term)),
                                  c);
        return m.bias ? ops::add(tape, y, m.bias) : y;
      });
    }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// W ← (m/n) ⊙ (W + s B A), n = ‖W + s B A‖ per row, kept for unmerge.
    void merge(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        Slot* s = sites_.active(*lin);
        if (!s) continue;
        RowMatrix<T> w = lin->weight_out_in();
        w.noalias() += s->extra.scale * ((*s)[1].value().matrix() * (*s)[0].value().matrix());
        s->extra.merged_norm = Tensor<T>(Shape{lin->out_features});
        s->extra.merged_norm.vector() = w.rowwise().norm();
        const Eigen::Matrix<T, Eigen::Dynamic, 1> factor =
            (*s)[2].value().vector().array() / s->extra.merged_norm.vector().array();
        w = factor.asDiagonal() * w;
        detail::set_weight_out_in(*lin, w);
        s->merged = true;
      }
    }
    /// W ← W' / (m/n) − s B A with the n of the merge.
    void unmerge(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        Slot* s = sites_.find(*lin);
        if (!s || !s->merged) continue;
        const Eigen::Matrix<T, Eigen::Dynamic, 1> inverse =
            s->extra.merged_norm.vector().array() / (*s)[2].value().vector().array();
        RowMatrix<T> w = inverse.asDiagonal() * lin->weight_out_in();
        w.noalias() -= s->extra.scale * ((*s)[1].value().matrix() * (*s)[0].value().matrix());
        detail::set_weight_out_in(*lin, w);
        s->merged = false;
      }
    }
    void unload(const std::vector<nn::Linear<T>*>& modules) {
      merge(modules);
      sites_ = Sites{};
    }

   private:
    Config config_;
    Sites sites_;
  };
};

}  // namespace peft
