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
  double rank_dropout = 0.0;    ///< recorded and written back; dropout is not applied
  double module_dropout = 0.0;  ///< recorded and written back; dropout is not applied
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

}  // namespace peft::detail
