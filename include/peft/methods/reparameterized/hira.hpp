#pragma once
// HiRA (Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large
// Language Models", ICLR 2025): the update is the base weight modulated entrywise by a low-rank
// product, so its rank is not bounded by r:
//   ΔW = W₀ ⊙ (B A),   y = x W₀ᵀ + b + x (W₀ ⊙ B A)ᵀ,   A = hira_A [r, in], B = hira_B [out, r]
// (no scaling). rank_pattern is kept in the config but changes no rank: the reference 0.21.2
// builds every module with config.r (its dispatch_default ignores the pattern's r), so its files
// hold r everywhere and this library reads them as they are. init_weights true: A kaiming-uniform,
// B = 0 (the base model exactly); "gaussian": A ~ N(0, 1/r²), B = 0; false: both N(0, 1).
// hira_dropout drops the update's input in training. Adapts GPT-2's Conv1D as the reference does
// (W₀ⁱⁿᵒᵘᵗ transposed). Mergeable: W ← W ⊙ (1 + B A), and back by the same entrywise division (the
// reference keeps a copy of W₀ instead; an entry with 1 + (B A) = 0 cannot come back).
// The forward forms W₀ ⊙ (B A) (out·in) at each call, as the reference does; it needs a dense
// base weight (bf16 / NF4 bases are refused by name).
// docs/methods/reparameterized.md#hira; tests/test_sparse_and_random.cpp; golden llama_hira,
// gpt2_hira.
#include <string>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct HiraConfig : ConfigIo<HiraConfig> {
  enum class Init { Default, Gaussian, Random };
  static constexpr std::string_view peft_type = "HIRA";
  int r = 32;
  double hira_dropout = 0.0;
  Init init = Init::Default;
  TargetRules targets;
  PatternMap<int> rank_pattern;  ///< read and written; no module's rank (see the header)

  static auto fields() {
    using C = HiraConfig;
    return config_fields(
        field("r", &C::r, check::dimension),
        float_field("hira_dropout", &C::hira_dropout, check::probability),
        choice("init_weights", &C::init, std::pair(true, Init::Default),
               std::pair("gaussian", Init::Gaussian), std::pair(false, Init::Random)),
        targets_field(&C::targets), field("rank_pattern", &C::rank_pattern, check::dimension),
        fan_in_fan_out(), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct HiRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "hira", title = "HiRA";
  static constexpr std::string_view paper =
      "Huang et al., 2025, HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large "
      "Language Models";
  static constexpr std::string_view reference = "HIRA";  ///< peft_type in HF peft
  using Config = HiraConfig;
  template <class T>
  using State = SiteState<HiRA, T>;
  template <class T>
  using Slot = SiteSlot<T>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    return {{"hira_A", {c.r, m.in_features}}, {"hira_B", {m.out_features, c.r}}};
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>&, std::mt19937_64& rng) {
    if (c.init == Config::Init::Default) return detail::kaiming_uniform(s[0].value(), rng);
    detail::normal_fill(s[0].value(), rng,
                        c.init == Config::Init::Gaussian ? 1.0 / s[0].shape()[0] : 1.0);
    if (c.init == Config::Init::Random) detail::normal_fill(s[1].value(), rng, 1.0);
  }

  /// x (W₀ ⊙ B A)ᵀ as a delta on the (dropped) input, W₀ in its storage layout.
  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.add_delta(
        [a = s[0], b = s[1], &m = p.module()](Tape<T>& t, const Var<T>& x) {
          const bool out_in = m.layout == ops::WeightLayout::OutIn;
          const Var<T> ba = out_in ? ops::matmul(t, b, a) : ops::matmul(t, a, b, true, true);
          const Var<T> w = ops::mul(t, m.dense_weight("HiRA"), ba);
          return ops::linear(t, x, w, Var<T>{}, m.layout);
        },
        c.hira_dropout);
  }
  /// W ⊙ (1 + B A) (merge), W ⊘ (1 + B A) (unmerge), on W [out, in].
  template <class T>
  static RowMatrix<T> merged_weight(const Config&, const Slot<T>& s, const nn::Linear<T>& m,
                                    bool merge) {
    const RowMatrix<T> f = (s[1].value().matrix() * s[0].value().matrix()).array() + T(1);
    const RowMatrix<T> w = m.weight_out_in();
    return merge ? RowMatrix<T>(w.cwiseProduct(f)) : RowMatrix<T>(w.cwiseQuotient(f));
  }
};

}  // namespace peft
