#pragma once
// The methods that can be loaded from a reference adapter_config.json, as one type list.
// A new file-loadable method adds its policy here (it needs `static bool accepts(json)` and
// `Config::from_json(json, source)`).
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/ia3.hpp"
#include "peft/methods/additive/p_tuning.hpp"
#include "peft/methods/additive/prefix_tuning.hpp"
#include "peft/methods/additive/prompt_tuning.hpp"
#include "peft/methods/additive/ssf.hpp"
#include "peft/methods/reparameterized/adalora.hpp"
#include "peft/methods/reparameterized/dora.hpp"
#include "peft/methods/reparameterized/dylora.hpp"
#include "peft/methods/reparameterized/loha.hpp"
#include "peft/methods/reparameterized/lokr.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/methods/reparameterized/vera.hpp"
#include "peft/methods/selective/bitfit.hpp"
#include "peft/methods/selective/diff_pruning.hpp"
#include "peft/methods/selective/fishmask.hpp"
#include "peft/methods/selective/ln_tuning.hpp"
#include "peft/methods/selective/masks.hpp"
#include "peft/methods/selective/structured.hpp"

namespace peft {

template <class... Policies>
struct PolicyList {};

using LoadablePolicies =
    PolicyList<LoRA, DoRA, VeRA, LoHa, LoKr, AdaLoRA, DyLoRA, IA3, PrefixTuning, PromptTuning,
               PTuning, SSF, SerialAdapter, PfeifferAdapter, ParallelAdapter, BitFit, LNTuning,
               UnstructuredMask, FishMask, DiffPruning, StructuredMask>;

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
  if (model_type == arch::Gpt2::model_type)
    visitor.template operator()<arch::Gpt2>();
  else if (model_type == arch::Llama::model_type)
    visitor.template operator()<arch::Llama>();
  else
    throw ConfigError("unknown architecture '" + model_type + "' (supported: gpt2, llama)");
}

}  // namespace peft
