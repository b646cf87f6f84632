#pragma once
// SiteState<P, T>: the whole State<T> of a method that adapts linear modules one by one, from a
// few static declarations on the policy — so that such a method is its math and nothing else.
//
//   struct OutputShift {                              // y = x Wᵀ + b + β
//     using family = peft::family::Additive;
//     static constexpr std::string_view name = "output_shift";
//     struct Config { ... };                          // a field table (config_fields.hpp)
//     static SiteTensors site_tensors(const Config&, const ModuleSite& m) {
//       return {{"shift", {m.out_features}}};
//     }
//     template <class T>
//     static void contribute(const Config&, Projection<T>& p, const SiteSlot<T>& s) {
//       p.shift_output(s[0]);
//     }
//     template <class T> using State = SiteState<OutputShift, T>;
//   };
//
// REQUIRED OF P (beside the contract's family, name, Config)
//   static SiteTensors site_tensors(const Config&, const ModuleSite&)      (site_table.hpp)
//   template <class T> static void contribute(const Config&, Projection<T>&, const Slot&)
//       what an attached, unmerged module adds to its product (nn/projection.hpp)
// OPTIONAL OF P
//   static bool selects(const Config&, const ModuleSite&)        default: config.targets
//   template <class T> struct Extra                                per-module values (slot.extra)
//   template <class T> static void initialise(const Config&, Slot&, const nn::Linear<T>&,
//                                             std::mt19937_64&)     new tensors start at zero
//   template <class T> static void reinitialise(const Config&, Slot&, nn::Linear<T>&)
//       runs at attach and whenever base weights are loaded (PiSSA, DoRA's norms)
//   template <class T> static RowMatrix<T> delta_weight(const Slot&, const nn::Linear<T>&)
//       ΔW [out, in]: the state is then Mergeable and Unloadable (W += ΔW)
//   template <class T> static RowMatrix<T> merged_weight(const Config&, const Slot&,
//                                                        const nn::Linear<T>&, bool merge)
//       instead, for a merge that is not a sum: the module's next W [out, in], from its current
//       one (merge: W Rᵀ for OFT; unmerge: the inverse map); Mergeable and Unloadable too
//   template <class T> static Eigen::Matrix<T, Eigen::Dynamic, 1> merged_bias(const Config&,
//                                const Slot&, const nn::Linear<T>&, bool merge)
//       with merged_weight, for a merge that rewrites the bias too: the module's next bias from
//       its current one, called while the module holds its unmerged W (RoAd: R b; GLoRA)
//   template <class T> static void project_gradient(const Config&, const Slot&)
//       rewrites the slot's gradients before the optimizer step (ProjectsGradients: LoRA-FA)
#include <random>
#include <vector>

#include "peft/methods/policy.hpp"
#include "peft/methods/site_table.hpp"

namespace peft {

namespace detail {
template <class P, class T>
struct ExtraOf {
  using type = NoExtra;
};
template <class P, class T>
requires requires { typename P::template Extra<T>; }
struct ExtraOf<P, T> {
  using type = typename P::template Extra<T>;
};
}  // namespace detail

template <class P, class T>
class SiteState {
 public:
  using Config = typename P::Config;
  using Sites = SiteTable<T, typename detail::ExtraOf<P, T>::type>;
  using Slot = typename Sites::Slot;
  static constexpr bool additive_merge = requires(const Slot& s, const nn::Linear<T>& m) {
    P::delta_weight(s, m);
  };
  static constexpr bool transform_merge =
      requires(const Config& c, const Slot& s, const nn::Linear<T>& m) {
    P::merged_weight(c, s, m, true);
  };
  static constexpr bool mergeable = additive_merge || transform_merge;

  explicit SiteState(const Config& config) : config_(config) {}
  const Config& config() const { return config_; }
  const Sites& sites() const { return sites_; }
  const Slot* find(int site) const { return sites_.find(site); }
  bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

  void attach(AttachContext<T>& ctx) {
    sites_.template attach<P>(config_, ctx.linears, [&](Slot& slot, const nn::Linear<T>& m) {
      if constexpr (requires { P::initialise(config_, slot, m, ctx.rng); })
        P::initialise(config_, slot, m, ctx.rng);
    });
    on_base_weights_loaded(ctx.linears);
  }
  void on_base_weights_loaded(const std::vector<nn::Linear<T>*>& modules) {
    if constexpr (requires(Slot & s, nn::Linear<T> & m) { P::reinitialise(config_, s, m); })
      for (nn::Linear<T>* lin : modules)
        if (Slot* s = sites_.active(*lin)) P::reinitialise(config_, *s, *lin);
  }

  void adapt(Projection<T>& p) const {
    if (const Slot* s = sites_.active(p.module())) P::contribute(config_, p, *s);
  }
  std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
  void project_gradients() requires requires(const Config& c, const Slot& s) {
    P::project_gradient(c, s);
  }
  {
    sites_.for_each([this](const Slot& s) { P::project_gradient(config_, s); });
  }

  void merge(const std::vector<nn::Linear<T>*>& m) requires mergeable { fold(m, true); }
  void unmerge(const std::vector<nn::Linear<T>*>& m) requires mergeable { fold(m, false); }
  /// Merges for good and drops the adapter (parameters() is empty afterwards).
  void unload(const std::vector<nn::Linear<T>*>& m) requires mergeable {
    fold(m, true);
    sites_ = Sites{};
  }

 private:
  void fold(const std::vector<nn::Linear<T>*>& m, bool merge) {
    if constexpr (additive_merge)
      sites_.fold(m, merge,
                  [](const Slot& s, const nn::Linear<T>& l) { return P::delta_weight(s, l); });
    else
      sites_.refold(
          m, merge,
          [this](const Slot& s, const nn::Linear<T>& l, bool forward) {
            return P::merged_weight(config_, s, l, forward);
          },
          bias_transform());
  }

  auto bias_transform() const {
    if constexpr (requires(const Slot& s, const nn::Linear<T>& l) {
                    P::merged_bias(config_, s, l, true);
                  })
      return [this](const Slot& s, const nn::Linear<T>& l, bool forward) {
        return P::merged_bias(config_, s, l, forward);
      };
    else
      return nullptr;
  }

  Config config_;
  Sites sites_;
};

}  // namespace peft
