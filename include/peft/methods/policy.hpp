#pragma once
// THE METHOD CONTRACT (second edition). Every PEFT method of the library, and any method an
// outside project writes, is a policy P as specified here; every protocol the decoder, Compose,
// the trainer, the savers and the commands use is named below as a concept, and nothing is
// detected elsewhere. docs/tutorial-new-method.md writes a method against it end to end.
//
// 1. REQUIRED OF P (concept PeftPolicy)
//   using family = peft::family::Additive | Selective | Reparameterized | Hybrid;
//   static constexpr std::string_view name;        // "lora", "ia3", ... (unique in a registry)
//   struct Config;                                 // its hyper-parameters, as values
//   template <class T> class State;                // its tensors and hooks for scalar T
//   Optional: static constexpr std::string_view title ("LoRA": used in messages; default name),
//             paper ("Authors, year, title") and reference (HF peft's peft_type, "" if none):
//             what `peft methods` lists (commands/methods.hpp).
//
// 2. REQUIRED OF P::State<T> (concept PolicyState)
//   explicit State(const P::Config&);
//   const P::Config& config() const;
//   void attach(AttachContext<T>&);      // once, at build: pick the modules to adapt and create
//                                        // the tensors (a SiteTable does both, site_table.hpp)
//   std::vector<NamedParameter<T>> parameters();  // every tensor the adapter file holds, keyed
//                                        // as the reference keys it ("base_model.model.<module>.
//                                        // <name>"); trainable ones have requires_grad()
//
// 3. OPTIONAL HOOKS OF State<T> (each a concept below; a hook a state lacks costs nothing).
//    The decoder calls them in this order (token_embedding once per forward, the rest within
//    each block):
//   Var<T> token_embedding(Tape<T>&, const Var<T>& table)           HasTokenEmbedding
//       the token table [V, d] the model looks up and, where the head is tied, projects with:
//       `table` or a table derived from it (trainable tokens' rows)
//   void before_attention(Tape<T>&, int layer, const Var<T>& x)    HasBeforeAttention
//       sees the block's normalised attention input before its projections (UniPELT's gates)
//   void adapt(Projection<T>&)                                      HasProjectionHook
//       at every projection site (qkv / q, k, v, o, fc, proj / gate, up, down, lm_head):
//       CONTRIBUTES to the module's product — an input or output scale, an input map, a low-rank
//       term, a delta, a shift, or (where the method truly is one) a replacement — as data
//       (nn/projection.hpp, which fixes their order). Several methods may adapt one module.
//   std::int64_t num_virtual_tokens() const;                        HasVirtualTokens
//   Var<T> prepend_virtual_tokens(Tape<T>&, const Var<T>& embeddings)   [B,T,d] -> [B,P+T,d]
//   std::int64_t num_prefix_tokens() const;                         HasPrefix
//   std::pair<Var<T>, Var<T>> prefix_key_values(Tape<T>&, int layer, std::int64_t batch)
//       keys and values [B, P, kv_heads·head_dim] prepended to a layer's attention
//   Var<T> adapt_attention(Tape<T>&, const AttentionSite<T>&, const Var<T>& o)  HasAttentionHook
//       after the output projection: o plus an attention of the method's own, from the
//       block's queries and its own projections (AttentionSite; LLaMA-Adapter's gated prompts)
//   Var<T> after_attention(Tape<T>&, int layer, const Var<T>& o)    HasAfterAttention
//       before the residual add
//   Var<T> after_mlp(Tape<T>&, int layer, const Var<T>& in, const Var<T>& out)  HasAfterMlp
//   Var<T> after_block(Tape<T>&, int layer, const Var<T>& h, const TokenSpans&)  HasAfterBlock
//       the block's output h [B, Tn, d] (the residual stream after the MLP's residual add);
//       returns the block's output in its place. TokenSpans says where each row's tokens sit
//       (padding and virtual tokens outside them) and how many came before the call (a cached
//       generation step), and carries the dropout generator in training (ReFT's interventions
//       at chosen positions). Outside a checkpointed block's re-run.
//   Var<T> extra_loss(Tape<T>&)                                     HasExtraLoss
//       a regulariser [1] added to the training loss
//   void pre_pass(Tape<T>&, const std::function<Tensor<T>()>& hidden, std::mt19937_64* dropout)
//                                                                   HasPrePass
//       once per forward, before everything else: hidden() runs the whole model without
//       recording (every hook, this state's adapt() too, as the state stands while it runs)
//       and returns its last hidden states [B, Tn, d] after the final norm; what the state
//       derives from them on `tape` feeds its hooks in the real pass (X-LoRA's scaling pass).
//       `dropout`: the decoder's generator in training, else null. No forward_cached, no mixed
//       batches.
//
// 4. OPTIONAL CAPABILITIES (named concepts; what each enables)
//   Mergeable             merge(modules) / unmerge(modules): fold into the base weights and back
//                         (Decoder::merge, golden merged logits)
//   Unloadable            unload(modules): merge for good and drop the adapter
//   DependsOnBaseWeights  on_base_weights_loaded(modules): redo initialisation that reads the
//                         base weights (PiSSA, DoRA norms, prompt init from the vocabulary)
//   Savable (of P)        its adapter_config.json: a field table (TabledConfig, config_fields.hpp)
//                         or Config::to_json(const ModelConfig&); written by config_to_json
//   Loadable (of P)       read back: the field table, or static Config::from_json(json, source);
//                         and which files are P's: static bool accepts(json), by default the
//                         table's peft_type (method_accepts; the registry dispatches on it)
//   WritesOwnTensors      write_tensors(io::SafetensorsWriter&) const: tensors that are not
//                         parameters() (index tensors of the selective family); else the
//                         saver writes parameters()
//   ReadsOwnTensors       read_tensors(const io::SafetensorsFile&, linears); else the loader
//                         fills parameters() by name
//   FoldsBeforeSaving     fold(): re-parameterised tensors saved as the reference saves them
//                         (prefix / P-tuning encoders write their output)
//   CountableFromShapes (of P)  static count_parameters(ModelConfig, shapes, Config), or a site
//                         table declaration (site_tensors) from which peft::count_parameters<P>
//                         derives it
//   Calibrated            calibrate(model, batches) before training (FishMask's Fisher pass)
//   AllocatesBudget       update_and_allocate(step) after each optimizer step (AdaLoRA)
//   SamplesRank           sample_rank() before each step, set_rank(b) (DyLoRA)
//   TrainsInTwoPhases     prune() between a dense and a sparse phase (diff pruning)
//   ProjectsGradients     project_gradients() after backward, the gradient clip and the
//                         data-parallel sum, before the optimizer step: rewrites its trainable
//                         tensors' gradients (LoRA-FA's g_B (A Aᵀ)⁻¹ / s²); the Trainer and the
//                         golden runner call it
//   PrescribesAdamW (of P) static constexpr AdamWForm adamw_form: the optimizer form the method
//                         is defined with (LoRA-FA: the reference's LoraFAOptimizer, the Hugging
//                         Face form, train/optimizer.hpp); the Trainer and the golden runner use it
//   HasRunningState       running_state() -> nlohmann::json, restore_running_state(json):
//                         what a method updates while training that its adapter file does not
//                         hold (AdaLoRA's importance averages and allocation, DyLoRA's rank
//                         generator, diff pruning's gate-noise generator); the Trainer keeps it
//                         in every checkpoint, so that a resumed run equals the uninterrupted one
//
// 5. ROOM FOR WHAT COMES NEXT (how each plugs in without reopening this contract)
//   - Frozen-weight storage formats (fp32, bf16, fp16, NF4): a module's weight becomes a
//     storage that Projection::compute() multiplies by; methods contribute as above and read W
//     only through a read-only dequantized view (nn::Linear::weight_out_in()).
//   - Devices: State<T> gains the decoder's device parameter; contributions are device
//     tensors, computed by the device's Projection::compute().
//   - Named adapters on one model (built): a model holds several P::State<T> by name
//     (Decoder::add_adapter, set_adapter; methods/named_adapters.hpp); a batch's per-row adapter
//     names turn a projection's contributions into a grouped product (one term per group,
//     nn/projection.hpp's grouped_projection). A state needs nothing more for it; mixed batches
//     take the methods whose only per-forward hook is adapt().
//   - Train/eval mode and randomness (built): Decoder::set_training, and a seeded dropout
//     generator the Projection draws masks from, in order (nn/projection.hpp); running values
//     through HasRunningState. For N data-parallel ranks to reproduce one process, the masks
//     would instead be keyed by (seed, step, sample, site): the generator is the one place to
//     change.
#include <concepts>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/site_table.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/nn/modules.hpp"
#include "peft/nn/projection.hpp"

namespace peft {

namespace io {
struct TensorInfo;
class SafetensorsFile;
class SafetensorsWriter;
}  // namespace io

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

/// What after_block sees of a forward besides the hidden states (section 3).
struct TokenSpans {
  /// Per row b: its tokens are positions begin[b] .. end[b] − 1 of the call's sequence (from
  /// the attention mask's first and last 1; virtual tokens before them).
  std::vector<std::int64_t> begin, end;
  std::int64_t past = 0;  ///< tokens of each row before this call (cached generation steps)
  std::mt19937_64* dropout = nullptr;  ///< the decoder's dropout generator in training, else null
};

/// What a block's attention shows adapt_attention (section 3): its queries and the layer's own
/// projections, computed as the model computes them (through the method's adapt(), if any).
template <class T>
struct AttentionSite {
  int layer = 0;
  Var<T> queries;  ///< [B, T, heads·head_dim], after rotary (LLaMA)
  /// The layer's key and value projections of x [..., hidden] (no rotary): [..., kv_dim] each.
  std::function<std::pair<Var<T>, Var<T>>(const Var<T>&)> key_values;
  /// The layer's output projection of x [..., heads·head_dim] (o_proj, c_proj).
  std::function<Var<T>(const Var<T>&)> output;
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
concept PolicyState = requires(S state, const S cstate, AttachContext<T>& ctx) {
  {state.attach(ctx)};
  { state.parameters() } -> std::same_as<std::vector<NamedParameter<T>>>;
  cstate.config();
};

/// A PEFT policy, as specified at the top of include/peft/methods/policy.hpp.
template <class P>
concept PeftPolicy =
    HasPolicyTraits<P> && std::constructible_from < typename P::template State<double>,
const typename P::Config& > &&PolicyState<typename P::template State<double>, double>&&
                                PolicyState<typename P::template State<float>, float>;

namespace detail {

/// The contract checked one requirement at a time, each failing with its own message that
/// names the member and the spec section (and nothing else: a failed policy is replaced by
/// NoPeft below, so that the model's code raises no further errors).
template <class P>
struct PolicyCheck {
  static constexpr bool has_name = requires {
    { P::name } -> std::convertible_to<std::string_view>;
  };
  static constexpr bool has_family = requires { typename P::family; };
  static constexpr bool has_config = requires { typename P::Config; };
  static constexpr bool has_state = requires { typename P::template State<float>; };
  static_assert(has_name,
                "peft policy: missing `static constexpr std::string_view name` "
                "(include/peft/methods/policy.hpp, section 1)");
  static_assert(has_family,
                "peft policy: missing `using family = peft::family::...` "
                "(include/peft/methods/policy.hpp, section 1)");
  static_assert(has_config,
                "peft policy: missing `struct Config` "
                "(include/peft/methods/policy.hpp, section 1)");
  static_assert(has_state,
                "peft policy: missing `template <class T> class State` "
                "(include/peft/methods/policy.hpp, section 1)");
  static constexpr bool traits = has_name && has_family && has_config && has_state;
  template <class S, class C>
  static constexpr bool constructible = std::constructible_from<S, const C&>;
  template <class S>
  static constexpr bool attaches = requires(S s, AttachContext<float>& ctx) {
    s.attach(ctx);
  };
  template <class S>
  static constexpr bool lists = requires(S s) {
    { s.parameters() } -> std::same_as<std::vector<NamedParameter<float>>>;
  };
  template <class S>
  static constexpr bool configured = requires(const S s) {
    s.config();
  };
  static constexpr bool state_ok = [] {
    if constexpr (traits) {
      using S = typename P::template State<float>;
      return constructible<S, typename P::Config> && attaches<S> && lists<S> && configured<S>;
    } else {
      return false;
    }
  }();
  static constexpr bool ok = traits && state_ok;
};

/// Section 2's checks, instantiated only for a policy that passes section 1 (PolicyCheck).
template <class P, bool = PolicyCheck<P>::traits>
struct StateContract {};

template <class P>
struct StateContract<P, true> {
  using S = typename P::template State<float>;
  using C = PolicyCheck<P>;
  static_assert(C::template constructible<S, typename P::Config>,
                "peft policy: State<T> needs `explicit State(const Config&)` "
                "(include/peft/methods/policy.hpp, section 2)");
  static_assert(C::template attaches<S>,
                "peft policy: State<T> needs `void attach(AttachContext<T>&)` "
                "(include/peft/methods/policy.hpp, section 2)");
  static_assert(C::template lists<S>,
                "peft policy: State<T> needs `std::vector<NamedParameter<T>> parameters()` "
                "(include/peft/methods/policy.hpp, section 2)");
  static_assert(C::template configured<S>,
                "peft policy: State<T> needs `const Config& config() const` "
                "(include/peft/methods/policy.hpp, section 2)");
};

// The contract's static_asserts for P fire, one message per missing member and nothing more,
// where a class names `static_assert(sizeof(detail::StateContract<P>) > 0)`: sizeof
// instantiates both sections' checks and stays a constant where one failed, for GCC and clang
// alike. (A constexpr function or variable that instantiated a failed check is no constant for
// clang, which then adds an error of its own.)

}  // namespace detail

/// Hook detection, one concept per optional hook (section 3 above).
template <class S, class T>
concept HasProjectionHook = requires(S s, Projection<T>& p) {
  s.adapt(p);
};
template <class S, class T>
concept HasTokenEmbedding = requires(S s, Tape<T>& tape, const Var<T>& table) {
  { s.token_embedding(tape, table) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasAttentionHook = requires(S s, Tape<T>& tape, const AttentionSite<T>& site,
                                    const Var<T>& o) {
  { s.adapt_attention(tape, site, o) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasBeforeAttention = requires(S s, Tape<T>& tape, const Var<T>& x) {
  s.before_attention(tape, 0, x);
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
concept HasAfterBlock = requires(S s, Tape<T>& tape, const Var<T>& h, const TokenSpans& spans) {
  { s.after_block(tape, 0, h, spans) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasExtraLoss = requires(S s, Tape<T>& tape) {
  { s.extra_loss(tape) } -> std::same_as<Var<T>>;
};
template <class S, class T>
concept HasPrePass = requires(S s, Tape<T>& tape, const std::function<Tensor<T>()>& hidden,
                              std::mt19937_64* dropout) {
  s.pre_pass(tape, hidden, dropout);
};

/// Capabilities (section 4 above).
template <class S, class T>
concept Mergeable = requires(S s, std::vector<nn::Linear<T>*>& modules) {
  s.merge(modules);
  s.unmerge(modules);
};
template <class S, class T>
concept Unloadable = requires(S s, std::vector<nn::Linear<T>*>& modules) {
  s.unload(modules);
};
template <class S, class T>
concept DependsOnBaseWeights = requires(S s, std::vector<nn::Linear<T>*>& modules) {
  s.on_base_weights_loaded(modules);
};
template <class P>
concept Savable = TabledConfig<typename P::Config> ||
    requires(const typename P::Config& c, const ModelConfig& m) {
  { c.to_json(m) } -> std::convertible_to<nlohmann::json>;
};
template <class P>
concept Loadable = (TabledConfig<typename P::Config> ||
                    requires(const nlohmann::json& j, const std::string& source) {
                      {
                        P::Config::from_json(j, source)
                        } -> std::convertible_to<typename P::Config>;
                    }) &&
                   (TabledConfig<typename P::Config> || requires(const nlohmann::json& j) {
                     { P::accepts(j) } -> std::convertible_to<bool>;
                   });
template <class S>
concept WritesOwnTensors = requires(const S s, io::SafetensorsWriter& w) {
  s.write_tensors(w);
};
template <class S, class T>
concept ReadsOwnTensors = requires(S s, const io::SafetensorsFile& f,
                                   const std::vector<nn::Linear<T>*>& linears) {
  s.read_tensors(f, linears);
};
template <class S>
concept FoldsBeforeSaving = requires(S s) {
  s.fold();
};
template <class P>
concept CountsOwnParameters = requires(const ModelConfig& m, const std::vector<LinearShape>& l,
                                       const typename P::Config& c) {
  { P::count_parameters(m, l, c) } -> std::same_as<ParameterCount>;
};
template <class P>
concept DeclaresSiteTensors = requires(const typename P::Config& c, const ModuleSite& site) {
  { P::site_tensors(c, site) } -> std::convertible_to<SiteTensors>;
};
template <class P>
concept CountableFromShapes = CountsOwnParameters<P> || DeclaresSiteTensors<P>;
template <class S, class Model, class Batches>
concept Calibrated = requires(S s, Model& model, const Batches& batches) {
  s.calibrate(model, batches);
};
template <class S>
concept AllocatesBudget = requires(S s) {
  s.update_and_allocate(0);
};
template <class S>
concept SamplesRank = requires(S s) {
  s.sample_rank();
  s.set_rank(1);
  { s.config().r } -> std::convertible_to<int>;
};
template <class S>
concept TrainsInTwoPhases = requires(S s) {
  s.prune();
};
template <class S>
concept ProjectsGradients = requires(S s) {
  s.project_gradients();
};
template <class P>
concept PrescribesAdamW = requires {
  P::adamw_form;
};
template <class S>
concept HasRunningState = requires(S s, const S& cs, const nlohmann::json& j) {
  { cs.running_state() } -> std::convertible_to<nlohmann::json>;
  s.restore_running_state(j);
};

namespace detail {
/// A generator's state as text (the standard's operator<<), for HasRunningState.
inline std::string generator_text(const std::mt19937_64& g) {
  std::ostringstream out;
  out << g;
  return out.str();
}
/// Restores `g` from running_state()[key]; FileError naming `what` when it is not a state.
inline void read_generator(std::mt19937_64& g, const nlohmann::json& state, const char* key,
                           const std::string& what) {
  const auto it = state.find(key);
  if (it == state.end() || !it->is_string())
    throw FileError(what + ": running state: field '" + key + "' expected a generator state");
  std::istringstream in(it->get<std::string>());
  std::mt19937_64 restored;
  in >> restored;
  if (!in) throw FileError(what + ": running state: field '" + key + "' is not a generator state");
  g = restored;
}
}  // namespace detail

/// What a method adds to a model, from shapes alone: its own count, or its site declaration.
template <class P>
requires CountableFromShapes<P> ParameterCount
count_parameters(const ModelConfig& model, const std::vector<LinearShape>& linears,
                 const typename P::Config& config) {
  if constexpr (CountsOwnParameters<P>)
    return P::count_parameters(model, linears, config);
  else
    return count_site_tensors<P>(linears, config);
}

/// The base model alone: no adapter tensors, no hooks.
struct NoPeft {
  using family = family::None;
  static constexpr std::string_view name = "none";
  struct Config {};
  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }
    void attach(AttachContext<T>&) {}
    std::vector<NamedParameter<T>> parameters() { return {}; }

   private:
    Config config_;
  };
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>&,
                                         const Config&) {
    return {};
  }
};

}  // namespace peft
