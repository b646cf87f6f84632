#pragma once
// Plumbing the reparameterized policies share: initialisers as torch draws them (by
// distribution, not bit for bit), config-table helpers (a number written as given, a nested
// table) and the options LoHa and LoKr share.
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <tuple>
#include <utility>

#include "peft/core/error.hpp"
#include "peft/core/tensor.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/target_modules.hpp"

namespace peft::detail {

/// torch.nn.init.kaiming_uniform_(t, a=√5) on a 2-D [rows, fan_in] tensor: U(−1/√fan_in,
/// 1/√fan_in).
template <class T>
void kaiming_uniform(Tensor<T>& t, std::mt19937_64& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(t.cols()));
  std::uniform_real_distribution<double> u(-bound, bound);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(u(rng));
}

/// N(0, std²) entries.
template <class T>
void normal_fill(Tensor<T>& t, std::mt19937_64& rng, double std) {
  std::normal_distribution<double> n(0.0, std);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(n(rng));
}

/// The options LoHa and LoKr share (the reference's LyCORIS-style configs).
struct LycorisOptions {
  int r = 8;
  double alpha = 8;
  double rank_dropout = 0.0;    ///< rows of ΔW dropped in training (lycoris_dropout)
  double module_dropout = 0.0;  ///< the whole adapter skipped in training, per forward
  bool init_weights = true;     ///< false: every factor random (the update starts non-zero)
  TargetRules targets;
  PatternMap<int> rank_pattern;  ///< keys compiled once (target_modules.hpp)
  PatternMap<double> alpha_pattern;

  int rank_for(const std::string& module) const {
    return pattern_lookup(rank_pattern, module).value_or(r);
  }
  /// s = α / r, with the module's own α and r from the patterns.
  double scaling_for(const std::string& module) const {
    return pattern_lookup(alpha_pattern, module).value_or(alpha) / rank_for(module);
  }

  static auto fields() {
    using O = LycorisOptions;
    namespace check = ::peft::check;
    return config_fields(
        field("r", &O::r, check::dimension), field("alpha", &O::alpha, check::scale),
        float_field("rank_dropout", &O::rank_dropout, check::probability),
        float_field("module_dropout", &O::module_dropout, check::probability),
        field("init_weights", &O::init_weights), targets_field(&O::targets),
        field("rank_pattern", &O::rank_pattern, check::dimension),
        field("alpha_pattern", &O::alpha_pattern, check::scale),
        fixed("use_effective_conv2d", false,
              "it applies to convolutions, which this library's models do not have"),
        fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

/// LyCORIS's dropouts in training mode, as the reference's LoHa and LoKr layers draw them: the
/// adapter is skipped for this forward unless u > module_dropout (u ~ U[0, 1)); then, with a
/// rank dropout p, each row of ΔW (an output feature) is kept when its u > p, the kept rows
/// rescaled by 1 / (kept fraction) when `rescale` (LoHa always; LoKr with rank_dropout_scale).
/// Drawn from the decoder's dropout generator, module first; `generator` null (evaluation):
/// nothing is dropped. Where every row is dropped the update is zero (the reference divides 0
/// by 0 there).
template <class T>
struct LycorisDropout {
  bool skip = false;
  Tensor<T> rows;  ///< [out] multipliers of the update's outputs; empty: none dropped
};
template <class T>
LycorisDropout<T> lycoris_dropout(const LycorisOptions& o, std::mt19937_64* generator,
                                  std::int64_t out_features, bool rescale) {
  LycorisDropout<T> d;
  if (!generator) return d;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (o.module_dropout > 0 && !(u(*generator) > o.module_dropout)) {
    d.skip = true;
    return d;
  }
  if (o.rank_dropout <= 0) return d;
  d.rows = Tensor<T>::zeros(Shape{out_features});
  std::int64_t kept = 0;
  for (std::int64_t i = 0; i < out_features; ++i)
    if (u(*generator) > o.rank_dropout) d.rows[i] = T(1), ++kept;
  if (rescale && kept > 0) {
    const T scale = static_cast<T>(double(out_features) / double(kept));
    for (std::int64_t i = 0; i < out_features; ++i) d.rows[i] *= scale;
  }
  return d;
}

namespace reparameterized {
/// The target rules without exclude_modules, which the reference's VeRA and C3A configs do not
/// have.
template <class C>
struct TargetsWithoutExclude : TargetsField<C> {
  void write(const C& c, nlohmann::json& j, const ModelConfig& model) const {
    TargetsField<C>::write(c, j, model);
    j.erase("exclude_modules");
  }
};
}  // namespace reparameterized

}  // namespace peft::detail
