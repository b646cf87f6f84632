#pragma once
// UniPELT (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language
// Model Tuning"): LoRA on the query and value projections, prefix tuning and a serial adapter,
// each behind a learned gate G = σ(W_G x + b_G), W_G [1, d] a linear map of the hidden state x
// that the submodule reads, learned per layer (per module for LoRA).
//
//   struct UniPELT : Compose<Gated<LoRA>, Gated<PrefixTuning>, Gated<SerialAdapter>> {...};
//
// Gated<P> puts any policy behind such gates, without knowing its internals:
//   adapt           at a module P adapts, P contributes to a Projection of its own and each
//                   contribution is re-emitted gated (State::adapt says how, per kind): for LoRA
//                   y = W x + G(x) ⊙ s·B A x, the term computed alone, W x once.
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
//     every position may see without looking ahead), which the decoder (and Compose) show it
//     through the contract's `before_attention` hook.
// Gates start at w ~ N(0, 0.02²), b = 0 (G ≈ ½), as the code initialises the adapter gate.
//
// Layout: Gated<P> saves P's tensors and config as P does, and its gates as
// "base_model.model.<module>.gate.{weight,bias}" (linear), "base_model.model.<block>.
// {attention_gate,mlp_gate,prefix_gate}.{weight,bias}"; its adapter_config.json is P's with
// peft_type "GATED" and the method's own peft_type under "gated_peft_type".
#include <array>
#include <cmath>
#include <memory>
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

/// A policy's config and nothing more: the gates have no hyper-parameters. Its JSON is P's own
/// (P's field table, if it has one) with peft_type "GATED" and P's under "gated_peft_type", so
/// it has no field table of its own.
template <class P>
struct GatedConfig {
  static constexpr std::string_view peft_type = "GATED";
  typename P::Config inner;

  GatedConfig() = default;
  GatedConfig(typename P::Config config) : inner(std::move(config)) {}  // implicit: reads as P's

  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = config_to_json(inner, model);
    j["gated_peft_type"] = j["peft_type"];
    j["peft_type"] = std::string(peft_type);
    return j;
  }
  static GatedConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, std::string(peft_type), source);
    nlohmann::json inner = j;
    inner["peft_type"] = detail::json_or<std::string>(j, "gated_peft_type", "", source);
    inner.erase("gated_peft_type");
    return GatedConfig(config_from_json<typename P::Config>(inner, source));
  }
};

namespace detail {

/// Whether P's module selection can be read from its config and a module's shape alone (its
/// `selects`, or its `targets` rules): what Gated counts linear gates by.
template <class P>
concept SelectsSitesFromShapes = requires(const typename P::Config& c, const ModuleSite& site) {
  { P::selects(c, site) } -> std::convertible_to<bool>;
}
|| requires(const typename P::Config& c) {
  { c.targets.selects(std::string(), false) } -> std::convertible_to<bool>;
};

}  // namespace detail

template <class P>
struct Gated {
  static_assert(!detail::prepends_tokens<P>,
                "Gated: virtual tokens (prompt tuning, P-tuning) have no gate in UniPELT");

  using family = family::Hybrid;
  static constexpr std::string_view name = detail::GatedName<P>::value;
  using Config = GatedConfig<P>;

  static bool accepts(const nlohmann::json& j) {
    if (detail::string_or(j, "peft_type", "") != "GATED") return false;
    nlohmann::json inner = j;
    inner["peft_type"] = detail::string_or(j, "gated_peft_type", "");
    return method_accepts<P>(inner);
  }

  /// P's parameters plus in + 1 per module P adapts (its own selection, site_table.hpp) and
  /// d + 1 per block-level gate.
  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count = peft::count_parameters<P>(model, linears, config.inner);
    using S = detail::StateOf<P>;
    if constexpr (HasProjectionHook<S, float>) {
      static_assert(detail::SelectsSitesFromShapes<P>,
                    "Gated: counting the gates of a projection method needs its selection from "
                    "shapes (`static bool selects(const Config&, const ModuleSite&)` or "
                    "`targets` rules; methods/site_table.hpp)");
      for (const LinearShape& l : linears)
        if (method_selects<P>(config.inner, ModuleSite::of(l)))
          count.trainable += l.in_features + 1;
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
    static constexpr bool inner_projection = HasProjectionHook<Inner, T>;
    static constexpr bool gates_modules = inner_projection;
    static constexpr bool inner_prefix = HasPrefix<Inner, T>;
    static_assert(
        !gates_modules || detail::SelectsSitesFromShapes<P> ||
            requires(const Inner i, const nn::Linear<T>& m) {
              { i.adapts(m) } -> std::convertible_to<bool>;
            },
        "Gated: a projection method needs a selection (`selects` or `targets`) or "
        "`bool adapts(const nn::Linear<T>&) const` to know which modules get a gate");
    using Contribution = typename Projection<T>::Contribution;
    using Kind = typename Projection<T>::Kind;
    // G(x) of one projection, computed when the first gated contribution needs it (after the
    // product, as the first edition did: the tape, and so the gradients' summation order, are
    // the same), once for all of them.
    struct LazyGate {
      const detail::LinearGate<T>* gate;
      Var<T> x;
      std::shared_ptr<Var<T>> value;
      const Var<T>& operator()(Tape<T>& tape) const {
        if (!value->defined()) *value = gate->forward(tape, x);
        return *value;
      }
    };

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
      first_position_.assign(layers, Var<T>{});
      if constexpr (gates_modules)
        for (nn::Linear<T>* lin : ctx.linears)
          if (gated_module(*lin))
            linear_gates_[static_cast<std::size_t>(lin->site)].emplace(lin->name + ".gate",
                                                                       lin->in_features, ctx.rng);
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

    /// Whether the gated method changes `module` (a gate sits on it).
    bool adapts(const nn::Linear<T>& module) const {
      const auto site = static_cast<std::size_t>(module.site);
      return module.site >= 0 && site < linear_gates_.size() && linear_gates_[site].has_value();
    }

    /// Keeps the block's attention input at the first position, for the prefix gate.
    void before_attention(Tape<T>& tape, int layer,
                          const Var<T>& x) requires(inner_prefix || HasBeforeAttention<Inner, T>) {
      if constexpr (HasBeforeAttention<Inner, T>) inner_.before_attention(tape, layer, x);
      if constexpr (inner_prefix)
        first_position_[static_cast<std::size_t>(layer)] = ops::slice(tape, x, 1, 0, 1);  // [B,1,d]
    }

    /// The inner method contributes to a fresh Projection on the same input; each contribution
    /// is re-emitted into `p` behind the module's gate G = σ(w·x + b) (per token), without
    /// knowing which method made it:
    ///   low-rank term s·B A x  →  delta G ⊙ (s·B A x)           (the term alone, no second W x)
    ///   delta Δ(x)             →  delta G ⊙ Δ(x)
    ///   output scale l         →  y ← y ⊙ (1 + G ⊙ (l − 1))      (= y + G ⊙ (y ⊙ l − y))
    ///   output shift β         →  y ← y + G ⊙ β
    ///   output map f           →  y ← y + G ⊙ (f(y) − y)
    ///   input scale, replacement: the whole inner product as
    ///   one delta G ⊙ (y_inner − y_base), y_inner the inner contributions on their own
    ///   Projection, y_base = x Wᵀ + b: exact, but it computes W x twice more.
    void adapt(Projection<T>& p) requires(gates_modules) {
      const auto site = static_cast<std::size_t>(p.module().site);
      if (p.module().site < 0 || site >= linear_gates_.size() || !linear_gates_[site]) return;
      Tape<T>& tape = p.tape();
      {
        Projection<T> own(tape, p.module(), p.input(), p.dropout_generator());
        inner_.adapt(own);
        if (own.empty()) return;  // e.g. merged: the method adds nothing here
        const LazyGate g{&*linear_gates_[site], p.input(), std::make_shared<Var<T>>()};
        bool whole = false;
        for (const Contribution& c : own.contributions())
          whole = whole || c.kind == Kind::InputScale || c.kind == Kind::InputMap ||
                  c.kind == Kind::Replace;
        if (whole) {
          p.add_delta([contributions = own.contributions(), g, &module = p.module(),
                       dropout = p.dropout_generator()](Tape<T>& t, const Var<T>& x) {
            Projection<T> alone(t, module, x, dropout);
            for (const Contribution& c : contributions) alone.add(c);
            return detail::scale_rows(
                t, detail::subtract(t, alone.compute(), module.forward_base(t, x)), g(t));
          });
          return;
        }
        const std::int64_t out = p.module().out_features;
        for (const Contribution& c : own.contributions()) switch (c.kind) {
            case Kind::LowRank:
              p.add_delta(
                  [c, g](Tape<T>& t, const Var<T>& x) {
                    return detail::scale_rows(t, Projection<T>::low_rank(t, x, c), g(t));
                  },
                  c.dropout);  // the term's input dropout moves with it
              break;
            case Kind::Delta:
              p.add_delta(
                  [f = c.function, g](Tape<T>& t, const Var<T>& x) {
                    return detail::scale_rows(t, f(t, x), g(t));
                  },
                  c.dropout);
              break;
            case Kind::OutputScale:
              p.map_output([l = c.a, g, out](Tape<T>& t, const Var<T>& y) {
                const Var<T> scaled = ops::mul(t, y, Projection<T>::flat(t, l, out));
                return ops::add(t, y, detail::scale_rows(t, detail::subtract(t, scaled, y), g(t)));
              });
              break;
            case Kind::OutputShift:
              p.map_output([beta = c.a, g, out](Tape<T>& t, const Var<T>& y) {
                // G ⊗ β: [..., 1] times β as a [out, 1] weight.
                const Var<T> column = ops::reshape(t, beta, Shape{out, 1});
                return ops::add(t, y,
                                ops::linear(t, g(t), column, Var<T>{}, ops::WeightLayout::OutIn));
              });
              break;
            case Kind::OutputMap:
              p.map_output([f = c.function, g](Tape<T>& t, const Var<T>& y) {
                return ops::add(t, y, detail::scale_rows(t, detail::subtract(t, f(t, y), y), g(t)));
              });
              break;
            case Kind::InputScale:
            case Kind::InputMap:
            case Kind::Replace:
              break;  // handled above, as the whole inner product
          }
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
                          ">: no attention input was seen for layer " + std::to_string(layer) +
                          " (the prefix gate reads it; the decoder shows it through "
                          "before_attention)");
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

    void on_base_weights_loaded(std::vector<nn::Linear<T>*>& modules) requires(
        DependsOnBaseWeights<Inner, T>) {
      inner_.on_base_weights_loaded(modules);
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
    void fold() requires(FoldsBeforeSaving<Inner>) { inner_.fold(); }

   private:
    bool gated_module(const nn::Linear<T>& lin) const {
      if constexpr (detail::SelectsSitesFromShapes<P>)
        return method_selects<P>(config_.inner, ModuleSite::of(lin));  // as counted
      else
        return inner_.adapts(lin);
    }

    static bool adapts_layer(const Config& c, int layer) {
      if constexpr (requires { c.inner.adapts_layer(layer); })
        return c.inner.adapts_layer(layer);
      else
        return true;
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
        prefix_gates_;                    // by layer
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

/// UniPELT: gated LoRA (q, v), gated prefix tuning, gated serial adapter. A named composition:
/// everything is Compose's, with the registry name "unipelt" (the study's and the search's row).
struct UniPELT : Compose<Gated<LoRA>, Gated<PrefixTuning>, Gated<SerialAdapter>> {
  static constexpr std::string_view name = "unipelt", title = "UniPELT";
  static constexpr std::string_view paper =
      "Mao et al., 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model "
      "Tuning";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
};

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
