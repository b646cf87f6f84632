#pragma once
// HRA (Yuan et al., "Bridging the gap between low-rank and orthogonal adaptation via Householder
// reflection adaptation", 2024): W ← W H with H the product of r Householder reflections,
//   H = Π_{i=0}^{r−1} (I − 2 û_i û_iᵀ),  û_i = u_i / ‖u_i‖,  U = hra_u [in, r],
// or, with apply_GS, one reflection across the span of U orthonormalised by Gram–Schmidt:
//   H = I − 2 Q Qᵀ.
// y = x (W H)ᵀ + b = (x Hᵀ) Wᵀ + b: the forward maps the input through the reflections
// (x ← x − 2 (x û) ûᵀ, r rank-1 steps, O(r·in) a row) and never forms H or W H.
// With init_weights and an even r, the columns come in equal pairs (u_{2k} = u_{2k+1}), whose
// reflections cancel: the model starts at the base model (to rounding). Mergeable: W ← W H, and
// back with the reflections in reverse order (H⁻¹ = Hᵀ).
// docs/methods/reparameterized.md#hra; tests/test_orthogonal.cpp; golden llama_hra.
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/core/ops/orthogonal.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct HraConfig : ConfigIo<HraConfig> {
  static constexpr std::string_view peft_type = "HRA";
  int r = 8;
  bool apply_GS = false;     ///< one reflection across the Gram–Schmidt span of U
  bool init_weights = true;  ///< paired columns (start at the base); false: all random
  TargetRules targets;

  static auto fields() {
    using C = HraConfig;
    return config_fields(field("r", &C::r, check::dimension), field("apply_GS", &C::apply_GS),
                         field("init_weights", &C::init_weights), targets_field(&C::targets),
                         fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct HRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "hra", title = "HRA";
  static constexpr std::string_view paper =
      "Yuan et al., 2024, Bridging the Gap between Low-rank and Orthogonal Adaptation via "
      "Householder Reflection Adaptation";
  static constexpr std::string_view reference = "HRA";  ///< peft_type in HF peft
  using Config = HraConfig;
  template <class T>
  using State = SiteState<HRA, T>;
  template <class T>
  using Slot = SiteSlot<T>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    return {{"hra_u", {m.in_features, c.r}}};
  }
  /// As the reference: kaiming-uniform columns, drawn for half of them and each repeated once
  /// (repeat_interleave) when init_weights and r is even.
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>&, std::mt19937_64& rng) {
    Tensor<T>& u = s[0].value();
    if (!c.init_weights || c.r % 2 != 0) return detail::kaiming_uniform(u, rng);
    Tensor<T> half(Shape{u.dim(0), c.r / 2});
    detail::kaiming_uniform(half, rng);
    for (std::int64_t i = 0; i < u.dim(0); ++i)
      for (int j = 0; j < c.r; ++j) u[i * c.r + j] = half[i * (c.r / 2) + j / 2];
  }

  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    p.map_input([u = s[0], gs = c.apply_GS](Tape<T>& tape, const Var<T>& x) {
      return gs ? reflect_span(tape, x, u) : reflect_each(tape, x, u);
    });
  }

  /// W ← W H (merge) or W ← W H⁻¹ (unmerge: the reflections in reverse order; for apply_GS,
  /// H is its own inverse).
  template <class T>
  static RowMatrix<T> merged_weight(const Config& c, const Slot<T>& s, const nn::Linear<T>& m,
                                    bool merge) {
    return m.weight_out_in() * reflections(s[0].value(), c.apply_GS, merge);
  }

 private:
  // x Hᵀ = x H_{r−1} ⋯ H_0 (each reflection symmetric): the last reflection first.
  template <class T>
  static Var<T> reflect_each(Tape<T>& tape, Var<T> x, const Var<T>& u) {
    const Var<T> unit = ops::normalize_columns(tape, u);
    for (std::int64_t i = unit.shape()[1] - 1; i >= 0; --i) {
      const Var<T> column = ops::slice(tape, unit, 1, i, 1);  // [in, 1]
      x = reflect(tape, x, ops::transpose(tape, column, 0, 1), column);
    }
    return x;
  }
  // x − 2 (x Q) Qᵀ, Q = Gram–Schmidt(U) (modified: each column against the ones before it).
  template <class T>
  static Var<T> reflect_span(Tape<T>& tape, const Var<T>& x, const Var<T>& u) {
    const Var<T> q = ops::transpose(tape, gram_schmidt(tape, u), 0, 1);  // [r, in]
    return reflect(tape, x, q, ops::transpose(tape, q, 0, 1));
  }
  // x − 2 (x Vᵀ) V'ᵀ with V [k, in] and V' = Vᵀ as a [in, k] weight.
  template <class T>
  static Var<T> reflect(Tape<T>& tape, const Var<T>& x, const Var<T>& rows, const Var<T>& cols) {
    using ops::WeightLayout;
    const Var<T> h = ops::linear(tape, x, rows, Var<T>{}, WeightLayout::OutIn);
    return ops::add(
        tape, x,
        ops::scale(tape, ops::linear(tape, h, cols, Var<T>{}, WeightLayout::OutIn), T(-2)));
  }
  template <class T>
  static Var<T> gram_schmidt(Tape<T>& tape, const Var<T>& u) {
    std::vector<Var<T>> q;
    for (std::int64_t i = 0; i < u.shape()[1]; ++i) {
      Var<T> ui = ops::slice(tape, u, 1, i, 1);  // [in, 1]
      for (const Var<T>& w : q) {
        const Var<T> dot = ops::reshape(tape, ops::matmul(tape, w, ui, true), Shape{1});
        ui = ops::add(tape, ui, ops::scale(tape, ops::mul(tape, w, dot), T(-1)));
      }
      q.push_back(ops::normalize_columns(tape, ui));
    }
    return ops::concat(tape, q, 1);  // [in, r]
  }
  template <class T>
  static RowMatrix<T> reflections(const Tensor<T>& hra_u, bool gram_schmidt, bool forward) {
    ConstMatrixMap<T> u = hra_u.matrix();
    const std::int64_t in = u.rows(), r = u.cols();
    RowMatrix<T> h = RowMatrix<T>::Identity(in, in);
    if (gram_schmidt) {
      RowMatrix<T> q(in, r);
      for (std::int64_t i = 0; i < r; ++i) {
        Eigen::Matrix<T, Eigen::Dynamic, 1> c = u.col(i);
        for (std::int64_t j = 0; j < i; ++j) c -= q.col(j).dot(c) * q.col(j);
        q.col(i) = c / c.norm();
      }
      return h - T(2) * q * q.transpose();
    }
    for (std::int64_t k = 0; k < r; ++k) {
      const std::int64_t i = forward ? k : r - 1 - k;
      const Eigen::Matrix<T, Eigen::Dynamic, 1> c = u.col(i) / u.col(i).norm();
      h -= T(2) * (h * c) * c.transpose();
    }
    return h;
  }
};

}  // namespace peft
