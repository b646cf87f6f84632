#pragma once
// ReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models"), as AdapterHub's
// ReftConfig family defines it: after each chosen block, the hidden state h [d] at each row's
// first `prefix_positions` and last `suffix_positions` tokens is replaced by an intervention
//   LoReFT  Φ(h) = h + Rᵀ(W h + b − R h),  R [r, d] with orthonormal rows (orthogonality)
//   NoReFT  the same with R unconstrained
//   DiReFT  Φ(h) = h + Rᵀ(W h + b)          (R unconstrained, no subtraction)
// with W [r, d], b [r] (AdapterHub's learned_source) and R (its projection). The prefix and the
// suffix each have their own (W, b, R), or share one with tied_weights. Dropout p acts on Φ(h)
// (AdapterHub and pyreft drop the intervened state, h included). Where a position is both in
// the prefix and the suffix, the suffix's Φ wins (AdapterHub scatters the suffix last); positions
// past a row's tokens (padding, a row shorter than the prefix) are not intervened.
//
// R's orthogonal parametrisation (LoReFT): torch's Householder map, the one
// torch.nn.utils.parametrizations.orthogonal picks for a non-square weight, as AdapterHub and
// pyreft use: from X [r, d] (".projection.parametrizations.weight.original"), v_k = e_k +
// Σ_{j>k} X[k, j] e_j, H_k = I − 2 v_k v_kᵀ / ‖v_k‖², R = (H_1 ⋯ H_r)[:, :r]ᵀ, so R Rᵀ = I for
// every X (entries X[k, j≤k] are unused). Unlike torch's default it has no trivialisation (a
// frozen d×d base multiplying the result, which AdapterHub saves in every unit), and no sign
// factor (R's row signs are absorbed by W and b).
// Initialisation as AdapterHub's: W, b, R (or X) as nn.Linear initialises them, so the model
// does not start at the base model; with W = R and b = 0 (LoReFT, NoReFT) or W = 0, b = 0
// (DiReFT) Φ is the identity (tests/test_reft_and_compacter.cpp).
// Generation with a key/value cache: the prefill intervenes on the prompt; later steps on the
// prefix positions they still hold only (the suffix stays the prompt's, as pyreft generates).
//
// No reference in HF peft; this project's layout (docs/methods/additive.md#reft): peft_type
// "LOREFT" / "NOREFT" / "DIREFT"; per block i and unit u (0: the prefix, or both when tied;
// 1: the suffix) "base_model.model.<block i>.reft_layer.units.<u>.learned_source.{weight,bias}"
// and ".projection.weight" (NoReFT, DiReFT) or ".projection.parametrizations.weight.original".
#include <algorithm>
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/projection.hpp"

namespace peft {

namespace detail {
enum class ReftKind { LoReft, NoReft, DiReft };

constexpr std::string_view reft_peft_type(ReftKind k) {
  return k == ReftKind::LoReft ? "LOREFT" : k == ReftKind::NoReft ? "NOREFT" : "DIREFT";
}

/// AdapterHub's `layers`: "all" (written for an empty list), a layer index or a list of them.
template <class C>
struct ReftLayersField {
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    const nlohmann::json& v = json_field(j, "layers");
    if (v.is_null() || v == "all") return c.layers.clear();
    if (v.is_number_integer())
      c.layers = {config_detail::read_value<int>(v, source, "layers")};
    else
      c.layers = config_detail::read_value<std::vector<int>>(v, source, "layers");
    for (int layer : c.layers)
      if (layer < 0) config_detail::fail(source, "layers", "\"all\" or layer indices >= 0", v);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const {
    j["layers"] = c.layers.empty() ? nlohmann::json("all") : nlohmann::json(c.layers);
  }
};
}  // namespace detail

template <detail::ReftKind Kind>
struct ReftConfig : ConfigIo<ReftConfig<Kind>> {
  static constexpr std::string_view peft_type = detail::reft_peft_type(Kind);
  static constexpr bool orthogonality = Kind == detail::ReftKind::LoReft;
  static constexpr bool subtract_projection = Kind != detail::ReftKind::DiReft;

  std::vector<int> layers;  ///< empty: every block ("all")
  std::int64_t prefix_positions = 3, suffix_positions = 0;
  std::int64_t r = 1;
  bool tied_weights = false;
  double dropout = 0.05;

  static auto fields() {
    using C = ReftConfig;
    return config_fields(
        detail::ReftLayersField<C>{},
        field("prefix_positions", &C::prefix_positions, check::dimension_or_zero),
        field("suffix_positions", &C::suffix_positions, check::dimension_or_zero),
        field("r", &C::r, check::dimension), field("tied_weights", &C::tied_weights),
        float_field("dropout", &C::dropout, check::probability),
        fixed("orthogonality", orthogonality, "fixed by the method: loreft, noreft, direft"),
        fixed("subtract_projection", subtract_projection,
              "fixed by the method: loreft, noreft, direft"),
        fixed("non_linearity", nullptr, "only the identity, AdapterHub's default"));
  }
  void validate(const std::string& source) const {
    if (prefix_positions + suffix_positions == 0)
      throw ConfigError(source +
                        ": prefix_positions and suffix_positions are both 0 (expected "
                        "at least one position to intervene on)");
  }
  bool adapts_layer(int layer) const {
    return layers.empty() || std::find(layers.begin(), layers.end(), layer) != layers.end();
  }
  int units() const {
    return tied_weights || suffix_positions == 0 || prefix_positions == 0 ? 1 : 2;
  }
};

template <detail::ReftKind Kind>
struct Reft : detail::AdditiveMethod<ReftConfig<Kind>> {
  using Config = ReftConfig<Kind>;
  static constexpr std::string_view name = Kind == detail::ReftKind::LoReft   ? "loreft"
                                           : Kind == detail::ReftKind::NoReft ? "noreft"
                                                                              : "direft";
  static constexpr std::string_view title = Kind == detail::ReftKind::LoReft   ? "LoReFT"
                                            : Kind == detail::ReftKind::NoReft ? "NoReFT"
                                                                               : "DiReFT";
  static constexpr std::string_view paper =
      "Wu et al., 2024, ReFT: Representation Finetuning for Language Models";
  static constexpr std::string_view reference = "";  ///< AdapterHub's, not HF peft's

  static ParameterCount count_parameters(const ModelConfig& m, const std::vector<LinearShape>&,
                                         const Config& c) {
    std::int64_t layers = 0;
    for (int l = 0; l < static_cast<int>(m.num_layers); ++l) layers += c.adapts_layer(l);
    return {layers * c.units() * (2 * c.r * m.hidden_size + c.r), 0};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    struct Unit {
      detail::DenseLayer<T> source;  ///< W [r, d], b [r]
      Var<T> projection;             ///< R [r, d], or X [r, d] of R's Householder map
    };
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      if (Config::orthogonality && config_.r > m.hidden_size)
        throw ConfigError(std::string(title) + ": r " + std::to_string(config_.r) +
                          " exceeds hidden_size " + std::to_string(m.hidden_size) +
                          " (R [r, d] needs r orthonormal rows)");
      const std::string block = m.model_type == "gpt2" ? "transformer.h." : "model.layers.";
      units_.assign(static_cast<std::size_t>(m.num_layers), {});
      for (int l = 0; l < static_cast<int>(m.num_layers); ++l) {
        if (!config_.adapts_layer(l)) continue;
        paths_.push_back(block + std::to_string(l) + ".reft_layer.units.");
        for (int u = 0; u < config_.units(); ++u) {
          detail::DenseLayer<T> proj(m.hidden_size, config_.r, ctx.rng);  // nn.Linear, no bias
          units_[static_cast<std::size_t>(l)].push_back(
              {detail::DenseLayer<T>(m.hidden_size, config_.r, ctx.rng), proj.weight});
        }
      }
    }

    std::vector<NamedParameter<T>> parameters() const {
      std::vector<NamedParameter<T>> out;
      std::size_t path = 0;
      for (const auto& layer : units_) {
        if (layer.empty()) continue;
        for (std::size_t u = 0; u < layer.size(); ++u) {
          const std::string p = "base_model.model." + paths_[path] + std::to_string(u) + ".";
          layer[u].source.name_parameters(p + "learned_source", out);
          out.push_back({p + (Config::orthogonality ? "projection.parametrizations.weight.original"
                                                    : "projection.weight"),
                         layer[u].projection});
        }
        ++path;
      }
      return out;
    }

    /// R of a unit: its weight, or the Householder map of X (LoReFT).
    static Var<T> rotation(Tape<T>& tape, const Var<T>& x) {
      if constexpr (!Config::orthogonality) return x;
      const std::int64_t r = x.value().dim(0), d = x.value().dim(1);
      Tensor<T> above = Tensor<T>::zeros(Shape{r, d}), eye = Tensor<T>::zeros(Shape{r, d});
      for (std::int64_t k = 0; k < r; ++k) {
        eye[k * d + k] = T(1);
        for (std::int64_t j = k + 1; j < d; ++j) above[k * d + j] = T(1);
      }
      const Var<T> v = ops::add(tape, ops::mul(tape, x, Var<T>(above)), Var<T>(eye));
      const Var<T> unit = ops::normalize_columns(tape, ops::transpose(tape, v, 0, 1));  // [d, r]
      Var<T> q(eye);  // rows of (H_1 ⋯ H_r)[:, :r]ᵀ = E H_r ⋯ H_1: the last reflection first
      for (std::int64_t k = r - 1; k >= 0; --k) {
        const Var<T> u = ops::slice(tape, unit, 1, k, 1);  // [d, 1]
        const Var<T> qu = ops::matmul(tape, q, u);         // [r, 1]
        q = ops::add(tape, q, ops::scale(tape, ops::matmul(tape, qu, u, false, true), T(-2)));
      }
      return q;
    }
    /// Φ(x) − x on rows x [N, d].
    Var<T> intervention(Tape<T>& tape, const Unit& unit, const Var<T>& x) const {
      const Var<T> rot = rotation(tape, unit.projection);
      Var<T> s = unit.source.forward(tape, x);  // W x + b
      if constexpr (Config::subtract_projection)
        s = ops::add(
            tape, s,
            ops::scale(tape, ops::linear(tape, x, rot, Var<T>{}, ops::WeightLayout::OutIn), T(-1)));
      return ops::matmul(tape, s, rot);  // (·) R = Rᵀ(·) per row
    }

    Var<T> after_block(Tape<T>& tape, int layer, const Var<T>& h, const TokenSpans& spans) const {
      const auto& units = units_[static_cast<std::size_t>(layer)];
      if (units.empty()) return h;
      const std::int64_t B = h.value().dim(0), Tn = h.value().dim(1), d = h.value().dim(2);
      std::vector<std::vector<std::int64_t>> rows(units.size());  // flat indices b·Tn + t
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t begin = spans.begin[static_cast<std::size_t>(b)],
                           end = spans.end[static_cast<std::size_t>(b)];
        const std::int64_t suffix =
            spans.past == 0 ? std::max(begin, end - config_.suffix_positions) : end;
        for (std::int64_t t = begin; t < end; ++t) {
          const bool in_suffix = t >= suffix,
                     in_prefix = spans.past + t - begin < config_.prefix_positions;
          if (in_suffix || in_prefix)
            rows[in_suffix && units.size() == 2 ? 1 : 0].push_back(b * Tn + t);
        }
      }
      const Var<T> flat = ops::reshape(tape, h, Shape{B * Tn, d});
      std::vector<std::vector<std::int64_t>> where;
      std::vector<Var<T>> deltas;
      for (std::size_t u = 0; u < units.size(); ++u) {
        if (rows[u].empty()) continue;
        const Var<T> x = ops::gather_rows(tape, flat, rows[u]);
        Var<T> delta = intervention(tape, units[u], x);
        if (spans.dropout && config_.dropout > 0) {  // dropout(x + Δ) − x
          const Var<T> mask(
              Projection<T>::dropout_mask(x.shape(), config_.dropout, *spans.dropout));
          delta = ops::add(tape, ops::mul(tape, ops::add(tape, x, delta), mask),
                           ops::scale(tape, x, T(-1)));
        }
        where.push_back(std::move(rows[u]));
        deltas.push_back(delta);
      }
      if (deltas.empty()) return h;
      return ops::reshape(tape, ops::index_add_rows(tape, flat, where, deltas), Shape{B, Tn, d});
    }

    const std::vector<Unit>& units(int layer) const {
      return units_[static_cast<std::size_t>(layer)];
    }

   private:
    using detail::ConfiguredState<Config>::config_;
    std::vector<std::vector<Unit>> units_;  // by layer
    std::vector<std::string> paths_;        // of the adapted layers, in order
  };
};

using LoReFT = Reft<detail::ReftKind::LoReft>;
using NoReFT = Reft<detail::ReftKind::NoReft>;
using DiReFT = Reft<detail::ReftKind::DiReft>;

}  // namespace peft
