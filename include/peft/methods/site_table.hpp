#pragma once
// SiteTable: a method's per-module adapters, from one selection. A method that adapts linear
// modules declares, once:
//
//   static bool selects(const Config&, const ModuleSite&);              // optional: default
//       // config.targets.selects(site.name, site.is_head())
//   static SiteTensors site_tensors(const Config&, const ModuleSite&);  // the tensors it adds
//       // to one selected module: reference key suffix ("lora_A.weight"), shape, trainable
//
// and from that declaration follow, without further code in the method:
//   - attach: every selected module gets its tensors allocated (zero; the method initialises
//     them), or the error "<Method>: target_modules [...] matched no module of this model";
//   - counting from shapes (`peft count`, the search's budget), from the same two functions, so
//     counting and attaching cannot disagree;
//   - parameters() keyed as the reference keys them: "base_model.model.<module>.<suffix>";
//   - adapts(module), the merged guard (a merged slot contributes nothing), merge / unmerge /
//     unload through the method's `delta_weight` (W += ΔW, HF peft's get_delta_weight).
// A slot holds its tensors in declaration order (slot[0], slot[1], ...) and the method's own
// per-module values in `extra`.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/core/error.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/nn/modules.hpp"

namespace peft {

/// One linear module, as attach sees it (from nn::Linear) and counting sees it (from
/// LinearShape): the same fields, so one selection serves both.
struct ModuleSite {
  std::string_view name;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  int layer = -1;  ///< -1: the output head
  bool has_bias = false;
  bool is_head() const { return layer < 0; }

  static ModuleSite of(const LinearShape& l) {
    return {l.name, l.in_features, l.out_features, l.layer, l.bias};
  }
  template <class T>
  static ModuleSite of(const nn::Linear<T>& l) {
    return {l.name, l.in_features, l.out_features, l.layer, static_cast<bool>(l.bias)};
  }
};

/// A tensor a method adds to one module.
struct TensorDecl {
  std::string key;  ///< the reference's key suffix after "base_model.model.<module>."
  Shape shape;
  bool trainable = true;
};
using SiteTensors = std::vector<TensorDecl>;

inline std::int64_t numel_of(const Shape& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

/// The default selection: the config's target rules ("all-linear" leaves out the head).
template <class Config>
bool selects_by_targets(const Config& config, const ModuleSite& site) {
  return config.targets.selects(std::string(site.name), site.is_head());
}

/// P::selects when the method declares it, else the target rules.
template <class P>
bool method_selects(const typename P::Config& config, const ModuleSite& site) {
  if constexpr (requires { P::selects(config, site); })
    return P::selects(config, site);
  else
    return selects_by_targets(config, site);
}

/// The count of a site-table method from shapes alone: the declared tensors of every selected
/// module (trainable ones as trainable, the others as frozen).
template <class P>
ParameterCount count_site_tensors(const std::vector<LinearShape>& linears,
                                  const typename P::Config& config) {
  ParameterCount count;
  for (const LinearShape& l : linears) {
    const ModuleSite site = ModuleSite::of(l);
    if (!method_selects<P>(config, site)) continue;
    for (const TensorDecl& t : P::site_tensors(config, site))
      (t.trainable ? count.trainable : count.frozen) += numel_of(t.shape);
  }
  return count;
}

/// "<Method>: target_modules [...] matched no module of this model (module paths look like ...)".
template <class T>
[[noreturn]] void throw_no_target(std::string_view method, const TargetRules& rules,
                                  const std::vector<nn::Linear<T>*>& linears) {
  throw ConfigError(std::string(method) + ": target_modules " +
                    rules.target_modules.to_json().dump() +
                    " matched no module of this model (module paths look like '" +
                    (linears.empty() ? std::string("-") : linears.front()->name) + "')");
}

/// The name a method's messages use (`P::title`, e.g. "LoRA"), or its registry name.
template <class P>
constexpr std::string_view method_title() {
  if constexpr (requires { P::title; })
    return P::title;
  else
    return P::name;
}

struct NoExtra {};

template <class T, class Extra = NoExtra>
struct SiteSlot {
  std::string module;  ///< the module's path
  int site = -1;
  std::vector<Var<T>> tensors;  ///< in the method's declaration order
  std::vector<std::string> keys;
  bool merged = false;
  Extra extra{};

  Var<T>& operator[](std::size_t i) { return tensors[i]; }
  const Var<T>& operator[](std::size_t i) const { return tensors[i]; }
};

template <class T, class Extra = NoExtra>
class SiteTable {
 public:
  using Slot = SiteSlot<T, Extra>;

  /// Allocates the declared tensors of every module P selects; throws when none is.
  /// `init(slot, module)` then initialises each new slot.
  template <class P, class Init>
  void attach(const typename P::Config& config, const std::vector<nn::Linear<T>*>& linears,
              Init&& init) {
    slots_.assign(linears.size(), std::nullopt);
    for (nn::Linear<T>* lin : linears) {
      const ModuleSite site = ModuleSite::of(*lin);
      if (!method_selects<P>(config, site)) continue;
      Slot slot;
      slot.module = lin->name;
      slot.site = lin->site;
      for (TensorDecl& t : P::site_tensors(config, site)) {
        slot.tensors.emplace_back(Tensor<T>(t.shape), t.trainable);
        slot.keys.push_back(std::move(t.key));
      }
      init(slot, *lin);
      slots_.at(static_cast<std::size_t>(lin->site)) = std::move(slot);
    }
    if (size() == 0) {
      if constexpr (requires { config.targets; })
        throw_no_target(method_title<P>(), config.targets, linears);
      else
        throw ConfigError(std::string(method_title<P>()) + ": selected no module of this model");
    }
  }
  template <class P>
  void attach(const typename P::Config& config, const std::vector<nn::Linear<T>*>& linears) {
    attach<P>(config, linears, [](Slot&, const nn::Linear<T>&) {});
  }

  Slot* find(int site) {
    if (site < 0 || static_cast<std::size_t>(site) >= slots_.size()) return nullptr;
    auto& slot = slots_[static_cast<std::size_t>(site)];
    return slot ? &*slot : nullptr;
  }
  const Slot* find(int site) const { return const_cast<SiteTable*>(this)->find(site); }
  Slot* find(const nn::Linear<T>& module) { return find(module.site); }
  const Slot* find(const nn::Linear<T>& module) const { return find(module.site); }
  /// The slot of `module` when it contributes to the forward (present and not merged).
  const Slot* active(const nn::Linear<T>& module) const {
    const Slot* s = find(module.site);
    return s && !s->merged ? s : nullptr;
  }
  Slot* active(const nn::Linear<T>& module) {
    Slot* s = find(module.site);
    return s && !s->merged ? s : nullptr;
  }
  bool adapts(const nn::Linear<T>& module) const { return find(module.site) != nullptr; }

  std::size_t size() const {
    std::size_t n = 0;
    for (const auto& slot : slots_) n += slot.has_value();
    return n;
  }

  /// Every slot's tensors, keyed "base_model.model.<module>.<suffix>".
  std::vector<NamedParameter<T>> parameters() const {
    std::vector<NamedParameter<T>> out;
    for (const auto& slot : slots_)
      if (slot)
        for (std::size_t i = 0; i < slot->tensors.size(); ++i)
          out.push_back(
              {"base_model.model." + slot->module + "." + slot->keys[i], slot->tensors[i]});
    return out;
  }

  template <class F>
  void for_each(F&& f) {
    for (auto& slot : slots_)
      if (slot) f(*slot);
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& slot : slots_)
      if (slot) f(*slot);
  }

  /// W += ΔW (merge) or W −= ΔW (unmerge) with ΔW = delta(slot, module) [out, in], for each
  /// slot not already in that state.
  template <class Delta>
  void fold(const std::vector<nn::Linear<T>*>& modules, bool merge, Delta&& delta) {
    for (nn::Linear<T>* lin : modules) {
      Slot* slot = find(lin->site);
      if (!slot || slot->merged == merge) continue;
      RowMatrix<T> d = delta(*slot, *lin);
      if (!merge) d = -d;
      lin->add_to_weight(d);
      slot->merged = merge;
    }
  }
  /// W ← transform(slot, module, merge) [out, in] (merge), or back (unmerge), for each slot
  /// not already in that state: merges that multiply W (the orthogonal family: W Rᵀ and back
  /// with R⁻ᵀ) rather than add to it. `transform` reads the module's current W itself.
  /// `bias_transform(slot, module, merge)`, where given, is the module's next bias [out] (for a
  /// module that has one), called while the module holds its unmerged W: before W changes on
  /// merge, after W is back on unmerge (RoAd: R b; GLoRA: b + b ⊙ D + E + W₀ C).
  template <class Transform, class BiasTransform = std::nullptr_t>
  void refold(const std::vector<nn::Linear<T>*>& modules, bool merge, Transform&& transform,
              BiasTransform&& bias_transform = nullptr) {
    constexpr bool folds_bias = !std::is_same_v<std::decay_t<BiasTransform>, std::nullptr_t>;
    for (nn::Linear<T>* lin : modules) {
      Slot* slot = find(lin->site);
      if (!slot || slot->merged == merge) continue;
      const RowMatrix<T> next = transform(*slot, *lin, merge);
      if constexpr (folds_bias)
        if (merge && lin->bias) lin->bias.value().vector() = bias_transform(*slot, *lin, true);
      lin->add_to_weight(next - lin->weight_out_in());
      if constexpr (folds_bias)
        if (!merge && lin->bias) lin->bias.value().vector() = bias_transform(*slot, *lin, false);
      slot->merged = merge;
    }
  }
  /// Merges for good and drops every slot: the model is the base model with the update in.
  template <class Delta>
  void unload(const std::vector<nn::Linear<T>*>& modules, Delta&& delta) {
    fold(modules, true, std::forward<Delta>(delta));
    for (auto& slot : slots_) slot.reset();
  }

 private:
  std::vector<std::optional<Slot>> slots_;  // by linear site
};

}  // namespace peft
