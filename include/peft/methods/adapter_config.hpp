#pragma once
// Fields every reference adapter_config.json shares, and reading them strictly.
#include <cmath>
#include <concepts>
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

/// A string field, or `fallback` when absent or null; any other JSON type is a ConfigError
/// naming the file and the field ("peft_type": 3 is not left to nlohmann's own message).
template <class V>
requires std::same_as<V, std::string> V json_or(const nlohmann::json& j, const char* key,
                                                V fallback, const std::string& source) {
  if (!j.is_object())
    throw ConfigError(source + ": expected a JSON object, found " + std::string(j.type_name()));
  const nlohmann::json& v = json_field(j, key);
  if (v.is_null()) return fallback;
  if (!v.is_string()) {
    std::string shown = v.dump();
    if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
    throw ConfigError(source + ": field '" + key + "': expected a string, found " + shown);
  }
  return v.get<std::string>();
}

/// A string field for a yes/no question (`accepts`): the field's string, or `fallback` when
/// `j` is not an object or the field is absent or not a string. Never throws: a wrong type is
/// reported by the reader that follows.
inline std::string string_or(const nlohmann::json& j, const char* key, std::string fallback) {
  if (!j.is_object()) return fallback;
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
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
