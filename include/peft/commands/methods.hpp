#pragma once
// `peft methods`: every method of a registry, one line each — family, name, whether the
// reference library (HF peft) has it (its peft_type), the source paper:
//
//   reparameterized  lora              LORA           Hu et al., 2021, LoRA: ...
//   additive         ssf               -              Lian et al., 2022, Scaling & Shifting ...
//
// A policy says where it comes from with two optional members (methods/policy.hpp, section 1):
//   static constexpr std::string_view paper;      // "Authors, year, title"
//   static constexpr std::string_view reference;  // the reference's peft_type, "" when none
// and a method that has neither prints "-" there. `--json` prints the same as a JSON array.
#include <iomanip>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "peft/methods/registry.hpp"

namespace peft::commands {

/// What `peft methods` says of one method.
struct MethodInfo {
  std::string_view family, name, title, reference, paper;
};

template <class P>
MethodInfo method_info() {
  MethodInfo info{P::family::name, P::name, method_title<P>(), {}, {}};
  if constexpr (requires { P::paper; }) info.paper = P::paper;
  if constexpr (requires { P::reference; }) info.reference = P::reference;
  return info;
}

/// Every method of `Registry`, in registry order.
template <class Registry = BuiltinMethods>
std::vector<MethodInfo> list_methods() {
  std::vector<MethodInfo> out;
  Registry::for_each([&]<class P>() { out.push_back(method_info<P>()); });
  return out;
}

/// `peft methods [--json]`. Returns the exit status (2: an unknown flag).
template <class Registry = BuiltinMethods>
int run_methods(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  bool json = false;
  for (const std::string& a : args) {
    if (a == "--json") {
      json = true;
      continue;
    }
    err << "peft methods: unknown argument '" << a << "' (expected --json or nothing)\n";
    return 2;
  }
  const std::vector<MethodInfo> methods = list_methods<Registry>();
  if (json) {
    nlohmann::json rows = nlohmann::json::array();
    for (const MethodInfo& m : methods)
      rows.push_back({{"family", m.family},
                      {"name", m.name},
                      {"title", m.title},
                      {"reference_peft_type",
                       m.reference.empty() ? nlohmann::json() : nlohmann::json(m.reference)},
                      {"paper", m.paper}});
    out << rows.dump(1) << '\n';
    return 0;
  }
  const auto dash = [](std::string_view s) {
    return s.empty() ? std::string("-") : std::string(s);
  };
  out << std::left << std::setw(17) << "family" << std::setw(19) << "name" << std::setw(17)
      << "reference"
      << "paper\n";
  for (const MethodInfo& m : methods)
    out << std::left << std::setw(17) << m.family << std::setw(19) << m.name << std::setw(17)
        << dash(m.reference) << dash(m.paper) << '\n';
  out << methods.size() << " methods\n";
  return 0;
}

}  // namespace peft::commands
