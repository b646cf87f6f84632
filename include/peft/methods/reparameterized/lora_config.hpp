#pragma once
// LoRA's config (the reference's LoraConfig, shared with DoRA), apart from the policy
// (lora.hpp) so that code that reads LoRA adapter files without a model (weighted merging,
// weighted_merge.hpp) does not compile the model headers.
#include <cmath>
#include <map>
#include <string>
#include <string_view>

#include "peft/methods/config_fields.hpp"
#include "peft/methods/target_modules.hpp"

namespace peft {

struct LoraConfig : ConfigIo<LoraConfig> {
  enum class Init { Default, Gaussian, Zeros, Pissa, Olora };
  static constexpr std::string_view peft_type = "LORA";

  int r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  double lora_dropout = 0.0;  ///< the low-rank path's input dropout in training mode
  TargetRules targets;
  PatternMap<int> rank_pattern;  ///< keys compiled once (target_modules.hpp)
  PatternMap<double> alpha_pattern;
  Init init = Init::Default;

  /// s = α / r, or α / √r with rsLoRA.
  double scaling(int rank, double alpha) const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
  }
  int rank_for(const std::string& module) const {
    return pattern_lookup(rank_pattern, module).value_or(r);
  }
  double alpha_for(const std::string& module) const {
    return pattern_lookup(alpha_pattern, module).value_or(lora_alpha);
  }

  /// The reference's fields (peft 0.21), shared with DoRA (use_dora true).
  template <class C = LoraConfig>
  static auto lora_fields(bool use_dora) {
    return config_fields(
        field("r", &C::r, check::dimension), field("lora_alpha", &C::lora_alpha, check::scale),
        field("use_rslora", &C::use_rslora),
        field("lora_dropout", &C::lora_dropout, check::probability),
        field("rank_pattern", &C::rank_pattern, check::dimension),
        field("alpha_pattern", &C::alpha_pattern, check::scale), targets_field<C>(&C::targets),
        choice("init_lora_weights", &C::init, std::pair(true, Init::Default),
               std::pair(false, Init::Zeros), std::pair("gaussian", Init::Gaussian),
               std::pair("pissa", Init::Pissa), std::pair("olora", Init::Olora)),
        fixed("use_dora", use_dora, use_dora ? "a DoRA config" : "load it with the DoRA policy"),
        fixed("bias", "none"), fixed("lora_bias", false), fixed("layer_replication", nullptr),
        fixed("modules_to_save", nullptr), fan_in_fan_out(),
        constants({{"alora_invocation_tokens", nullptr},
                   {"arrow_config", nullptr},
                   {"corda_config", nullptr},
                   {"eva_config", nullptr},
                   {"kasa_config", nullptr},
                   {"lora_ga_config", nullptr},
                   {"megatron_config", nullptr},
                   {"monteclora_config", nullptr},
                   {"target_parameters", nullptr},
                   {"trainable_token_indices", nullptr},
                   {"use_bdlora", nullptr},
                   {"velora_config", nullptr},
                   {"ensure_weight_tying", false},
                   {"loftq_config", nlohmann::json::object()},
                   {"megatron_core", "megatron.core"},
                   {"qalora_group_size", 16},
                   {"use_qalora", false}}));
  }
  static auto fields() { return lora_fields(false); }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

}  // namespace peft
