#pragma once
// MiSS (Kang et al., "MiSS: balancing LoRA performance and efficiency with simple shard
// sharing", 2024; the reference's successor of Bone): one trainable shard D = miss_block [r, out]
// shared by every r-wide group of input features,
//   y = x Wᵀ + b + fold(x) D,  fold(x)_k = Σ_j x_{j·r + k}   (x zero-padded to a multiple of r),
// i.e. ΔW[o, i] = D[i mod r, o]: a rank-≤ r update through a fixed 0/1 matrix F [r, in]
// (F[k, i] = [i mod r = k]), fold(x) = x Fᵀ. With init_weights "mini", D [r, mini_r] is tiled
// along the outputs (D_full[k, o] = D[k, o mod mini_r]): r·mini_r parameters. D starts at 0, so
// the model starts at the base model. Mergeable: W += Fᵀ-shaped ΔW. miss_dropout drops the
// shard path's input in training. Not built: init_weights "bat" (a ΔW that multiplies W's own
// blocks; refused with a ConfigError).
// docs/methods/reparameterized.md#miss; tests/test_orthogonal.cpp; golden llama_miss.
#include <string>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct MissConfig : ConfigIo<MissConfig> {
  enum class Init { Zeros, Random, Mini, Bat };
  static constexpr std::string_view peft_type = "MISS";
  int r = 64;
  int mini_r = 1;
  double miss_dropout = 0.0;
  Init init = Init::Zeros;
  TargetRules targets;

  static auto fields() {
    using C = MissConfig;
    return config_fields(
        field("r", &C::r, check::dimension), field("mini_r", &C::mini_r, check::dimension),
        float_field("miss_dropout", &C::miss_dropout, check::probability),
        choice("init_weights", &C::init, std::pair(true, Init::Zeros),
               std::pair(false, Init::Random), std::pair("mini", Init::Mini),
               std::pair("bat", Init::Bat)),
        targets_field(&C::targets), fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    if (init == Init::Bat)
      throw ConfigError(source +
                        ": init_weights \"bat\" (MiSS's block-affine variant) is not "
                        "supported; use true, false or \"mini\"");
  }
};

struct MiSS {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "miss", title = "MiSS";
  static constexpr std::string_view paper =
      "Kang and Yin, 2024, MiSS: Balancing LoRA Performance and Efficiency with Simple Shard "
      "Sharing";
  static constexpr std::string_view reference = "MISS";  ///< peft_type in HF peft
  using Config = MissConfig;
  template <class T>
  struct Extra {
    Var<T> fold;  ///< F [r, in], constant
    Var<T> tile;  ///< [mini_r, out], constant (mini only)
  };
  template <class T>
  using State = SiteState<MiSS, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    if (c.r > m.in_features)
      throw ConfigError("MiSS: r (" + std::to_string(c.r) + ") exceeds " + std::string(m.name) +
                        "'s in_features (" + std::to_string(m.in_features) + ")");
    if (c.init == Config::Init::Mini && m.out_features % c.mini_r != 0)
      throw ConfigError("MiSS: mini_r (" + std::to_string(c.mini_r) + ") does not divide " +
                        std::string(m.name) + "'s out_features (" + std::to_string(m.out_features) +
                        ")");
    return {{"miss_block", {c.r, c.init == Config::Init::Mini ? c.mini_r : m.out_features}}};
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    Tensor<T> fold = Tensor<T>::zeros(Shape{c.r, m.in_features});
    for (std::int64_t i = 0; i < m.in_features; ++i) fold[(i % c.r) * m.in_features + i] = T(1);
    s.extra.fold = Var<T>(std::move(fold));
    if (c.init == Config::Init::Mini) {
      Tensor<T> tile = Tensor<T>::zeros(Shape{c.mini_r, m.out_features});
      for (std::int64_t o = 0; o < m.out_features; ++o)
        tile[(o % c.mini_r) * m.out_features + o] = T(1);
      s.extra.tile = Var<T>(std::move(tile));
    }
    if (c.init == Config::Init::Random) detail::kaiming_uniform(s[0].value(), rng);
  }

  /// fold(x) D (mini: fold(x) D tile), in training after miss_dropout on x.
  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.add_delta(
        [d = s[0], fold = s.extra.fold, tile = s.extra.tile](Tape<T>& t, const Var<T>& x) {
          using ops::WeightLayout;
          const Var<T> h = ops::linear(t, x, fold, Var<T>{}, WeightLayout::OutIn);  // [..., r]
          const Var<T> y = ops::linear(t, h, d, Var<T>{}, WeightLayout::InOut);
          return tile ? ops::linear(t, y, tile, Var<T>{}, WeightLayout::InOut) : y;
        },
        c.miss_dropout);
  }
  /// ΔW [out, in] = D_fullᵀ F.
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>&) {
    RowMatrix<T> d = s[0].value().matrix();
    if (s.extra.tile) d = d * s.extra.tile.value().matrix();
    return d.transpose() * s.extra.fold.value().matrix();
  }
};

}  // namespace peft
