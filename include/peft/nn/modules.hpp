#pragma once
// The decoder's building blocks: a linear layer that knows its module path, and the norms.
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"

namespace peft::nn {

/// A base model's linear projection, identified by its module path in the reference model
/// (e.g. "transformer.h.0.attn.c_attn", "model.layers.1.self_attn.q_proj"), which is what
/// `target_modules` rules match against. The weight stays in its checkpoint layout.
template <class T>
struct Linear {
  std::string name;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  ops::WeightLayout layout = ops::WeightLayout::OutIn;
  Var<T> weight;
  Var<T> bias;     ///< undefined when the module has no bias
  int site = -1;   ///< index among the decoder's linear modules; adapters are indexed by it
  int layer = -1;  ///< the block it belongs to, -1 outside the blocks (lm_head)

  Linear() = default;
  Linear(std::string module_name, std::int64_t in, std::int64_t out,
         ops::WeightLayout weight_layout, bool with_bias)
      : name(std::move(module_name)), in_features(in), out_features(out), layout(weight_layout) {
    weight =
        Var<T>(Tensor<T>(layout == ops::WeightLayout::OutIn ? Shape{out, in} : Shape{in, out}));
    if (with_bias) bias = Var<T>(Tensor<T>(Shape{out}));
  }

  Var<T> forward_base(Tape<T>& tape, const Var<T>& x) const {
    return ops::linear(tape, x, weight, bias, layout);
  }

  /// W += delta, for delta given as [out, in] whatever the storage layout (merging adapters).
  void add_to_weight(const RowMatrix<T>& delta_out_in) {
    if (delta_out_in.rows() != out_features || delta_out_in.cols() != in_features)
      throw ShapeError(name + ": weight delta is [" + std::to_string(delta_out_in.rows()) + ", " +
                       std::to_string(delta_out_in.cols()) + "], expected [" +
                       std::to_string(out_features) + ", " + std::to_string(in_features) + "]");
    if (layout == ops::WeightLayout::OutIn)
      weight.value().matrix() += delta_out_in;
    else
      weight.value().matrix() += delta_out_in.transpose();
  }

  /// The weight as [out, in], a copy (for methods whose math is defined on W [out, in]).
  RowMatrix<T> weight_out_in() const {
    if (layout == ops::WeightLayout::OutIn) return weight.value().matrix();
    return weight.value().matrix().transpose();
  }
};

/// LayerNorm with scale and shift (GPT-2).
template <class T>
struct LayerNorm {
  Var<T> weight, bias;
  T eps = T(1e-5);
  LayerNorm() = default;
  LayerNorm(std::int64_t d, double epsilon)
      : weight(Tensor<T>(Shape{d}, T(1))), bias(Tensor<T>(Shape{d})), eps(T(epsilon)) {}
  Var<T> forward(Tape<T>& tape, const Var<T>& x) const {
    return ops::layer_norm(tape, x, weight, bias, eps);
  }
  template <class Visitor>
  void visit_parameters(const std::string& prefix, Visitor&& visit) {
    visit(prefix + ".weight", weight);
    visit(prefix + ".bias", bias);
  }
};

/// RMSNorm with scale only (LLaMA).
template <class T>
struct RmsNorm {
  Var<T> weight;
  T eps = T(1e-6);
  RmsNorm() = default;
  RmsNorm(std::int64_t d, double epsilon) : weight(Tensor<T>(Shape{d}, T(1))), eps(T(epsilon)) {}
  Var<T> forward(Tape<T>& tape, const Var<T>& x) const {
    return ops::rms_norm(tape, x, weight, eps);
  }
  template <class Visitor>
  void visit_parameters(const std::string& prefix, Visitor&& visit) {
    visit(prefix + ".weight", weight);
  }
};

}  // namespace peft::nn
