#pragma once
// The method registry: which methods the commands and runners know (adapter files dispatched on
// `accepts`, methods named on the command line). It is a type, not a global list: an outside
// project extends it without editing the library,
//
//   using MyMethods = peft::BuiltinMethods::with<OutputShift>;
//   MyMethods::visit_for(adapter_json, [&]<class P>() { ... });     // the first that accepts
//   MyMethods::visit_named("output_shift", [&]<class P>() { ... });
//
// in the user's own program. A prebuilt `peft` binary knows BuiltinMethods only: a method
// compiled later reaches the library's runners through the user's program (the study:
// experiment::run_study with extra rows), not through plugins (a shared-object plugin would need
// a stable ABI for templates instantiated on the user's types, which a header-only template
// library does not have). The registry-dependent commands are installed library functions
// templated on a registry (include/peft/commands/: run_count, run_generate, and main<Registry>,
// a whole `peft`-style front end in one line of the user's main).
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/compacter.hpp"
#include "peft/methods/additive/ia3.hpp"
#include "peft/methods/additive/llama_adapter.hpp"
#include "peft/methods/additive/p_tuning.hpp"
#include "peft/methods/additive/prefix_tuning.hpp"
#include "peft/methods/additive/prompt_tuning.hpp"
#include "peft/methods/additive/reft.hpp"
#include "peft/methods/additive/ssf.hpp"
#include "peft/methods/hybrid/adapter_drop.hpp"
#include "peft/methods/hybrid/adapter_fusion.hpp"
#include "peft/methods/hybrid/xlora.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/adalora.hpp"
#include "peft/methods/reparameterized/boft.hpp"
#include "peft/methods/reparameterized/c3a.hpp"
#include "peft/methods/reparameterized/delora.hpp"
#include "peft/methods/reparameterized/dora.hpp"
#include "peft/methods/reparameterized/dylora.hpp"
#include "peft/methods/reparameterized/fourierft.hpp"
#include "peft/methods/reparameterized/glora.hpp"
#include "peft/methods/reparameterized/gralora.hpp"
#include "peft/methods/reparameterized/hira.hpp"
#include "peft/methods/reparameterized/hra.hpp"
#include "peft/methods/reparameterized/loha.hpp"
#include "peft/methods/reparameterized/lokr.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/methods/reparameterized/lora_fa.hpp"
#include "peft/methods/reparameterized/miss.hpp"
#include "peft/methods/reparameterized/oft.hpp"
#include "peft/methods/reparameterized/randlora.hpp"
#include "peft/methods/reparameterized/road.hpp"
#include "peft/methods/reparameterized/vblora.hpp"
#include "peft/methods/reparameterized/vera.hpp"
#include "peft/methods/selective/bitfit.hpp"
#include "peft/methods/selective/diff_pruning.hpp"
#include "peft/methods/selective/fishmask.hpp"
#include "peft/methods/selective/ln_tuning.hpp"
#include "peft/methods/selective/masks.hpp"
#include "peft/methods/selective/shira.hpp"
#include "peft/methods/selective/structured.hpp"
#include "peft/methods/selective/trainable_tokens.hpp"

namespace peft {

/// A list of methods (each a PeftPolicy; names unique).
template <class... Methods>
struct MethodRegistry {
  static_assert(((sizeof(detail::StateContract<Methods>) > 0) && ...));  // policy.hpp

  /// This registry with more methods after its own.
  template <class... More>
  using with = MethodRegistry<Methods..., More...>;
  static constexpr std::size_t size = sizeof...(Methods);

  /// Calls `visitor.template operator()<P>()` for the first loadable P accepting an
  /// adapter_config.json; false when none does.
  template <class Visitor>
  static bool visit_for(const nlohmann::json& config, Visitor&& visitor) {
    bool found = false;
    (
        [&] {
          if constexpr (Loadable<Methods>)
            if (!found && method_accepts<Methods>(config)) {
              found = true;
              visitor.template operator()<Methods>();
            }
        }(),
        ...);
    return found;
  }
  /// Calls the visitor for the method named `name` (P::name); false when none is.
  template <class Visitor>
  static bool visit_named(std::string_view name, Visitor&& visitor) {
    bool found = false;
    ((!found && Methods::name == name ? (found = true, visitor.template operator()<Methods>(), 0)
                                      : 0),
     ...);
    return found;
  }
  /// Calls the visitor for every method, in order.
  template <class Visitor>
  static void for_each(Visitor&& visitor) {
    (visitor.template operator()<Methods>(), ...);
  }
  static std::vector<std::string_view> names() { return {Methods::name...}; }
};

/// Every method of the library that reads the reference's adapter files.
using BuiltinMethods =
    MethodRegistry<LoRA, LoraFA, DoRA, VeRA, LoHa, LoKr, AdaLoRA, DyLoRA, OFT, BOFT, HRA, MiSS, C3A,
                   VBLoRA, FourierFT, IA3, PrefixTuning, PromptTuning, PTuning, SSF, SerialAdapter,
                   PfeifferAdapter, ParallelAdapter, LoReFT, NoReFT, DiReFT, Compacter, BitFit,
                   LNTuning, UnstructuredMask, FishMask, DiffPruning, StructuredMask, RoAd, DeLoRA,
                   RandLoRA, HiRA, GraLoRA, GLoRA, SHiRA, LlamaAdapter, TrainableTokens,
                   AdapterFusion, SerialAdapterFusion, XLoRA, AdapterDrop<PfeifferAdapter>>;

/// An adapter config's peft_type as an error message shows it: the string, "?" where there is
/// none, or the first 64 characters of whatever JSON stands there instead.
inline std::string peft_type_text(const nlohmann::json& adapter_json) {
  if (!adapter_json.is_object() || !adapter_json.contains("peft_type")) return "?";
  const nlohmann::json& type = adapter_json["peft_type"];
  return type.is_string() ? type.get<std::string>() : type.dump().substr(0, 64);
}

/// BuiltinMethods::visit_for, or the visit of another registry.
template <class Registry = BuiltinMethods, class Visitor>
bool visit_policy_for(const nlohmann::json& config, Visitor&& visitor) {
  return Registry::visit_for(config, std::forward<Visitor>(visitor));
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
