#pragma once
// LoKr (Edalati et al., KronA, 2022; as in LyCORIS): the update is a Kronecker product,
//   ΔW = s · w1 ⊗ w2,  w1 [out_l, in_m], w2 [out_k, in_n],  out = out_l·out_k, in = in_m·in_n,
// s = α / r. The split of each dimension follows the reference's `factorization` (the divisor
// pair nearest √dim, or `decompose_factor` when it divides). A factor is itself a rank-r
// product (w1_a w1_b, w2_a w2_b) when r is below half its larger side: always for w2, and for
// w1 only with `decompose_both`. The forward uses (w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ) per input
// row, so ΔW is never formed. w1 (or w1_a) starts at 0, so the model starts at the base model.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"

namespace peft {

namespace detail {
/// The reference's LoKr split of `dimension` into (m, n), m <= n, m·n = dimension: `factor`
/// itself when it divides; otherwise the walk over divisors from 1 towards √dimension, each
/// step no larger than `factor` (no bound when factor < 0).
inline std::pair<std::int64_t, std::int64_t> lokr_factorization(std::int64_t dimension,
                                                                std::int64_t factor = -1) {
  if (factor > 0 && dimension % factor == 0) {
    std::int64_t m = factor, n = dimension / factor;
    if (m > n) std::swap(m, n);
    return {m, n};
  }
  if (factor < 0) factor = dimension;
  std::int64_t m = 1, n = dimension;
  const std::int64_t length = m + n;
  while (m < n) {
    std::int64_t new_m = m + 1;
    while (dimension % new_m != 0) ++new_m;
    const std::int64_t new_n = dimension / new_m;
    if (new_m + new_n > length || new_m > factor) break;
    m = new_m;
    n = new_n;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// How one module's LoKr factors are shaped.
struct LokrShape {
  std::int64_t out_l, out_k, in_m, in_n;
  bool full_w1, full_w2;  ///< false: the factor is a rank-r product

  static LokrShape of(std::int64_t in, std::int64_t out, std::int64_t r, std::int64_t factor,
                      bool decompose_both) {
    const auto [in_m, in_n] = lokr_factorization(in, factor);
    const auto [out_l, out_k] = lokr_factorization(out, factor);
    LokrShape s{out_l, out_k, in_m, in_n, true, true};
    s.full_w1 = !(decompose_both && 2 * r < std::max(out_l, in_m));
    s.full_w2 = !(2 * r < std::max(out_k, in_n));
    return s;
  }
};
}  // namespace detail

struct LokrConfig : ConfigIo<LokrConfig> {
  static constexpr std::string_view peft_type = "LOKR";
  detail::LycorisOptions options;
  bool decompose_both = false;
  int decompose_factor = -1;
  bool rank_dropout_scale = false;  ///< rank dropout rescales the kept rows (lycoris_dropout)

  static auto fields() {
    using C = LokrConfig;
    return config_fields(nested_fields(&C::options, detail::LycorisOptions::fields()),
                         field("decompose_both", &C::decompose_both),
                         field("decompose_factor", &C::decompose_factor),
                         field("rank_dropout_scale", &C::rank_dropout_scale));
  }
  detail::LokrShape shape_for(const std::string& module, std::int64_t in, std::int64_t out) const {
    return detail::LokrShape::of(in, out, options.rank_for(module), decompose_factor,
                                 decompose_both);
  }
};

struct LoKr {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lokr", title = "LoKr";
  static constexpr std::string_view paper =
      "Yeh et al., 2024, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model "
      "Evaluation";
  static constexpr std::string_view reference = "LOKR";  ///< peft_type in HF peft
  using Config = LokrConfig;

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "LOKR"); }
  static bool selects(const Config& c, const ModuleSite& m) {
    return selects_by_targets(c.options, m);
  }
  /// w1 [out_l, in_m] or w1_a [out_l, r], w1_b [r, in_m]; then w2 [out_k, in_n] or w2_a
  /// [out_k, r], w2_b [r, in_n].
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::string module(m.name);
    const std::int64_t r = c.options.rank_for(module);
    const detail::LokrShape s = c.shape_for(module, m.in_features, m.out_features);
    SiteTensors t;
    if (s.full_w1)
      t.push_back({"lokr_w1", {s.out_l, s.in_m}});
    else
      t.insert(t.end(), {{"lokr_w1_a", {s.out_l, r}}, {"lokr_w1_b", {r, s.in_m}}});
    if (s.full_w2)
      t.push_back({"lokr_w2", {s.out_k, s.in_n}});
    else
      t.insert(t.end(), {{"lokr_w2_a", {s.out_k, r}}, {"lokr_w2_b", {r, s.in_n}}});
    return t;
  }

  template <class T>
  class State {
   public:
    struct Extra {
      detail::LokrShape shape{};
      T scale = T(1);
    };
    using Sites = SiteTable<T, Extra>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const detail::LycorisOptions& o = config_.options;
      sites_.template attach<LoKr>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>& m) {
        s.extra = {config_.shape_for(m.name, m.in_features, m.out_features),
                   static_cast<T>(o.scaling_for(m.name))};
        // As the reference: w1 (or w1_a) zero, the rest Kaiming-uniform; all random without
        // init_weights.
        if (!o.init_weights) detail::kaiming_uniform(s[0].value(), ctx.rng);
        for (std::size_t i = 1; i < s.tensors.size(); ++i)
          detail::kaiming_uniform(s[i].value(), ctx.rng);
      });
    }

    /// A replacement by the fused kronecker_linear (x Wᵀ + b + s x (w1 ⊗ w2)ᵀ in one op), so
    /// that the numerics stay those of the op. In training mode, module and rank dropout first
    /// (detail::lycoris_dropout, rescaled with rank_dropout_scale): with a rank dropout the
    /// update is a delta of its own, s x (w1 ⊗ w2)ᵀ with its outputs dropped.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      const detail::LycorisDropout<T> drop =
          detail::lycoris_dropout<T>(config_.options, p.dropout_generator(),
                                     p.module().out_features, config_.rank_dropout_scale);
      if (drop.skip) return;
      if (!drop.rows.empty()) {
        return p.add_delta([s, rows = Var<T>(drop.rows)](Tape<T>& t, const Var<T>& x) {
          return ops::mul(
              t, kronecker_delta(t, x, factor(t, *s, 1), factor(t, *s, 2), s->extra.scale), rows);
        });
      }
      p.replace_product([s](Tape<T>& tape, const nn::Linear<T>& m, const Var<T>& x) {
        const Var<T> w1 = factor(tape, *s, 1), w2 = factor(tape, *s, 2);
        return ops::kronecker_linear(tape, x, m.dense_weight("LoKr"), m.bias, m.layout, w1, w2,
                                     s->extra.scale);
      });
    }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// ΔW = s w1 ⊗ w2 [out, in].
    static RowMatrix<T> delta_weight(const Slot& s, const nn::Linear<T>&) {
      const RowMatrix<T> w1 = factor_value(s, 1), w2 = factor_value(s, 2);
      RowMatrix<T> delta(w1.rows() * w2.rows(), w1.cols() * w2.cols());
      for (Eigen::Index i = 0; i < w1.rows(); ++i)
        for (Eigen::Index j = 0; j < w1.cols(); ++j)
          delta.block(i * w2.rows(), j * w2.cols(), w2.rows(), w2.cols()) =
              (s.extra.scale * w1(i, j)) * w2;
      return delta;
    }
    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta_weight); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta_weight); }
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta_weight); }

   private:
    /// Where factor 1 or 2 starts in the slot, and whether it is one tensor (else the product
    /// of its two rank-r parts).
    static std::pair<std::size_t, bool> part(const Slot& s, int which) {
      const bool full_w1 = s.extra.shape.full_w1;
      if (which == 1) return {0, full_w1};
      return {full_w1 ? 1 : 2, s.extra.shape.full_w2};
    }
    /// s x (w1 ⊗ w2)ᵀ alone, from the library's ops (each row of x as X [im, in_n]:
    /// w1 (X w2ᵀ) [ol, ok]), for the rank-dropout path; x [..., in] → [..., out].
    static Var<T> kronecker_delta(Tape<T>& t, const Var<T>& x, const Var<T>& w1, const Var<T>& w2,
                                  T scale) {
      const std::int64_t ol = w1.value().dim(0), im = w1.value().dim(1);
      const std::int64_t ok = w2.value().dim(0), in_n = w2.value().dim(1);
      const std::int64_t n = x.value().numel() / (im * in_n);
      Shape out_shape = x.shape();
      out_shape.back() = ol * ok;
      const Var<T> z = ops::linear(t, ops::reshape(t, x, Shape{n * im, in_n}), w2, Var<T>{},
                                   ops::WeightLayout::OutIn);  // [N·im, ok]
      const Var<T> zt = ops::transpose(t, ops::reshape(t, z, Shape{n, im, ok}), 1, 2);
      const Var<T> y = ops::linear(t, zt, w1, Var<T>{}, ops::WeightLayout::OutIn);  // [N, ok, ol]
      return ops::scale(t, ops::reshape(t, ops::transpose(t, y, 1, 2), out_shape), scale);
    }
    static Var<T> factor(Tape<T>& tape, const Slot& s, int which) {
      const auto [i, full] = part(s, which);
      return full ? s[i] : ops::matmul(tape, s[i], s[i + 1]);
    }
    static RowMatrix<T> factor_value(const Slot& s, int which) {
      const auto [i, full] = part(s, which);
      if (full) return s[i].value().matrix();
      return s[i].value().matrix() * s[i + 1].value().matrix();
    }

    Config config_;
    Sites sites_;
  };
};

}  // namespace peft
