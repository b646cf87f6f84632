#pragma once
// Helpers the per-method test files share (test_reparameterized.cpp, test_orthogonal.cpp and the
// files of issue 20's second part): the largest entrywise difference of two tensors, a seeded
// perturbation of an adapter's trainable tensors (so that a method starting at the base model has
// a non-trivial update to check), the targets that exist in both tiny models, and the checks every
// method passes (`method_checks` below): the whole model's finite-difference gradients, merge →
// unmerge → unload, the start at the base model, save → load → the same logits with counts from
// shapes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <string>
#include <vector>

#include "scratch_dir.hpp"
#include "tiny_models.hpp"

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

/// The typed-case kit. A method case is a struct with `using Policy`, `static constexpr const
/// char* name`, `static constexpr int start` (0: the adapted model starts bit-exactly at the base
/// model, 1: to rounding, 2: not at the base, a random init) and `static Config config()`;
/// `MethodCase<Arch, M>` pairs it with a tiny model's architecture.
template <class ArchT, class MethodT>
struct MethodCase {
  using Arch = ArchT;
  using Method = MethodT;
  using Policy = typename MethodT::Policy;
};

template <class C, class T>
using ModelOf = peft::Decoder<typename C::Arch, typename C::Policy, T>;

template <class C, class T>
ModelOf<C, T> make_model(std::uint64_t seed = 11) {
  return ModelOf<C, T>(tiny_config<typename C::Arch>(), C::Method::config(), seed);
}

template <class C>
std::string case_name() {
  return std::string(C::Arch::model_type) + " " + C::Method::name;
}

namespace method_checks {

/// A model's analytic gradients (logits with respect to every trainable tensor) against central
/// differences, in double.
template <class Model>
void model_gradients_match_finite_differences(Model& model) {
  const peft::Batch batch = padded_batch();
  std::vector<peft::Var<double>> inputs;
  for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
  REQUIRE(!inputs.empty());
  peft::testing::GradCheckOptions options;
  options.rtol = 1e-5;
  options.atol = 1e-7;
  const auto result = peft::testing::check_gradients(
      [&](peft::Tape<double>& tape, std::vector<peft::Var<double>>&) {
        return model.forward(tape, batch, false).logits;
      },
      inputs, options);
  INFO(result.message);
  CHECK(result.ok);
}

/// The same for the case's tiny model with a perturbed adapter.
template <class C>
void gradients_match_finite_differences() {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 3);
  model_gradients_match_finite_differences(model);
}

/// merge gives the same logits; unmerge restores every weight and bias; unload leaves no
/// adapter tensor and the same logits.
template <class C>
void merge_unmerge_unload() {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 5);
  const peft::Batch batch = padded_batch();
  std::vector<peft::Tensor<double>> weights, biases;
  for (auto* lin : model.linear_modules()) {
    weights.push_back(lin->weight.value());
    biases.push_back(lin->bias ? lin->bias.value() : peft::Tensor<double>());
  }
  const peft::Tensor<double> unmerged = model.logits(batch);
  model.merge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-10);
  model.unmerge();
  auto modules = model.linear_modules();
  for (std::size_t i = 0; i < modules.size(); ++i) {
    CHECK(max_abs_diff(modules[i]->weight.value(), weights[i]) < 1e-12);
    if (modules[i]->bias) CHECK(max_abs_diff(modules[i]->bias.value(), biases[i]) < 1e-12);
  }
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-11);
  model.adapter().unload(modules);
  CHECK(model.adapter().parameters().empty());
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-10);
}

/// The freshly attached model against the base model built from the same seed, as the case's
/// `start` promises; a random init (start 2) must move the logits.
template <class C>
void starts_at_base() {
  INFO(case_name<C>());
  auto model = make_model<C, double>(21);
  peft::Decoder<typename C::Arch, peft::NoPeft, double> base(tiny_config<typename C::Arch>(), {},
                                                             21);
  const peft::Batch batch = padded_batch();
  const double diff = max_abs_diff(model.logits(batch), base.logits(batch));
  if constexpr (C::Method::start == 0)
    CHECK(diff == 0.0);
  else if constexpr (C::Method::start == 1)
    CHECK(diff < 1e-12);
  else
    CHECK(diff > 1e-6);
}

/// save → the saved config is the method's and reads back to itself → load into a model of
/// another seed → bit-identical logits; the count from shapes equals the attached trainable
/// tensors. Returns the count for the caller's further checks.
template <class C>
peft::ParameterCount save_load_and_count(const std::string& file) {
  INFO(case_name<C>());
  auto model = make_model<C, float>();
  perturb_adapter(model, 7);
  const peft::Batch batch = padded_batch();
  const auto dir = scratch_dir(file, case_name<C>());
  peft::io::save_adapter(dir, C::Method::config().to_json(model.config()),
                         model.adapter().parameters());
  const auto json = peft::io::load_json(dir / "adapter_config.json");
  CHECK(peft::method_accepts<typename C::Policy>(json));
  const auto config = C::Policy::Config::from_json(json, "saved config");
  CHECK(config.to_json(model.config()) == json);
  ModelOf<C, float> loaded(tiny_config<typename C::Arch>(), config, 11);
  peft::io::load_adapter_tensors(
      loaded.adapter().parameters(),
      peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors"));
  CHECK(model.logits(batch).values() == loaded.logits(batch).values());

  std::int64_t attached = 0;
  for (const auto& p : model.adapter().parameters())
    if (p.var.requires_grad()) attached += p.var.value().numel();
  const auto count = peft::count_parameters<typename C::Policy>(
      model.config(), peft::linear_shapes<typename C::Arch>(model.config()), C::Method::config());
  CHECK(count.trainable == attached);
  CHECK(count.trainable > 0);
  std::filesystem::remove_all(dir);
  return count;
}

}  // namespace method_checks

}  // namespace test_support
