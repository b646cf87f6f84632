#pragma once
// Which modules a method touches, decided as the reference ecosystem decides it, once, when
// the model is built (the forward pass does no string work).
//
// - target_modules as a list: a module matches when its path equals an entry or ends with
//   "." + entry. As a string: the whole path must match it as a regular expression
//   (std::regex ECMAScript, which agrees with Python's `re.fullmatch` on the usual patterns).
//   "all-linear": every linear layer except the output head.
// - exclude_modules: the same rules, removing matches.
// - layers_to_transform: only modules whose layer index (the number after the layers_pattern
//   component, or after any component when no pattern is given) is listed.
// - rank_pattern / alpha_pattern: the first key k such that the path matches "(.*\.)?(k)$".
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

/// A target_modules / exclude_modules rule: a list of names, or one regular expression.
struct ModuleSelector {
  std::vector<std::string> names;
  std::optional<std::string> regex;
  bool all_linear = false;

  bool empty() const { return names.empty() && !regex && !all_linear; }

  static ModuleSelector from_json(const nlohmann::json& j, const std::string& field,
                                  const std::string& source) {
    ModuleSelector s;
    if (j.is_null()) return s;
    if (j.is_string()) {
      const std::string text = j.get<std::string>();
      if (text == "all-linear")
        s.all_linear = true;
      else
        s.regex = text;
      return s;
    }
    if (!j.is_array())
      throw ConfigError(source + ": field '" + field + "' expected a list of names or a regex");
    for (const auto& item : j) {
      if (!item.is_string())
        throw ConfigError(source + ": field '" + field + "' holds a non-string");
      s.names.push_back(item.get<std::string>());
    }
    return s;
  }
  nlohmann::json to_json() const {
    if (all_linear) return "all-linear";
    if (regex) return *regex;
    if (names.empty()) return nullptr;
    return names;
  }

  /// `is_output_head`: "all-linear" excludes the output head, as the reference does.
  bool matches(const std::string& module_path, bool is_output_head = false) const {
    if (all_linear) return !is_output_head;
    if (regex) return std::regex_match(module_path, std::regex(*regex));
    for (const std::string& name : names) {
      if (module_path == name) return true;
      if (module_path.size() > name.size() &&
          module_path.compare(module_path.size() - name.size(), name.size(), name) == 0 &&
          module_path[module_path.size() - name.size() - 1] == '.')
        return true;
    }
    return false;
  }
};

/// The layer index in a module path: the integer after the `layers_pattern` component (any
/// component when the pattern is empty), e.g. 3 in "model.layers.3.self_attn.q_proj".
inline std::optional<int> layer_index_of(const std::string& module_path,
                                         const std::vector<std::string>& layers_pattern = {}) {
  std::smatch m;
  if (layers_pattern.empty()) {
    static const std::regex any(R"(.*\.[^.]*\.(\d+)\..*)");
    if (std::regex_match(module_path, m, any)) return std::stoi(m[1]);
    return std::nullopt;
  }
  for (const std::string& pattern : layers_pattern) {
    const std::regex re(".*\\." + pattern + "\\.(\\d+)\\..*");
    if (std::regex_match(module_path, m, re)) return std::stoi(m[1]);
  }
  return std::nullopt;
}

/// The target rules every adapter config shares.
struct TargetRules {
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  std::vector<int> layers_to_transform;  ///< empty: every layer
  std::vector<std::string> layers_pattern;

  bool selects(const std::string& module_path, bool is_output_head = false) const {
    if (!target_modules.matches(module_path, is_output_head)) return false;
    if (!exclude_modules.empty() && exclude_modules.matches(module_path, is_output_head))
      return false;
    if (!layers_to_transform.empty()) {
      const std::optional<int> layer = layer_index_of(module_path, layers_pattern);
      if (!layer) return false;
      bool listed = false;
      for (int l : layers_to_transform) listed = listed || l == *layer;
      if (!listed) return false;
    }
    return true;
  }

  static TargetRules from_json(const nlohmann::json& j, const std::string& source) {
    TargetRules rules;
    rules.target_modules = ModuleSelector::from_json(j.value("target_modules", nlohmann::json()),
                                                     "target_modules", source);
    rules.exclude_modules = ModuleSelector::from_json(j.value("exclude_modules", nlohmann::json()),
                                                      "exclude_modules", source);
    const nlohmann::json layers = j.value("layers_to_transform", nlohmann::json());
    if (layers.is_number_integer())
      rules.layers_to_transform.push_back(layers.get<int>());
    else if (layers.is_array())
      for (const auto& l : layers) rules.layers_to_transform.push_back(l.get<int>());
    else if (!layers.is_null())
      throw ConfigError(source + ": field 'layers_to_transform' expected an integer or a list");
    const nlohmann::json pattern = j.value("layers_pattern", nlohmann::json());
    if (pattern.is_string())
      rules.layers_pattern.push_back(pattern.get<std::string>());
    else if (pattern.is_array())
      for (const auto& p : pattern) rules.layers_pattern.push_back(p.get<std::string>());
    return rules;
  }
  void to_json(nlohmann::json& j) const {
    j["target_modules"] = target_modules.to_json();
    j["exclude_modules"] = exclude_modules.to_json();
    j["layers_to_transform"] =
        layers_to_transform.empty() ? nlohmann::json(nullptr) : nlohmann::json(layers_to_transform);
    j["layers_pattern"] = layers_pattern.empty()       ? nlohmann::json(nullptr)
                          : layers_pattern.size() == 1 ? nlohmann::json(layers_pattern[0])
                                                       : nlohmann::json(layers_pattern);
  }
};

/// rank_pattern / alpha_pattern lookup: the value of the first key k whose "(.*\.)?(k)$" matches.
template <class V>
std::optional<V> pattern_lookup(const std::map<std::string, V>& patterns, const std::string& path) {
  for (const auto& [key, value] : patterns)
    if (std::regex_match(path, std::regex("(.*\\.)?(" + key + ")"))) return value;
  return std::nullopt;
}

}  // namespace peft
