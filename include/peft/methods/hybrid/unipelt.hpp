#pragma once
// UniPELT (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language
// Model Tuning"): LoRA on the query and value projections, prefix tuning and a serial adapter,
// each behind a learned gate G = σ(W_G x + b_G), W_G [1, d] a linear map of the hidden state x
// that the submodule reads, learned per layer (per module for LoRA).
//
//   using UniPELT = Compose<Gated<LoRA>, Gated<PrefixTuning>, Gated<SerialAdapter>>;
//
// Gated<P> puts any policy behind such gates:
//   linear          y = W x + G(x) ⊙ Δ(x), Δ(x) the method's change of the module's output
//                   (for LoRA s·B A x, computed directly; otherwise P's output minus W x).
//   after_attention h ← h + G(h) ⊙ (P(h) − h), likewise after_mlp with G read from the MLP output
//                   (the adapter's input, as the paper's adapter gate reads the FFN output).
//   prefix          P_K ← G P_K, P_V ← G P_V with one G per sequence and layer.
//
// Our reading of the paper and of its code (github.com/morningmoni/UniPELT: lora_layers.py,
// adapters/modeling.py, models/bert/modeling_bert.py). The paper writes the gates as
// G_L = σ(W_GL x), G_P = σ(W_GP x), G_A = σ(W_GA h_F); the code computes σ(W x + b) per token
// and then averages it over the sequence, one gate per sequence, and for LoRA the gate takes the
// place of α/r. BERT is bidirectional, so a sequence mean is free there; in a causal decoder it
// would let every position see the tokens after it. So here:
//   - LoRA and adapter gates are per token, σ(w·x_t + b) (what the paper's formula says, and
//     causal); LoRA keeps its α/r as well (set lora_alpha = r to match the code's scale);
//   - the prefix gate multiplies keys and values shared by every query, so it needs one value per
//     sequence; it reads the block's attention input at the first position (the only summary
//     every position may see without looking ahead). Gated<P> receives that input through the
//     `observe_attention_input` hook, which Compose, and Gated itself, call from the block's
//     first projection.
// Gates start at w ~ N(0, 0.02²), b = 0 (G ≈ ½), as the code initialises the adapter gate.
//
// Layout: Gated<P> saves P's tensors and config as P does, and its gates as
// "base_model.model.<module>.gate.{weight,bias}" (linear), "base_model.model.<block>.
// {attention_gate,mlp_gate,prefix_gate}.{weight,bias}"; its adapter_config.json is P's with
// peft_type "GATED" and the method's own peft_type under "gated_peft_type".
#include <array>
#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/prefix_tuning.hpp"
#include "peft/methods/hybrid/compose.hpp"
#include "peft/methods/reparameterized/lora.hpp"

namespace peft {

namespace detail {

/// "gated_" + P::name, with static storage.
template <class P>
struct GatedName {
  static constexpr std::string_view head = "gated_";
  static constexpr auto chars = [] {
    std::array<char, head.size() + P::name.size()> a{};
    for (std::size_t i = 0; i < head.size(); ++i) a[i] = head[i];
    for (std::size_t i = 0; i < P::name.size(); ++i) a[head.size() + i] = P::name[i];
    return a;
  }();
  static constexpr std::string_view value{chars.data(), chars.size()};
};

/// σ(w·x + b) for x [..., d]: w [1, d], b [1]; output [..., 1].
template <class T>
struct LinearGate {
  std::string path;  ///< "<module>.gate" or "<block>.<site>_gate"
  Var<T> weight, bias;

  LinearGate(std::string gate_path, std::int64_t in, std::mt19937_64& rng)
      : path(std::move(gate_path)),
        weight(Tensor<T>(Shape{1, in}), true),
        bias(Tensor<T>(Shape{1}), true) {
    fill_normal(weight.value(), rng, 0.02);
  }
  Var<T> forward(Tape<T>& tape, const Var<T>& x) const {
    return ops::sigmoid(tape, ops::linear(tape, x, weight, bias, ops::WeightLayout::OutIn));
  }
  void name_parameters(std::vector<NamedParameter<T>>& out) const {
    out.push_back({"base_model.model." + path + ".weight", weight});
    out.push_back({"base_model.model." + path + ".bias", bias});
  }
};

inline std::string block_path(const ModelConfig& model, int layer) {
  return (model.model_type == "gpt2" ? "transformer.h." : "model.layers.") + std::to_string(layer);
}

}  // namespace detail

/// A policy's config and nothing more: the gates have no hyper-parameters.
template <class P>
struct GatedConfig {
  typename P::Config inner;

  GatedConfig() = default;
  GatedConfig(typename P::Config config) : inner(std::move(config)) {}  // implicit: reads as P's

  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = inner.to_json(model);
    j["gated_peft_type"] = j["peft_type"];
    j["peft_type"] = "GATED";
    return j;
  }
  static GatedConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "GATED", source);
    nlohmann::json inner = j;
    inner["peft_type"] = detail::json_or<std::string>(j, "gated_peft_type", "", source);
    inner.erase("gated_peft_type");
    return GatedConfig(P::Config::from_json(inner, source));
  }
};

template <class P>
struct Gated {
  static_assert(!detail::prepends_tokens<P>,
                "Gated: virtual tokens (prompt tuning, P-tuning) have no gate in UniPELT");

  using family = family::Hybrid;
  static constexpr std::string_view name = detail::GatedName<P>::value;
  using Config = GatedConfig<P>;

  static bool accepts(const nlohmann::json& j) {
    if (j.value("peft_type", std::string()) != "GATED") return false;
    nlohmann::json inner = j;
    inner["peft_type"] = j.value("gated_peft_type", std::string());
    return P::accepts(inner);
  }

  /// P's parameters plus d + 1 (or in + 1) per gate.
  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count = peft::count_parameters<P>(model, linears, config.inner);
    using S = detail::StateOf<P>;
    if constexpr (HasLinearHook<S, float>) {
      static_assert(
          requires { config.inner.targets.selects(std::string(), false); },
          "Gated: counting linear gates needs the method's `targets` rules");
      for (const LinearShape& l : linears)
        if (config.inner.targets.selects(l.name, l.layer < 0)) count.trainable += l.in_features + 1;
    }
    const std::int64_t layers = gated_layers(model, config);
    const std::int64_t per_gate = model.hidden_size + 1;
    if constexpr (HasAfterAttention<S, float>) count.trainable += layers * per_gate;
    if constexpr (HasAfterMlp<S, float>) count.trainable += layers * per_gate;
    if constexpr (HasPrefix<S, float>) count.trainable += model.num_layers * per_gate;
    return count;
  }

  template <class T>
  class State {
    using Inner = detail::StateOf<P, T>;
    static constexpr bool inner_linear = HasLinearHook<Inner, T>;
    static constexpr bool inner_prefix = HasPrefix<Inner, T>;
    static_assert(!inner_linear || ReportsAdaptedModules<Inner, T>,
                  "Gated: the method's linear hook needs `bool adapts(const nn::Linear<T>&) "
                  "const` to know which modules get a gate");

   public:
    explicit State(const Config& config) : config_(config), inner_(config.inner) {}
    const Config& config() const { return config_; }
    Inner& inner() { return inner_; }
    const Inner& inner() const { return inner_; }

    void attach(AttachContext<T>& ctx) {
      inner_.attach(ctx);
      const ModelConfig& m = ctx.config;
      const auto layers = static_cast<std::size_t>(m.num_layers);
      linear_gates_.assign(ctx.linears.size(), std::nullopt);
      attention_gates_.assign(layers, std::nullopt);
      mlp_gates_.assign(layers, std::nullopt);
      prefix_gates_.assign(layers, std::nullopt);
      first_site_of_layer_.assign(layers, -1);
      first_position_.assign(layers, Var<T>{});
      for (nn::Linear<T>* lin : ctx.linears) {
        if (lin->layer >= 0) {
          int& first = first_site_of_layer_[static_cast<std::size_t>(lin->layer)];
          if (first < 0 || lin->site < first) first = lin->site;
        }
        if constexpr (inner_linear)
          if (inner_.adapts(*lin))
            linear_gates_[static_cast<std::size_t>(lin->site)].emplace(lin->name + ".gate",
                                                                       lin->in_features, ctx.rng);
      }
      for (int layer = 0; layer < static_cast<int>(layers); ++layer) {
        const std::string block = detail::block_path(m, layer);
        const auto l = static_cast<std::size_t>(layer);
        const bool adapted = adapts_layer(config_, layer);
        if constexpr (HasAfterAttention<Inner, T>)
          if (adapted)
            attention_gates_[l].emplace(block + ".attention_gate", m.hidden_size, ctx.rng);
        if constexpr (HasAfterMlp<Inner, T>)
          if (adapted) mlp_gates_[l].emplace(block + ".mlp_gate", m.hidden_size, ctx.rng);
        if constexpr (inner_prefix)
          prefix_gates_[l].emplace(block + ".prefix_gate", m.hidden_size, ctx.rng);
      }
    }

    /// Whether the gated method changes `module` (Compose's routing question).
    bool adapts(const nn::Linear<T>& module) const {
      if constexpr (inner_linear)
        return inner_.adapts(module);
      else
        return false;
    }

    /// Keeps the block's attention input at the first position, for the prefix gate.
    void observe_attention_input(Tape<T>& tape, int layer, const Var<T>& x) requires(inner_prefix) {
      first_position_[static_cast<std::size_t>(layer)] = ops::slice(tape, x, 1, 0, 1);  // [B,1,d]
    }

    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module,
                  const Var<T>& x) requires(inner_linear || inner_prefix) {
      // Standalone (outside Compose) the gate sees the attention input here.
      if constexpr (inner_prefix)
        if (module.layer >= 0 &&
            first_site_of_layer_[static_cast<std::size_t>(module.layer)] == module.site)
          observe_attention_input(tape, module.layer, x);
      if constexpr (inner_linear) {
        const auto site = static_cast<std::size_t>(module.site);
        if (module.site >= 0 && site < linear_gates_.size() && linear_gates_[site])
          return gated_linear(tape, module, x, *linear_gates_[site]);
        return inner_.linear(tape, module, x);
      } else {
        return module.forward_base(tape, x);
      }
    }

    std::int64_t num_prefix_tokens() const requires(inner_prefix) {
      return inner_.num_prefix_tokens();
    }
    std::pair<Var<T>, Var<T>> prefix_key_values(Tape<T>& tape, int layer,
                                                std::int64_t batch) requires(inner_prefix) {
      const Var<T>& first = first_position_[static_cast<std::size_t>(layer)];
      if (!first.defined())
        throw ConfigError("Gated<" + std::string(P::name) +
                          ">: no attention input was seen for "
                          "layer " +
                          std::to_string(layer) + " (the prefix gate reads it)");
      auto [keys, values] = inner_.prefix_key_values(tape, layer, batch);
      Var<T> g = prefix_gates_[static_cast<std::size_t>(layer)]->forward(tape, first);  // [B,1,1]
      return {detail::scale_rows(tape, keys, g), detail::scale_rows(tape, values, g)};
    }

    Var<T> after_attention(Tape<T>& tape, int layer,
                           const Var<T>& h) requires(HasAfterAttention<Inner, T>) {
      const auto& gate = attention_gates_[static_cast<std::size_t>(layer)];
      Var<T> adapted = inner_.after_attention(tape, layer, h);
      if (!gate) return adapted;
      return gated_residual(tape, h, adapted, gate->forward(tape, h));
    }

    Var<T> after_mlp(Tape<T>& tape, int layer, const Var<T>& mlp_in,
                     const Var<T>& mlp_out) requires(HasAfterMlp<Inner, T>) {
      const auto& gate = mlp_gates_[static_cast<std::size_t>(layer)];
      Var<T> adapted = inner_.after_mlp(tape, layer, mlp_in, mlp_out);
      if (!gate) return adapted;
      return gated_residual(tape, mlp_out, adapted, gate->forward(tape, mlp_out));
    }

    Var<T> extra_loss(Tape<T>& tape) requires(HasExtraLoss<Inner, T>) {
      return inner_.extra_loss(tape);
    }

    void on_base_weights_loaded(std::vector<nn::Linear<T>*>& modules) {
      if constexpr (requires { inner_.on_base_weights_loaded(modules); })
        inner_.on_base_weights_loaded(modules);
      else if constexpr (requires { inner_.on_base_weights_loaded(); })
        inner_.on_base_weights_loaded();
    }

    /// P's tensors, then the gates.
    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out = inner_.parameters();
      for (const auto& g : linear_gates_)
        if (g) g->name_parameters(out);
      for (const auto* gates : {&attention_gates_, &mlp_gates_, &prefix_gates_})
        for (const auto& g : *gates)
          if (g) g->name_parameters(out);
      return out;
    }

    /// Sets every gate to σ(b) = `open` exactly where it can be (0 or 1: b = ∓1000, w = 0), for
    /// tests and ablations: 0 switches the method off, 1 leaves it ungated.
    void set_gates(double open) {
      const double b = open <= 0 ? -1000.0 : open >= 1 ? 1000.0 : std::log(open / (1 - open));
      auto set = [&](auto& gates) {
        for (auto& g : gates)
          if (g) {
            g->weight.value().vector().setZero();
            g->bias.value()[0] = static_cast<T>(b);
          }
      };
      set(linear_gates_);
      set(attention_gates_);
      set(mlp_gates_);
      set(prefix_gates_);
    }

    /// Projected prefixes are saved as their output (the reference's layout).
    void fold() requires(requires(Inner i) { i.fold(); }) { inner_.fold(); }

   private:
    static bool adapts_layer(const Config& c, int layer) {
      if constexpr (requires { c.inner.adapts_layer(layer); })
        return c.inner.adapts_layer(layer);
      else
        return true;
    }

    // W x + G ⊙ Δ(x).
    Var<T> gated_linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x,
                        const detail::LinearGate<T>& gate) {
      Var<T> base = module.forward_base(tape, x);
      Var<T> delta;
      if constexpr (std::is_same_v<P, LoRA>) {
        const auto* m = inner_.find(module.site);
        if (m->merged) return base;
        Var<T> down = ops::linear(tape, x, m->a, Var<T>{}, ops::WeightLayout::OutIn);
        delta = ops::scale(tape, ops::linear(tape, down, m->b, Var<T>{}, ops::WeightLayout::OutIn),
                           m->scale);
      } else {
        delta = detail::subtract(tape, inner_.linear(tape, module, x), base);
      }
      return ops::add(tape, base, detail::scale_rows(tape, delta, gate.forward(tape, x)));
    }

    // h + G ⊙ (adapted − h).
    static Var<T> gated_residual(Tape<T>& tape, const Var<T>& h, const Var<T>& adapted,
                                 const Var<T>& g) {
      return ops::add(tape, h, detail::scale_rows(tape, detail::subtract(tape, adapted, h), g));
    }

    Config config_;
    Inner inner_;
    std::vector<std::optional<detail::LinearGate<T>>> linear_gates_;  // by site
    std::vector<std::optional<detail::LinearGate<T>>> attention_gates_, mlp_gates_,
        prefix_gates_;  // by layer
    std::vector<int> first_site_of_layer_;
    std::vector<Var<T>> first_position_;  // by layer: the last forward's attention input [B,1,d]
  };

 private:
  static std::int64_t gated_layers(const ModelConfig& model, const Config& config) {
    std::int64_t n = 0;
    for (int layer = 0; layer < static_cast<int>(model.num_layers); ++layer) {
      if constexpr (requires { config.inner.adapts_layer(layer); })
        n += config.inner.adapts_layer(layer);
      else
        ++n;
    }
    return n;
  }
};

/// UniPELT: gated LoRA (q, v), gated prefix tuning, gated serial adapter.
using UniPELT = Compose<Gated<LoRA>, Gated<PrefixTuning>, Gated<SerialAdapter>>;

/// UniPELT's sizes, as hyper-parameters: LoRA rank, prefix length, adapter width.
struct UniPeltSizes {
  int lora_r = 8;
  double lora_alpha = 8;
  std::int64_t prefix_tokens = 10;
  std::int64_t adapter_width = 16;
};

/// A UniPELT config for `model`: LoRA on the query and value projections (GPT-2's fused c_attn
/// holds both, and the keys with them), prefix tuning in every layer, a serial adapter after
/// attention and MLP.
inline UniPELT::Config unipelt_config(const ModelConfig& model, const UniPeltSizes& sizes = {}) {
  LoraConfig lora;
  lora.r = sizes.lora_r;
  lora.lora_alpha = sizes.lora_alpha;
  if (model.model_type == "gpt2")
    lora.targets.target_modules.names = {"c_attn"};
  else
    lora.targets.target_modules.names = {"q_proj", "v_proj"};
  PrefixTuningConfig prefix;
  prefix.num_virtual_tokens = sizes.prefix_tokens;
  SerialAdapter::Config adapter;
  adapter.bottleneck_size = sizes.adapter_width;
  return UniPELT::Config(lora, prefix, adapter);
}

}  // namespace peft
