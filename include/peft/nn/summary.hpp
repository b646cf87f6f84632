#pragma once
// The reference's print_trainable_parameters, as a library function:
//   "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
// from two counts (e.g. peft::count_parameters<P> from shapes) or from a live model.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"

namespace peft {

/// 1234567 → "1,234,567"; −1234 → "-1,234".
inline std::string with_thousands(std::int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

/// The reference's line for `trainable` of `all` parameters (percentage with four decimals;
/// 0.0000 when `all` is not positive).
inline std::string trainable_parameters_line(std::int64_t trainable, std::int64_t all) {
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f", all > 0 ? 100.0 * double(trainable) / double(all) : 0.0);
  return "trainable params: " + with_thousands(trainable) +
         " || all params: " + with_thousands(all) + " || trainable%: " + pct;
}

/// Element counts of a live model.
struct ParameterSummary {
  std::int64_t trainable = 0;          ///< elements the optimizer updates (trainable_parameters)
  std::int64_t all = 0;                ///< base + adapter_trainable + adapter_frozen
  std::int64_t base = 0;               ///< every base tensor (the tied head counted once)
  std::int64_t adapter_trainable = 0;  ///< adapter tensors that require a gradient
  std::int64_t adapter_frozen = 0;     ///< adapter tensors listed in parameters() but frozen

  std::string line() const { return trainable_parameters_line(trainable, all); }
};

/// Counts `model` as the reference's print_trainable_parameters does, and as `peft count` and
/// peft::count_parameters<P> do from shapes: all = every base tensor plus every tensor the
/// adapter lists in parameters(); trainable = every tensor of trainable_parameters() (a tensor
/// listed by both the base and the adapter once; full fine-tuning counts the base too).
/// A base tensor the adapter trains in place (LN tuning's norms, BitFit's biases) is in "all"
/// twice, as in the reference, whose LN tuning trains a copy beside the frozen norm.
///
/// What is counted is what the adapter lists: a frozen tensor it saves (VeRA's shared
/// projections when save_projection is on) counts in "all", where the reference keeps it as a
/// buffer and does not; a scalar that is not a tensor here (AdaLoRA's ranknum, a frozen
/// parameter in the reference) does not. peft::count_parameters<P> from shapes follows the
/// reference exactly for both.
template <class Model>
ParameterSummary parameter_summary(Model& model) {
  using T = typename Model::Scalar;
  ParameterSummary s;
  for (const NamedParameter<T>& p : model.base_parameters()) s.base += p.var.value().numel();
  if constexpr (requires { model.frozen_base_elements(); }) s.base += model.frozen_base_elements();
  for (const NamedParameter<T>& p : model.adapter().parameters())
    (p.var.requires_grad() ? s.adapter_trainable : s.adapter_frozen) += p.var.value().numel();
  for (const NamedParameter<T>& p : model.trainable_parameters())
    s.trainable += p.var.value().numel();
  s.all = s.base + s.adapter_trainable + s.adapter_frozen;
  return s;
}

/// parameter_summary(model).line(): the line print_trainable_parameters prints for `model`.
template <class Model>
std::string trainable_parameters_line(Model& model) {
  return parameter_summary(model).line();
}

}  // namespace peft
