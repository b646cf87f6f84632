#pragma once
// The methods that can be loaded from a reference adapter_config.json, as one type list.
// A new file-loadable method adds its policy here (it needs `static bool accepts(json)` and
// `Config::from_json(json, source)`).
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/methods/reparameterized/lora.hpp"

namespace peft {

template <class... Policies>
struct PolicyList {};

using LoadablePolicies = PolicyList<LoRA>;

/// Calls `visitor.template operator()<P>()` for the first P of the list accepting `config`;
/// returns false when none does.
template <class Visitor, class... Policies>
bool visit_policy_for(const nlohmann::json& config, Visitor&& visitor, PolicyList<Policies...>) {
  bool found = false;
  ((!found && Policies::accepts(config) ? (found = true, visitor.template operator()<Policies>(), 0)
                                        : 0),
   ...);
  return found;
}

template <class Visitor>
bool visit_policy_for(const nlohmann::json& config, Visitor&& visitor) {
  return visit_policy_for(config, std::forward<Visitor>(visitor), LoadablePolicies{});
}

/// Calls `visitor.template operator()<Arch>()` for the architecture of a model config.
template <class Visitor>
void visit_arch_for(const std::string& model_type, Visitor&& visitor) {
  if (model_type == arch::Gpt2::model_type) visitor.template operator()<arch::Gpt2>();
  else if (model_type == arch::Llama::model_type) visitor.template operator()<arch::Llama>();
  else throw ConfigError("unknown architecture '" + model_type + "' (supported: gpt2, llama)");
}

}  // namespace peft
