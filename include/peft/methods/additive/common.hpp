#pragma once
// Pieces the additive methods share: initialisers matching torch's defaults, a small MLP of
// nn.Linear-style layers (the prompt encoders and the bottleneck adapters), repeating a tensor
// over the batch, and reading the prompt-learning fields of a reference adapter_config.json.
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/nn/config.hpp"

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

inline Activation activation_from_name(const std::string& name, const std::string& source) {
  if (name == "relu") return Activation::Relu;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu")
    return Activation::GeluTanh;
  if (name == "silu" || name == "swish") return Activation::Silu;
  if (name == "tanh") return Activation::Tanh;
  throw ConfigError(source + ": activation '" + name +
                    "' unsupported (relu, gelu_new, silu, tanh)");
}
inline std::string activation_name(Activation a) {
  switch (a) {
    case Activation::Relu:
      return "relu";
    case Activation::GeluTanh:
      return "gelu_new";
    case Activation::Silu:
      return "silu";
    case Activation::Tanh:
      return "tanh";
  }
  return "relu";
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

/// The model dimensions a prompt-learning adapter_config.json records (the reference fills them
/// from the model when it builds the adapter). 0 = not recorded; checked against the model.
struct PromptLearningDims {
  std::int64_t num_layers = 0, token_dim = 0, num_attention_heads = 0;

  static PromptLearningDims from_json(const nlohmann::json& j, const std::string& source) {
    PromptLearningDims d;
    d.num_layers = json_or<std::int64_t>(j, "num_layers", 0, source);
    d.token_dim = json_or<std::int64_t>(j, "token_dim", 0, source);
    d.num_attention_heads = json_or<std::int64_t>(j, "num_attention_heads", 0, source);
    const std::int64_t submodules =
        json_or<std::int64_t>(j, "num_transformer_submodules", 1, source);
    if (submodules != 1)
      throw ConfigError(source + ": num_transformer_submodules " + std::to_string(submodules) +
                        " unsupported (decoder-only models have 1)");
    return d;
  }

  /// Throws when a recorded dimension disagrees with the model's; an actual value of −1 skips
  /// a field the method does not depend on.
  void check(const std::string& method, std::int64_t layers, std::int64_t dim,
             std::int64_t heads) const {
    auto mismatch = [&](const char* field, std::int64_t recorded, std::int64_t actual) {
      if (actual >= 0 && recorded != 0 && recorded != actual)
        throw ConfigError(method + ": adapter config has " + field + " " +
                          std::to_string(recorded) + ", the model needs " + std::to_string(actual));
    };
    mismatch("num_layers", num_layers, layers);
    mismatch("token_dim", token_dim, dim);
    mismatch("num_attention_heads", num_attention_heads, heads);
  }
};

/// Writes the prompt-learning fields every reference prompt-learning config carries.
inline void prompt_learning_to_json(nlohmann::json& j, std::int64_t num_virtual_tokens,
                                    std::int64_t layers, std::int64_t token_dim,
                                    std::int64_t heads) {
  j["num_virtual_tokens"] = num_virtual_tokens;
  j["num_layers"] = layers;
  j["token_dim"] = token_dim;
  j["num_attention_heads"] = heads;
  j["num_transformer_submodules"] = 1;
  j["modules_to_save"] = nullptr;
}

}  // namespace peft::detail
