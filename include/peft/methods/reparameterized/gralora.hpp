#pragma once
// GraLoRA (Jung et al., 2025, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
// Fine-Tuning"): W [out, in] split into k × k blocks, block (j, n) (outputs j, inputs n) with a
// low-rank pair of its own, of rank r / k:
//   ΔW_{jn} = s · (A_n[:, j·r/k : (j+1)·r/k] · B_j[n·r/k : (n+1)·r/k, :])ᵀ,
//   A = gralora_A [k, in/k, r], B = gralora_B [k, r, out/k],  s = alpha / (r + hybrid_r),
// so r·(in + out) parameters (LoRA's) reach rank r·k. With hybrid_r > 0 a plain LoRA pair
// rides along: ΔW += s · B_g A_g, A_g = gralora_A_general.weight [hybrid_r, in],
// B_g = gralora_B_general.weight [out, hybrid_r]. The forward never forms ΔW: x [M, k, in/k]
// through A (one batched product per input block), the r columns regrouped by output block,
// through B (HF peft's einsum pair). Reference peft_type "GRALORA" (tuners/gralora); it adapts
// nn.Linear and GPT-2's Conv1D. init_weights: A (and A_g) kaiming-uniform over each block's
// fan-in, B (and B_g) zero: the model starts at the base model exactly; false: B random too.
// Mergeable (W += ΔW, as the reference's get_delta_weight).
// docs/methods/reparameterized.md#gralora; tests/test_granular_and_general.cpp;
// golden llama_gralora, llama_gralora_hybrid, gpt2_gralora.
#include <cmath>
#include <random>
#include <string>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct GraloraConfig : ConfigIo<GraloraConfig> {
  static constexpr std::string_view peft_type = "GRALORA";
  int r = 32;
  int hybrid_r = 0;  ///< rank of the plain LoRA pair beside the blocks (0: none)
  double alpha = 64;
  double gralora_dropout = 0.0;
  int gralora_k = 2;         ///< blocks per side: r, in and out must be multiples of it
  bool init_weights = true;  ///< B zero (start at the base); false: B random too
  TargetRules targets;

  double scaling() const { return alpha / (r + hybrid_r); }

  static auto fields() {
    using C = GraloraConfig;
    return config_fields(field("r", &C::r, check::dimension),
                         field("hybrid_r", &C::hybrid_r, check::dimension_or_zero),
                         field("alpha", &C::alpha, check::scale),
                         float_field("gralora_dropout", &C::gralora_dropout, check::probability),
                         field("gralora_k", &C::gralora_k, check::dimension),
                         field("init_weights", &C::init_weights),
                         detail::reparameterized::TargetsWithoutExclude<C>{{&C::targets}},
                         fan_in_fan_out(), fixed("bias", "none"),
                         fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    if (r % gralora_k != 0)
      throw ConfigError(source + ": field 'r': expected a multiple of gralora_k (" +
                        std::to_string(gralora_k) + "), found " + std::to_string(r));
  }
};

struct GraLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "gralora", title = "GraLoRA";
  static constexpr std::string_view paper =
      "Jung et al., 2025, GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient "
      "Fine-Tuning";
  static constexpr std::string_view reference = "GRALORA";  ///< peft_type in HF peft
  using Config = GraloraConfig;
  template <class T>
  struct Extra {
    T scaling = T(1);
  };
  template <class T>
  using State = SiteState<GraLoRA, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t k = c.gralora_k;
    for (const std::int64_t n : {m.in_features, m.out_features})
      if (n % k != 0)
        throw ConfigError("GraLoRA: " + std::string(m.name) + " is [" +
                          std::to_string(m.out_features) + ", " + std::to_string(m.in_features) +
                          "]: gralora_k (" + std::to_string(k) + ") must divide both sides");
    SiteTensors t{{"gralora_A", {k, m.in_features / k, c.r}},
                  {"gralora_B", {k, c.r, m.out_features / k}}};
    if (c.hybrid_r > 0) {
      t.push_back({"gralora_A_general.weight", {c.hybrid_r, m.in_features}});
      t.push_back({"gralora_B_general.weight", {m.out_features, c.hybrid_r}});
    }
    return t;
  }
  /// As the reference: each block's A_n [r, in/k] (and A_g) kaiming-uniform, U(±1/√fan_in);
  /// B zero, or kaiming-uniform over its fan-in r (B_g: hybrid_r) without init_weights.
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>&, std::mt19937_64& rng) {
    s.extra.scaling = static_cast<T>(c.scaling());
    uniform(s[0].value(), s[0].value().dim(1), rng);
    if (!c.init_weights) uniform(s[1].value(), c.r, rng);
    if (c.hybrid_r == 0) return;
    detail::kaiming_uniform(s[2].value(), rng);
    if (!c.init_weights) detail::kaiming_uniform(s[3].value(), rng);
  }

  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.add_delta(
        [&s](Tape<T>& t, const Var<T>& x) { return blocks(t, x, s[0], s[1], s.extra.scaling); },
        c.gralora_dropout);
    if (c.hybrid_r > 0) p.add_low_rank(s[2], s[3], s.extra.scaling, c.gralora_dropout);
  }

  /// ΔW [out, in], block by block, plus the hybrid pair.
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>& m) {
    const Tensor<T>& a = s[0].value();  // [k, in/k, r]
    const Tensor<T>& b = s[1].value();  // [k, r, out/k]
    const std::int64_t k = a.dim(0), bi = a.dim(1), r = a.dim(2), bo = b.dim(2), sub = r / k;
    RowMatrix<T> d(m.out_features, m.in_features);
    for (std::int64_t j = 0; j < k; ++j)
      for (std::int64_t n = 0; n < k; ++n) {
        ConstMatrixMap<T> an(a.data() + n * bi * r, bi, r), bj(b.data() + j * r * bo, r, bo);
        d.block(j * bo, n * bi, bo, bi) =
            (an.middleCols(j * sub, sub) * bj.middleRows(n * sub, sub)).transpose();
      }
    if (s.tensors.size() > 2) d += s[3].value().matrix() * s[2].value().matrix();
    return s.extra.scaling * d;
  }

 private:
  template <class T>
  static void uniform(Tensor<T>& t, std::int64_t fan_in, std::mt19937_64& rng) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    std::uniform_real_distribution<double> u(-bound, bound);
    for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(u(rng));
  }
  // s · x ΔWᵀ for x [..., in]: [k, M, in/k] ×_batch A → [k, M, r]; regroup the columns
  // (input block n, output block j, sub) as [j, M, (n, sub)]; ×_batch B → [k, M, out/k].
  template <class T>
  static Var<T> blocks(Tape<T>& t, const Var<T>& x, const Var<T>& a, const Var<T>& b, T s) {
    const std::int64_t k = a.shape()[0], bi = a.shape()[1], r = a.shape()[2];
    const std::int64_t bo = b.shape()[2], rows = x.value().numel() / (k * bi);
    Var<T> h = ops::transpose(t, ops::reshape(t, x, Shape{rows, k, bi}), 0, 1);
    h = ops::reshape(t, ops::matmul(t, h, a), Shape{k, rows, k, r / k});
    h = ops::reshape(t, ops::transpose(t, h, 0, 2), Shape{k, rows, r});
    h = ops::transpose(t, ops::matmul(t, h, b), 0, 1);  // [M, k, out/k]
    Shape out = x.shape();
    out.back() = k * bo;
    return ops::scale(t, ops::reshape(t, h, out), s);
  }
};

}  // namespace peft
