#pragma once
// RoAd (Liao et al., "2D Rotary Adaptation for Efficient Parameter-Efficient Fine-Tuning",
// 2024): the module's output, in groups of g = group_size features, is rotated and scaled in
// 2-D pairs — feature k of a group paired with feature k + g/2 of the same group:
//   y = x Wᵀ + b,  y'_i = c1_i y_i + c2_i rot(y)_i,  rot(y)_i = −y_{i+g/2} (first half of a
//   group), y_{i−g/2} (second half),
//   c1 = α ⊙ cos θ, c2 = α ⊙ sin θ (road_1: θ, α [out/2], one pair of values shared by both
//   features of a pair; road_2: θ, α [out], one per feature; road_4: θ, α [2·out], per group
//   [g first-column values, g second-column values], c1 = α₁ cos θ₁, c2 = α₂ sin θ₂).
// An output map (map_output), multiplicative. Reference peft_type "ROAD", tensors road_theta and
// road_alpha. init_weights true: θ = 0, α = 1, so the model starts at the base model exactly;
// false: θ ~ N(0, 0.5), α ~ N(1, 0.5). Mergeable as the reference merges: R (W x + b) = (R W) x
// + R b with R block 2 × 2 per pair; unmerge applies R⁻¹ (pairwise 2 × 2 inverses).
// docs/methods/reparameterized.md#road; tests/test_rotations_and_blocks.cpp; golden llama_road*.
#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"
#include "peft/methods/site_table.hpp"

namespace peft {

struct RoadConfig : ConfigIo<RoadConfig> {
  enum class Variant { Road1, Road2, Road4 };
  static constexpr std::string_view peft_type = "ROAD";
  Variant variant = Variant::Road1;
  int group_size = 64;
  bool init_weights = true;  ///< θ = 0, α = 1 (the base model); false: random
  TargetRules targets;

  /// θ's and α's length for a module of `out` features.
  std::int64_t size_for(std::int64_t out) const {
    return variant == Variant::Road1 ? out / 2 : variant == Variant::Road2 ? out : 2 * out;
  }
  static auto fields() {
    using C = RoadConfig;
    return config_fields(
        choice("variant", &C::variant, std::pair("road_1", Variant::Road1),
               std::pair("road_2", Variant::Road2), std::pair("road_4", Variant::Road4)),
        field("group_size", &C::group_size, check::dimension),
        field("init_weights", &C::init_weights),
        detail::reparameterized::TargetsWithoutExclude<C>{{&C::targets}},
        fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    if (group_size % 2 != 0)
      throw ConfigError(source + ": group_size: expected an even value, found " +
                        std::to_string(group_size));
  }
};

struct RoAd {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "road", title = "RoAd";
  static constexpr std::string_view paper =
      "Liao et al., 2024, 2D Rotary Adaptation for Efficient Parameter-Efficient Fine-Tuning";
  static constexpr std::string_view reference = "ROAD";  ///< peft_type in HF peft
  using Config = RoadConfig;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    if (c.group_size % 2 != 0 || m.out_features % c.group_size != 0)
      throw ConfigError("RoAd: group_size " + std::to_string(c.group_size) +
                        " must be even and divide " + std::string(m.name) + "'s out_features (" +
                        std::to_string(m.out_features) + ")");
    const std::int64_t n = c.size_for(m.out_features);
    return {{"road_theta", {n}}, {"road_alpha", {n}}};
  }

  /// Where feature i of the output reads its first- and second-column θ and α, its partner and
  /// the partner's sign in rot(y): built once per module at attach (slot.extra).
  struct Layout {
    std::vector<std::int64_t> first, second, partner;
    static Layout of(const Config& c, std::int64_t out) {
      Layout l;
      const std::int64_t g = c.group_size, h = g / 2;
      for (std::int64_t i = 0; i < out; ++i) {
        const std::int64_t group = i / g, k = i % g;
        l.partner.push_back(k < h ? i + h : i - h);
        if (c.variant == Config::Variant::Road1) {
          l.first.push_back(group * h + k % h);
          l.second.push_back(group * h + k % h);
        } else if (c.variant == Config::Variant::Road2) {
          l.first.push_back(i);
          l.second.push_back(i);
        } else {
          l.first.push_back(group * 2 * g + k);
          l.second.push_back(group * 2 * g + g + k);
        }
      }
      return l;
    }
  };
  template <class T>
  struct Extra {
    Layout layout;
    Var<T> sign;  ///< [out]: −1 where the partner comes after (the first half of a group), else 1
  };
  template <class T>
  using State = SiteState<RoAd, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    const std::int64_t out = m.out_features;
    s.extra.layout = Layout::of(c, out);
    Tensor<T> sign(Shape{out});
    for (std::int64_t i = 0; i < out; ++i) sign[i] = s.extra.layout.partner[i] > i ? T(-1) : T(1);
    s.extra.sign = Var<T>(std::move(sign));
    if (c.init_weights) return s[1].value().fill(T(1));  // θ stays 0
    detail::normal_fill(s[0].value(), rng, 0.5);
    detail::normal_fill(s[1].value(), rng, 0.5);
    for (std::int64_t i = 0; i < s[1].value().numel(); ++i) s[1].value()[i] += T(1);
  }

  /// y' = y ⊙ c1 + y[partner] ⊙ (±c2), the sign folded into a constant.
  template <class T>
  static void contribute(const Config&, Projection<T>& p, const Slot<T>& s) {
    p.map_output([&s](Tape<T>& t, const Var<T>& y) {
      using std::cos, std::sin;
      const Layout& l = s.extra.layout;
      const Var<T> c1 = ops::mul(t, ops::gather_features(t, s[1], l.first),
                                 ops::detail::unary(
                                     t, ops::gather_features(t, s[0], l.first),
                                     [](T v) { return cos(v); }, [](T v, T) { return -sin(v); }));
      const Var<T> c2 =
          ops::mul(t, ops::mul(t, ops::gather_features(t, s[1], l.second), s.extra.sign),
                   ops::detail::unary(
                       t, ops::gather_features(t, s[0], l.second), [](T v) { return sin(v); },
                       [](T v, T) { return cos(v); }));
      return ops::add(t, ops::mul(t, y, c1),
                      ops::mul(t, ops::gather_features(t, y, l.partner), c2));
    });
  }

  /// Row i of W ← a_i row i + b_i row partner(i): R (merge) or R⁻¹ (unmerge).
  template <class T>
  static RowMatrix<T> merged_weight(const Config&, const Slot<T>& s, const nn::Linear<T>& m,
                                    bool merge) {
    const auto [a, b] = pair_factors(s, merge);
    const RowMatrix<T> w = m.weight_out_in();
    RowMatrix<T> next(w.rows(), w.cols());
    for (Eigen::Index i = 0; i < w.rows(); ++i)
      next.row(i) = a[i] * w.row(i) + b[i] * w.row(s.extra.layout.partner[i]);
    return next;
  }
  /// The bias is rotated as the rows are: R b, and back.
  template <class T>
  static Eigen::Matrix<T, Eigen::Dynamic, 1> merged_bias(const Config&, const Slot<T>& s,
                                                         const nn::Linear<T>& m, bool merge) {
    const auto [a, b] = pair_factors(s, merge);
    const Tensor<T>& bias = m.bias.value();
    Eigen::Matrix<T, Eigen::Dynamic, 1> next(bias.numel());
    for (std::int64_t i = 0; i < bias.numel(); ++i)
      next[i] = a[i] * bias[i] + b[i] * bias[s.extra.layout.partner[i]];
    return next;
  }

 private:
  /// R's pair factors: row i of R has a_i at i and b_i at partner(i); R⁻¹'s, from the 2 × 2
  /// inverse of each pair [[a_i, b_i], [b_j, a_j]].
  template <class T>
  static std::pair<std::vector<T>, std::vector<T>> pair_factors(const Slot<T>& s, bool merge) {
    const Layout& l = s.extra.layout;
    const Tensor<T>&theta = s[0].value(), &alpha = s[1].value();
    const std::size_t out = l.partner.size();
    std::vector<T> a(out), b(out);
    for (std::size_t i = 0; i < out; ++i) {
      a[i] = alpha[l.first[i]] * std::cos(theta[l.first[i]]);
      b[i] = s.extra.sign.value()[i] * alpha[l.second[i]] * std::sin(theta[l.second[i]]);
    }
    if (merge) return {a, b};
    std::vector<T> ia(out), ib(out);
    for (std::size_t i = 0; i < out; ++i) {
      const std::int64_t j = l.partner[i];
      const T det = a[i] * a[j] - b[i] * b[j];
      ia[i] = a[j] / det;
      ib[i] = -b[i] / det;
    }
    return {ia, ib};
  }
};

}  // namespace peft
