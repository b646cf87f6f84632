#pragma once
// LoRA (Hu et al., 2021): y = W x + s · B A x, A [r, in], B [out, r], s = α / r, or α / √r with
// rsLoRA (Kalajdzievski, 2023). Trains A and B; W stays frozen. Mergeable: W += s B A.
// Initialisations: Kaiming-uniform A and zero B (default), gaussian A, zeros, or PiSSA
// (pissa.hpp: A and B from the top-r singular triplets of W, the base keeping W − s B A).
// docs/methods/reparameterized.md; tests/test_reparameterized.cpp; golden gpt2_lora,
// llama_lora_rslora.
#include <cmath>
#include <map>
#include <string>

#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/reparameterized/lora_config.hpp"
#include "peft/methods/reparameterized/olora.hpp"
#include "peft/methods/reparameterized/pissa.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct LoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lora", title = "LoRA";
  static constexpr std::string_view paper =
      "Hu et al., 2021, LoRA: Low-Rank Adaptation of Large Language Models";
  static constexpr std::string_view reference = "LORA";  ///< peft_type in HF peft
  using Config = LoraConfig;
  template <class T>
  struct Extra {
    T scale = T(1);  ///< s
  };
  template <class T>
  using State = SiteState<LoRA, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "LORA", "use_dora"); }
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t r = c.rank_for(std::string(m.name));
    return {{"lora_A.weight", {r, m.in_features}}, {"lora_B.weight", {m.out_features, r}}};
  }
  /// B = 0 (every init but PiSSA), so the adapted model starts exactly at the base model.
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    const int r = c.rank_for(m.name);
    s.extra.scale = static_cast<T>(c.scaling(r, c.alpha_for(m.name)));
    if (c.init == Config::Init::Default) detail::kaiming_uniform(s[0].value(), rng);
    if (c.init == Config::Init::Gaussian) detail::normal_fill(s[0].value(), rng, 1.0 / r);
  }
  /// PiSSA reads W: at attach, and again once real base weights are loaded.
  template <class T>
  static void reinitialise(const Config& c, Slot<T>& s, nn::Linear<T>& m) {
    if (c.init == Config::Init::Pissa)
      detail::pissa_initialise(m, s[0].value(), s[1].value(), s.extra.scale);
    if (c.init == Config::Init::Olora)
      detail::olora_initialise(m, s[0].value(), s[1].value(), s.extra.scale);
  }
  /// lora_dropout drops the low-rank path's input only, in training mode (projection.hpp).
  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.add_low_rank(s[0], s[1], s.extra.scale, c.lora_dropout);
  }
  /// W += s B A (W −= on unmerge); a merged module runs the base product alone.
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>&) {
    return s.extra.scale * (s[1].value().matrix() * s[0].value().matrix());
  }
};

}  // namespace peft
