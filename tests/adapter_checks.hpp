#pragma once
// Helpers the per-method test files share (test_reparameterized.cpp, test_orthogonal.cpp): the
// largest entrywise difference of two tensors, a seeded perturbation of an adapter's trainable
// tensors (so that a method starting at the base model has a non-trivial update to check), and
// the targets that exist in both tiny models.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <peft/peft.hpp>
#include <random>

namespace test_support {

template <class T>
double max_abs_diff(const peft::Tensor<T>& a, const peft::Tensor<T>& b) {
  REQUIRE(a.shape() == b.shape());
  double d = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    d = std::max(d, std::abs(double(a[i]) - double(b[i])));
  return d;
}

template <class Model>
void perturb_adapter(Model& model, std::uint64_t seed, double amplitude = 0.3) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-amplitude, amplitude);
  for (auto& p : model.adapter().parameters())
    if (p.var.requires_grad())
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i)
        p.var.value()[i] += static_cast<typename Model::Scalar>(u(rng));
}

/// Targets that exist in both tiny models: q_proj / v_proj / down_proj (LLaMA), c_attn / c_fc
/// (GPT-2).
inline peft::TargetRules both_model_targets() {
  peft::TargetRules t;
  t.target_modules.names = {"q_proj", "v_proj", "down_proj", "c_attn", "c_fc"};
  return t;
}

}  // namespace test_support
