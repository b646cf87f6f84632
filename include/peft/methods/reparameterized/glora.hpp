#pragma once
// GLoRA (Chavan et al., 2023, "One-for-All: Generalized LoRA for Parameter-Efficient
// Fine-tuning"), as HF peft's tuners/glora computes it:
//   W_eff = W0 + W0 ⊙ A + B,   b_eff = b0 + b0 ⊙ D + E + W0 C,   y = x W_effᵀ + b_eff,
// each of A, B [out, in] (config_A_B), C [in, 1] (config_C) and D, E [out] (config_D_E) one of
//   lora      Xd Xu, Xd [rows, r], Xu [r, cols]   keys glora_<P>.Xd, glora_<P>.Xu
//   vector    X [rows, 1] broadcast over columns (D, E: X [out])    key glora_<P>.X
//   constant  X [1], one scalar                                     key glora_<P>.X
//   none      zero: the reference still saves a zero buffer         key glora_<P>.zeros
// C, D and E act only where the module has a bias (else they are the zero buffers). Reference
// peft_type "GLORA"; it adapts nn.Linear only (not GPT-2's Conv1D, which this library adapts
// too). init_weights: Xu kaiming-uniform, Xd, X zero: the model starts at the base model
// exactly; false: Xd and the vectors kaiming-uniform, the scalars N(0, 0.02²). Mergeable as the
// reference merges it: W ← W + W ⊙ A + B, b ← b + b ⊙ D + E + W C; unmerge inverts it,
// W0 = (W − B) ⊘ (1 + A), b0 = (b − E − W0 C) ⊘ (1 + D).
// docs/methods/reparameterized.md#glora; tests/test_granular_and_general.cpp; golden llama_glora.
#include <array>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

namespace detail::glora {
/// target_modules alone: the reference's GloraConfig has no exclude_modules and no layer
/// selection (read, they are honoured; written, left out).
template <class C>
struct TargetsOnly : TargetsField<C> {
  void write(const C& c, nlohmann::json& j, const ModelConfig& model) const {
    TargetsField<C>::write(c, j, model);
    for (const char* key : {"exclude_modules", "layers_to_transform", "layers_pattern"})
      j.erase(key);
  }
};
}  // namespace detail::glora

struct GloraConfig : ConfigIo<GloraConfig> {
  static constexpr std::string_view peft_type = "GLORA";
  enum class Path { Lora, Vector, Constant, None };
  int r = 8;
  Path config_A_B = Path::Lora, config_C = Path::Lora, config_D_E = Path::Constant;
  bool init_weights = true;  ///< the update starts at zero; false: random paths
  TargetRules targets;

  static auto fields() {
    using C = GloraConfig;
    using P = Path;
    return config_fields(field("r", &C::r, check::dimension),
                         choice("config_A_B", &C::config_A_B, std::pair{"lora", P::Lora},
                                std::pair{"vector", P::Vector}, std::pair{"constant", P::Constant},
                                std::pair{"none", P::None}),
                         choice("config_C", &C::config_C, std::pair{"lora", P::Lora},
                                std::pair{"vector", P::Vector}, std::pair{"none", P::None}),
                         choice("config_D_E", &C::config_D_E, std::pair{"vector", P::Vector},
                                std::pair{"constant", P::Constant}, std::pair{"none", P::None}),
                         field("init_weights", &C::init_weights),
                         detail::glora::TargetsOnly<C>{{&C::targets}}, fixed("bias", "none"),
                         fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct GLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "glora", title = "GLoRA";
  static constexpr std::string_view paper =
      "Chavan et al., 2023, One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning";
  static constexpr std::string_view reference = "GLORA";  ///< peft_type in HF peft
  using Config = GloraConfig;
  using Path = GloraConfig::Path;
  template <class T>
  using Slot = SiteSlot<T>;

  /// One path of A..E: its kind and extents (rows, cols; D and E are [out], cols 0).
  struct PathSite {
    Path kind;
    std::int64_t rows, cols;
  };
  static std::array<PathSite, 5> paths(const Config& c, const ModuleSite& m) {
    const std::int64_t in = m.in_features, out = m.out_features;
    const auto biased = [&](Path p) { return m.has_bias ? p : Path::None; };
    return {{{c.config_A_B, out, in},
             {c.config_A_B, out, in},
             {biased(c.config_C), in, 1},
             {biased(c.config_D_E), out, 0},
             {biased(c.config_D_E), out, 0}}};
  }
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    SiteTensors t;
    const auto ps = paths(c, m);
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const std::string key = std::string("glora_") + char('A' + i) + ".";
      const auto [kind, rows, cols] = ps[i];
      const Shape full = cols ? Shape{rows, cols} : Shape{rows};
      if (kind == Path::Lora) {
        t.push_back({key + "Xd", {rows, c.r}});
        t.push_back({key + "Xu", {c.r, cols}});
      } else if (kind == Path::None) {
        t.push_back({key + "zeros", full, false});  // a buffer: saved, not trained
      } else {
        t.push_back({key + "X", kind == Path::Constant ? Shape{1}
                                : cols                 ? Shape{rows, 1}
                                                       : Shape{rows}});
      }
    }
    return t;
  }
  /// The trainable tensors: the zero buffers are not parameters of the reference.
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>& l,
                                         const Config& c) {
    return {count_site_tensors<GLoRA>(l, c).trainable, 0};
  }

  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    std::size_t i = 0;
    for (const PathSite& p : paths(c, ModuleSite::of(m))) {
      if (p.kind == Path::Lora) {
        detail::kaiming_uniform(s[i + 1].value(), rng);  // Xu
        if (!c.init_weights) detail::kaiming_uniform(s[i].value(), rng);
      } else if (p.kind == Path::Vector && !c.init_weights) {
        detail::kaiming_uniform(s[i].value(), rng);
      } else if (p.kind == Path::Constant && !c.init_weights) {
        detail::normal_fill(s[i].value(), rng, 0.02);
      }
      i += p.kind == Path::Lora ? 2 : 1;
    }
  }

  /// y += x (W ⊙ A + B)ᵀ + b ⊙ D + E + W C (the reference's forward, less its base product).
  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.add_delta([&c, &s, &m = p.module()](Tape<T>& t, const Var<T>& x) {
      const auto ps = paths(c, ModuleSite::of(m));
      std::array<Var<T>, 5> v;
      for (std::size_t k = 0, i = 0; k < 5; i += ps[k].kind == Path::Lora ? 2 : 1, ++k)
        v[k] = path(t, ps[k], s, i);
      const Var<T> w = weight(m);
      Var<T> d(Tensor<T>(Shape{m.out_features, m.in_features}));
      if (v[0]) d = ops::mul(t, w, v[0]);
      if (v[1]) d = ops::add(t, d, v[1]);
      Var<T> bias;
      if (m.bias) {
        bias = Var<T>(Tensor<T>(Shape{m.out_features}));
        if (v[3]) bias = ops::mul(t, m.bias, v[3]);
        if (v[4]) bias = ops::add(t, bias, v[4]);
        if (v[2])
          bias = ops::add(t, bias, ops::reshape(t, ops::matmul(t, w, v[2]), Shape{m.out_features}));
      }
      return ops::linear(t, x, d, bias, ops::WeightLayout::OutIn);
    });
  }

  /// W + W ⊙ A + B (merge) or (W − B) ⊘ (1 + A) (unmerge); merged_bias folds the bias.
  template <class T>
  static RowMatrix<T> merged_weight(const Config& c, const Slot<T>& s, const nn::Linear<T>& m,
                                    bool merge) {
    const auto ps = paths(c, ModuleSite::of(m));
    const RowMatrix<T> w = m.weight_out_in(), a = value(ps[0], s, 0);
    const RowMatrix<T> b = value(ps[1], s, ps[0].kind == Path::Lora ? 2 : 1);
    if (merge) return w + w.cwiseProduct(a) + b;
    return (w - b).cwiseQuotient((a.array() + T(1)).matrix());
  }

  /// b + b ⊙ D + E + W₀ C (merge) or (b − E − W₀ C) ⊘ (1 + D) (unmerge), W₀ the unmerged W.
  template <class T>
  static Eigen::Matrix<T, Eigen::Dynamic, 1> merged_bias(const Config& c, const Slot<T>& s,
                                                         const nn::Linear<T>& m, bool merge) {
    const auto ps = paths(c, ModuleSite::of(m));
    std::array<std::size_t, 5> at{};
    for (std::size_t k = 1; k < 5; ++k) at[k] = at[k - 1] + (ps[k - 1].kind == Path::Lora ? 2 : 1);
    using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
    const Vector wc = m.weight_out_in() * value(ps[2], s, at[2]);
    const Vector d = value(ps[3], s, at[3]), e = value(ps[4], s, at[4]);
    const Vector b = m.bias.value().vector();
    if (merge) return b + b.cwiseProduct(d) + e + wc;
    return (b - e - wc).cwiseQuotient((d.array() + T(1)).matrix());
  }
  template <class T>
  using State = SiteState<GLoRA, T>;

 private:
  // A path's value on the tape, at its own extent (broadcast by the op that uses it), or none.
  template <class T>
  static Var<T> path(Tape<T>& t, const PathSite& p, const Slot<T>& s, std::size_t i) {
    if (p.kind == Path::None) return {};
    if (p.kind == Path::Lora) return ops::matmul(t, s[i], s[i + 1]);
    if (p.kind == Path::Vector && p.cols > 1)  // [out, 1] over [out, in]: X 1ᵀ
      return ops::matmul(t, s[i], Var<T>(Tensor<T>(Shape{1, p.cols}, T(1))));
    return s[i];
  }
  // A path's value as a [rows, max(cols, 1)] matrix.
  template <class T>
  static RowMatrix<T> value(const PathSite& p, const Slot<T>& s, std::size_t i) {
    const std::int64_t cols = std::max<std::int64_t>(p.cols, 1);
    if (p.kind == Path::Lora) return s[i].value().matrix() * s[i + 1].value().matrix();
    if (p.kind == Path::Vector) return s[i].value().vector().replicate(1, cols);
    if (p.kind == Path::Constant) return RowMatrix<T>::Constant(p.rows, cols, s[i].value()[0]);
    return RowMatrix<T>::Zero(p.rows, cols);
  }
  template <class T>
  static Var<T> weight(const nn::Linear<T>& m) {
    if (m.dense() && m.layout == ops::WeightLayout::OutIn) return m.weight;
    Tensor<T> w(Shape{m.out_features, m.in_features});
    w.matrix() = m.weight_out_in();
    return Var<T>(std::move(w));
  }
};

}  // namespace peft
