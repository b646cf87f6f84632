#pragma once
// Helpers for reading JSON that comes from outside the program (adapter_config.json, config.json,
// safetensors headers). Every problem becomes a peft::FileError whose message names the file and,
// where it applies, the field, the type that was expected and what was found instead.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/printable.hpp"

namespace peft::io {

/// Config files are small; anything bigger than this is refused before it is read.
inline constexpr std::uintmax_t kMaxJsonFileBytes = 16u * 1024u * 1024u;

/// Deeper nesting than this is refused: no config or header we read nests more than a few
/// levels, and a bound keeps a hostile "[[[[..." from costing unbounded memory.
inline constexpr std::size_t kMaxJsonDepth = 64;

/// Describes a JSON value for "found ..." in messages: its type, and for scalars its value.
inline std::string describe_json(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::null:
      return "null";
    case nlohmann::json::value_t::boolean:
      return value.get<bool>() ? "true" : "false";
    case nlohmann::json::value_t::string:
      return "string \"" + printable(value.get_ref<const std::string&>(), 60) + "\"";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
      return "number " + value.dump();
    case nlohmann::json::value_t::array:
      return "array";
    case nlohmann::json::value_t::object:
      return "object";
    case nlohmann::json::value_t::binary:
      return "binary";
    case nlohmann::json::value_t::discarded:
      return "discarded value";
  }
  return "unknown value";
}

namespace detail {

/// Builds the parsed value itself, one event at a time: each event does constant work plus a
/// key lookup in its own object, so parsing is linear in the text (nlohmann's callback parser
/// rescans the parent object at every close: quadratic in the number of tensors of a header).
/// Refuses duplicate keys in any object and nesting deeper than kMaxJsonDepth.
class StrictJsonBuilder {
 public:
  using json = nlohmann::json;
  StrictJsonBuilder(json& root, const std::string& display_name)
      : root_(root), name_(display_name) {}

  bool null() { return put(json(nullptr)); }
  bool boolean(bool value) { return put(json(value)); }
  bool number_integer(json::number_integer_t value) { return put(json(value)); }
  bool number_unsigned(json::number_unsigned_t value) { return put(json(value)); }
  bool number_float(json::number_float_t value, const json::string_t& /*text*/) {
    return put(json(value));
  }
  bool string(json::string_t& value) { return put(json(std::move(value))); }
  bool binary(json::binary_t& value) { return put(json::binary(std::move(value))); }
  bool start_object(std::size_t /*elements*/) { return open(json::object()); }
  bool start_array(std::size_t /*elements*/) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(json::string_t& value) {
    json& object = *stack_.back();
    if (object.contains(value))
      throw FileError(printable(name_) + ": duplicate JSON key '" + printable(value) + "'");
    // The slot is created now and filled by the value event that follows.
    pending_ = &object[value];
    return true;
  }
  bool parse_error(std::size_t position, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& error) {
    // The message carries "at line L, column C"; the 0-based byte offset (position counts from
    // 1) helps with one-line JSON such as a safetensors header.
    const std::size_t offset = position > 0 ? position - 1 : 0;
    throw FileError(printable(name_) + ": invalid JSON at byte offset " + std::to_string(offset) +
                    ": " + printable(error.what(), 300));
  }

 private:
  json* slot() {
    if (stack_.empty()) return &root_;
    json& parent = *stack_.back();
    if (parent.is_array()) {
      parent.push_back(json());
      return &parent.back();
    }
    return pending_;
  }
  bool put(json&& value) {
    *slot() = std::move(value);
    return true;
  }
  bool open(json&& container) {
    if (stack_.size() >= kMaxJsonDepth)
      throw FileError(printable(name_) + ": JSON nests deeper than " +
                      std::to_string(kMaxJsonDepth) + " levels");
    json* target = slot();
    *target = std::move(container);
    stack_.push_back(target);
    return true;
  }
  bool close() {
    stack_.pop_back();
    return true;
  }

  json& root_;
  const std::string& name_;
  std::vector<json*> stack_;  // open containers; elements never move while their parent is open
  json* pending_ = nullptr;   // the object slot the next value fills
};

/// Parses text as strict JSON (no comments, no trailing garbage), additionally refusing
/// duplicate keys in any object and nesting deeper than kMaxJsonDepth. nlohmann::json silently
/// keeps the last of two equal keys, so a file could show one value to us and another to a
/// reader that keeps the first; refusing both is the only safe answer.
inline nlohmann::json parse_json_strict(std::string_view text, const std::string& display_name) {
  nlohmann::json root;
  StrictJsonBuilder builder(root, display_name);
  try {
    nlohmann::json::sax_parse(text.begin(), text.end(), &builder,
                              nlohmann::json::input_format_t::json, /*strict=*/true,
                              /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(printable(display_name) + ": invalid JSON: " + printable(e.what(), 300));
  }
  return root;
}

template <class T>
struct IsStdVector : std::false_type {};
template <class T, class A>
struct IsStdVector<std::vector<T, A>> : std::true_type {};

template <class T>
struct IsStringMap : std::false_type {};
template <class T, class C, class A>
struct IsStringMap<std::map<std::string, T, C, A>> : std::true_type {};

template <class T>
std::string expected_type_name() {
  if constexpr (std::is_same_v<T, nlohmann::json>) {
    return "any value";
  } else if constexpr (std::is_same_v<T, bool>) {
    return "boolean";
  } else if constexpr (std::is_same_v<T, std::string>) {
    return "string";
  } else if constexpr (std::is_integral_v<T>) {
    return std::is_signed_v<T> ? "integer" : "non-negative integer";
  } else if constexpr (std::is_floating_point_v<T>) {
    return "number";
  } else if constexpr (IsStdVector<T>::value) {
    return "array of " + expected_type_name<typename T::value_type>();
  } else if constexpr (IsStringMap<T>::value) {
    return "object of " + expected_type_name<typename T::mapped_type>();
  } else {
    static_assert(!sizeof(T),
                  "json_get supports bool, std::string, integers, floating point, "
                  "nlohmann::json, std::vector and std::map<std::string, ...> of them");
  }
}

template <class T>
[[noreturn]] void throw_field_error(const std::string& file, std::string_view path,
                                    const nlohmann::json& found, std::string_view note = {}) {
  std::string message =
      printable(file) + ": field '" + printable(path) + "' expected " + expected_type_name<T>();
  if (!note.empty()) {
    message += " ";
    message += note;
  }
  message += ", found " + describe_json(found);
  throw FileError(message);
}

/// Converts one JSON value to T with full checking; `path` names the value in messages
/// ("lora_alpha", "target_modules[2]").
template <class T>
T convert_json(const nlohmann::json& value, std::string_view path, const std::string& file) {
  if constexpr (std::is_same_v<T, nlohmann::json>) {
    return value;
  } else if constexpr (std::is_same_v<T, bool>) {
    if (!value.is_boolean()) throw_field_error<T>(file, path, value);
    return value.get<bool>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!value.is_string()) throw_field_error<T>(file, path, value);
    return value.get<std::string>();
  } else if constexpr (std::is_integral_v<T>) {
    // Checked by hand: nlohmann's get<int>() would silently truncate 4.7 and wrap 2^40.
    const std::string range = "in [" + std::to_string(std::numeric_limits<T>::min()) + ", " +
                              std::to_string(std::numeric_limits<T>::max()) + "]";
    if (value.is_number_unsigned()) {
      const auto raw = value.get<std::uint64_t>();
      if (raw > static_cast<std::uint64_t>(std::numeric_limits<T>::max())) {
        throw_field_error<T>(file, path, value, range);
      }
      return static_cast<T>(raw);
    }
    if (value.is_number_integer()) {
      const auto raw = value.get<std::int64_t>();
      if constexpr (std::is_unsigned_v<T>) {
        if (raw < 0) throw_field_error<T>(file, path, value);
      } else {
        if (raw < static_cast<std::int64_t>(std::numeric_limits<T>::min()) ||
            raw > static_cast<std::int64_t>(std::numeric_limits<T>::max())) {
          throw_field_error<T>(file, path, value, range);
        }
      }
      return static_cast<T>(raw);
    }
    throw_field_error<T>(file, path, value);
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!value.is_number()) throw_field_error<T>(file, path, value);
    return value.get<T>();
  } else if constexpr (IsStdVector<T>::value) {
    if (!value.is_array()) throw_field_error<T>(file, path, value);
    T result;
    result.reserve(value.size());
    for (std::size_t i = 0; i < value.size(); ++i) {
      const std::string element_path = std::string(path) + "[" + std::to_string(i) + "]";
      result.push_back(convert_json<typename T::value_type>(value[i], element_path, file));
    }
    return result;
  } else if constexpr (IsStringMap<T>::value) {
    if (!value.is_object()) throw_field_error<T>(file, path, value);
    T result;
    for (const auto& [key, element] : value.items()) {
      const std::string element_path = std::string(path) + "." + key;
      result.emplace(key, convert_json<typename T::mapped_type>(element, element_path, file));
    }
    return result;
  } else {
    static_assert(!sizeof(T), "unsupported type for json_get");
  }
}

inline void require_object(const nlohmann::json& obj, std::string_view key,
                           const std::string& file) {
  if (!obj.is_object()) {
    throw FileError(printable(file) + ": expected a JSON object holding field '" + printable(key) +
                    "', found " + describe_json(obj));
  }
}

}  // namespace detail

/// Reads and parses a JSON file that may be missing, huge or malformed.
/// Throws FileError naming the file (and, for syntax errors, the position).
inline nlohmann::json load_json(const std::filesystem::path& path) {
  const std::vector<std::uint8_t> bytes = read_regular_file(path, kMaxJsonFileBytes, "JSON file");
  return detail::parse_json_strict(
      std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path.string());
}

/// Returns obj[key] as T. Missing key or wrong type: FileError
/// "<file>: field '<key>' expected <type>, found <what>".
/// T: bool, std::string, any integer type (range-checked, no truncation of 4.5), float, double,
/// nlohmann::json, and std::vector / std::map<std::string, ...> of these.
template <class T>
T json_get(const nlohmann::json& obj, std::string_view key, const std::string& file) {
  detail::require_object(obj, key, file);
  const auto it = obj.find(std::string(key));
  if (it == obj.end()) {
    throw FileError(printable(file) + ": field '" + printable(key) + "' expected " +
                    detail::expected_type_name<T>() + ", found nothing (missing)");
  }
  return detail::convert_json<T>(*it, key, file);
}

/// Like json_get, but a missing key or a null value gives default_value.
template <class T>
T json_get_or(const nlohmann::json& obj, std::string_view key, T default_value,
              const std::string& file) {
  detail::require_object(obj, key, file);
  const auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) return default_value;
  return detail::convert_json<T>(*it, key, file);
}

/// A string literal default means a std::string result, not a const char*.
inline std::string json_get_or(const nlohmann::json& obj, std::string_view key,
                               const char* default_value, const std::string& file) {
  return json_get_or<std::string>(obj, key, std::string(default_value), file);
}

}  // namespace peft::io
