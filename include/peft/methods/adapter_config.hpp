#pragma once
// Fields every reference adapter_config.json shares, and reading them strictly.
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "peft/core/error.hpp"
#include "peft/methods/target_modules.hpp"

namespace peft::detail {

inline const nlohmann::json& json_field(const nlohmann::json& j, const char* key) {
  static const nlohmann::json null_value;
  return j.contains(key) ? j[key] : null_value;
}

template <class V>
V json_or(const nlohmann::json& j, const char* key, V fallback, const std::string& source) {
  const nlohmann::json& v = json_field(j, key);
  if (v.is_null()) return fallback;
  try {
    return v.get<V>();
  } catch (const nlohmann::json::exception&) {
    throw ConfigError(source + ": field '" + key + "' has the wrong type (" + v.dump() + ")");
  }
}

/// An integral value as a JSON integer (the reference writes `8`, not `8.0`).
inline nlohmann::json json_number(double v) {
  if (std::floor(v) == v && std::abs(v) < 9.0e15) return static_cast<std::int64_t>(v);
  return v;
}

/// Throws unless the config's peft_type is `expected`.
inline void require_peft_type(const nlohmann::json& j, const std::string& expected,
                              const std::string& source) {
  const std::string found = json_or<std::string>(j, "peft_type", "", source);
  if (found != expected)
    throw ConfigError(source + ": peft_type '" + found + "', expected '" + expected + "'");
}

/// The common header of a written adapter_config.json.
inline nlohmann::json adapter_config_header(const std::string& peft_type) {
  nlohmann::json j;
  j["peft_type"] = peft_type;
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = nullptr;
  j["revision"] = nullptr;
  j["inference_mode"] = true;
  j["auto_mapping"] = nullptr;
  j["peft_version"] = "0.21.0";
  return j;
}

}  // namespace peft::detail
