#pragma once
// `peft count MODEL_CONFIG.json ADAPTER_CONFIG.json`: the reference's print_trainable_parameters
// line, from shapes alone: "trainable params: 294,912 || all params: 124,734,720 ||
// trainable%: 0.2364".
#include <cstdio>
#include <iostream>
#include <peft/peft.hpp>
#include <string>
#include <vector>

#include "model_budget.hpp"

namespace peft::cli {

/// 1234567 → "1,234,567".
inline std::string with_thousands(std::int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

/// The reference's line for `trainable` of `all` parameters.
inline std::string trainable_line(std::int64_t trainable, std::int64_t all) {
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f", all > 0 ? 100.0 * double(trainable) / double(all) : 0.0);
  return "trainable params: " + with_thousands(trainable) +
         " || all params: " + with_thousands(all) + " || trainable%: " + pct;
}

/// The deepest model `peft count` takes. Counting lists every layer's modules by name (about
/// 1 KB a layer), so memory grows with the layer count; 10,000 layers is ten times the deepest
/// published decoder (DeepNet's 1,000) and takes about 10 MB and milliseconds. A config beyond
/// it is refused with the field named, instead of taking gigabytes (10^6 layers) or failing
/// with std::bad_alloc (10^9).
inline constexpr std::int64_t kMaxCountLayers = 10000;

/// The largest count `peft count` reports: counts are exact below 2^53 (they are also printed
/// as a double percentage), and no product of sizes can overflow 64 bits on the way.
inline constexpr long double kMaxCountParameters = 9007199254740992.0L;  // 2^53

/// Counts from a model config and an adapter config (both parsed); throws when unsupported.
inline std::pair<std::int64_t, std::int64_t> count_parameters(const nlohmann::json& model_json,
                                                              const std::string& model_source,
                                                              const nlohmann::json& adapter_json,
                                                              const std::string& adapter_source) {
  const ModelConfig model = ModelConfig::from_json(model_json, model_source);
  if (model.num_layers > kMaxCountLayers)
    throw ConfigError(
        model_source + ": num_layers: expected at most " + std::to_string(kMaxCountLayers) +
        " (peft count's bound, docs/cli.md), found " + std::to_string(model.num_layers));
  if (estimated_parameters(model) > kMaxCountParameters)
    throw ConfigError(model_source + ": the model's sizes (" + size_fields(model) +
                      ") give more than 2^53 parameters, beyond what peft count reports exactly");
  std::int64_t trainable = 0, all = 0;
  const bool known = visit_policy_for(adapter_json, [&]<class Policy>() {
    const auto config = Policy::Config::from_json(adapter_json, adapter_source);
    visit_arch_for(model.model_type, [&]<class Arch>() {
      const ParameterCount c =
          peft::count_parameters<Policy>(model, linear_shapes<Arch>(model), config);
      trainable = c.trainable;
      all = base_parameter_count<Arch>(model) + c.trainable + c.frozen;
    });
  });
  if (!known) {
    const bool has = adapter_json.is_object() && adapter_json.contains("peft_type");
    const std::string type = !has ? std::string("?")
                             : adapter_json["peft_type"].is_string()
                                 ? adapter_json["peft_type"].get<std::string>()
                                 : adapter_json["peft_type"].dump().substr(0, 64);
    throw ConfigError(adapter_source + ": peft_type '" + type + "' is not supported");
  }
  return {trainable, all};
}

}  // namespace peft::cli
