#pragma once
// The decoder's building blocks: a linear layer that knows its module path, and the norms.
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/frozen_weight.hpp"
#include "peft/core/ops.hpp"
#include "peft/core/ops/frozen_linear.hpp"

namespace peft::nn {

/// A base model's linear projection, identified by its module path in the reference model
/// (e.g. "transformer.h.0.attn.c_attn", "model.layers.1.self_attn.q_proj"), which is what
/// `target_modules` rules match against.
///
/// Its weight is stored one of two ways (core/frozen_weight.hpp, BaseFormat):
///   - dense: `weight`, a Tensor<T> in the checkpoint's layout (`layout`); `frozen` is null;
///   - frozen: `frozen`, bf16 or NF4, always [out, in]; `weight` is undefined.
/// Methods read W through the format-independent view (weight_out_in(), forward_base()); a
/// method whose math needs the dense tensor itself asks for dense_weight(method), which names
/// the module and the format when the weight is not dense.
template <class T>
struct Linear {
  std::string name;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  ops::WeightLayout layout = ops::WeightLayout::OutIn;
  Var<T> weight;  ///< dense storage; undefined when `frozen` holds the weight
  Var<T> bias;    ///< undefined when the module has no bias
  std::shared_ptr<const FrozenWeight> frozen;  ///< bf16 / NF4 storage, [out, in]
  int site = -1;   ///< index among the decoder's linear modules; adapters are indexed by it
  int layer = -1;  ///< the block it belongs to, -1 outside the blocks (lm_head)

  Linear() = default;
  /// A module with a dense weight (zeros) in `weight_layout`, or, with `allocate_weight` false,
  /// no weight yet (one is stored with store_frozen or assigned to `weight`).
  Linear(std::string module_name, std::int64_t in, std::int64_t out,
         ops::WeightLayout weight_layout, bool with_bias, bool allocate_weight = true)
      : name(std::move(module_name)), in_features(in), out_features(out), layout(weight_layout) {
    if (allocate_weight)
      weight =
          Var<T>(Tensor<T>(layout == ops::WeightLayout::OutIn ? Shape{out, in} : Shape{in, out}));
    if (with_bias) bias = Var<T>(Tensor<T>(Shape{out}));
  }

  BaseFormat format() const { return frozen ? frozen->format() : BaseFormat::fp32; }
  bool dense() const { return frozen == nullptr; }

  /// The dense weight Var, for a method whose math needs it (`method` names it in the error).
  /// BaseFormatError (a ConfigError) when the weight is stored in bf16, fp16 or NF4.
  const Var<T>& dense_weight(std::string_view method) const {
    if (frozen)
      throw BaseFormatError(name + ": " + std::string(method) +
                            " needs a dense base weight, but this "
                            "model holds it in " +
                            std::string(base_format_name(frozen->format())) +
                            " (build or load the model with base format fp32)");
    return weight;
  }

  /// Replaces the weight by `w` (bf16 or NF4, [out, in]); the dense tensor is released.
  void store_frozen(std::shared_ptr<const FrozenWeight> w) {
    if (!w || w->rows() != out_features || w->cols() != in_features)
      throw ShapeError(name + ": frozen weight does not have the module's shape [" +
                       std::to_string(out_features) + ", " + std::to_string(in_features) + "]");
    frozen = std::move(w);
    weight = Var<T>{};
  }

  /// Bytes the weight holds in its storage format.
  std::size_t weight_bytes() const {
    if (frozen) return frozen->bytes();
    return weight ? static_cast<std::size_t>(weight.value().numel()) * sizeof(T) : 0;
  }

  Var<T> forward_base(Tape<T>& tape, const Var<T>& x) const {
    if (frozen) return ops::frozen_linear(tape, x, frozen, bias);
    return ops::linear(tape, x, weight, bias, layout);
  }

  /// W += delta, for delta given as [out, in] whatever the storage layout (merging adapters).
  /// ConfigError for a weight in bf16 or NF4: merging into it would requantize (lossy); merge
  /// into a model built or loaded in fp32 instead.
  void add_to_weight(const RowMatrix<T>& delta_out_in) {
    if (delta_out_in.rows() != out_features || delta_out_in.cols() != in_features)
      throw ShapeError(name + ": weight delta is [" + std::to_string(delta_out_in.rows()) + ", " +
                       std::to_string(delta_out_in.cols()) + "], expected [" +
                       std::to_string(out_features) + ", " + std::to_string(in_features) + "]");
    if (frozen)
      throw BaseFormatError(name + ": cannot merge into a base weight held in " +
                            std::string(base_format_name(frozen->format())) +
                            " (it would be requantized); load the base in fp32 to merge");
    if (layout == ops::WeightLayout::OutIn)
      weight.value().matrix() += delta_out_in;
    else
      weight.value().matrix() += delta_out_in.transpose();
  }

  /// The weight as [out, in], a copy (for methods whose math is defined on W [out, in]); a
  /// bf16 or NF4 weight dequantized.
  RowMatrix<T> weight_out_in() const {
    if (frozen) {
      RowMatrix<T> w(out_features, in_features);
      frozen->rows_as<T>(0, out_features, w.data());
      return w;
    }
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
