#pragma once
// BOFT (Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
// 2024): OFT's rotation as a product of k butterfly factors, and a trainable output scale,
//   y = ((x · M) Wᵀ) ⊙ s + b,   M = F_{k−1} ⋯ F_0,   F_f = P_f · blockdiag(R_f,0 .. R_f,D−1) ·
//   P_fᵀ,
// R_f,j = cayley(½ (Q − Qᵀ)) (the exact (I − S)(I + S)⁻¹, as the reference) of the square
// blocks boft_R [k, D, H, H], s = boft_s [out, 1] (the bias is not scaled). P_f are the
// reference's block-butterfly permutations (block_butterfly_perm); with one factor P = I and BOFT
// is a block rotation with an output scale. D · H = in (give boft_block_size or
// boft_block_num); k = boft_n_butterfly_factor (a factor count the reference runs only with its
// CUDA kernel: on a CPU it runs one factor whatever the config says — files it writes there
// hold boft_R [1, ...]). Starts at the base model (R = 0, s = 1). Mergeable: W ← s ⊙ (W Mᵀ).
// docs/methods/reparameterized.md#boft; tests/test_orthogonal.cpp; golden llama_boft.
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/core/ops/orthogonal.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct BoftConfig : ConfigIo<BoftConfig> {
  static constexpr std::string_view peft_type = "BOFT";
  int boft_block_size = 4;  ///< H (0: from boft_block_num)
  int boft_block_num = 0;   ///< D (0: from boft_block_size)
  int boft_n_butterfly_factor = 1;
  double boft_dropout = 0.0;
  bool init_weights = true;  ///< R = 0, s = 1; false: N(0, 0.1²) and N(1, 0.1²)
  TargetRules targets;

  static auto fields() {
    using C = BoftConfig;
    return config_fields(
        field("boft_block_size", &C::boft_block_size, check::dimension_or_zero),
        field("boft_block_num", &C::boft_block_num, check::dimension_or_zero),
        field("boft_n_butterfly_factor", &C::boft_n_butterfly_factor, check::dimension),
        float_field("boft_dropout", &C::boft_dropout, check::probability),
        field("init_weights", &C::init_weights), targets_field(&C::targets), fan_in_fan_out(),
        fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    if ((boft_block_size != 0) == (boft_block_num != 0))
      throw ConfigError(source + ": exactly one of boft_block_size (" +
                        std::to_string(boft_block_size) + ") and boft_block_num (" +
                        std::to_string(boft_block_num) + ") must be non-zero");
    if (boft_dropout > 0)
      throw ConfigError(source + ": boft_dropout (multiplicative block dropout) is not supported");
  }
  /// {D, H} on a module of `in` features, checked as the reference checks them.
  std::pair<std::int64_t, std::int64_t> blocks_for(std::int64_t in, std::string_view module) const {
    const std::int64_t given = boft_block_size != 0 ? boft_block_size : boft_block_num;
    const std::int64_t factors = std::int64_t(1) << (boft_n_butterfly_factor - 1);
    auto fail = [&](const std::string& why) {
      throw ConfigError("BOFT: " + std::string(module) + " (in " + std::to_string(in) +
                        "): " + why);
    };
    if (in % given != 0) fail(std::to_string(given) + " does not divide in_features");
    const std::int64_t d = boft_block_size != 0 ? in / given : given, h = in / d;
    if (boft_n_butterfly_factor > 1 && (d % factors != 0 || d % 2 != 0 || h % 2 != 0))
      fail("the block count and size must be even and the count a multiple of 2^(factors − 1)");
    return {d, h};
  }
};

struct BOFT {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "boft", title = "BOFT";
  static constexpr std::string_view paper =
      "Liu et al., 2024, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization";
  static constexpr std::string_view reference = "BOFT";  ///< peft_type in HF peft
  using Config = BoftConfig;
  template <class T>
  struct Extra {
    std::vector<std::vector<std::int64_t>> perms, inverses;  ///< per factor; empty: identity
  };
  template <class T>
  using State = SiteState<BOFT, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const auto [d, h] = c.blocks_for(m.in_features, m.name);
    return {{"boft_R", {c.boft_n_butterfly_factor, d, h, h}}, {"boft_s", {m.out_features, 1}}};
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    const auto [d, h] = c.blocks_for(m.in_features, m.name);
    const int k = c.boft_n_butterfly_factor;
    for (int f = 0; f < k && k > 1; ++f) {
      std::vector<std::int64_t> p = butterfly_perm(m.in_features, d >> f, h / 2), inv(p.size());
      for (std::size_t i = 0; i < p.size(); ++i)
        inv[static_cast<std::size_t>(p[i])] = std::int64_t(i);
      s.extra.perms.push_back(std::move(p));
      s.extra.inverses.push_back(std::move(inv));
    }
    s[1].value().fill(T(1));
    if (!c.init_weights) {
      detail::normal_fill(s[0].value(), rng, 0.1);
      std::normal_distribution<double> n(1.0, 0.1);
      for (std::int64_t i = 0; i < s[1].value().numel(); ++i) s[1].value()[i] = T(n(rng));
    }
  }

  /// The input map x · M, then the output scale on the product without its bias.
  template <class T>
  static void contribute(const Config&, Projection<T>& p, const Slot<T>& s) {
    p.map_input([s](Tape<T>& tape, const Var<T>& x) { return rotate(tape, x, s); });
    const std::int64_t out = p.module().out_features;
    p.map_output([scale = s[1], bias = p.module().bias, out](Tape<T>& t, const Var<T>& y) {
      const Var<T> flat = ops::reshape(t, scale, Shape{out});
      if (!bias) return ops::mul(t, y, flat);
      const Var<T> unbiased = ops::add(t, y, ops::scale(t, bias, T(-1)));
      return ops::add(t, ops::mul(t, unbiased, flat), bias);
    });
  }
  /// W ← s ⊙ (W Mᵀ) (merge), or back: W ← (W / s) M⁻ᵀ.
  template <class T>
  static RowMatrix<T> merged_weight(const Config&, const Slot<T>& s, const nn::Linear<T>& m,
                                    bool merge) {
    Tape<T> tape(false);
    const std::int64_t in = m.in_features;
    Tensor<T> eye = Tensor<T>::zeros(Shape{in, in});
    for (std::int64_t i = 0; i < in; ++i) eye[i * in + i] = T(1);
    const RowMatrix<T> rotation = rotate(tape, Var<T>(std::move(eye)), s).value().matrix();  // I M
    const auto scale = s[1].value().vector().array();
    if (merge) return (scale.matrix().asDiagonal() * (m.weight_out_in() * rotation.transpose()));
    const RowMatrix<T> unscaled = scale.inverse().matrix().asDiagonal() * m.weight_out_in();
    return unscaled * rotation.transpose().inverse();
  }

 private:
  // x · F_{k−1} ⋯ F_0, F = P B Pᵀ: x P scatters (gather by the inverse), then the blocks, then
  // Pᵀ gathers.
  template <class T>
  static Var<T> rotate(Tape<T>& tape, Var<T> x, const Slot<T>& s) {
    const Var<T>& q = s[0];  // [k, D, H, H]
    const std::int64_t k = q.shape()[0], d = q.shape()[1], h = q.shape()[2];
    const Var<T> blocks = ops::reshape(tape, q, Shape{k * d, h, h});
    const Var<T> skew = ops::scale(
        tape, ops::add(tape, blocks, ops::scale(tape, ops::transpose(tape, blocks, 1, 2), T(-1))),
        T(0.5));
    const Var<T> r = ops::cayley(tape, skew);  // [k·D, H, H]
    for (std::int64_t f = k - 1; f >= 0; --f) {
      const Var<T> rf = k == 1 ? r : ops::slice(tape, r, 0, f * d, d);
      if (s.extra.perms.empty()) {
        x = ops::block_rotate(tape, x, rf);
        continue;
      }
      const auto i = static_cast<std::size_t>(f);
      x = ops::gather_features(tape, x, s.extra.inverses[i]);
      x = ops::gather_features(tape, ops::block_rotate(tape, x, rf), s.extra.perms[i]);
    }
    return x;
  }
  /// The reference's block_butterfly_perm(n, b, r): within each chunk of n/b features, the
  /// r-wide groups at even positions first, then the odd ones.
  static std::vector<std::int64_t> butterfly_perm(std::int64_t n, std::int64_t b, std::int64_t r) {
    if (b * r * 2 > n) throw ConfigError("BOFT: invalid number of blocks for the butterfly");
    const std::int64_t chunk = n / b;
    const double step = double(chunk) / double(r);
    std::vector<std::int64_t> order(static_cast<std::size_t>(chunk));
    std::int64_t slot = 0;
    for (int parity = 0; parity < 2; ++parity)
      for (std::int64_t pos = parity; double(pos) < step; pos += 2, ++slot)
        for (std::int64_t t = 0; t < r; ++t)
          order[static_cast<std::size_t>(slot * r + t)] = pos * r + t;
    std::vector<std::int64_t> perm(static_cast<std::size_t>(n));
    for (std::int64_t start = 0; start < n; start += chunk)
      for (std::int64_t i = 0; i < chunk; ++i)
        perm[static_cast<std::size_t>(start + i)] = start + order[static_cast<std::size_t>(i)];
    return perm;
  }
};

}  // namespace peft
