#pragma once
// FourierFT (Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
// 2024): the update is the real part of the inverse 2-D DFT of a sparse spectrum — n trainable
// coefficients c (fourierft_spectrum [n]) at n fixed random frequencies (r_k, q_k) of [out, in]:
//   ΔW[p, t] = s/(out·in) · Σ_k c_k cos(2π (r_k p / out + q_k t / in)),   s = scaling.
// The frequencies are the reference's: the first n of torch.randperm(out·in) with a CPU
// generator seeded random_loc_seed (its Mersenne Twister and Fisher–Yates draws, reproduced
// bit for bit by std::mt19937 below), split as (k / in, k mod in) — so a reference file, which
// stores c alone, loads with the same frequencies. With cos(a + b) = cos a cos b − sin a sin b
// the update is two rank-n products of fixed bases,
//   x ΔWᵀ = s' (x Cᵢₙᵀ) diag(c) Cₒᵤₜ − s' (x Sᵢₙᵀ) diag(c) Sₒᵤₜ,  Cᵢₙ[k, t] = cos(2π q_k t / in),
//   ...
// so the forward is two low-rank terms (fused into the base product) and never forms ΔW.
// init_weights true: c = 0 (the base model exactly); false (the reference's default): N(0, 1).
// Mergeable: W += ΔW. The reference builds ΔW in float32 even in a float64 model.
// docs/methods/reparameterized.md#fourierft; tests/test_orthogonal.cpp; golden llama_fourierft,
// gpt2_fourierft.
#include <cmath>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct FourierFtConfig : ConfigIo<FourierFtConfig> {
  static constexpr std::string_view peft_type = "FOURIERFT";
  int n_frequency = 1000;
  double scaling = 150.0;
  std::int64_t random_loc_seed = 777;
  bool init_weights = false;  ///< true: c = 0; false: N(0, 1) (the reference's default)
  PatternMap<int> n_frequency_pattern;
  TargetRules targets;

  int frequencies_for(const std::string& module) const {
    return pattern_lookup(n_frequency_pattern, module).value_or(n_frequency);
  }
  static auto fields() {
    using C = FourierFtConfig;
    return config_fields(field("n_frequency", &C::n_frequency, check::positive),
                         float_field("scaling", &C::scaling, check::scale),
                         field("random_loc_seed", &C::random_loc_seed),
                         field("init_weights", &C::init_weights),
                         field("n_frequency_pattern", &C::n_frequency_pattern, check::all_positive),
                         targets_field(&C::targets), fan_in_fan_out(), fixed("bias", "none"),
                         fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct FourierFT {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "fourierft", title = "FourierFT";
  static constexpr std::string_view paper =
      "Gao et al., 2024, Parameter-Efficient Fine-Tuning with Discrete Fourier Transform";
  static constexpr std::string_view reference = "FOURIERFT";  ///< peft_type in HF peft
  using Config = FourierFtConfig;
  template <class T>
  struct Extra {
    Var<T> cos_in, sin_in;    ///< [n, in], constant
    Var<T> cos_out, sin_out;  ///< [out, n], constant
    T scale = T(1);           ///< s / (out · in)
  };
  template <class T>
  using State = SiteState<FourierFT, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t n = c.frequencies_for(std::string(m.name));
    if (n > m.in_features * m.out_features)
      throw ConfigError("FourierFT: n_frequency " + std::to_string(n) + " exceeds " +
                        std::string(m.name) + "'s " +
                        std::to_string(m.in_features * m.out_features) + " frequencies");
    return {{"fourierft_spectrum", {n}}};
  }

  /// The first `count` entries of torch.randperm(n, generator=torch.Generator().manual_seed(seed))
  /// on the CPU: the identity shuffled by Fisher–Yates with z = mt19937() mod (n − i) (ATen's
  /// randperm_cpu, for n below 2^32 / 20).
  static std::vector<std::int64_t> torch_randperm(std::int64_t n, std::int64_t seed,
                                                  std::int64_t count) {
    if (n >= std::int64_t(0xffffffffu) / 20)
      throw ConfigError("FourierFT: a module of " + std::to_string(n) +
                        " weights is beyond the frequency draw reproduced here (2^32 / 20)");
    std::mt19937 rng(static_cast<std::uint32_t>(seed));
    std::vector<std::int64_t> r(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) r[static_cast<std::size_t>(i)] = i;
    for (std::int64_t i = 0; i + 1 < n && i < count; ++i) {
      const auto z = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(n - i));
      std::swap(r[static_cast<std::size_t>(i)], r[static_cast<std::size_t>(z + i)]);
    }
    r.resize(static_cast<std::size_t>(count));
    return r;
  }

  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    const std::int64_t in = m.in_features, out = m.out_features;
    const std::int64_t n = s[0].value().numel();
    const std::vector<std::int64_t> picks = torch_randperm(in * out, c.random_loc_seed, n);
    Tensor<T> ci(Shape{n, in}), si(Shape{n, in}), co(Shape{out, n}), so(Shape{out, n});
    constexpr double two_pi = 2 * std::numbers::pi;
    for (std::int64_t k = 0; k < n; ++k) {
      const std::int64_t row = picks[static_cast<std::size_t>(k)] / in;
      const std::int64_t col = picks[static_cast<std::size_t>(k)] % in;
      for (std::int64_t t = 0; t < in; ++t) {
        const double a = two_pi * double((col * t) % in) / double(in);
        ci[k * in + t] = static_cast<T>(std::cos(a));
        si[k * in + t] = static_cast<T>(std::sin(a));
      }
      for (std::int64_t p = 0; p < out; ++p) {
        const double a = two_pi * double((row * p) % out) / double(out);
        co[p * n + k] = static_cast<T>(std::cos(a));
        so[p * n + k] = static_cast<T>(std::sin(a));
      }
    }
    s.extra = {Var<T>(std::move(ci)), Var<T>(std::move(si)), Var<T>(std::move(co)),
               Var<T>(std::move(so)), static_cast<T>(c.scaling / double(in * out))};
    if (!c.init_weights) detail::normal_fill(s[0].value(), rng, 1.0);
  }

  /// s' (x Cᵢₙᵀ)(Cₒᵤₜ ⊙ c)ᵀ − s' (x Sᵢₙᵀ)(Sₒᵤₜ ⊙ c)ᵀ: two low-rank terms, c on the output bases.
  template <class T>
  static void contribute(const Config&, Projection<T>& p, const Slot<T>& s) {
    Tape<T>& tape = p.tape();
    const Extra<T>& e = s.extra;
    p.add_low_rank(e.cos_in, ops::mul(tape, e.cos_out, s[0]), e.scale);
    p.add_low_rank(e.sin_in, ops::mul(tape, e.sin_out, s[0]), -e.scale);
  }
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>&) {
    const Extra<T>& e = s.extra;
    const auto c = s[0].value().vector().asDiagonal();
    return e.scale * (e.cos_out.value().matrix() * c * e.cos_in.value().matrix() -
                      e.sin_out.value().matrix() * c * e.sin_in.value().matrix());
  }
};

}  // namespace peft
