#pragma once
// Config field tables: a method's hyper-parameters declared once, one line per field of the
// reference's adapter_config.json, from which reading, writing, defaults and error messages
// follow.
//
//   struct MyConfig {
//     int r = 8;
//     double dropout = 0.0;
//     TargetRules targets;
//     static constexpr std::string_view peft_type = "MY_METHOD";   // written and required
//     static auto fields() {
//       return config_fields(field("r", &MyConfig::r, check::positive),
//                            field("dropout", &MyConfig::dropout, check::probability),
//                            targets_field(&MyConfig::targets),
//                            fixed("bias", "none"), fan_in_fan_out(),
//                            constants({{"megatron_core", "megatron.core"}}));
//     }
//   };
//   MyConfig c = read_config<MyConfig>(json, "adapter_config.json");
//   nlohmann::json j = write_config(c, model);   // ModelConfig: fan_in_fan_out follows it
//
// READING: a key that is absent or null keeps the member's default (the value in `MyConfig{}`).
// A present key must have the member's JSON type exactly (an integer field rejects 0.5 and
// 4294967296; a bool field rejects 1; a number field rejects a non-finite value; a
// PatternMap's keys must compile, target_modules.hpp); then the field's check runs (the
// `check::` functors below: ranges, and the upper bounds of `limits`). Every error is a ConfigError
// "<source>: field '<key>': expected <what>, found <json>". Keys the table does not name are
// ignored (the reference adds fields between versions).
// WRITING: every field writes its key; `constants` keys are written and never read; `fixed` keys
// are written with their one value and, when read, must hold it (or be null).
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"

namespace peft {

namespace config_detail {

[[noreturn]] inline void fail(const std::string& source, std::string_view key,
                              const std::string& expected, const nlohmann::json& found) {
  throw_field_error(source, key, expected, found);
}

template <class M>
struct is_string_map : std::false_type {};
template <class V>
struct is_string_map<std::map<std::string, V>> : std::true_type {};
template <class M>
struct is_pattern_map : std::false_type {};
template <class V>
struct is_pattern_map<PatternMap<V>> : std::true_type {};
template <class M>
struct is_vector : std::false_type {};
template <class V>
struct is_vector<std::vector<V>> : std::true_type {};

template <class M>
std::string type_name() {
  if constexpr (std::is_same_v<M, bool>)
    return "true or false";
  else if constexpr (std::is_integral_v<M>)
    return "an integer";
  else if constexpr (std::is_floating_point_v<M>)
    return "a number";
  else if constexpr (std::is_same_v<M, std::string>)
    return "a string";
  else if constexpr (is_vector<M>::value)
    return "a list of " + type_name<typename M::value_type>() + "s";
  else if constexpr (is_string_map<M>::value)
    return "an object of " + type_name<typename M::mapped_type>() + "s";
  else if constexpr (is_pattern_map<M>::value)
    return "an object of patterns to " + type_name<typename M::mapped_type>() + "s";
  else
    return "a value";
}

/// A JSON value as M, strictly (no float → int, no number → bool conversions).
template <class M>
M read_value(const nlohmann::json& v, const std::string& source, std::string_view key) {
  if constexpr (std::is_same_v<M, bool>) {
    if (!v.is_boolean()) fail(source, key, type_name<M>(), v);
    return v.get<bool>();
  } else if constexpr (std::is_integral_v<M>) {
    if (!v.is_number_integer()) fail(source, key, type_name<M>(), v);
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<M>::max()))
        fail(source, key, "an integer of at most " + std::to_string(std::numeric_limits<M>::max()),
             v);
      return static_cast<M>(u);
    }
    const auto i = v.get<std::int64_t>();
    if (i < static_cast<std::int64_t>(std::numeric_limits<M>::min()) ||
        (i > 0 &&
         static_cast<std::uint64_t>(i) > static_cast<std::uint64_t>(std::numeric_limits<M>::max())))
      fail(source, key,
           "an integer in the range of " + std::string(sizeof(M) == 4 ? "int32" : "int64"), v);
    return static_cast<M>(i);
  } else if constexpr (std::is_floating_point_v<M>) {
    if (!v.is_number()) fail(source, key, type_name<M>(), v);
    const double x = v.get<double>();
    if (!std::isfinite(x)) fail(source, key, "a finite number", v);
    return static_cast<M>(x);
  } else if constexpr (std::is_same_v<M, std::string>) {
    if (!v.is_string()) fail(source, key, type_name<M>(), v);
    return v.get<std::string>();
  } else if constexpr (is_vector<M>::value) {
    if (!v.is_array()) fail(source, key, type_name<M>(), v);
    M out;
    for (const auto& item : v) out.push_back(read_value<typename M::value_type>(item, source, key));
    return out;
  } else if constexpr (is_string_map<M>::value) {
    if (!v.is_object()) fail(source, key, type_name<M>(), v);
    M out;
    for (const auto& [k, item] : v.items())
      out.emplace(k, read_value<typename M::mapped_type>(item, source, std::string(key) + "." + k));
    return out;
  } else if constexpr (is_pattern_map<M>::value) {
    // Each key is compiled here, once; a key RE2 refuses names the field.
    return M(read_value<typename M::map_type>(v, source, key),
             source + ": field '" + std::string(key) + "'");
  } else {
    static_assert(sizeof(M) == 0, "config field: no JSON reader for this member type");
  }
}

template <class M>
nlohmann::json write_value(const M& value) {
  if constexpr (std::is_floating_point_v<M>)
    return detail::json_number(static_cast<double>(value));  // the reference writes 8, not 8.0
  else if constexpr (is_string_map<M>::value || is_pattern_map<M>::value) {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& [k, v] : value) j[k] = write_value(v);
    return j;
  } else {
    return value;
  }
}

}  // namespace config_detail

/// Upper bounds on config values that size tensors or scale activations. The reference has no
/// such bounds (Python allocates until the machine says no); here a value past them is a
/// ConfigError naming the field when the config is read, instead of std::bad_alloc, or
/// infinities in the logits, once the model is built.
namespace limits {
/// The largest rank, width, virtual-token count or layer count a config may ask for: 2^16.
/// Each such value is one dimension of an adapter tensor; at 65,536 one LoRA module on a
/// 1,024-wide layer already holds 512 MiB of float32 factors, far beyond any model this CPU
/// library trains, so a larger value is a typo (r: 80000000), not a plan.
inline constexpr std::int64_t max_dimension = 65536;
/// The largest magnitude of a scale factor (lora_alpha, alpha, scaling, d_initial): float32's
/// largest finite value, since the models compute in float32 and a larger α / r would be an
/// infinite scale.
inline constexpr double max_scale = 3.4028234663852886e38;
}  // namespace limits

/// Field checks: each returns an empty string when the value is acceptable, else what was
/// expected.
namespace check {
struct None {
  template <class M>
  std::string operator()(const M&) const {
    return {};
  }
};
inline constexpr None none{};
struct Positive {
  template <class M>
  std::string operator()(const M& v) const {
    return v > M(0) ? std::string() : "a positive value";
  }
};
inline constexpr Positive positive{};
struct NonNegative {
  template <class M>
  std::string operator()(const M& v) const {
    return v >= M(0) ? std::string() : "a value >= 0";
  }
};
inline constexpr NonNegative non_negative{};
/// A dropout probability: 0 <= p < 1, as the reference's nn.Dropout allows for training.
struct Probability {
  std::string operator()(double p) const {
    return p >= 0.0 && p < 1.0 ? std::string() : "a probability in [0, 1)";
  }
};
inline constexpr Probability probability{};
/// 0 < x <= 1 (densities, fractions).
struct Fraction {
  std::string operator()(double p) const {
    return p > 0.0 && p <= 1.0 ? std::string() : "a fraction in (0, 1]";
  }
};
inline constexpr Fraction fraction{};
/// Every list entry or map value positive.
struct AllPositive {
  template <class M>
  std::string operator()(const M& v) const {
    if constexpr (config_detail::is_string_map<M>::value ||
                  config_detail::is_pattern_map<M>::value) {
      for (const auto& [k, x] : v)
        if (!(x > 0)) return "positive values";
    } else {
      for (const auto& x : v)
        if (!(x > 0)) return "positive values";
    }
    return {};
  }
};
inline constexpr AllPositive all_positive{};
/// A tensor dimension (rank, width, token or layer count): 1 ..= limits::max_dimension, or
/// 0 ..= limits::max_dimension where 0 means "derived from the model" / "not recorded".
struct Dimension {
  bool zero_allowed = false;
  template <class M>
  std::string operator()(const M& v) const {
    if constexpr (config_detail::is_string_map<M>::value ||
                  config_detail::is_pattern_map<M>::value) {
      for (const auto& [k, x] : v)
        if (const std::string e = (*this)(x); !e.empty()) return e + " for every key";
      return {};
    } else {
      if (static_cast<std::int64_t>(v) < (zero_allowed ? 0 : 1))
        return zero_allowed ? "a value >= 0" : "a positive value";
      if (static_cast<std::int64_t>(v) > limits::max_dimension)
        return "at most " + std::to_string(limits::max_dimension) +
               " (limits::max_dimension: larger tensors than any model here can hold)";
      return {};
    }
  }
};
inline constexpr Dimension dimension{false};
inline constexpr Dimension dimension_or_zero{true};
/// A scale factor: |x| <= limits::max_scale (float32's range), every value of a map.
struct Scale {
  std::string operator()(double x) const {
    return std::isfinite(x) && std::abs(x) <= limits::max_scale
               ? std::string()
               : "a number of magnitude at most 3.4e38 (float32's range: the models compute in "
                 "float32)";
  }
  template <class M>
  requires(config_detail::is_string_map<M>::value ||
           config_detail::is_pattern_map<M>::value) std::string
  operator()(const M& v) const {
    for (const auto& [k, x] : v)
      if (const std::string e = (*this)(x); !e.empty()) return e + " for every key";
    return {};
  }
};
inline constexpr Scale scale{};
/// Every list entry >= 0 (indices).
struct AllNonNegative {
  template <class M>
  std::string operator()(const M& v) const {
    for (const auto& x : v)
      if (x < 0) return "indices >= 0";
    return {};
  }
};
inline constexpr AllNonNegative all_non_negative{};
}  // namespace check

/// One member read from and written to one key.
template <class C, class M, class Check>
struct Field {
  std::string_view key;
  M C::*member;
  Check check;

  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    const nlohmann::json& v = detail::json_field(j, std::string(key).c_str());
    if (v.is_null()) return;
    M value = config_detail::read_value<M>(v, source, key);
    if (const std::string expected = check(value); !expected.empty())
      config_detail::fail(source, key, expected, v);
    c.*member = std::move(value);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const {
    j[std::string(key)] = config_detail::write_value(c.*member);
  }
};

template <class C, class M, class Check = check::None>
constexpr Field<C, M, Check> field(std::string_view key, M C::*member, Check c = {}) {
  return {key, member, c};
}

/// An enum member whose JSON form is one of several values (e.g. init_lora_weights: true,
/// false, "gaussian", "pissa").
template <class C, class E, std::size_t N>
struct ChoiceField {
  std::string_view key;
  E C::*member;
  std::array<std::pair<nlohmann::json, E>, N> choices;

  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    const nlohmann::json& v = detail::json_field(j, std::string(key).c_str());
    if (v.is_null()) return;
    for (const auto& [json, value] : choices)
      if (json == v) {
        c.*member = value;
        return;
      }
    std::string expected = "one of";
    for (const auto& [json, value] : choices) {
      expected += ' ';
      expected += json.dump();  // appended, not "+": GCC 12's false -Wrestrict (bug 105329)
    }
    config_detail::fail(source, key, expected, v);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const {
    for (const auto& [json, value] : choices)
      if (value == c.*member) {
        j[std::string(key)] = json;
        return;
      }
  }
};

template <class C, class E, class... Choices>
auto choice(std::string_view key, E C::*member, Choices... choices) {
  return ChoiceField<C, E, sizeof...(Choices)>{
      key, member, {std::pair<nlohmann::json, E>(choices.first, choices.second)...}};
}

/// Keys written with one value each and ignored when read (the reference's fields this library
/// has no use for: megatron_core, loftq_config, ...): one JSON object of them.
struct ConstantFields {
  nlohmann::json values;
  template <class C>
  void read(C&, const nlohmann::json&, const std::string&) const {}
  template <class C>
  void write(const C&, nlohmann::json& j, const ModelConfig&) const {
    for (const auto& [key, value] : values.items()) j[key] = value;
  }
};
inline ConstantFields constants(nlohmann::json values) { return {std::move(values)}; }

/// fan_in_fan_out: written as the reference writes it for the model (true for GPT-2's Conv1D
/// [in, out] weights); read and ignored, since the model's layout decides.
struct FanInFanOutField {
  template <class C>
  void read(C&, const nlohmann::json&, const std::string&) const {}
  template <class C>
  void write(const C&, nlohmann::json& j, const ModelConfig& model) const {
    j["fan_in_fan_out"] = model.model_type == "gpt2";
  }
};
inline FanInFanOutField fan_in_fan_out() { return {}; }

/// A key written with one value that, when read, must hold it or be null (what this library
/// does not support: lora_bias true, bias "all", modules_to_save, ...).
struct FixedField {
  std::string_view key;
  nlohmann::json value;
  std::string_view unsupported;  ///< why another value is refused
  template <class C>
  void read(C&, const nlohmann::json& j, const std::string& source) const {
    const nlohmann::json& v = detail::json_field(j, std::string(key).c_str());
    if (v.is_null() || v == value) return;
    config_detail::fail(
        source, key,
        value.dump() + (unsupported.empty() ? "" : " (" + std::string(unsupported) + ")"), v);
  }
  template <class C>
  void write(const C&, nlohmann::json& j, const ModelConfig&) const {
    j[std::string(key)] = value;
  }
};
inline FixedField fixed(std::string_view key, nlohmann::json value,
                        std::string_view unsupported = "not supported") {
  return {key, std::move(value), unsupported};
}

/// A double written as the value it holds (0.0 stays 0.0, 1.0 stays 1.0, as the reference writes
/// dropouts and densities), where `field` writes integral values as integers (8, not 8.0).
template <class C, class Check>
struct FloatField : Field<C, double, Check> {
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const {
    j[std::string(this->key)] = c.*(this->member);
  }
};
template <class C, class Check = check::None>
FloatField<C, Check> float_field(std::string_view key, double C::*member, Check test = {}) {
  return {{key, member, test}};
}

/// A member struct's own field table, read and written at the top level of the config (the
/// struct's validate, if any, runs after its fields are read).
template <class C, class Sub, class Table>
struct NestedFields {
  Sub C::*member;
  Table table;
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    std::apply([&](const auto&... f) { (f.read(c.*member, j, source), ...); }, table.fields);
    if constexpr (requires { (c.*member).validate(source); }) (c.*member).validate(source);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig& model) const {
    std::apply([&](const auto&... f) { (f.write(c.*member, j, model), ...); }, table.fields);
  }
};
template <class C, class Sub, class Table>
NestedFields<C, Sub, Table> nested_fields(Sub C::*member, Table table) {
  return {member, std::move(table)};
}

/// The target rules (target_modules, exclude_modules, layers_to_transform, layers_pattern).
template <class C>
struct TargetsField {
  TargetRules C::*member;
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    c.*member = TargetRules::from_json(j, source);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const { (c.*member).to_json(j); }
};
template <class C>
TargetsField<C> targets_field(TargetRules C::*member) {
  return {member};
}

/// A config's field table, as returned by its static `fields()`.
template <class... F>
struct ConfigFields {
  std::tuple<F...> fields;
};
template <class... F>
ConfigFields<F...> config_fields(F... fields) {
  return {std::tuple<F...>(std::move(fields)...)};
}

/// A config with a field table (see the top of this file).
template <class C>
concept TabledConfig = std::default_initializable<C> && requires {
  { C::peft_type } -> std::convertible_to<std::string_view>;
  C::fields();
};

/// Reads every field of C's table from an adapter_config.json (peft_type must be C's), then
/// runs `c.validate(source)` when C has one (checks that span several fields).
template <TabledConfig C>
C read_config(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object())
    throw ConfigError(source + ": expected a JSON object, found " + std::string(j.type_name()));
  detail::require_peft_type(j, std::string(C::peft_type), source);
  C c{};
  std::apply([&](const auto&... f) { (f.read(c, j, source), ...); }, C::fields().fields);
  if constexpr (requires { c.validate(source); }) c.validate(source);
  return c;
}

/// The adapter_config.json of C on `model`: the common header, then every field of the table.
template <TabledConfig C>
nlohmann::json write_config(const C& c, const ModelConfig& model) {
  nlohmann::json j = detail::adapter_config_header(std::string(C::peft_type));
  std::apply([&](const auto&... f) { (f.write(c, j, model), ...); }, C::fields().fields);
  return j;
}

/// `C::from_json` / `c.to_json(model)` from C's field table, for a config struct that derives
/// from it (`struct MyConfig : ConfigIo<MyConfig>`): the members the rest of the library and
/// the tests call, without writing them.
template <class C>
struct ConfigIo {
  static C from_json(const nlohmann::json& j, const std::string& source) {
    return read_config<C>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    return write_config(static_cast<const C&>(*this), model);
  }
};

/// Whether an adapter_config.json's peft_type is `type` (and, given, `flag` is not true).
inline bool is_peft_type(const nlohmann::json& j, std::string_view type,
                         const char* unless_flag = nullptr) {
  if (!j.is_object()) return false;
  const auto it = j.find("peft_type");
  if (it == j.end() || !it->is_string() || it->get<std::string>() != type) return false;
  if (!unless_flag) return true;
  const auto flag = j.find(unless_flag);
  return flag == j.end() || !flag->is_boolean() || !flag->get<bool>();
}

}  // namespace peft

namespace peft {

/// A config's adapter_config.json: its own `to_json(model)` when it has one, else its table's.
template <class C>
nlohmann::json config_to_json(const C& c, const ModelConfig& model) {
  if constexpr (requires { c.to_json(model); })
    return c.to_json(model);
  else
    return write_config(c, model);
}

/// A config from an adapter_config.json: its own `from_json` when it has one, else its table.
template <class C>
C config_from_json(const nlohmann::json& j, const std::string& source) {
  if constexpr (requires { C::from_json(j, source); })
    return C::from_json(j, source);
  else
    return read_config<C>(j, source);
}

/// Whether a method reads an adapter_config.json: its own `accepts`, else its table's peft_type.
template <class P>
bool method_accepts(const nlohmann::json& j) {
  if constexpr (requires { P::accepts(j); })
    return P::accepts(j);
  else
    return is_peft_type(j, P::Config::peft_type);
}

}  // namespace peft
