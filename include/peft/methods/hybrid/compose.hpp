#pragma once
// Compose<P...>: several PEFT policies, of any families, attached to one model at once.
//
// ORDER AT THE HOOK SITES (the decoder's order within a block, then the components' order):
//   before_attention     every component, in order.
//   adapt (projections)  every component contributes to the same Projection, in component order
//                        (nn/projection.hpp fixes how contributions combine), so several
//                        components may adapt one module: Compose<LoRA, IA3> on v_proj computes
//                        (x Wᵀ + b + s B A x) ⊙ l.
//   virtual tokens       at most one component (checked at compile time).
//   prefix keys/values   at most one component (checked at compile time).
//   after_attention      chained in component order: o ← P_1(o), then P_2, ...
//   after_mlp            chained in component order, each reading the MLP input and the previous
//                        component's output.
//   after_block          chained in component order, each reading the previous one's output.
//   extra_loss           summed.
//   merge / unmerge      every mergeable component is folded (in order; unmerge in reverse); the
//                        others stay active, so the model's output is unchanged by a merge.
//
// PARAMETERS AND FILES
//   parameters() lists every component's tensors, each name prefixed with its component folder
//   "<i>_<name>/" (e.g. "0_lora/base_model.model...."), so names never collide. On disk
//   (save_composite / load_composite) a composite is a folder with adapter_config.json
//   (peft_type "COMPOSE", the list of components with their configs and folders) and one
//   sub-folder per component in the reference layout (adapter_config.json +
//   adapter_model.safetensors), each loadable on its own as that component's policy.
//
// COMPOSITION RULES (compile time, each a static_assert that says why)
//   - at least one component;
//   - at most one component prepends virtual tokens (the decoder has one token site, and a second
//     set would shift the first's positions);
//   - at most one component supplies prefix keys/values (one prefix per layer);
//   - at most one component replaces a given module's product (DoRA, VeRA, LoKr, the selective
//     diffs): checked when the product is built (Projection::replace_product).
#include <array>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

namespace detail {

template <class P, class T = float>
using StateOf = typename P::template State<T>;

template <class P>
inline constexpr bool prepends_tokens = HasVirtualTokens<StateOf<P>, float>;
template <class P>
inline constexpr bool supplies_prefix = HasPrefix<StateOf<P>, float>;

/// "<i>_<name>": a component's folder in the saved layout and its parameters' name prefix.
template <class P>
std::string component_folder(std::size_t index) {
  return std::to_string(index) + "_" + std::string(P::name);
}

/// x [..., C] viewed as rows [R, C / (numel / R)], each row r scaled by g[r] (g has R entries,
/// any shape): a per-token or per-sequence gate over an activation. Backward: dx = g ⊙ dy per
/// row, dg[r] = Σ_row dy ⊙ x.
template <class T>
Var<T> scale_rows(Tape<T>& tape, const Var<T>& x, const Var<T>& g) {
  const std::int64_t rows = g.value().numel(), n = x.value().numel();
  ops::detail::check(
      rows > 0 && n % rows == 0, "scale_rows",
      "gate of " + std::to_string(rows) + " entries does not divide " + shape_string(x.shape()));
  const std::int64_t width = n / rows;
  Tensor<T> out = x.value();
  for (std::int64_t r = 0; r < rows; ++r) {
    const T s = g.value()[r];
    T* row = out.data() + r * width;
    for (std::int64_t c = 0; c < width; ++c) row[c] *= s;
  }
  Var<T> result = ops::detail::make_output(tape, std::move(out), x, g);
  if (result.requires_grad()) {
    tape.record([x, g, result, rows, width]() mutable {
      const T* dy = result.grad().data();
      for (std::int64_t r = 0; r < rows; ++r) {
        const T s = g.value()[r];
        if (x.requires_grad()) {
          T* dx = x.grad().data() + r * width;
          for (std::int64_t c = 0; c < width; ++c) dx[c] += s * dy[r * width + c];
        }
        if (g.requires_grad()) {
          const T* xv = x.value().data() + r * width;
          T acc = 0;
          for (std::int64_t c = 0; c < width; ++c) acc += dy[r * width + c] * xv[c];
          g.grad()[r] += acc;
        }
      }
    });
  }
  return result;
}

/// a − b.
template <class T>
Var<T> subtract(Tape<T>& tape, const Var<T>& a, const Var<T>& b) {
  return ops::add(tape, a, ops::scale(tape, b, T(-1)));
}

}  // namespace detail

/// The configs of a composite's components, in order. Its manifest is a list of the components'
/// own configs, so it keeps hand-written JSON rather than a field table (config_fields.hpp).
template <class... P>
struct ComposeConfig {
  static constexpr std::string_view peft_type = "COMPOSE";
  std::tuple<typename P::Config...> components;

  ComposeConfig() = default;
  // Implicit, so that `Decoder<Arch, Compose<A, B>> model(config, {a_config, b_config})` reads
  // as the composition it builds.
  ComposeConfig(typename P::Config... configs) : components(std::move(configs)...) {}

  template <std::size_t I>
  auto& get() {
    return std::get<I>(components);
  }
  template <std::size_t I>
  const auto& get() const {
    return std::get<I>(components);
  }

  /// The composite's manifest: peft_type "COMPOSE" and, per component, its method name, folder
  /// and its own adapter_config.json.
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = detail::adapter_config_header(std::string(peft_type));
    nlohmann::json list = nlohmann::json::array();
    std::size_t i = 0;
    std::apply(
        [&](const auto&... config) {
          ((list.push_back({{"method", std::string(P::name)},
                            {"folder", detail::component_folder<P>(i)},
                            {"config", config_to_json(config, model)}}),
            ++i),
           ...);
        },
        components);
    j["components"] = std::move(list);
    return j;
  }

  /// Reads a manifest written by to_json; the components must be P... in order.
  static ComposeConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, std::string(peft_type), source);
    const nlohmann::json& list = detail::json_field(j, "components");
    if (!list.is_array() || list.size() != sizeof...(P))
      throw ConfigError(source + ": 'components' must list " + std::to_string(sizeof...(P)) +
                        " components");
    ComposeConfig c;
    std::size_t i = 0;
    std::apply(
        [&](auto&... config) {
          ((config = read_component<P>(list[i], source + ": components[" + std::to_string(i) + "]"),
            ++i),
           ...);
        },
        c.components);
    return c;
  }

 private:
  template <class Q>
  static typename Q::Config read_component(const nlohmann::json& entry, const std::string& where) {
    const std::string method = detail::json_or<std::string>(entry, "method", "", where);
    if (method != Q::name)
      throw ConfigError(where + ": method '" + method + "', this composite expects '" +
                        std::string(Q::name) + "'");
    return config_from_json<typename Q::Config>(detail::json_field(entry, "config"),
                                                where + ".config");
  }
};

template <class... P>
struct Compose {
  static_assert(sizeof...(P) >= 1, "Compose: give at least one component policy");
  // Each component's contract (methods/policy.hpp); a failing check names the component.
  static_assert(((sizeof(detail::StateContract<P>) > 0) && ...));
  static_assert((int(detail::prepends_tokens<P>) + ... + 0) <= 1,
                "Compose: two components prepend virtual tokens (prompt tuning, P-tuning); the "
                "decoder has one virtual-token site and a second set would shift the first's "
                "positions");
  static_assert((int(detail::supplies_prefix<P>) + ... + 0) <= 1,
                "Compose: two components supply prefix keys/values (prefix tuning); a layer has "
                "one prefix, so they cannot share the attention's key/value site");
  static_assert(((!HasTokenEmbedding<detail::StateOf<P, float>, float> &&
                  !HasAttentionHook<detail::StateOf<P, float>, float>)&&...),
                "Compose: a component changes the token table or adds an attention of its own "
                "(trainable tokens, LLaMA-Adapter); Compose does not forward those hooks yet");

  using family = family::Hybrid;
  static constexpr std::string_view name = "compose";
  using Config = ComposeConfig<P...>;
  static constexpr std::size_t size = sizeof...(P);

  /// Sum of the components' counts, from shapes alone.
  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount total;
    std::apply(
        [&](const auto&... c) { (add(total, peft::count_parameters<P>(model, linears, c)), ...); },
        config.components);
    return total;
  }

  /// A manifest written by ComposeConfig::to_json for exactly these components.
  static bool accepts(const nlohmann::json& j) {
    if (detail::string_or(j, "peft_type", "") != "COMPOSE") return false;
    const nlohmann::json& list = detail::json_field(j, "components");
    if (!list.is_array() || list.size() != sizeof...(P)) return false;
    std::size_t i = 0;
    bool all = true;
    ((all = all && detail::string_or(list[i], "method", "") == P::name, ++i), ...);
    return all;
  }

  template <class T>
  class State {
    using States = std::tuple<detail::StateOf<P, T>...>;
    static constexpr bool any_projection = (HasProjectionHook<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_before = (HasBeforeAttention<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_tokens = (HasVirtualTokens<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_prefix = (HasPrefix<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_after_attention =
        (HasAfterAttention<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_after_mlp = (HasAfterMlp<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_extra_loss = (HasExtraLoss<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_after_block = (HasAfterBlock<detail::StateOf<P, T>, T> || ...);
    static constexpr bool any_mergeable = (Mergeable<detail::StateOf<P, T>, T> || ...);

   public:
    explicit State(const Config& config)
        : config_(config),
          states_(std::apply([](const auto&... c) { return States(c...); }, config.components)) {}
    const Config& config() const { return config_; }

    /// The I-th component's state.
    template <std::size_t I>
    auto& component() {
      return std::get<I>(states_);
    }
    template <std::size_t I>
    const auto& component() const {
      return std::get<I>(states_);
    }

    /// Attaches every component in order.
    void attach(AttachContext<T>& ctx) {
      std::apply([&](auto&... s) { (s.attach(ctx), ...); }, states_);
    }

    void before_attention(Tape<T>& tape, int layer, const Var<T>& x) requires(any_before) {
      for_each_state([&](auto& state) {
        if constexpr (HasBeforeAttention<std::decay_t<decltype(state)>, T>)
          state.before_attention(tape, layer, x);
      });
    }

    void adapt(Projection<T>& p) requires(any_projection) {
      for_each_state([&](auto& state) {
        if constexpr (HasProjectionHook<std::decay_t<decltype(state)>, T>) state.adapt(p);
      });
    }

    std::int64_t num_virtual_tokens() const requires(any_tokens) {
      std::int64_t n = 0;
      std::apply(
          [&](const auto&... s) {
            (
                [&](const auto& state) {
                  if constexpr (HasVirtualTokens<std::decay_t<decltype(state)>, T>)
                    n = state.num_virtual_tokens();
                }(s),
                ...);
          },
          states_);
      return n;
    }
    Var<T> prepend_virtual_tokens(Tape<T>& tape, const Var<T>& embeddings) requires(any_tokens) {
      Var<T> out = embeddings;
      for_each_state([&](auto& state) {
        if constexpr (HasVirtualTokens<std::decay_t<decltype(state)>, T>)
          out = state.prepend_virtual_tokens(tape, embeddings);
      });
      return out;
    }

    std::int64_t num_prefix_tokens() const requires(any_prefix) {
      std::int64_t n = 0;
      std::apply(
          [&](const auto&... s) {
            (
                [&](const auto& state) {
                  if constexpr (HasPrefix<std::decay_t<decltype(state)>, T>)
                    n = state.num_prefix_tokens();
                }(s),
                ...);
          },
          states_);
      return n;
    }
    std::pair<Var<T>, Var<T>> prefix_key_values(Tape<T>& tape, int layer,
                                                std::int64_t batch) requires(any_prefix) {
      std::pair<Var<T>, Var<T>> out;
      for_each_state([&](auto& state) {
        if constexpr (HasPrefix<std::decay_t<decltype(state)>, T>)
          out = state.prefix_key_values(tape, layer, batch);
      });
      return out;
    }

    Var<T> after_attention(Tape<T>& tape, int layer,
                           const Var<T>& attention_out) requires(any_after_attention) {
      Var<T> h = attention_out;
      for_each_state([&](auto& state) {
        if constexpr (HasAfterAttention<std::decay_t<decltype(state)>, T>)
          h = state.after_attention(tape, layer, h);
      });
      return h;
    }

    Var<T> after_mlp(Tape<T>& tape, int layer, const Var<T>& mlp_in,
                     const Var<T>& mlp_out) requires(any_after_mlp) {
      Var<T> h = mlp_out;
      for_each_state([&](auto& state) {
        if constexpr (HasAfterMlp<std::decay_t<decltype(state)>, T>)
          h = state.after_mlp(tape, layer, mlp_in, h);
      });
      return h;
    }

    Var<T> after_block(Tape<T>& tape, int layer, const Var<T>& h,
                       const TokenSpans& spans) requires(any_after_block) {
      Var<T> out = h;
      for_each_state([&](auto& state) {
        if constexpr (HasAfterBlock<std::decay_t<decltype(state)>, T>)
          out = state.after_block(tape, layer, out, spans);
      });
      return out;
    }

    Var<T> extra_loss(Tape<T>& tape) requires(any_extra_loss) {
      Var<T> total;
      for_each_state([&](auto& state) {
        if constexpr (HasExtraLoss<std::decay_t<decltype(state)>, T>) {
          Var<T> term = state.extra_loss(tape);
          total = total.defined() ? ops::add(tape, total, term) : term;
        }
      });
      return total;
    }

    void merge(std::vector<nn::Linear<T>*>& modules) requires(any_mergeable) {
      for_each_state([&](auto& state) {
        if constexpr (Mergeable<std::decay_t<decltype(state)>, T>) state.merge(modules);
      });
    }
    void unmerge(std::vector<nn::Linear<T>*>& modules) requires(any_mergeable) {
      for_each_state_reversed([&](auto& state) {
        if constexpr (Mergeable<std::decay_t<decltype(state)>, T>) state.unmerge(modules);
      });
    }

    /// Components initialised from base tensors redo it once the real weights are in.
    void on_base_weights_loaded(std::vector<nn::Linear<T>*>& modules) {
      for_each_state([&](auto& state) {
        if constexpr (DependsOnBaseWeights<std::decay_t<decltype(state)>, T>)
          state.on_base_weights_loaded(modules);
      });
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      for_each_indexed([&]<class Q>(auto& state, std::size_t i) {
        const std::string prefix = detail::component_folder<Q>(i) + "/";
        for (NamedParameter<T>& p : state.parameters()) out.push_back({prefix + p.name, p.var});
      });
      return out;
    }

    /// Calls f(state) for each component, in order.
    template <class F>
    void for_each_state(F&& f) {
      std::apply([&](auto&... s) { (f(s), ...); }, states_);
    }
    /// Calls f.template operator()<P_i>(state_i, i) for each component, in order.
    template <class F>
    void for_each_indexed(F&& f) {
      indexed(f, std::index_sequence_for<P...>{});
    }

   private:
    template <class F, std::size_t... I>
    void indexed(F& f, std::index_sequence<I...>) {
      (f.template operator()<std::tuple_element_t<I, std::tuple<P...>>>(std::get<I>(states_), I),
       ...);
    }

    template <class F>
    void for_each_state_reversed(F&& f) {
      reversed(f, std::make_index_sequence<sizeof...(P)>{});
    }
    template <class F, std::size_t... I>
    void reversed(F& f, std::index_sequence<I...>) {
      (f(std::get<sizeof...(P) - 1 - I>(states_)), ...);
    }

    Config config_;
    States states_;
  };

 private:
  static void add(ParameterCount& total, const ParameterCount& c) {
    total.trainable += c.trainable;
    total.frozen += c.frozen;
  }
};

namespace detail {

/// The Compose a composite's config belongs to.
template <class Config>
struct ComposeOf;
template <class... P>
struct ComposeOf<ComposeConfig<P...>> {
  using type = Compose<P...>;
};

/// Writes one component into `dir` in the reference layout (its own adapter_config.json and
/// tensors), so the folder loads on its own as that policy.
template <class Q, class State>
void save_component(const std::filesystem::path& dir, State& state, const ModelConfig& model) {
  static_assert(Savable<Q>,
                "save_composite: this component (Q above) has no "
                "`Config::to_json(const ModelConfig&)` (methods/policy.hpp, Savable)");
  // Re-parameterised prompts are saved as the reference saves them: their output.
  if constexpr (FoldsBeforeSaving<State>) state.fold();
  const nlohmann::json config = config_to_json(state.config(), model);
  if constexpr (WritesOwnTensors<State>) {
    // Methods with index tensors (the selective family) write their own tensors.
    io::SafetensorsWriter writer;
    writer.set_metadata("format", "pt");
    state.write_tensors(writer);
    const std::vector<std::uint8_t> tensors = writer.to_bytes();
    io::replace_directory_atomically(dir, [&](const std::filesystem::path& fresh) {
      io::write_file_atomically(fresh / "adapter_model.safetensors", tensors);
      io::write_file_atomically(fresh / "adapter_config.json", config.dump(2) + "\n");
    });
  } else {
    io::save_adapter(dir, config, state.parameters());
  }
}

template <class State, class T>
void load_component(const std::filesystem::path& dir, State& state,
                    const std::vector<nn::Linear<T>*>& linears) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(dir / "adapter_model.safetensors");
  if constexpr (ReadsOwnTensors<State, T>)
    state.read_tensors(file, linears);
  else
    io::load_adapter_tensors(state.parameters(), file);
}

}  // namespace detail

/// Writes a composite state into `dir`: the manifest adapter_config.json and one sub-folder
/// per component (see the layout at the top of this file), replacing the folder as one unit.
template <class State>
void save_composite_state(const std::filesystem::path& dir, State& adapter,
                          const ModelConfig& model) {
  const nlohmann::json manifest = adapter.config().to_json(model);
  io::replace_directory_atomically(dir, [&](const std::filesystem::path& fresh) {
    adapter.for_each_indexed([&]<class Q>(auto& state, std::size_t i) {
      detail::save_component<Q>(fresh / detail::component_folder<Q>(i), state, model);
    });
    io::write_file_atomically(fresh / "adapter_config.json", manifest.dump(2) + "\n");
  });
}

/// Reads every component's tensors from a folder written by save_composite_state into `adapter`,
/// whose composite must have the same components (checked against the manifest).
template <class State, class T>
void load_composite_state(const std::filesystem::path& dir, State& adapter,
                          const std::vector<nn::Linear<T>*>& linears) {
  using Policy = typename detail::ComposeOf<std::decay_t<decltype(adapter.config())>>::type;
  const std::filesystem::path manifest_path = dir / "adapter_config.json";
  const nlohmann::json manifest = io::load_json(manifest_path);
  if (!Policy::accepts(manifest))
    throw ConfigError(manifest_path.string() + ": not a composite of this model's components");
  adapter.for_each_indexed([&]<class Q>(auto& state, std::size_t i) {
    detail::load_component(dir / detail::component_folder<Q>(i), state, linears);
  });
}

/// Saves a model's (active) composite adapter into `dir` (save_composite_state).
template <class Model>
void save_composite(const std::filesystem::path& dir, Model& model) {
  save_composite_state(dir, model.adapter(), model.config());
}

/// Loads a folder written by save_composite into the model's (active) composite adapter.
template <class Model>
void load_composite(const std::filesystem::path& dir, Model& model) {
  load_composite_state(dir, model.adapter(), model.linear_modules());
}

}  // namespace peft
