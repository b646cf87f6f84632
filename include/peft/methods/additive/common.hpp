#pragma once
// Pieces the additive methods share: initialisers matching torch's defaults, a small MLP of
// nn.Linear-style layers (the prompt encoders and the bottleneck adapters), repeating a tensor
// over the batch, the prompt-learning config fields, field-table pieces the additive configs
// share, and folding a scale into a linear's weight (IA3, SSF).
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/modules.hpp"

namespace peft::detail {

/// Fills with U(−bound, bound).
template <class T>
void fill_uniform(Tensor<T>& t, std::mt19937_64& rng, double bound) {
  std::uniform_real_distribution<double> u(-bound, bound);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(u(rng));
}

/// Fills with N(0, stddev²) (torch.nn.Embedding's default is stddev 1).
template <class T>
void fill_normal(Tensor<T>& t, std::mt19937_64& rng, double stddev) {
  std::normal_distribution<double> n(0.0, stddev);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(n(rng));
}

/// A torch.nn.Linear-style layer of an adapter: weight [out, in], bias [out].
template <class T>
struct DenseLayer {
  Var<T> weight, bias;

  DenseLayer() = default;
  /// Kaiming-uniform weight and uniform bias with bound 1/√in, as torch.nn.Linear initialises
  /// them; `zero` makes both zero (adapter up-projections start at zero).
  DenseLayer(std::int64_t in, std::int64_t out, std::mt19937_64& rng, bool zero = false)
      : weight(Tensor<T>(Shape{out, in}), true), bias(Tensor<T>(Shape{out}), true) {
    if (!zero) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      fill_uniform(weight.value(), rng, bound);
      fill_uniform(bias.value(), rng, bound);
    }
  }
  std::int64_t in_features() const { return weight.value().dim(1); }
  std::int64_t out_features() const { return weight.value().dim(0); }
  std::int64_t numel() const { return weight.value().numel() + bias.value().numel(); }

  Var<T> forward(Tape<T>& tape, const Var<T>& x) const {
    return ops::linear(tape, x, weight, bias, ops::WeightLayout::OutIn);
  }
  /// Appends "<prefix>.weight" and "<prefix>.bias".
  void name_parameters(const std::string& prefix, std::vector<NamedParameter<T>>& out) const {
    out.push_back({prefix + ".weight", weight});
    out.push_back({prefix + ".bias", bias});
  }
};

/// The non-linearities an adapter may use, by the names transformers gives them.
enum class Activation { Relu, GeluTanh, Silu, Tanh };

/// Their JSON names: the first of each is the one written.
template <class C>
auto activation_choice(std::string_view key, Activation C::*member) {
  return choice(key, member, std::pair("relu", Activation::Relu),
                std::pair("gelu_new", Activation::GeluTanh),
                std::pair("gelu_pytorch_tanh", Activation::GeluTanh),
                std::pair("gelu", Activation::GeluTanh), std::pair("silu", Activation::Silu),
                std::pair("swish", Activation::Silu), std::pair("tanh", Activation::Tanh));
}

template <class T>
Var<T> activate(Tape<T>& tape, const Var<T>& x, Activation a) {
  switch (a) {
    case Activation::Relu:
      return ops::relu(tape, x);
    case Activation::GeluTanh:
      return ops::gelu_tanh(tape, x);
    case Activation::Silu:
      return ops::silu(tape, x);
    case Activation::Tanh:
      return ops::tanh(tape, x);
  }
  return x;
}

/// x [P, d] → [B, P, d], the same rows for every sequence of the batch (gradients sum over B).
template <class T>
Var<T> repeat_over_batch(Tape<T>& tape, const Var<T>& x, std::int64_t batch) {
  Var<T> one = ops::reshape(tape, x, Shape{1, x.value().dim(0), x.value().cols()});
  if (batch == 1) return one;
  return ops::concat(tape, std::vector<Var<T>>(static_cast<std::size_t>(batch), one), 0);
}

/// The token-embedding table among a model's base tensors ("transformer.wte.weight",
/// "model.embed_tokens.weight"); undefined when absent.
template <class T>
Var<T> find_token_embedding(const std::vector<NamedParameter<T>>& base) {
  for (const NamedParameter<T>& p : base)
    if (p.name == "transformer.wte.weight" || p.name == "model.embed_tokens.weight") return p.var;
  return Var<T>{};
}

/// Several fields read and written as one entry of a field table.
template <class... F>
struct FieldGroup {
  std::tuple<F...> fields;
  template <class C>
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    std::apply([&](const auto&... f) { (f.read(c, j, source), ...); }, fields);
  }
  template <class C>
  void write(const C& c, nlohmann::json& j, const ModelConfig& model) const {
    std::apply([&](const auto&... f) { (f.write(c, j, model), ...); }, fields);
  }
};
template <class... F>
FieldGroup<F...> field_group(F... fields) {
  return {std::tuple<F...>(std::move(fields)...)};
}

/// A list or string field whose empty value is written as null, or not written at all.
template <class C, class M>
struct EmptyAsNullField {
  Field<C, M, check::None> inner;
  bool omit_when_empty = false;
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    inner.read(c, j, source);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig& model) const {
    if (!(c.*inner.member).empty())
      inner.write(c, j, model);
    else if (!omit_when_empty)
      j[std::string(inner.key)] = nullptr;
  }
};
template <class C, class M>
EmptyAsNullField<C, M> empty_as_null(std::string_view key, M C::*member, bool omit = false) {
  return {{key, member, {}}, omit};
}

/// layers_to_transform: a layer index or a list of them (written null when empty: every layer).
template <class C>
struct LayerListField {
  std::vector<int> C::*member;
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    const nlohmann::json& v = json_field(j, "layers_to_transform");
    if (v.is_number_integer())
      c.*member = {config_detail::read_value<int>(v, source, "layers_to_transform")};
    else
      empty_as_null("layers_to_transform", member).read(c, j, source);
    for (int layer : c.*member)  // a negative index would select no block, silently
      if (layer < 0) config_detail::fail(source, "layers_to_transform", "layer indices >= 0", v);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig& model) const {
    empty_as_null("layers_to_transform", member).write(c, j, model);
  }
};

/// The fields every prompt-learning config shares: P, and the model dimensions the reference
/// records when it builds the adapter (0 = not recorded; checked against the model at attach,
/// written from the model).
struct PromptLearningConfig {
  std::int64_t num_virtual_tokens = 20;
  std::int64_t num_layers = 0, token_dim = 0, num_attention_heads = 0;

  static auto prompt_learning_fields() {
    using C = PromptLearningConfig;
    return field_group(
        field("num_virtual_tokens", &C::num_virtual_tokens, check::dimension),
        field("num_layers", &C::num_layers, check::dimension_or_zero),
        field("token_dim", &C::token_dim, check::dimension_or_zero),
        field("num_attention_heads", &C::num_attention_heads, check::dimension_or_zero),
        fixed("num_transformer_submodules", 1, "decoder-only models have 1"),
        fixed("modules_to_save", nullptr));
  }

  /// Throws when a recorded dimension disagrees with the model's; an actual value of −1 skips
  /// a field the method does not depend on.
  void check_recorded(std::string_view method, std::int64_t layers, std::int64_t dim,
                      std::int64_t heads) const {
    auto mismatch = [&](const char* field, std::int64_t recorded, std::int64_t actual) {
      if (actual >= 0 && recorded != 0 && recorded != actual)
        throw ConfigError(std::string(method) + ": adapter config has " + field + " " +
                          std::to_string(recorded) + ", the model needs " + std::to_string(actual));
    };
    mismatch("num_layers", num_layers, layers);
    mismatch("token_dim", token_dim, dim);
    mismatch("num_attention_heads", num_attention_heads, heads);
  }
  /// The config with `model`'s dimensions recorded, as written.
  template <class C>
  static C recording(C c, std::int64_t layers, std::int64_t dim, std::int64_t heads) {
    c.num_layers = layers;
    c.token_dim = dim;
    c.num_attention_heads = heads;
    return c;
  }
};

/// What every additive policy declares alike: its family, and that it loads the adapter files
/// of its config's peft_type.
template <class Config>
struct AdditiveMethod {
  using family = family::Additive;
  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, Config::peft_type); }
};

/// The state of a method with one config: holds it, and answers config().
template <class Config>
class ConfiguredState {
 public:
  explicit ConfiguredState(const Config& config) : config_(config) {}
  const Config& config() const { return config_; }

 protected:
  Config config_;
};

/// A prompt encoder (prefix tuning's re-parameterisation, P-tuning's MLP head): learned inputs
/// E through layers with σ between them. The reference saves only its output.
template <class T>
struct PromptEncoder {
  Var<T> embedding;  ///< E, the encoder's input
  std::vector<DenseLayer<T>> layers;
  Activation activation = Activation::Relu;
  std::string head;  ///< the reference's module name of the layers ("transform", "mlp_head")

  bool active() const { return !layers.empty(); }
  /// Every layer but the last, each followed by σ.
  Var<T> hidden(Tape<T>& tape) const {
    Var<T> h = embedding;
    for (std::size_t i = 0; i + 1 < layers.size(); ++i)
      h = activate(tape, layers[i].forward(tape, h), activation);
    return h;
  }
  Var<T> forward(Tape<T>& tape) const { return layers.back().forward(tape, hidden(tape)); }
  /// The output, or `plain` when not encoding.
  Tensor<T> output_or(const Var<T>& plain) const {
    if (!active()) return plain.value();
    Tape<T> tape(false);
    return forward(tape).value();
  }
  /// The reference's keys: the plain tensor, or while encoding the encoder's input and layers.
  std::vector<NamedParameter<T>> parameters_or(const Var<T>& plain) const {
    if (!active()) return {{"prompt_embeddings", plain}};
    std::vector<NamedParameter<T>> out{{"prompt_encoder.embedding.weight", embedding}};
    for (std::size_t i = 0; i < layers.size(); ++i)
      layers[i].name_parameters("prompt_encoder." + head + "." + std::to_string(2 * i), out);
    return out;
  }
  /// Replaces the encoder by its output in `plain` (trainable, as saved and loaded); true when
  /// there was one.
  bool fold_into(Var<T>& plain) {
    if (!active()) return false;
    plain = Var<T>(output_or(plain), true);
    *this = PromptEncoder{};
    return true;
  }
};

/// [P, d] prompts before the token embeddings [B, T, d]: [B, P + T, d].
template <class T>
Var<T> prepend_rows(Tape<T>& tape, const Var<T>& prompts, const Var<T>& embeddings) {
  return ops::concat(tape,
                     {repeat_over_batch(tape, prompts, embeddings.value().dim(0)), embeddings}, 1);
}

/// What a merge multiplies W by: the scale, or on unmerge its inverse (throws on a zero entry).
template <class T>
Eigen::Array<T, Eigen::Dynamic, 1> merge_factor(const Tensor<T>& scale, bool merge,
                                                std::string_view method,
                                                const std::string& module) {
  Eigen::Array<T, Eigen::Dynamic, 1> factor = scale.vector().array();
  if (merge) return factor;
  if ((factor == T(0)).any())
    throw ConfigError(std::string(method) + ": cannot unmerge " + module + ": a scale is zero");
  return factor.inverse();
}
/// W ← W ⊙ factor along W's columns (input scaling) or rows (output scaling), added as the
/// [out, in] delta nn::Linear::add_to_weight takes.
template <class T>
void rescale_weight(nn::Linear<T>& lin, const Eigen::Array<T, Eigen::Dynamic, 1>& factor,
                    bool columns) {
  const RowMatrix<T> w = lin.weight_out_in();
  if (columns)
    lin.add_to_weight((w.array().rowwise() * (factor - T(1)).transpose()).matrix());
  else
    lin.add_to_weight((w.array().colwise() * (factor - T(1))).matrix());
}

}  // namespace peft::detail
