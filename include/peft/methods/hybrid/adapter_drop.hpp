#pragma once
// AdapterDrop (Rücklé et al., 2021, "AdapterDrop: On the Efficiency of Adapters in
// Transformers"): no adapters in the lowest n transformer layers, in training and at inference.
//   fixed n (robust = false): P's tensors exist only in layers >= drop_layers (P's own
//            layers_to_transform, restricted); the model is P with those layers' adapters removed.
//   robust:  P's tensors in every layer P adapts; each training forward draws n ~ U{0..max_drop}
//            (max_drop -1: num_layers - 1, the paper's 0..N-1) and skips the adapters of layers <
//            n; evaluation skips layers < drop_layers. The draw comes from the decoder's dropout
//            generator (seeded with the model, checkpointed by the Trainer; null in evaluation),
//            the generator the adapters' dropout uses: no state of its own.
// Speed: below layer n no value needs a gradient, so ops record no backward closure there
// (core/autograd.hpp) and backward stops at layer n by itself.
// Starts at the base where P does. Layout: P's tensors and keys; adapter_config.json is P's with
// peft_type "ADAPTER_DROP", P's under "adapter_drop_peft_type", plus drop_layers, robust,
// max_drop. Not supported: prefix / virtual-token inners; merging; robust mode with activation
// checkpointing (a block's re-run draws again, as dropout masks do).
#include <optional>
#include <random>
#include <string>

#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/hybrid/compose.hpp"

namespace peft {

template <class P>
struct AdapterDropConfig {
  static constexpr std::string_view peft_type = "ADAPTER_DROP";
  typename P::Config inner;
  int drop_layers = 0;  ///< n: no adapters (fixed) or skipped adapters (robust, evaluation) below
  bool robust = false;
  int max_drop = -1;  ///< robust training draws n in [0, max_drop]; -1: num_layers - 1

  void validate(const std::string& source, std::int64_t layers = -1) const {
    auto fail = [&](const std::string& what) { throw ConfigError(source + ": " + what); };
    if (drop_layers < 0) fail("drop_layers expected >= 0, found " + std::to_string(drop_layers));
    if (max_drop < -1) fail("max_drop expected >= -1, found " + std::to_string(max_drop));
    if (layers >= 0 && drop_layers > layers)
      fail("drop_layers expected <= num_layers " + std::to_string(layers) + ", found " +
           std::to_string(drop_layers));
    if (layers >= 0 && max_drop >= layers)
      fail("max_drop expected < num_layers " + std::to_string(layers) + ", found " +
           std::to_string(max_drop));
  }
  /// P's config as P is built with: layers < drop_layers removed (fixed n only).
  typename P::Config effective(std::int64_t layers) const {
    typename P::Config c = inner;
    if (robust) return c;
    std::vector<int> kept;
    for (int l = drop_layers; l < layers; ++l)
      if (c.adapts_layer(l)) kept.push_back(l);
    c.layers_to_transform = kept.empty() ? std::vector<int>{-1} : kept;  // {-1}: no layer
    return c;
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = config_to_json(inner, model);
    j["adapter_drop_peft_type"] = j["peft_type"];
    j["peft_type"] = std::string(peft_type);
    j["drop_layers"] = drop_layers;
    j["robust"] = robust;
    j["max_drop"] = max_drop;
    return j;
  }
  static AdapterDropConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, std::string(peft_type), source);
    AdapterDropConfig c;
    nlohmann::json in = j;
    in["peft_type"] = detail::json_or<std::string>(j, "adapter_drop_peft_type", "", source);
    for (const char* key : {"adapter_drop_peft_type", "drop_layers", "robust", "max_drop"})
      in.erase(key);
    if (j.contains("drop_layers")) c.drop_layers = io::json_get<int>(j, "drop_layers", source);
    if (j.contains("robust")) c.robust = io::json_get<bool>(j, "robust", source);
    if (j.contains("max_drop")) c.max_drop = io::json_get<int>(j, "max_drop", source);
    c.inner = config_from_json<typename P::Config>(in, source);  // refuses unknown fields
    c.validate(source);
    return c;
  }
};

template <class P>
struct AdapterDrop {
  static_assert(!detail::prepends_tokens<P> && !detail::supplies_prefix<P>,
                "AdapterDrop: virtual tokens and prefixes are shared by every layer");
  using family = family::Hybrid;
  static constexpr std::string_view name = "adapter_drop", title = "AdapterDrop";
  static constexpr std::string_view paper =
      "Rücklé et al., 2021, AdapterDrop: On the Efficiency of Adapters in Transformers";
  static constexpr std::string_view reference = "";  ///< AdapterHub's, not HF peft's
  using Config = AdapterDropConfig<P>;

  static bool accepts(const nlohmann::json& j) {
    return detail::string_or(j, "peft_type", "") == Config::peft_type;
  }
  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears, const Config& c) {
    c.validate("AdapterDrop", model.num_layers);
    return peft::count_parameters<P>(model, linears, c.effective(model.num_layers));
  }

  template <class T>
  class State {
    using Inner = detail::StateOf<P, T>;

   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }
    Inner& inner() { return *inner_; }
    int current_drop() const { return training_ && config_.robust ? drawn_ : config_.drop_layers; }

    void attach(AttachContext<T>& ctx) {
      const std::int64_t layers = ctx.config.num_layers;
      config_.validate("AdapterDrop", layers);
      layers_ = static_cast<int>(layers);
      max_drop_ = config_.max_drop < 0 ? layers_ - 1 : config_.max_drop;
      inner_.emplace(config_.effective(layers));
      inner_->attach(ctx);
    }
    std::vector<NamedParameter<T>> parameters() {
      return inner_ ? inner_->parameters() : std::vector<NamedParameter<T>>{};
    }

    /// Every projection tells the mode (the dropout generator is null in evaluation); the
    /// first one of a training forward draws n.
    void adapt(Projection<T>& p) {
      std::mt19937_64* generator = p.dropout_generator();
      training_ = generator != nullptr;
      if (training_ && config_.robust && fresh_) {
        drawn_ = std::uniform_int_distribution<int>(0, max_drop_)(*generator);
        fresh_ = false;
      }
      if constexpr (HasProjectionHook<Inner, T>)
        if (active(p.module().layer)) inner_->adapt(p);
    }
    void before_attention(Tape<T>& t, int layer,
                          const Var<T>& x) requires(HasBeforeAttention<Inner, T>) {
      if (active(layer)) inner_->before_attention(t, layer, x);
    }
    Var<T> adapt_attention(Tape<T>& t, const AttentionSite<T>& s,
                           const Var<T>& o) requires(HasAttentionHook<Inner, T>) {
      return active(s.layer) ? inner_->adapt_attention(t, s, o) : o;
    }
    Var<T> after_attention(Tape<T>& t, int layer,
                           const Var<T>& o) requires(HasAfterAttention<Inner, T>) {
      return active(layer) ? inner_->after_attention(t, layer, o) : o;
    }
    Var<T> after_mlp(Tape<T>& t, int layer, const Var<T>& in,
                     const Var<T>& out) requires(HasAfterMlp<Inner, T>) {
      return active(layer) ? inner_->after_mlp(t, layer, in, out) : out;
    }
    /// The last block's hook ends a forward: the next training forward draws again.
    Var<T> after_block(Tape<T>& t, int layer, const Var<T>& h, const TokenSpans& spans) {
      if (layer == layers_ - 1) fresh_ = true;
      if constexpr (HasAfterBlock<Inner, T>)
        if (active(layer)) return inner_->after_block(t, layer, h, spans);
      return h;
    }
    Var<T> extra_loss(Tape<T>& t) requires(HasExtraLoss<Inner, T>) { return inner_->extra_loss(t); }
    void on_base_weights_loaded(std::vector<nn::Linear<T>*>& m) requires(
        DependsOnBaseWeights<Inner, T>) {
      inner_->on_base_weights_loaded(m);
    }

   private:
    bool active(int layer) const { return layer < 0 || layer >= current_drop(); }

    Config config_;
    std::optional<Inner> inner_;
    int layers_ = 0, max_drop_ = 0, drawn_ = 0;
    bool training_ = false, fresh_ = true;
  };
};

}  // namespace peft
