#pragma once
// Compacter (Mahabadi et al., 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
// Layers"), as AdapterHub's CompacterConfig builds it: a bottleneck adapter
// h ← h + U(σ(D(h))) whose down- and up-projections are PHM layers,
//   y = x H + b,   H [in, out] = Σ_{i=1..n} A_i ⊗ (L_i R_i),
// with the rule A [n, n, n] (A_i = A[i]) one tensor shared by every PHM layer of the model (all
// blocks, down and up: AdapterHub's shared_phm_rule), and per layer L [n, in/n, k],
// R [n, k, out/n] (factorized_phm_W, k = phm_rank) and b [out]. (The paper writes the [out, in]
// weight W = Σ A_i ⊗ B_i; H is its transpose, the layout AdapterHub multiplies by.)
// Sites: after the attention output and after the MLP, each before its residual add
// (mh_adapter true: CompacterConfig, Houlsby's placement), or after the MLP only (mh_adapter false:
// Compacter++, Pfeiffer's). Width m = bottleneck_size, or hidden_size / reduction_factor (32).
// Initialisation as AdapterHub's: A ~ N(0, phm_init_range²), each L_i, R_i Glorot-uniform, b = 0;
// so H is small but not zero and the model starts near, not at, the base model (exactly at it
// with A = 0; tests/test_reft_and_compacter.cpp).
//
// No reference in HF peft; this project's layout (docs/methods/additive.md#compacter): peft_type
// "COMPACTER"; "base_model.model.phm_rule" [n, n, n]; per block i
// "base_model.model.<block i>.<site>.{down,up}.{W_left,W_right,b}", <site> "attention_adapter" or
// "mlp_adapter".
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "peft/core/ops/orthogonal.hpp"
#include "peft/core/ops/reparameterized.hpp"
#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"

namespace peft {

struct CompacterConfig : ConfigIo<CompacterConfig> {
  static constexpr std::string_view peft_type = "COMPACTER";
  std::int64_t bottleneck_size = 0;  ///< m; 0: hidden_size / reduction_factor
  std::int64_t reduction_factor = 32;
  detail::Activation activation = detail::Activation::GeluTanh;
  bool mh_adapter = true;  ///< also after the attention output (Compacter); false: Compacter++
  std::int64_t phm_dim = 4, phm_rank = 1;
  double phm_init_range = 1e-4;
  std::vector<int> layers_to_transform;  ///< empty: every block

  static auto fields() {
    using C = CompacterConfig;
    return config_fields(
        field("bottleneck_size", &C::bottleneck_size, check::dimension_or_zero),
        field("reduction_factor", &C::reduction_factor, check::dimension_or_zero),
        detail::activation_choice("non_linearity", &C::activation),
        field("mh_adapter", &C::mh_adapter), field("phm_dim", &C::phm_dim, check::dimension),
        field("phm_rank", &C::phm_rank, check::dimension),
        float_field("phm_init_range", &C::phm_init_range, check::non_negative),
        detail::LayerListField<C>{&C::layers_to_transform}, fixed("shared_phm_rule", true),
        fixed("factorized_phm_W", true), fixed("shared_W_phm", false),
        fixed("factorized_phm_rule", false), fixed("learn_phm", true), fixed("phm_bias", true),
        fixed("phm_c_init", "normal"), fixed("hypercomplex_nonlinearity", "glorot-uniform"),
        fixed("modules_to_save", nullptr));
  }
  /// m on `model`; ConfigError unless m and hidden_size are multiples of phm_dim.
  std::int64_t width(const ModelConfig& model) const {
    const std::int64_t m = bottleneck_size > 0    ? bottleneck_size
                           : reduction_factor > 0 ? model.hidden_size / reduction_factor
                                                  : 0;
    if (m <= 0 || m % phm_dim != 0 || model.hidden_size % phm_dim != 0)
      throw ConfigError("COMPACTER: bottleneck width " + std::to_string(m) + " and hidden_size " +
                        std::to_string(model.hidden_size) +
                        " must be positive multiples of phm_dim " + std::to_string(phm_dim) +
                        " (set bottleneck_size or reduction_factor)");
    return m;
  }
  bool adapts_layer(int layer) const {
    return layers_to_transform.empty() ||
           std::find(layers_to_transform.begin(), layers_to_transform.end(), layer) !=
               layers_to_transform.end();
  }
};

struct Compacter : detail::AdditiveMethod<CompacterConfig> {
  using Config = CompacterConfig;
  static constexpr std::string_view name = "compacter", title = "Compacter";
  static constexpr std::string_view paper =
      "Mahabadi et al., 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers";
  static constexpr std::string_view reference = "";  ///< AdapterHub's, not HF peft's

  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& c) {
    const std::int64_t d = model.hidden_size, m = c.width(model), k = c.phm_rank;
    std::int64_t sites = 0;
    for (int l = 0; l < static_cast<int>(model.num_layers); ++l)
      sites += c.adapts_layer(l) ? (c.mh_adapter ? 2 : 1) : 0;
    return {c.phm_dim * c.phm_dim * c.phm_dim + sites * (2 * k * (d + m) + m + d), 0};
  }

  /// One PHM layer: L [n, in/n, k], R [n, k, out/n], b [out].
  template <class T>
  struct PhmLayer {
    Var<T> left, right, bias;
    PhmLayer(std::int64_t in, std::int64_t out, const Config& c, std::mt19937_64& rng)
        : left(Tensor<T>(Shape{c.phm_dim, in / c.phm_dim, c.phm_rank}), true),
          right(Tensor<T>(Shape{c.phm_dim, c.phm_rank, out / c.phm_dim}), true),
          bias(Tensor<T>::zeros(Shape{out}), true) {
      const auto glorot = [](std::int64_t rows, std::int64_t cols) {
        return std::sqrt(6.0 / static_cast<double>(rows + cols));  // xavier_uniform_ per A[i]
      };
      detail::fill_uniform(left.value(), rng, glorot(in / c.phm_dim, c.phm_rank));
      detail::fill_uniform(right.value(), rng, glorot(c.phm_rank, out / c.phm_dim));
    }
    /// H [in, out] = Σ_i A_i ⊗ (L_i R_i).
    static Var<T> weight(Tape<T>& tape, const Var<T>& rule, const Var<T>& left,
                         const Var<T>& right) {
      const std::int64_t n = rule.value().dim(0), p = left.value().dim(1), q = right.value().dim(2);
      const Var<T> w = ops::reshape(tape, ops::matmul(tape, left, right), Shape{n, p * q});
      // row_kron's column (a·n + j)·p·q + u·q + v holds A_i[a, j] W_i[u, v]; H's (a·p + u, j·q + v)
      std::vector<std::int64_t> index(static_cast<std::size_t>(n * n * p * q));
      for (std::int64_t a = 0; a < n; ++a)
        for (std::int64_t u = 0; u < p; ++u)
          for (std::int64_t j = 0; j < n; ++j)
            for (std::int64_t v = 0; v < q; ++v)
              index[static_cast<std::size_t>((a * p + u) * n * q + j * q + v)] =
                  (a * n + j) * p * q + u * q + v;
      const Var<T> terms = ops::gather_features(
          tape, ops::row_kron(tape, ops::reshape(tape, rule, Shape{n, n * n}), w), index);
      const Var<T> ones(Tensor<T>::filled(Shape{1, n}, T(1)));
      return ops::reshape(tape, ops::matmul(tape, ones, terms), Shape{n * p, n * q});
    }
    Var<T> forward(Tape<T>& tape, const Var<T>& rule, const Var<T>& x) const {
      return ops::linear(tape, x, weight(tape, rule, left, right), bias, ops::WeightLayout::InOut);
    }
    void name_parameters(const std::string& prefix, std::vector<NamedParameter<T>>& out) const {
      out.push_back({prefix + ".W_left", left});
      out.push_back({prefix + ".W_right", right});
      out.push_back({prefix + ".b", bias});
    }
  };

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    struct Module {
      std::string path;  ///< "<block>.<site>"
      PhmLayer<T> down, up;
    };
    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      const std::int64_t d = m.hidden_size, width = config_.width(m), n = config_.phm_dim;
      const std::string block_prefix = m.model_type == "gpt2" ? "transformer.h." : "model.layers.";
      rule_ = Var<T>(Tensor<T>(Shape{n, n, n}), true);
      detail::fill_normal(rule_.value(), ctx.rng, config_.phm_init_range);
      attention_.assign(static_cast<std::size_t>(m.num_layers), std::nullopt);
      mlp_.assign(static_cast<std::size_t>(m.num_layers), std::nullopt);
      for (int layer = 0; layer < static_cast<int>(m.num_layers); ++layer) {
        if (!config_.adapts_layer(layer)) continue;
        const std::string block = block_prefix + std::to_string(layer) + ".";
        auto make = [&](const char* site) {
          return Module{block + site, PhmLayer<T>(d, width, config_, ctx.rng),
                        PhmLayer<T>(width, d, config_, ctx.rng)};
        };
        if (config_.mh_adapter)
          attention_[static_cast<std::size_t>(layer)] = make("attention_adapter");
        mlp_[static_cast<std::size_t>(layer)] = make("mlp_adapter");
      }
    }

    Var<T> after_attention(Tape<T>& tape, int layer, const Var<T>& o) const {
      return adapted(tape, attention_[static_cast<std::size_t>(layer)], o);
    }
    Var<T> after_mlp(Tape<T>& tape, int layer, const Var<T>&, const Var<T>& out) const {
      return adapted(tape, mlp_[static_cast<std::size_t>(layer)], out);
    }

    std::vector<NamedParameter<T>> parameters() const {
      std::vector<NamedParameter<T>> out{{"base_model.model.phm_rule", rule_}};
      for (std::size_t i = 0; i < mlp_.size(); ++i)
        for (const auto* m : {&attention_[i], &mlp_[i]})
          if (*m) {
            (*m)->down.name_parameters("base_model.model." + (*m)->path + ".down", out);
            (*m)->up.name_parameters("base_model.model." + (*m)->path + ".up", out);
          }
      return out;
    }
    const Var<T>& rule() const { return rule_; }
    const std::optional<Module>& mlp_module(int layer) const {
      return mlp_[static_cast<std::size_t>(layer)];
    }

   private:
    Var<T> adapted(Tape<T>& tape, const std::optional<Module>& m, const Var<T>& h) const {
      if (!m) return h;
      const Var<T> z = detail::activate(tape, m->down.forward(tape, rule_, h), config_.activation);
      return ops::add(tape, h, m->up.forward(tape, rule_, z));
    }

    using detail::ConfiguredState<Config>::config_;
    Var<T> rule_;  ///< A [n, n, n], shared by every PHM layer
    std::vector<std::optional<Module>> attention_, mlp_;  // by layer
  };
};

}  // namespace peft
