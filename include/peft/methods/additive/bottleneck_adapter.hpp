#pragma once
// Bottleneck adapters: a down-projection D [m, d] (+ bias), a non-linearity σ, an
// up-projection U [d, m] (+ bias), inserted in each block. U and its bias start at zero, so the
// adapted model starts exactly at the base model.
//   SerialAdapter   (Houlsby et al., 2019): after the attention output and after the MLP, before
//                   each residual add: h ← h + U σ(D h + b_D) + b_U.
//   PfeifferAdapter (Pfeiffer et al., 2021, AdapterFusion): the same block after the MLP only.
//   ParallelAdapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer
//                   Learning"): beside the MLP, reading the MLP's input x:
//                   MLP(x) + s · (U σ(D x + b_D) + b_U).
// The width m is `bottleneck_size`, or hidden_size / `reduction_factor` when that is 0.
//
// The reference ecosystem has no such method; this project's layout (docs/methods/additive.md):
// peft_type "SERIAL_ADAPTER", "PFEIFFER_ADAPTER" or "PARALLEL_ADAPTER"; per block i, tensors
// "base_model.model.<block i>.<site>.{down,up}.{weight,bias}" with <site> "attention_adapter"
// or "mlp_adapter" (serial, Pfeiffer) or "parallel_adapter"; weights [out, in].
#include <optional>
#include <string>
#include <vector>

#include "peft/methods/additive/common.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

namespace detail {
enum class AdapterPlacement { Serial, Pfeiffer, Parallel };

constexpr std::string_view adapter_peft_type(AdapterPlacement p) {
  return p == AdapterPlacement::Serial     ? "SERIAL_ADAPTER"
         : p == AdapterPlacement::Pfeiffer ? "PFEIFFER_ADAPTER"
                                           : "PARALLEL_ADAPTER";
}
}  // namespace detail

template <detail::AdapterPlacement Placement>
struct BottleneckAdapterConfig {
  static constexpr std::string_view peft_type = detail::adapter_peft_type(Placement);

  std::int64_t bottleneck_size = 0;  ///< m; 0: hidden_size / reduction_factor
  std::int64_t reduction_factor = 16;
  detail::Activation activation = detail::Activation::Relu;
  double scaling = Placement == detail::AdapterPlacement::Parallel ? 4.0 : 1.0;  ///< s (parallel)
  std::vector<int> layers_to_transform;  ///< empty: every block

  static auto fields() {
    using C = BottleneckAdapterConfig;
    auto shared = detail::field_group(
        field("bottleneck_size", &C::bottleneck_size, check::dimension_or_zero),
        field("reduction_factor", &C::reduction_factor, check::dimension_or_zero),
        detail::activation_choice("activation", &C::activation),
        detail::LayerListField<C>{&C::layers_to_transform}, fixed("modules_to_save", nullptr));
    if constexpr (Placement == detail::AdapterPlacement::Parallel)
      return config_fields(shared, float_field("scaling", &C::scaling, check::scale));
    else
      return config_fields(shared);
  }
  static BottleneckAdapterConfig from_json(const nlohmann::json& j, const std::string& source) {
    return read_config<BottleneckAdapterConfig>(j, source);
  }
  /// bottleneck_size is written as the width in effect on `model`.
  nlohmann::json to_json(const ModelConfig& model) const {
    BottleneckAdapterConfig c = *this;
    c.bottleneck_size = width(model);
    return write_config(c, model);
  }

  std::int64_t width(const ModelConfig& model) const {
    const std::int64_t m = bottleneck_size > 0    ? bottleneck_size
                           : reduction_factor > 0 ? model.hidden_size / reduction_factor
                                                  : 0;
    if (m <= 0)
      throw ConfigError(std::string(detail::adapter_peft_type(Placement)) +
                        ": bottleneck width is 0 (set bottleneck_size, or a reduction_factor "
                        "that does not exceed hidden_size " +
                        std::to_string(model.hidden_size) + ")");
    return m;
  }
  bool adapts_layer(int layer) const {
    if (layers_to_transform.empty()) return true;
    for (int l : layers_to_transform)
      if (l == layer) return true;
    return false;
  }
};

template <detail::AdapterPlacement Placement>
struct BottleneckAdapter : detail::AdditiveMethod<BottleneckAdapterConfig<Placement>> {
  static constexpr bool serial = Placement == detail::AdapterPlacement::Serial;
  static constexpr bool pfeiffer = Placement == detail::AdapterPlacement::Pfeiffer;
  static constexpr std::string_view name = serial     ? "serial_adapter"
                                           : pfeiffer ? "pfeiffer_adapter"
                                                      : "parallel_adapter";
  static constexpr std::string_view title = serial     ? "serial adapter"
                                            : pfeiffer ? "Pfeiffer adapter"
                                                       : "parallel adapter";
  static constexpr std::string_view paper =
      serial     ? "Houlsby et al., 2019, Parameter-Efficient Transfer Learning for NLP"
      : pfeiffer ? "Pfeiffer et al., 2021, AdapterFusion: Non-Destructive Task Composition for "
                   "Transfer Learning"
                 : "He et al., 2022, Towards a Unified View of Parameter-Efficient Transfer "
                   "Learning";
  static constexpr std::string_view reference = "";  ///< AdapterHub's, not HF peft's
  using Config = BottleneckAdapterConfig<Placement>;

  static constexpr bool after_attention_site = Placement == detail::AdapterPlacement::Serial;

  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    const std::int64_t d = model.hidden_size, m = config.width(model);
    const std::int64_t per_module = (d * m + m) + (m * d + d);
    std::int64_t modules = 0;
    for (int layer = 0; layer < static_cast<int>(model.num_layers); ++layer)
      if (config.adapts_layer(layer)) modules += after_attention_site ? 2 : 1;
    return ParameterCount{modules * per_module, 0};
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
   public:
    struct Module {
      std::string path;  ///< "<block>.<site>"
      detail::DenseLayer<T> down, up;
    };

    using detail::ConfiguredState<Config>::ConfiguredState;

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      const std::int64_t d = m.hidden_size, width = config_.width(m);
      const std::string block_prefix = m.model_type == "gpt2" ? "transformer.h." : "model.layers.";
      attention_.assign(static_cast<std::size_t>(m.num_layers), std::nullopt);
      mlp_.assign(static_cast<std::size_t>(m.num_layers), std::nullopt);
      for (int layer = 0; layer < static_cast<int>(m.num_layers); ++layer) {
        if (!config_.adapts_layer(layer)) continue;
        const std::string block = block_prefix + std::to_string(layer);
        auto make = [&](const std::string& site) {
          return Module{block + "." + site, detail::DenseLayer<T>(d, width, ctx.rng),
                        detail::DenseLayer<T>(width, d, ctx.rng, /*zero=*/true)};
        };
        if constexpr (after_attention_site)
          attention_[static_cast<std::size_t>(layer)] = make("attention_adapter");
        mlp_[static_cast<std::size_t>(layer)] = make(
            Placement == detail::AdapterPlacement::Parallel ? "parallel_adapter" : "mlp_adapter");
      }
    }

    Var<T> after_attention(Tape<T>& tape, int layer,
                           const Var<T>& attention_out) requires(after_attention_site) {
      const auto& m = attention_[static_cast<std::size_t>(layer)];
      return m ? ops::add(tape, attention_out, bottleneck(tape, *m, attention_out)) : attention_out;
    }

    Var<T> after_mlp(Tape<T>& tape, int layer, const Var<T>& mlp_in, const Var<T>& mlp_out) {
      const auto& m = mlp_[static_cast<std::size_t>(layer)];
      if (!m) return mlp_out;
      if constexpr (Placement == detail::AdapterPlacement::Parallel)
        return ops::add(
            tape, mlp_out,
            ops::scale(tape, bottleneck(tape, *m, mlp_in), static_cast<T>(config_.scaling)));
      else
        return ops::add(tape, mlp_out, bottleneck(tape, *m, mlp_out));
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      for (std::size_t i = 0; i < mlp_.size(); ++i)
        for (const auto* m : {&attention_[i], &mlp_[i]})
          if (*m) {
            (*m)->down.name_parameters("base_model.model." + (*m)->path + ".down", out);
            (*m)->up.name_parameters("base_model.model." + (*m)->path + ".up", out);
          }
      return out;
    }

   private:
    Var<T> bottleneck(Tape<T>& tape, const Module& m, const Var<T>& x) const {
      return m.up.forward(tape,
                          detail::activate(tape, m.down.forward(tape, x), config_.activation));
    }

    using detail::ConfiguredState<Config>::config_;
    std::vector<std::optional<Module>> attention_, mlp_;  // by layer
  };
};

using SerialAdapter = BottleneckAdapter<detail::AdapterPlacement::Serial>;
using PfeifferAdapter = BottleneckAdapter<detail::AdapterPlacement::Pfeiffer>;
using ParallelAdapter = BottleneckAdapter<detail::AdapterPlacement::Parallel>;

}  // namespace peft
