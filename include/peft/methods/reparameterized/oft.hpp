#pragma once
// OFT (Qiu et al., "Controlling text-to-image diffusion by orthogonal finetuning", 2023; the
// reference's OFT as of peft 0.17+): the input is rotated block by block before the frozen
// product,
//   y = (x · blockdiag(R_0 .. R_{n−1})) Wᵀ + b,   R_j = cayley(Q_j),  Q_j = S_j − S_jᵀ,
// with S_j's strict upper triangle the j-th row of oft_R.weight [n, b(b−1)/2] (n blocks of b
// input features, n · b = in). cayley is the reference's truncated Neumann series
// (use_cayley_neumann, num_cayley_neumann_terms) or the exact (I − Q)(I + Q)⁻¹
// (core/ops/orthogonal.hpp). Variants: block_share (one R for every block), COFT (coft: before
// each use, a block whose ‖Q_j‖_F exceeds eps/√n is scaled back onto that ball — the constrained
// OFT of the paper, done in place as the reference does), module_dropout (in training, ⌊p·n⌋
// random blocks act as the identity: the reference's multiplicative dropout).
// oft_R.weight starts at 0 (R = I): the model starts at the base model. Mergeable: W ← W Rᵀ,
// unmerged with R⁻ᵀ (R is orthogonal only for the exact transform).
// r (blocks) or oft_block_size is given, the other derived from each module's in_features; a
// value that does not divide in_features is moved to the nearest divisor, as the reference does.
// docs/methods/reparameterized.md#oft; tests/test_orthogonal.cpp; golden llama_oft, gpt2_oft.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/core/ops/orthogonal.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct OftConfig : ConfigIo<OftConfig> {
  static constexpr std::string_view peft_type = "OFT";
  int r = 0;                ///< blocks per module (0: from oft_block_size)
  int oft_block_size = 32;  ///< features per block (0: from r)
  double module_dropout = 0.0;
  bool coft = false;
  double eps = 6e-5;
  bool block_share = false;
  bool init_weights = true;  ///< zeros (R = I); false: N(0, 0.1²)
  bool use_cayley_neumann = true;
  int num_cayley_neumann_terms = 5;
  TargetRules targets;

  static auto fields() {
    using C = OftConfig;
    return config_fields(
        field("r", &C::r, check::dimension_or_zero),
        field("oft_block_size", &C::oft_block_size, check::dimension_or_zero),
        float_field("module_dropout", &C::module_dropout, check::probability),
        field("coft", &C::coft), float_field("eps", &C::eps, check::scale),
        field("block_share", &C::block_share), field("init_weights", &C::init_weights),
        field("use_cayley_neumann", &C::use_cayley_neumann),
        field("num_cayley_neumann_terms", &C::num_cayley_neumann_terms, check::dimension),
        targets_field(&C::targets), fan_in_fan_out(), fixed("bias", "none"),
        fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    if ((r != 0) == (oft_block_size != 0))
      throw ConfigError(source + ": exactly one of r (" + std::to_string(r) +
                        ") and oft_block_size (" + std::to_string(oft_block_size) +
                        ") must be non-zero (r × oft_block_size = in_features)");
  }

  /// The blocks and block size on a module of `in` features (the reference's
  /// adjust_oft_parameters: the nearest divisor of `in`, the lower one on a tie).
  std::pair<std::int64_t, std::int64_t> blocks_for(std::int64_t in) const {
    auto adjust = [in](std::int64_t v) {
      if (v >= in) return in;
      std::int64_t higher = v, lower = v;
      while (higher <= in && in % higher != 0) ++higher;
      while (lower > 1 && in % lower != 0) --lower;
      return v - lower <= higher - v ? lower : higher;
    };
    if (r == 0) {
      const std::int64_t b =
          in % oft_block_size != 0 || oft_block_size > in ? adjust(oft_block_size) : oft_block_size;
      return {in / b, b};
    }
    const std::int64_t n = in % r != 0 || r > in ? adjust(r) : r;
    return {n, in / n};
  }
};

struct OFT {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "oft", title = "OFT";
  static constexpr std::string_view paper =
      "Qiu et al., 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning";
  static constexpr std::string_view reference = "OFT";  ///< peft_type in HF peft
  using Config = OftConfig;
  template <class T>
  struct Extra {
    std::int64_t block = 1;  ///< b
  };
  template <class T>
  using State = SiteState<OFT, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  /// oft_R.weight [n, b(b−1)/2] ([1, ...] with block_share).
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const auto [n, b] = c.blocks_for(m.in_features);
    return {{"oft_R.weight", {c.block_share ? 1 : n, ops::skew_elements(b)}}};
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    s.extra.block = c.blocks_for(m.in_features).second;
    if (!c.init_weights) detail::normal_fill(s[0].value(), rng, 0.1);
  }

  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    std::mt19937_64* dropout = c.module_dropout > 0 ? p.dropout_generator() : nullptr;
    p.map_input([c, w = s[0], b = s.extra.block, dropout](Tape<T>& tape, const Var<T>& x) {
      Var<T> r = rotation(tape, c, w, b);
      if (dropout) r = drop_blocks(tape, r, c.module_dropout, *dropout);
      return ops::block_rotate(tape, x, r);
    });
  }

  /// W ← W Rᵀ (merge) or W ← W R⁻ᵀ (unmerge), block by block of input columns.
  template <class T>
  static RowMatrix<T> merged_weight(const Config& c, const Slot<T>& s, const nn::Linear<T>& m,
                                    bool merge) {
    Tape<T> tape(false);
    const Tensor<T> r = rotation(tape, c, s[0], s.extra.block).value();
    const std::int64_t b = s.extra.block, n = m.in_features / b;
    RowMatrix<T> w = m.weight_out_in();
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t k = r.dim(0) == 1 ? 0 : j;
      Eigen::Map<const RowMatrix<T>> rj(r.data() + k * b * b, b, b);
      const RowMatrix<T> factor =
          merge ? RowMatrix<T>(rj.transpose()) : RowMatrix<T>(rj.inverse().transpose());
      w.middleCols(j * b, b) = (w.middleCols(j * b, b) * factor).eval();
    }
    return w;
  }

 private:
  template <class T>
  static Var<T> rotation(Tape<T>& tape, const Config& c, Var<T> w, std::int64_t b) {
    if (c.coft) project(w.value(), b, c.eps);
    const Var<T> q = ops::skew_symmetric(tape, w, b);
    return c.use_cayley_neumann ? ops::cayley_neumann(tape, q, c.num_cayley_neumann_terms)
                                : ops::cayley(tape, q);
  }
  /// COFT's projection, in place (the reference copies it into the parameter under no_grad):
  /// a row whose skew matrix has ‖Q‖_F > ε/√n is scaled to norm ε/√n.
  template <class T>
  static void project(Tensor<T>& w, std::int64_t b, double eps) {
    const std::int64_t n = w.dim(0), m = ops::skew_elements(b);
    const double bound = eps / std::sqrt(static_cast<double>(n));
    for (std::int64_t k = 0; k < n; ++k) {
      double sq = 0;
      for (std::int64_t t = 0; t < m; ++t) sq += 2.0 * double(w[k * m + t]) * double(w[k * m + t]);
      const double norm = std::sqrt(sq);
      if (norm <= bound) continue;
      for (std::int64_t t = 0; t < m; ++t)
        w[k * m + t] = static_cast<T>(bound * (double(w[k * m + t]) / norm));
    }
  }
  /// ⌊p·n⌋ of the n blocks, drawn without replacement, become the identity (none when n = 1).
  template <class T>
  static Var<T> drop_blocks(Tape<T>& tape, const Var<T>& r, double p, std::mt19937_64& rng) {
    const std::int64_t n = r.shape()[0], b = r.shape()[1];
    const auto dropped = static_cast<std::int64_t>(p * static_cast<double>(n));
    if (n == 1 || dropped == 0) return r;
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    Tensor<T> keep = Tensor<T>::zeros(r.shape()), eye = Tensor<T>::zeros(r.shape());
    for (std::int64_t k = 0; k < n; ++k) {
      const bool drop =
          std::find(order.begin(), order.begin() + dropped, k) != order.begin() + dropped;
      for (std::int64_t i = 0; i < b * b; ++i) keep[k * b * b + i] = drop ? T(0) : T(1);
      if (drop)
        for (std::int64_t i = 0; i < b; ++i) eye[(k * b + i) * b + i] = T(1);
    }
    return ops::add(tape, ops::mul(tape, r, Var<T>(std::move(keep))), Var<T>(std::move(eye)));
  }
};

}  // namespace peft
