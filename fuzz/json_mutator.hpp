#pragma once
// A structure-aware mutator for the JSON harnesses (LLVMFuzzerCustomMutator). Byte mutations of
// JSON mostly give invalid JSON, which the strict parser rejects at once: type confusion
// ({"peft_type": 3}), edge numbers (1e308, 4294967296, -0.5) and hostile patterns in the right
// field are rarely reached. Half of the mutations here parse the input, change one value of the
// tree (another type, an edge number, a known key added or removed, a string mutated by
// libFuzzer) and write it back; the other half are libFuzzer's byte mutations, which keep the
// parser's own error paths covered.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

namespace peft::fuzz {

namespace detail {

inline void collect(nlohmann::json& value, std::vector<nlohmann::json*>& out) {
  out.push_back(&value);
  if (value.is_object() || value.is_array())
    for (auto& child : value) collect(child, out);
}

inline nlohmann::json edge_value(std::mt19937& rng, std::span<const std::string_view> strings) {
  static const nlohmann::json kEdges[] = {nullptr,
                                          true,
                                          false,
                                          0,
                                          1,
                                          -1,
                                          2,
                                          3,
                                          1000000000,
                                          4294967296LL,
                                          -4294967296LL,
                                          9223372036854775807LL,
                                          std::uint64_t{18446744073709551615ULL},
                                          0.5,
                                          -0.5,
                                          2.0,
                                          1e308,
                                          -1e308,
                                          1e-320,
                                          0.0,
                                          -0.0,
                                          nlohmann::json::array(),
                                          nlohmann::json::object(),
                                          "",
                                          "x",
                                          nlohmann::json::array({0, 1}),
                                          nlohmann::json::array({"x"})};
  constexpr std::size_t kEdgeCount = sizeof kEdges / sizeof kEdges[0];
  const std::size_t pick = rng() % (kEdgeCount + strings.size());
  if (pick < kEdgeCount) return kEdges[pick];
  return std::string(strings[pick - kEdgeCount]);
}

}  // namespace detail

/// One mutation of data[0, size) in place; returns the new size (at most max_size).
/// `strings`: keys and string values worth trying for this harness's file.
inline std::size_t mutate_json(std::uint8_t* data, std::size_t size, std::size_t max_size,
                               unsigned seed, std::span<const std::string_view> strings) {
  std::mt19937 rng(seed);
  if (rng() % 2 == 0) return LLVMFuzzerMutate(data, size, max_size);
  nlohmann::json root =
      nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return LLVMFuzzerMutate(data, size, max_size);

  std::vector<nlohmann::json*> values;
  detail::collect(root, values);
  nlohmann::json& target = *values[rng() % values.size()];
  switch (rng() % 6) {
    case 0:  // another value, of any type
    case 1:
      target = detail::edge_value(rng, strings);
      break;
    case 2:  // a known key added to an object (or the value wrapped in a list)
      if (target.is_object() && !strings.empty())
        target[std::string(strings[rng() % strings.size()])] = detail::edge_value(rng, strings);
      else
        target = nlohmann::json::array({target});
      break;
    case 3:  // a member or element removed
      if ((target.is_object() || target.is_array()) && !target.empty()) {
        auto it = target.begin();
        std::advance(it, static_cast<std::ptrdiff_t>(rng() % target.size()));
        target.erase(it);
      } else {
        target = nullptr;
      }
      break;
    case 4:  // a string's bytes mutated by libFuzzer (patterns, names, dtypes)
      if (target.is_string()) {
        std::string text = target.get<std::string>();
        if (text.empty()) text = "x";
        const std::size_t room = text.size() + 64;
        text.resize(room);
        text.resize(
            LLVMFuzzerMutate(reinterpret_cast<std::uint8_t*>(text.data()), room - 64, room));
        target = text;  // invalid UTF-8 makes dump() throw: caught below
      } else if (target.is_number()) {
        target = target.get<double>() * ((rng() % 2) ? 1000.0 : -1.0);
      }
      break;
    default: {  // a subtree copied over another (deep nesting, repeated structure)
      nlohmann::json copy = *values[rng() % values.size()];  // may be target's own ancestor
      target = std::move(copy);
      break;
    }
  }
  std::string text;
  try {
    text = root.dump();
  } catch (const nlohmann::json::exception&) {
    return LLVMFuzzerMutate(data, size, max_size);
  }
  if (text.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, text.data(), text.size());
  return text.size();
}

}  // namespace peft::fuzz
