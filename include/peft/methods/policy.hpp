#pragma once
// The PEFT policy concept: what a method is, the hooks it may implement, its family tag.
//
// WHAT A POLICY IS
//   A type P (a plain struct, never instantiated itself) that names a method:
//     using family = peft::family::Additive | Selective | Reparameterized | Hybrid;
//     static constexpr std::string_view name;        // "lora", "ia3", ...
//     struct Config;                                 // its hyper-parameters, as values
//     template <class T> class State;                // its tensors and hooks for scalar T
//   `Decoder<Arch, P, T>` owns one `P::State<T>`, built from a `P::Config`.
//
// REQUIRED OF State<T>
//   explicit State(const P::Config&);
//   void attach(AttachContext<T>&);      // once, at build: pick the modules to adapt (by the
//                                        // reference's target rules) and create the tensors
//   std::vector<NamedParameter<T>> parameters();  // every tensor the adapter file holds, keyed as
//                                        // the reference keys it ("base_model.model.<module>.
//                                        // <name>"); trainable ones have requires_grad()
//
// OPTIONAL HOOKS (detected with `requires`; a hook a policy lacks costs nothing)
//   Var<T> linear(Tape<T>&, const nn::Linear<T>& module, const Var<T>& x)
//       replaces the module's forward y = base(x) at every projection site (qkv / q, k, v, o,
//       fc, proj / gate, up, down, lm_head); the policy returns module.forward_base(...) for
//       modules it did not attach to.
//   std::int64_t num_virtual_tokens() const;
//   Var<T> prepend_virtual_tokens(Tape<T>&, const Var<T>& embeddings)    // [B,T,d] -> [B,P+T,d]
//   std::int64_t num_prefix_tokens() const;
//   std::pair<Var<T>, Var<T>> prefix_key_values(Tape<T>&, int layer, std::int64_t batch)
//       keys and values [B, P, kv_heads·head_dim] prepended to a layer's attention
//   Var<T> after_attention(Tape<T>&, int layer, const Var<T>& attention_out)   // before the
//   residual add Var<T> after_mlp(Tape<T>&, int layer, const Var<T>& mlp_in, const Var<T>& mlp_out)
//   Var<T> extra_loss(Tape<T>&)          // a regulariser [1] added to the training loss
//   void merge(std::vector<nn::Linear<T>*>&); void unmerge(std::vector<nn::Linear<T>*>&);
//       fold the adapter into the base weights and back (mergeable methods only)
//   bool adapts(const nn::Linear<T>&) const
//       with a linear hook: whether it adapted this module (Compose routes each projection to
//       the one component that adapts it)
//   void on_base_weights_loaded(std::vector<nn::Linear<T>*>&)   (or with no argument)
//       redo initialisation that depends on base weights (PiSSA, DoRA magnitudes, prompt
//       tuning from token embeddings) once real weights are in: Decoder::base_weights_changed()
//   void observe_attention_input(Tape<T>&, int layer, const Var<T>& x)
//       sees a block's normalised attention input before its projections (UniPELT's gates;
//       called by Compose from its linear routing)
//   static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>&,
//                                          const Config&)   // `peft count`, from shapes alone
//   static bool accepts(const nlohmann::json&)           // loadable from adapter_config.json
//
// ORDER AT A SITE: the decoder calls the hooks in the order listed above within each block.
#include <concepts>
#include <random>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/modules.hpp"

namespace peft {

namespace family {
struct Additive {
  static constexpr std::string_view name = "additive";
};
struct Selective {
  static constexpr std::string_view name = "selective";
};
struct Reparameterized {
  static constexpr std::string_view name = "reparameterized";
};
struct Hybrid {
  static constexpr std::string_view name = "hybrid";
};
/// No adaptation (the base model, or full fine-tuning).
struct None {
  static constexpr std::string_view name = "none";
};
}  // namespace family

template <class F>
concept FamilyTag = std::same_as<F, family::Additive> || std::same_as<F, family::Selective> ||
    std::same_as<F, family::Reparameterized> || std::same_as<F, family::Hybrid> ||
    std::same_as<F, family::None>;

/// What a policy sees of the model when it attaches (see the spec above).
template <class T>
struct AttachContext {
  const ModelConfig& config;
  std::vector<nn::Linear<T>*> linears;  ///< every projection of the model, by site index
  std::mt19937_64& rng;                 ///< for initialising new adapter tensors
  /// Every base tensor (embeddings, norms, weights, biases) named as in model.safetensors;
  /// selective methods pick theirs from here. All frozen when the policy attaches.
  std::vector<NamedParameter<T>> base_parameters;
};

// The concept is split so that a failing check names the missing piece.
template <class P>
concept HasPolicyTraits = requires {
  typename P::family;
  typename P::Config;
  { P::name } -> std::convertible_to<std::string_view>;
}
&&FamilyTag<typename P::family>;

template <class S, class T>
concept PolicyState = requires(S state, AttachContext<T>& ctx) {
  {state.attach(ctx)};
  { state.parameters() } -> std::same_as<std::vector<NamedParameter<T>>>;
};

/// A PEFT policy, as specified at the top of include/peft/methods/policy.hpp.
template <class P>
concept PeftPolicy =
    HasPolicyTraits<P> && std::constructible_from < typename P::template State<double>,
const typename P::Config& > &&PolicyState<typename P::template State<double>, double>&&
                                PolicyState<typename P::template State<float>, float>;

/// Hook detection, one concept per optional hook.
template <class S, class T>
concept HasLinearHook = requires(S s, Tape<T>& tape, const nn::Linear<T>& m, const Var<T>& x) {
  { s.linear(tape, m, x) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasVirtualTokens = requires(S s, const S cs, Tape<T>& tape, const Var<T>& h) {
  { cs.num_virtual_tokens() } -> std::convertible_to<std::int64_t>;
  { s.prepend_virtual_tokens(tape, h) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasPrefix = requires(S s, const S cs, Tape<T>& tape) {
  { cs.num_prefix_tokens() } -> std::convertible_to<std::int64_t>;
  { s.prefix_key_values(tape, 0, std::int64_t{1}) } -> std::same_as<std::pair<Var<T>, Var<T>>>;
};
template <class S, class T>
concept HasAfterAttention = requires(S s, Tape<T>& tape, const Var<T>& h) {
  { s.after_attention(tape, 0, h) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasAfterMlp = requires(S s, Tape<T>& tape, const Var<T>& h) {
  { s.after_mlp(tape, 0, h, h) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasExtraLoss = requires(S s, Tape<T>& tape) {
  { s.extra_loss(tape) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept Mergeable = requires(S s, std::vector<nn::Linear<T>*>& modules) {
  s.merge(modules);
  s.unmerge(modules);
};

/// The base model alone: no adapter tensors, no hooks.
struct NoPeft {
  using family = family::None;
  static constexpr std::string_view name = "none";
  struct Config {};
  template <class T>
  class State {
   public:
    explicit State(const Config&) {}
    void attach(AttachContext<T>&) {}
    std::vector<NamedParameter<T>> parameters() { return {}; }
  };
};

}  // namespace peft
