#pragma once
// DeLoRA (Bini et al., "Decoupling Angles and Strength in Low-rank Adaptation", 2025): a
// low-rank update whose rank-1 terms are each normalised, with one learnable boundary λ on its
// strength and the base weight's column norms,
//   ΔW = B diag(λ / r / (‖a_i‖ ‖b_i‖)) A diag(‖W_{:,j}‖),   y = x Wᵀ + b + x ΔWᵀ,
// A = delora_A [r, in] (rows a_i), B = delora_B [out, r] (columns b_i), λ = delora_lambda [1],
// the norms clamped below at 1e-4 as the reference does (so that ‖ΔW‖_F ≤ λ ‖W‖ / r · r). The
// column norms ‖W_{:,j}‖ = delora_w_norm [in] are captured from the base weights when the
// adapter is built (the reference's persistent buffer: saved in the adapter file, not trained,
// not counted as a parameter). Reference peft_type "DELORA". init_weights true: A
// kaiming-uniform, B = 0, so the model starts at the base model exactly; false: B
// kaiming-uniform too. rank_pattern / lambda_pattern set r / λ per module; module_dropout drops
// the update's input in training. Mergeable: W += ΔW.
// docs/methods/reparameterized.md#delora; tests/test_rotations_and_blocks.cpp; golden
// llama_delora*.
#include <algorithm>
#include <cmath>
#include <string>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct DeloraConfig : ConfigIo<DeloraConfig> {
  static constexpr std::string_view peft_type = "DELORA";
  int r = 8;
  double delora_lambda = 15;
  double module_dropout = 0.0;
  bool init_weights = true;  ///< B = 0 (the base model); false: B random too
  PatternMap<int> rank_pattern;
  PatternMap<double> lambda_pattern;
  TargetRules targets;

  int rank_for(const std::string& m) const { return pattern_lookup(rank_pattern, m).value_or(r); }
  double lambda_for(const std::string& m) const {
    return pattern_lookup(lambda_pattern, m).value_or(delora_lambda);
  }
  static auto fields() {
    using C = DeloraConfig;
    return config_fields(field("r", &C::r, check::dimension),
                         field("delora_lambda", &C::delora_lambda, check::scale),
                         float_field("module_dropout", &C::module_dropout, check::probability),
                         field("init_weights", &C::init_weights),
                         field("rank_pattern", &C::rank_pattern, check::dimension),
                         field("lambda_pattern", &C::lambda_pattern, check::scale),
                         targets_field(&C::targets), fixed("bias", "none"),
                         fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct DeLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "delora", title = "DeLoRA";
  static constexpr std::string_view paper =
      "Bini et al., 2025, Decoupling Angles and Strength in Low-rank Adaptation";
  static constexpr std::string_view reference = "DELORA";  ///< peft_type in HF peft
  using Config = DeloraConfig;
  template <class T>
  using State = SiteState<DeLoRA, T>;
  template <class T>
  using Slot = SiteSlot<T>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t r = c.rank_for(std::string(m.name));
    return {{"delora_A", {r, m.in_features}},
            {"delora_B", {m.out_features, r}},
            {"delora_lambda", {1}},
            {"delora_w_norm", {m.in_features}, false}};
  }
  /// The trainable tensors only: delora_w_norm is a buffer, which the reference does not count.
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>& l,
                                         const Config& c) {
    return {count_site_tensors<DeLoRA>(l, c).trainable, 0};
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    detail::kaiming_uniform(s[0].value(), rng);
    if (!c.init_weights) detail::kaiming_uniform(s[1].value(), rng);
    s[2].value().fill(static_cast<T>(c.lambda_for(m.name)));
  }
  /// ‖W_{:,j}‖ of the base weights (when the adapter is built or base weights are loaded).
  template <class T>
  static void reinitialise(const Config&, Slot<T>& s, nn::Linear<T>& m) {
    s[3].value().matrix() = m.weight_out_in().colwise().norm();
  }

  /// ((x ⊙ ‖W‖) Aᵀ ⊙ scaling) Bᵀ, scaling = λ / r / (‖a_i‖ ‖b_i‖).
  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.add_delta(
        [s](Tape<T>& t, const Var<T>& x) {
          using ops::WeightLayout;
          const Var<T> h =
              ops::linear(t, ops::mul(t, x, s[3]), s[0], Var<T>{}, WeightLayout::OutIn);
          return ops::linear(t, ops::mul(t, h, scaling(t, s)), s[1], Var<T>{}, WeightLayout::OutIn);
        },
        c.module_dropout);
  }
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>&) {
    Tape<T> tape(false);
    const Var<T> d = scaling(tape, s);
    return s[1].value().matrix() * d.value().vector().asDiagonal() * s[0].value().matrix() *
           s[3].value().vector().asDiagonal();
  }

 private:
  /// λ / r / (max(‖a_i‖, 1e-4) · max(‖b_i‖, 1e-4)) [r].
  template <class T>
  static Var<T> scaling(Tape<T>& t, const Slot<T>& s) {
    const std::int64_t r = s[0].shape()[0], in = s[0].shape()[1], out = s[1].shape()[0];
    const auto clamped_sqrt = [&](const Var<T>& sq) {  // sqrt, clamped: 0 gradient below 1e-4
      return ops::detail::unary(
          t, ops::reshape(t, sq, Shape{r}), [](T v) { return std::max(std::sqrt(v), T(1e-4)); },
          [](T v, T y) { return std::sqrt(v) > T(1e-4) ? T(0.5) / y : T(0); });
    };
    const Var<T> an = clamped_sqrt(
        ops::matmul(t, ops::mul(t, s[0], s[0]), Var<T>(Tensor<T>::filled(Shape{in, 1}, T(1)))));
    const Var<T> bn = clamped_sqrt(
        ops::matmul(t, Var<T>(Tensor<T>::filled(Shape{1, out}, T(1))), ops::mul(t, s[1], s[1])));
    const Var<T> inverse = ops::detail::unary(
        t, ops::mul(t, an, bn), [](T v) { return T(1) / v; }, [](T, T y) { return -y * y; });
    return ops::mul(t, ops::scale(t, inverse, T(1) / static_cast<T>(r)), s[2]);
  }
};

}  // namespace peft
