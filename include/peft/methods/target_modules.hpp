#pragma once
// Which modules a method touches, decided as the reference ecosystem decides it, once, when
// the model is built (the forward pass does no string work).
//
// - target_modules as a list: a module matches when its path equals an entry or ends with
//   "." + entry. As a string: the whole path must match it as a regular expression (Python's
//   `re.fullmatch(pattern, path)`). "all-linear": every linear layer except the output head.
// - exclude_modules: the same rules, removing matches.
// - layers_to_transform: only modules whose layer index is listed. The index is the reference's
//   `re.match(rf".*\.{layers_pattern}\.(\d+)\.", path)` group (each pattern in turn, the first
//   that matches), or `re.match(r".*\.[^.]*\.(\d+)\.", path)` when no pattern is given.
// - rank_pattern / alpha_pattern: the first key k (in key order) such that the whole path
//   matches "(.*\.)?(k)".
//
// Every pattern is matched by RE2, an engine whose matching time is linear in the path's
// length whatever the pattern (std::regex and Python's re backtrack: "(.*.*)*X" never ends,
// and 20,000 nested parentheses overflow std::regex's recursive compiler). RE2 has Python's
// leftmost-first semantics for what a match covers; it cannot express back-references or
// lookaround assertions, which are refused when the pattern is compiled. A pattern is
// compiled once, when the config is read or the pattern is assigned in code, and the compiled
// form is shared by every copy of the config (it is immutable, so copies are cheap and
// matching from several threads is safe).
#include <re2/re2.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"

namespace peft {

/// How a pattern's text is applied to a module path (the reference's three uses).
enum class PatternKind {
  Full,       ///< target_modules / exclude_modules / feedforward_modules: re.fullmatch(p, path)
  PathKey,    ///< rank_pattern / alpha_pattern keys: the whole path matches "(.*\.)?(p)"
  LayerIndex  ///< layers_pattern: re.match(rf".*\.{p}\.(\d+)\.", path), the index read
};

namespace pattern_detail {

/// The longest pattern text accepted. Module paths are a few dozen characters; this bound keeps
/// compiling any accepted pattern to milliseconds and well inside RE2's memory budget (RE2 also
/// reports, rather than crashes on, a program that exceeds kMaxMem).
inline constexpr std::size_t kMaxPatternLength = 100'000;
/// RE2's budget for one compiled pattern (its program and DFA caches), in bytes: the library's
/// default, spelled out because it is what turns a huge pattern into an error.
inline constexpr std::int64_t kMaxMem = std::int64_t(8) << 20;

inline std::string shown_text(std::string_view text) {
  std::string shown = nlohmann::json(std::string(text)).dump();
  if (shown.size() > 80) shown = shown.substr(0, 76) + "...\"";
  return shown;
}

/// A JSON value as the message shows it (dumped, cut to 80 characters).
inline std::string shown_json(const nlohmann::json& v) {
  std::string shown = v.dump();
  if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
  return shown;
}

/// Why RE2 refused a pattern, in words that say what to change.
inline std::string explain(const re2::RE2& re) {
  const std::string& arg = re.error_arg();
  const bool back_reference = re.error_code() == re2::RE2::ErrorBadEscape && arg.size() == 2 &&
                              arg[0] == '\\' && arg[1] >= '1' && arg[1] <= '9';
  const bool perl_only =
      re.error_code() == re2::RE2::ErrorBadPerlOp &&
      (arg.starts_with("(?=") || arg.starts_with("(?!") || arg.starts_with("(?<") ||
       arg.starts_with("(?P=") || arg.starts_with("(?>"));
  if (back_reference || perl_only)
    return re.error() +
           "; back-references and lookaround assertions cannot be matched in linear time, so "
           "RE2 (the engine used) does not support them";
  if (re.error_code() == re2::RE2::ErrorPatternTooLarge)
    return re.error() + "; the pattern exceeds RE2's " + std::to_string(kMaxMem >> 20) +
           " MiB budget";
  return re.error();
}

inline std::shared_ptr<const re2::RE2> compile(const std::string& text, PatternKind kind,
                                               const std::string& where) {
  if (text.size() > kMaxPatternLength)
    throw ConfigError(where + ": expected a regular expression of at most " +
                      std::to_string(kMaxPatternLength) + " characters, found one of " +
                      std::to_string(text.size()));
  re2::RE2::Options options;
  options.set_log_errors(false);
  options.set_max_mem(kMaxMem);
  std::string expression;
  switch (kind) {
    case PatternKind::Full:
      expression = text;
      break;
    case PatternKind::PathKey:
      expression = "(.*\\.)?(" + text + ")";
      break;
    case PatternKind::LayerIndex:
      // Without the capture: the match's own span ends ".<digits>.", which is the group, and
      // RE2 then needs no submatch tracking (a pattern with 20,000 groups would cost seconds
      // and gigabytes to track). Groups never change which match leftmost-first picks.
      expression = ".*\\." + text + "\\.\\d+\\.";
      options.set_never_capture(true);
      break;
  }
  auto re = std::make_shared<const re2::RE2>(expression, options);
  if (!re->ok()) {
    // Report the user's text, not the wrapper: when the text alone fails too, its own error
    // (a stray ")" in a key would otherwise be reported inside "(.*\.)?(...)").
    std::string reason = explain(*re);
    if (kind != PatternKind::Full) {
      options.set_never_capture(false);
      const re2::RE2 alone(text, options);
      if (!alone.ok()) reason = explain(alone);
    }
    throw ConfigError(where + ": expected a regular expression, found " + shown_text(text) + " (" +
                      reason + ")");
  }
  return re;
}

}  // namespace pattern_detail

/// A regular expression compiled once (RE2), applied as `Kind` says. Constructed from its text
/// (implicitly, so that `selector.regex = "..."` compiles it); a pattern RE2 refuses is a
/// ConfigError naming `where` (the source file and field when read from JSON).
template <PatternKind Kind>
class Pattern {
 public:
  Pattern(std::string text, const std::string& where = "pattern")
      : text_(std::move(text)), re_(pattern_detail::compile(text_, Kind, where)) {}
  Pattern(const char* text) : Pattern(std::string(text)) {}

  const std::string& text() const { return text_; }
  bool operator==(const Pattern& other) const { return text_ == other.text_; }

  /// Full / PathKey: whether the whole path matches.
  bool matches(std::string_view path) const requires(Kind != PatternKind::LayerIndex) {
    return re2::RE2::FullMatch(re2::StringPiece(path.data(), path.size()), *re_);
  }

  /// LayerIndex: the layer index the reference reads from `path`, if the pattern matches. An
  /// index too large for an int is reported as absent (no layers_to_transform entry can list
  /// it: entries are ints).
  std::optional<int> layer_index(std::string_view path) const
      requires(Kind == PatternKind::LayerIndex) {
    re2::StringPiece match;
    if (!re_->Match(re2::StringPiece(path.data(), path.size()), 0, path.size(),
                    re2::RE2::ANCHOR_START, &match, 1))
      return std::nullopt;
    // The match ends ".<digits>."; the digits are the group. A top-level "|" in the pattern
    // can make the reference's splice match without reaching its group (Python then fails on
    // int(None)): such a match reads as no layer index.
    if (match.size() < 3 || match[match.size() - 1] != '.') return std::nullopt;
    std::size_t end = match.size() - 1, begin = end;
    while (begin > 0 && match[begin - 1] >= '0' && match[begin - 1] <= '9') --begin;
    if (begin == end || begin == 0 || match[begin - 1] != '.') return std::nullopt;
    long long value = 0;
    for (std::size_t i = begin; i < end; ++i) {
      value = value * 10 + (match[i] - '0');
      if (value > std::numeric_limits<int>::max()) return std::nullopt;
    }
    return static_cast<int>(value);
  }

 private:
  std::string text_;
  std::shared_ptr<const re2::RE2> re_;  ///< shared by copies; RE2 is safe to use concurrently
};

using ModulePattern = Pattern<PatternKind::Full>;
using KeyPattern = Pattern<PatternKind::PathKey>;
using LayerPattern = Pattern<PatternKind::LayerIndex>;

/// rank_pattern / alpha_pattern: keys (patterns) to values, each key compiled once. Reads like
/// the std::map it wraps (iteration in key order, size, find); changed only by assignment, so
/// the compiled keys always match the map.
template <class V>
class PatternMap {
 public:
  using map_type = std::map<std::string, V>;
  using value_type = typename map_type::value_type;
  using const_iterator = typename map_type::const_iterator;

  PatternMap() = default;
  /// `where` names the field in errors ("adapter_config.json: field 'rank_pattern'").
  PatternMap(map_type values, const std::string& where = "pattern key")
      : values_(std::move(values)) {
    keys_.reserve(values_.size());
    for (const auto& entry : values_) keys_.emplace_back(entry.first, where);
  }
  PatternMap(std::initializer_list<value_type> values) : PatternMap(map_type(values)) {}

  const_iterator begin() const { return values_.begin(); }
  const_iterator end() const { return values_.end(); }
  const_iterator find(const std::string& key) const { return values_.find(key); }
  std::size_t size() const { return values_.size(); }
  bool empty() const { return values_.empty(); }
  const map_type& map() const { return values_; }
  bool operator==(const PatternMap& other) const { return values_ == other.values_; }

  /// The value of the first key (in key order) whose pattern matches the whole path.
  std::optional<V> lookup(std::string_view path) const {
    auto value = values_.begin();
    for (const KeyPattern& key : keys_) {
      if (key.matches(path)) return value->second;
      ++value;
    }
    return std::nullopt;
  }

 private:
  map_type values_;
  std::vector<KeyPattern> keys_;  ///< values_'s keys, compiled, in the same order
};

/// A target_modules / exclude_modules rule: a list of names, or one regular expression.
struct ModuleSelector {
  std::vector<std::string> names;
  std::optional<ModulePattern> regex;
  bool all_linear = false;

  bool empty() const { return names.empty() && !regex && !all_linear; }

  static ModuleSelector from_json(const nlohmann::json& j, const std::string& field,
                                  const std::string& source) {
    ModuleSelector s;
    const std::string where = source + ": field '" + field + "'";
    if (j.is_null()) return s;
    if (j.is_string()) {
      const std::string text = j.get<std::string>();
      if (text == "all-linear")
        s.all_linear = true;
      else
        s.regex.emplace(text, where);
      return s;
    }
    auto shown = [](const nlohmann::json& v) { return pattern_detail::shown_json(v); };
    if (!j.is_array())
      throw ConfigError(
          where + ": expected a list of module names or a regular expression, found " + shown(j));
    for (const auto& item : j) {
      if (!item.is_string())
        throw ConfigError(where + ": expected a list of module names (strings), found an entry " +
                          shown(item));
      s.names.push_back(item.get<std::string>());
    }
    return s;
  }
  nlohmann::json to_json() const {
    if (all_linear) return "all-linear";
    if (regex) return regex->text();
    if (names.empty()) return nullptr;
    return names;
  }

  /// `is_output_head`: "all-linear" excludes the output head, as the reference does.
  bool matches(const std::string& module_path, bool is_output_head = false) const {
    if (all_linear) return !is_output_head;
    if (regex) return regex->matches(module_path);
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

namespace pattern_detail {
/// The reference's pattern when layers_pattern is empty: the number after any component.
inline const LayerPattern& any_layer() {
  static const LayerPattern any("[^.]*", "the default layer pattern");  // immutable once built
  return any;
}
}  // namespace pattern_detail

/// The layer index in a module path: the integer after the `layers_pattern` component (any
/// component when the pattern is empty), e.g. 3 in "model.layers.3.self_attn.q_proj".
inline std::optional<int> layer_index_of(const std::string& module_path,
                                         const std::vector<LayerPattern>& layers_pattern = {}) {
  if (layers_pattern.empty()) return pattern_detail::any_layer().layer_index(module_path);
  for (const LayerPattern& pattern : layers_pattern)
    if (const std::optional<int> index = pattern.layer_index(module_path)) return index;
  return std::nullopt;
}

/// The target rules every adapter config shares.
struct TargetRules {
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  std::vector<int> layers_to_transform;  ///< empty: every layer
  std::vector<LayerPattern> layers_pattern;

  bool selects(const std::string& module_path, bool is_output_head = false) const {
    if (!target_modules.matches(module_path, is_output_head)) return false;
    if (!exclude_modules.empty() && exclude_modules.matches(module_path, is_output_head))
      return false;
    if (!layers_to_transform.empty()) {
      const std::optional<int> layer = layer_index_of(module_path, layers_pattern);
      if (!layer) return false;
      return std::find(layers_to_transform.begin(), layers_to_transform.end(), *layer) !=
             layers_to_transform.end();
    }
    return true;
  }

  /// The four fields, strictly: a layer index is a JSON integer in [0, 2^31) (0.5, -1 and
  /// 4294967296 are errors, not layer 0), every pattern compiles.
  static TargetRules from_json(const nlohmann::json& j, const std::string& source) {
    TargetRules rules;
    auto field = [&](const char* key) -> const nlohmann::json& {
      static const nlohmann::json null_value;  // immutable
      const auto it = j.find(key);
      return it == j.end() ? null_value : *it;
    };
    auto fail = [&](const char* key, const std::string& expected, const nlohmann::json& found) {
      throw ConfigError(source + ": field '" + key + "': expected " + expected + ", found " +
                        pattern_detail::shown_json(found));
    };
    rules.target_modules =
        ModuleSelector::from_json(field("target_modules"), "target_modules", source);
    rules.exclude_modules =
        ModuleSelector::from_json(field("exclude_modules"), "exclude_modules", source);

    const nlohmann::json& layers = field("layers_to_transform");
    auto layer = [&](const nlohmann::json& v) {
      const char* expected = "a layer index (an integer from 0 to 2147483647)";
      if (!v.is_number_integer()) fail("layers_to_transform", expected, v);
      if (v.is_number_unsigned()
              ? v.get<std::uint64_t>() > 2147483647u
              : (v.get<std::int64_t>() < 0 || v.get<std::int64_t>() > 2147483647))
        fail("layers_to_transform", expected, v);
      return static_cast<int>(v.get<std::int64_t>());
    };
    if (layers.is_number())
      rules.layers_to_transform.push_back(layer(layers));
    else if (layers.is_array())
      for (const auto& l : layers) rules.layers_to_transform.push_back(layer(l));
    else if (!layers.is_null())
      fail("layers_to_transform", "a layer index or a list of them", layers);

    const nlohmann::json& pattern = field("layers_pattern");
    const std::string where = source + ": field 'layers_pattern'";
    if (pattern.is_string())
      rules.layers_pattern.emplace_back(pattern.get<std::string>(), where);
    else if (pattern.is_array())
      for (const auto& p : pattern) {
        if (!p.is_string()) fail("layers_pattern", "a pattern (a string) or a list of them", p);
        rules.layers_pattern.emplace_back(p.get<std::string>(), where);
      }
    else if (!pattern.is_null())
      fail("layers_pattern", "a pattern (a string) or a list of them", pattern);
    return rules;
  }
  void to_json(nlohmann::json& j) const {
    j["target_modules"] = target_modules.to_json();
    j["exclude_modules"] = exclude_modules.to_json();
    j["layers_to_transform"] =
        layers_to_transform.empty() ? nlohmann::json(nullptr) : nlohmann::json(layers_to_transform);
    if (layers_pattern.empty()) {
      j["layers_pattern"] = nullptr;
    } else if (layers_pattern.size() == 1) {
      j["layers_pattern"] = layers_pattern[0].text();
    } else {
      nlohmann::json list = nlohmann::json::array();
      for (const LayerPattern& p : layers_pattern) list.push_back(p.text());
      j["layers_pattern"] = std::move(list);
    }
  }
};

/// rank_pattern / alpha_pattern lookup: the value of the first key k whose "(.*\.)?(k)" matches
/// the whole path.
template <class V>
std::optional<V> pattern_lookup(const PatternMap<V>& patterns, std::string_view path) {
  return patterns.lookup(path);
}

}  // namespace peft
