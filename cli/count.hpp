#pragma once
// `peft count MODEL_CONFIG.json ADAPTER_CONFIG.json`: the reference's print_trainable_parameters
// line, from shapes alone: "trainable params: 294,912 || all params: 124,734,720 ||
// trainable%: 0.2364".
#include <cstdio>
#include <iostream>
#include <peft/peft.hpp>
#include <string>
#include <vector>

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

/// Counts from a model config and an adapter config (both parsed); throws when unsupported.
inline std::pair<std::int64_t, std::int64_t> count_parameters(const nlohmann::json& model_json,
                                                              const std::string& model_source,
                                                              const nlohmann::json& adapter_json,
                                                              const std::string& adapter_source) {
  const ModelConfig model = ModelConfig::from_json(model_json, model_source);
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
  if (!known)
    throw ConfigError(adapter_source + ": peft_type '" +
                      adapter_json.value("peft_type", std::string("?")) + "' is not supported");
  return {trainable, all};
}

}  // namespace peft::cli
