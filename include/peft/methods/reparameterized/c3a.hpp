#pragma once
// C3A (Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution", 2025): a
// block-circulant update,
//   y = x Wᵀ + b + (1/in) · x Cᵀ,  C [out, in] in blocks of b × b, C_ij[k, t] = w_ij[(t − k) mod
//   b],
// with c3a_kernel w [out/b, in/b, b] trained: (out · in)/b parameters, a full-rank update. The
// product runs through the FFT (ops::block_circular), never forming C. b = block_size, per
// module from block_size_pattern; it must divide in and out. init_weights: true (zeros: the
// base model exactly), false / "xavier_uniform" (the reference's default: U(±√3·√(2/(in+out)))),
// "kaiming_uniform" (U(±1/√in)), "gaussian" (N(0, 1)). Mergeable: W += C / in.
// docs/methods/reparameterized.md#c3a; tests/test_orthogonal.cpp; golden llama_c3a.
#include <cmath>
#include <string>

#include "peft/core/ops.hpp"
#include "peft/core/ops/structured_updates.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct C3aConfig : ConfigIo<C3aConfig> {
  enum class Init { Zeros, XavierUniform, KaimingUniform, Gaussian };
  static constexpr std::string_view peft_type = "C3A";
  int block_size = 256;
  PatternMap<int> block_size_pattern;
  Init init = Init::XavierUniform;
  TargetRules targets;

  int block_for(const std::string& module) const {
    return pattern_lookup(block_size_pattern, module).value_or(block_size);
  }
  static auto fields() {
    using C = C3aConfig;
    return config_fields(field("block_size", &C::block_size, check::dimension),
                         field("block_size_pattern", &C::block_size_pattern, check::dimension),
                         choice("init_weights", &C::init, std::pair(true, Init::Zeros),
                                std::pair("xavier_uniform", Init::XavierUniform),
                                std::pair(false, Init::XavierUniform),
                                std::pair("kaiming_uniform", Init::KaimingUniform),
                                std::pair("gaussian", Init::Gaussian)),
                         detail::reparameterized::TargetsWithoutExclude<C>{{&C::targets}},
                         fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct C3A {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "c3a", title = "C3A";
  static constexpr std::string_view paper =
      "Chen et al., 2025, Parameter-Efficient Fine-Tuning via Circular Convolution";
  static constexpr std::string_view reference = "C3A";  ///< peft_type in HF peft
  using Config = C3aConfig;
  template <class T>
  using State = SiteState<C3A, T>;
  template <class T>
  using Slot = SiteSlot<T>;

  /// c3a_kernel [out/b, in/b, b]; b must divide both (the reference's check).
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t b = c.block_for(std::string(m.name));
    if (m.in_features % b != 0 || m.out_features % b != 0)
      throw ConfigError("C3A: block_size " + std::to_string(b) + " does not divide " +
                        std::string(m.name) + "'s [" + std::to_string(m.out_features) + ", " +
                        std::to_string(m.in_features) + "]");
    return {{"c3a_kernel", {m.out_features / b, m.in_features / b, b}}};
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    Tensor<T>& w = s[0].value();
    double bound = 0;
    if (c.init == Config::Init::XavierUniform)
      bound = std::sqrt(3.0) * std::sqrt(2.0 / double(m.in_features + m.out_features));
    if (c.init == Config::Init::KaimingUniform) bound = std::sqrt(1.0 / double(m.in_features));
    if (c.init == Config::Init::Gaussian) return detail::normal_fill(w, rng, 1.0);
    std::uniform_real_distribution<double> u(-bound, bound);
    if (bound > 0)
      for (std::int64_t i = 0; i < w.numel(); ++i) w[i] = static_cast<T>(u(rng));
  }
  template <class T>
  static void contribute(const Config&, Projection<T>& p, const Slot<T>& s) {
    const T inv_in = T(1) / static_cast<T>(p.module().in_features);
    p.add_delta([w = s[0], inv_in](Tape<T>& t, const Var<T>& x) {
      return ops::scale(t, ops::block_circular(t, x, w), inv_in);
    });
  }
  /// ΔW = C / in.
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>& m) {
    const Tensor<T>& w = s[0].value();
    const std::int64_t mb = w.dim(0), nb = w.dim(1), b = w.dim(2);
    RowMatrix<T> c(mb * b, nb * b);
    for (std::int64_t i = 0; i < mb; ++i)
      for (std::int64_t j = 0; j < nb; ++j)
        for (std::int64_t k = 0; k < b; ++k)
          for (std::int64_t t = 0; t < b; ++t)
            c(i * b + k, j * b + t) = w[(i * nb + j) * b + (t - k + b) % b];
    return c / static_cast<T>(m.in_features);
  }
};

}  // namespace peft
