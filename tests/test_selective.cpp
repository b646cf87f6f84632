// The selective family: BitFit, LN tuning, unstructured masks (random, magnitude), FishMask,
// diff pruning, structured masks (rows, columns, heads, layers). For every method: a
// finite-difference gradient check in double; masked entries never change in training; the
// trained entries are the budget exactly (and count_parameters says so from shapes); optimizer
// state and file bytes grow with k; save → load → the same logits; merge → the same logits; a
// short training run well below the base model's loss. Also the sparse op on its own, both of
// its routes, and BitFit's clear refusal on a model without biases.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <peft/methods/selective/bitfit.hpp>
#include <peft/methods/selective/diff_pruning.hpp>
#include <peft/methods/selective/fishmask.hpp>
#include <peft/methods/selective/ln_tuning.hpp>
#include <peft/methods/selective/masks.hpp>
#include <peft/methods/selective/structured.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <set>
#include <string>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_selective {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::ModelConfig;
using peft::Tape;
using peft::Tensor;
using peft::Var;
using Gpt2 = peft::arch::Gpt2;
using Llama = peft::arch::Llama;

using test_support::padded_batch;
using test_support::tiny_config;
using test_support::tiny_gpt2;
using test_support::tiny_llama;

Batch other_batch() {
  Batch b;
  b.batch = 1;
  b.seq = 6;
  b.input_ids = {4, 4, 6, 10, 11, 2};
  return b;
}

/// A cycle of tokens that a random base model cannot continue.
Batch cycle_batch() {
  Batch batch;
  batch.batch = 2;
  batch.seq = 12;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 12; ++t) batch.input_ids.push_back((3 * t + 5 * b) % 7 + 1);
  return batch;
}

template <class T>
double max_abs_diff(const Tensor<T>& a, const Tensor<T>& b) {
  REQUIRE(a.shape() == b.shape());
  double d = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    d = std::max(d, std::abs(double(a[i]) - double(b[i])));
  return d;
}

template <class Model>
void perturb_trainable(Model& model, std::uint64_t seed, double amplitude = 0.3) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-amplitude, amplitude);
  for (auto& p : model.trainable_parameters())
    for (std::int64_t i = 0; i < p.var.value().numel(); ++i)
      p.var.value()[i] += static_cast<typename Model::Scalar>(u(rng));
}

std::filesystem::path scratch_dir(const std::string& name) {
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("peft_test_selective_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  return dir;
}

// ---- the cases: one method configuration each -------------------------------------------------

template <class A>
struct BitFitAll {
  using Arch = A;
  using Policy = peft::BitFit;
  static constexpr const char* name = "bitfit all";
  static peft::BitFitConfig config() { return {}; }
  template <class M>
  static void prepare(M&) {}
};
struct BitFitSubset {
  using Arch = Gpt2;
  using Policy = peft::BitFit;
  static constexpr const char* name = "bitfit query+intermediate";
  static peft::BitFitConfig config() {
    peft::BitFitConfig c;
    c.subset = peft::BitFitConfig::Subset::QueryAndIntermediate;
    return c;
  }
  template <class M>
  static void prepare(M&) {}
};
template <class A>
struct LnTuning {
  using Arch = A;
  using Policy = peft::LNTuning;
  static constexpr const char* name = "ln tuning";
  static peft::LnTuningConfig config() { return {}; }
  template <class M>
  static void prepare(M&) {}
};
template <class A, peft::UnstructuredMaskConfig::Selection S, int PerMille>
struct Mask {
  using Arch = A;
  using Policy = peft::UnstructuredMask;
  static constexpr const char* name =
      S == peft::UnstructuredMaskConfig::Selection::Random ? "random mask" : "magnitude mask";
  static peft::UnstructuredMaskConfig config() {
    peft::UnstructuredMaskConfig c;
    c.selection = S;
    c.budget.density = PerMille / 1000.0;
    c.seed = 3;
    return c;
  }
  template <class M>
  static void prepare(M&) {}
};
using RandomMask = peft::UnstructuredMaskConfig::Selection;
template <class A>
struct Fish {
  using Arch = A;
  using Policy = peft::FishMask;
  static constexpr const char* name = "fishmask";
  static peft::FishMaskConfig config() {
    peft::FishMaskConfig c;
    c.budget.density = 0.05;
    return c;
  }
  template <class M>
  static void prepare(M& model) {
    model.adapter().calibrate(model, std::vector<Batch>{padded_batch(), other_batch()});
  }
};
template <class A, bool Pruned>
struct DiffPrune {
  using Arch = A;
  using Policy = peft::DiffPruning;
  static constexpr const char* name = Pruned ? "diff pruning, pruned" : "diff pruning, L0 phase";
  static peft::DiffPruningConfig config() {
    peft::DiffPruningConfig c;
    c.budget.density = 0.1;
    return c;
  }
  template <class M>
  static void prepare(M& model) {
    if (Pruned) {
      perturb_trainable(model, 17, 0.5);  // a non-trivial δ to prune
      model.adapter().prune();
    } else {
      model.adapter().fix_noise(true);
    }
  }
};
template <class A, peft::StructuredMaskConfig::Unit U, peft::StructuredMaskConfig::Rule R>
struct Structured {
  using Arch = A;
  using Policy = peft::StructuredMask;
  static constexpr const char* name = "structured mask";
  static peft::StructuredMaskConfig config() {
    peft::StructuredMaskConfig c;
    c.unit = U;
    c.rule = R;
    c.count = 1;
    c.seed = 2;
    return c;
  }
  template <class M>
  static void prepare(M&) {}
};
using Unit = peft::StructuredMaskConfig::Unit;
using Rule = peft::StructuredMaskConfig::Rule;

template <class C, class T>
using ModelOf = Decoder<typename C::Arch, typename C::Policy, T>;

template <class C, class T>
ModelOf<C, T> make_model(std::uint64_t seed = 7, ModelConfig mc = tiny_config<typename C::Arch>()) {
  ModelOf<C, T> model(mc, C::config(), seed);
  C::prepare(model);
  return model;
}

template <class C>
std::string case_name() {
  return std::string(C::name) + (std::is_same_v<typename C::Arch, Gpt2> ? " (gpt2)" : " (llama)");
}

#define ALL_CASES                                                                                 \
  BitFitAll<Gpt2>, BitFitSubset, LnTuning<Gpt2>, LnTuning<Llama>,                                 \
      Mask<Llama, RandomMask::Random, 20>, Mask<Gpt2, RandomMask::Random, 200>,                   \
      Mask<Gpt2, RandomMask::Magnitude, 30>, Fish<Gpt2>, Fish<Llama>, DiffPrune<Llama, false>,    \
      DiffPrune<Gpt2, true>, Structured<Gpt2, Unit::Rows, Rule::Score>,                           \
      Structured<Llama, Unit::Columns, Rule::Random>, Structured<Gpt2, Unit::Heads, Rule::Score>, \
      Structured<Llama, Unit::Heads, Rule::First>, Structured<Llama, Unit::Layers, Rule::Last>

// Cases whose diff lives on the projections only (no tensor trained in place).
#define PROJECTION_CASES                                                                          \
  BitFitSubset, Mask<Llama, RandomMask::Random, 20>, Mask<Gpt2, RandomMask::Magnitude, 30>,       \
      Fish<Gpt2>, Fish<Llama>, DiffPrune<Gpt2, true>, Structured<Gpt2, Unit::Rows, Rule::Score>,  \
      Structured<Llama, Unit::Columns, Rule::Random>, Structured<Gpt2, Unit::Heads, Rule::Score>, \
      Structured<Llama, Unit::Layers, Rule::Last>

}  // namespace

// ---- the sparse op on its own ------------------------------------------------------------------

TEST_CASE("selective: delta_linear gradients, sparse and dense routes, lines, bias entries") {
  using peft::ops::LineAxis;
  for (const auto layout : {peft::ops::WeightLayout::OutIn, peft::ops::WeightLayout::InOut})
    for (int variant = 0; variant < 5; ++variant) {
      INFO("layout " << int(layout) << " variant " << variant);
      const std::int64_t in = 7, out = 9;
      Var<double> x(peft::testing::random_tensor({2, 3, in}, 1), true);
      const peft::Shape wshape =
          layout == peft::ops::WeightLayout::OutIn ? peft::Shape{out, in} : peft::Shape{in, out};
      Var<double> w(peft::testing::random_tensor(wshape, 2), false);
      Var<double> b(peft::testing::random_tensor({out}, 3), false);
      peft::ops::WeightDelta<double> d;
      auto pattern = std::make_shared<peft::ops::SparsePattern>();
      // variant 0: 2 entries (sparse route); 1: 20 entries (dense route, 20 / 63 > 2%)
      const int k = variant == 0 ? 2 : 20;
      if (variant <= 1) {
        for (int j = 0; j < k; ++j) {
          pattern->out.push_back((j * 5) % out);
          pattern->in.push_back((j * 3 + j / out) % in);
        }
        d.entries = pattern;
        d.entry_values = Var<double>(peft::testing::random_tensor({k}, 4), true);
      } else if (variant == 2) {
        d.lines = std::make_shared<peft::ops::LineSelection>(
            peft::ops::LineSelection{LineAxis::Rows, {1, 4, 8}});
        d.line_values = Var<double>(peft::testing::random_tensor({3, in}, 5), true);
      } else if (variant == 3) {
        d.lines = std::make_shared<peft::ops::LineSelection>(
            peft::ops::LineSelection{LineAxis::Columns, {0, 6}});
        d.line_values = Var<double>(peft::testing::random_tensor({out, 2}, 6), true);
      } else {
        d.bias_entries =
            std::make_shared<const std::vector<std::int32_t>>(std::vector<std::int32_t>{2, 3, 7});
        d.bias_values = Var<double>(peft::testing::random_tensor({3}, 7), true);
      }
      std::vector<Var<double>> inputs{x};
      for (const Var<double>& v : {d.entry_values, d.line_values, d.bias_values})
        if (v.defined()) inputs.push_back(v);
      const auto result = peft::testing::check_gradients(
          [&](Tape<double>& tape, std::vector<Var<double>>&) {
            return peft::ops::delta_linear(tape, x, w, b, layout, d);
          },
          inputs);
      INFO(result.message);
      CHECK(result.ok);
      // The output equals the dense reference x (W + Δ)ᵀ + b + δb.
      peft::RowMatrix<double> dense = layout == peft::ops::WeightLayout::OutIn
                                          ? peft::RowMatrix<double>(w.value().matrix())
                                          : peft::RowMatrix<double>(w.value().matrix().transpose());
      Eigen::VectorXd bias = b.value().vector();
      if (d.entries)
        for (int j = 0; j < k; ++j)
          dense(pattern->out[j], pattern->in[j]) += d.entry_values.value()[j];
      if (d.lines) {
        const auto& L = d.lines->lines;
        for (std::size_t l = 0; l < L.size(); ++l)
          for (std::int64_t i = 0; i < (d.lines->axis == LineAxis::Rows ? in : out); ++i) {
            if (d.lines->axis == LineAxis::Rows)
              dense(L[l], i) += d.line_values.value()[std::int64_t(l) * in + i];
            else
              dense(i, L[l]) += d.line_values.value()[i * std::int64_t(L.size()) + std::int64_t(l)];
          }
      }
      if (d.bias_entries)
        for (std::size_t j = 0; j < d.bias_entries->size(); ++j)
          bias[(*d.bias_entries)[j]] += d.bias_values.value()[std::int64_t(j)];
      Tape<double> off(false);
      const Tensor<double> y = peft::ops::delta_linear(off, x, w, b, layout, d).value();
      const peft::RowMatrix<double> expected =
          (x.value().matrix() * dense.transpose()).rowwise() + bias.transpose();
      CHECK((y.matrix() - expected).cwiseAbs().maxCoeff() < 1e-12);
    }
}

// ---- every method -------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("selective: analytic gradients match finite differences", C, ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_trainable(model, 3);
  const Batch batch = padded_batch();
  std::vector<Var<double>> inputs;
  for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
  REQUIRE(!inputs.empty());
  peft::testing::GradCheckOptions options;
  options.rtol = 1e-5;
  options.atol = 1e-7;
  const auto result = peft::testing::check_gradients(
      [&](Tape<double>& tape, std::vector<Var<double>>&) {
        return model.forward(tape, batch, false).logits;
      },
      inputs, options);
  INFO(result.message);
  CHECK(result.ok);
}

TEST_CASE_TEMPLATE("selective: the trained entries are the budget, exactly, from shapes too", C,
                   ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  const auto counted = peft::count_parameters<typename C::Policy>(
      model.config(), peft::linear_shapes<typename C::Arch>(model.config()), C::config());
  std::int64_t built = 0;
  for (auto& p : model.trainable_parameters()) built += p.var.value().numel();
  if constexpr (std::is_same_v<typename C::Policy, peft::DiffPruning>) {
    if (!model.adapter().pruned()) {
      model.adapter().prune();
      built = 0;
      for (auto& p : model.trainable_parameters()) built += p.var.value().numel();
    }
  }
  CHECK(built == counted.trainable);
  CHECK(model.adapter().trained_entries() == counted.trainable);
}

TEST_CASE_TEMPLATE("selective: masked entries never change in training", C, PROJECTION_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, float>(9);
  Decoder<typename C::Arch, peft::NoPeft, float> base(tiny_config<typename C::Arch>(), {}, 9);
  peft::AdamWOptions options;
  options.lr = 1e-2;
  peft::AdamW<float> optimizer(model.trainable_parameters(), options);
  for (int step = 0; step < 5; ++step) {
    Tape<float> tape;
    auto out = model.forward(tape, padded_batch());
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
  }
  // The frozen base never moves; the merged model differs from it at trained entries only.
  auto bp = base.base_parameters(), mp = model.base_parameters();
  REQUIRE(bp.size() == mp.size());
  for (std::size_t i = 0; i < bp.size(); ++i)
    CHECK(bp[i].var.value().values() == mp[i].var.value().values());
  model.merge();
  std::int64_t changed = 0;
  mp = model.base_parameters();
  for (std::size_t i = 0; i < bp.size(); ++i)
    for (std::int64_t j = 0; j < bp[i].var.value().numel(); ++j)
      changed += bp[i].var.value()[j] != mp[i].var.value()[j];
  const std::int64_t k = model.adapter().trained_entries();
  MESSAGE(case_name<C>() << ": " << changed << " base entries changed by merging, budget " << k);
  CHECK(changed <= k);
  CHECK(changed >= k * 9 / 10);  // nearly every trained entry got a gradient and moved
  model.unmerge();
}

TEST_CASE_TEMPLATE("selective: save, load, same logits; merge, same logits", C, ALL_CASES) {
  INFO(case_name<C>());
  using Policy = typename C::Policy;
  auto model = make_model<C, double>();
  if constexpr (std::is_same_v<Policy, peft::DiffPruning>)
    if (!model.adapter().pruned()) model.adapter().prune();
  perturb_trainable(model, 5);
  const Batch batch = padded_batch();
  const Tensor<double> before = model.logits(batch);

  const auto dir = scratch_dir(case_name<C>());
  peft::save_selective_adapter(dir, model);
  const nlohmann::json saved = peft::io::load_json(dir / "adapter_config.json");
  bool loaded_as_policy = false;
  CHECK(peft::visit_policy_for(saved,
                               [&]<class P>() { loaded_as_policy = std::is_same_v<P, Policy>; }));
  CHECK(loaded_as_policy);
  auto config = Policy::Config::from_json(saved, (dir / "adapter_config.json").string());
  ModelOf<C, double> reloaded(tiny_config<typename C::Arch>(), config, 7);
  peft::load_selective_adapter(dir, reloaded);
  CHECK(max_abs_diff(reloaded.logits(batch), before) < 1e-5);  // the file holds float32
  CHECK(reloaded.adapter().trained_entries() == model.adapter().trained_entries());
  std::filesystem::remove_all(dir);

  if constexpr (peft::Mergeable<typename ModelOf<C, double>::Adapter, double>) {
    model.merge();
    CHECK(max_abs_diff(model.logits(batch), before) < 1e-12);
    model.unmerge();
    CHECK(max_abs_diff(model.logits(batch), before) < 1e-12);
  }
}

TEST_CASE_TEMPLATE("selective: each method trains well below the base model's loss", C,
                   BitFitAll<Gpt2>, LnTuning<Gpt2>, LnTuning<Llama>,
                   Mask<Llama, RandomMask::Random, 50>, Mask<Gpt2, RandomMask::Magnitude, 50>,
                   Fish<Gpt2>, Fish<Llama>, DiffPrune<Gpt2, false>,
                   Structured<Gpt2, Unit::Rows, Rule::Score>,
                   Structured<Llama, Unit::Heads, Rule::First>,
                   Structured<Llama, Unit::Layers, Rule::Last>) {
  // Threshold: after 60 AdamW steps (lr 3e-2) the loss is at most 40% of the base model's.
  INFO(case_name<C>());
  ModelConfig config = tiny_config<typename C::Arch>();
  config.hidden_size = 16;
  config.num_heads = 4;
  config.num_kv_heads = std::is_same_v<typename C::Arch, Gpt2> ? 4 : 2;
  config.intermediate_size = 32;
  ModelOf<C, float> model(config, C::config(), 5);
  // A head that can express the task: the random embeddings (std 0.02) give every logit nearly
  // the same value whatever the hidden state, which no method that leaves them frozen can fix.
  for (auto& p : model.base_parameters())
    if (p.name.find("wte") != std::string::npos ||
        p.name.find("embed_tokens") != std::string::npos ||
        p.name.find("lm_head") != std::string::npos)
      p.var.value().vector() *= 25.0f;
  model.base_weights_changed();
  const Batch batch = cycle_batch();
  if constexpr (std::is_same_v<typename C::Policy, peft::FishMask>)
    model.adapter().calibrate(model, std::vector<Batch>{batch});
  peft::AdamWOptions options;
  options.lr = 3e-2;
  auto optimizer = std::make_unique<peft::AdamW<float>>(model.trainable_parameters(), options);
  double base_loss = 0, loss = 0;
  for (int step = 0; step <= 60; ++step) {
    if constexpr (std::is_same_v<typename C::Policy, peft::DiffPruning>) {
      if (step == 40) {  // the L0 phase, then prune to the budget and go on with k values
        model.adapter().prune();
        optimizer = std::make_unique<peft::AdamW<float>>(model.trainable_parameters(), options);
      }
    }
    Tape<float> tape(step < 60);
    auto out = model.forward(tape, batch);
    loss = out.loss.value()[0];
    if (step == 0) base_loss = loss;
    if (step == 60) break;
    optimizer->zero_grad();
    tape.backward(out.loss);
    optimizer->step();
  }
  MESSAGE(case_name<C>() << ": loss " << base_loss << " -> " << loss << " training "
                         << model.adapter().trained_entries() << " entries");
  CHECK(loss < 0.4 * base_loss);
}

// ---- memory and file size follow k ------------------------------------------------------------

TEST_CASE("selective: optimizer state and file bytes are proportional to the budget") {
  ModelConfig mc = tiny_gpt2();
  mc.hidden_size = 32;
  mc.num_heads = 4;
  mc.num_kv_heads = 4;
  mc.head_dim = 8;
  mc.intermediate_size = 64;
  std::vector<std::size_t> state, file;
  const std::vector<std::int64_t> budgets{200, 800};
  for (std::int64_t k : budgets) {
    peft::UnstructuredMaskConfig c;
    c.budget.count = k;
    Decoder<Gpt2, peft::UnstructuredMask, float> model(mc, c, 1);
    peft::AdamW<float> optimizer(model.trainable_parameters(), {});
    state.push_back(optimizer.state_bytes());
    const auto dir = scratch_dir("budget" + std::to_string(k));
    peft::save_selective_adapter(dir, model);
    file.push_back(std::filesystem::file_size(dir / "adapter_model.safetensors"));
    std::filesystem::remove_all(dir);
    MESSAGE("k = " << k << ": optimizer state " << state.back() << " B, file " << file.back()
                   << " B");
  }
  // Two float moments per trained entry, nothing else.
  CHECK(state[0] == 2 * sizeof(float) * 200);
  CHECK(state[1] == 2 * sizeof(float) * 800);
  // 12 bytes per entry (I64 index + F32 value); the header adds the same few hundred bytes.
  const std::size_t per_entry = (file[1] - file[0]) / 600;
  CHECK(per_entry == 12);
  CHECK(file[0] < 12 * 200 + 2048);
}

// ---- method specifics ---------------------------------------------------------------------------

TEST_CASE("selective: BitFit on a model without biases is a clear error") {
  ModelConfig mc = tiny_llama();
  CHECK_THROWS_WITH_AS((Decoder<Llama, peft::BitFit, double>(mc, {}, 1)),
                       doctest::Contains("no bias terms"), peft::ConfigError);
  CHECK_THROWS_AS(peft::count_parameters<peft::BitFit>(mc, peft::linear_shapes<Llama>(mc), {}),
                  peft::ConfigError);
  mc.attention_bias = true;  // a LLaMA with attention biases has something to train
  Decoder<Llama, peft::BitFit, double> with_bias(mc, {}, 1);
  CHECK(with_bias.adapter().trained_entries() == 2 * (8 + 4 + 4 + 8));
}

TEST_CASE("selective: BitFit's subset trains GPT-2's query bias part and c_fc") {
  Decoder<Gpt2, peft::BitFit, double> model(tiny_gpt2(), BitFitSubset::config(), 1);
  std::set<std::string> names;
  for (auto& p : model.trainable_parameters()) {
    names.insert(p.name);
    if (p.name.find("c_attn") != std::string::npos) CHECK(p.var.value().numel() == 8);  // d, not 3d
  }
  CHECK(names ==
        std::set<std::string>{"base_model.model.transformer.h.0.attn.c_attn.bias_delta.values",
                              "base_model.model.transformer.h.0.mlp.c_fc.bias_delta.values",
                              "base_model.model.transformer.h.1.attn.c_attn.bias_delta.values",
                              "base_model.model.transformer.h.1.mlp.c_fc.bias_delta.values"});
}

TEST_CASE("selective: FishMask keeps the entries of largest Fisher information") {
  auto model = make_model<Fish<Gpt2>, double>();
  const std::vector<double> fisher =
      model.adapter().calibrate(model, std::vector<Batch>{padded_batch(), other_batch()});
  // The weights are frozen again, without gradient buffers.
  for (auto& p : model.base_parameters()) CHECK(!p.var.requires_grad());
  // Every kept entry's F is at least every dropped entry's.
  std::vector<bool> kept(fisher.size(), false);
  std::int64_t offset = 0;
  for (auto* lin : model.linear_modules()) {
    const auto* m = model.adapter().diffs().find(lin->site);
    if (m)
      for (std::int64_t j = 0; j < m->delta.entries->size(); ++j)
        kept[std::size_t(offset +
                         std::int64_t(m->delta.entries->out[std::size_t(j)]) * lin->in_features +
                         m->delta.entries->in[std::size_t(j)])] = true;
    offset += lin->in_features * lin->out_features;
  }
  double min_kept = 1e300, max_dropped = 0;
  for (std::size_t i = 0; i < fisher.size(); ++i)
    (kept[i] ? min_kept : max_dropped) =
        kept[i] ? std::min(min_kept, fisher[i]) : std::max(max_dropped, fisher[i]);
  CHECK(min_kept >= max_dropped);
  CHECK(min_kept > 0);
}

TEST_CASE("selective: diff pruning's L0 penalty pulls the open gates toward the target density") {
  peft::DiffPruningConfig c;
  c.budget.density = 0.1;
  c.l0_lambda = 50;
  Decoder<Gpt2, peft::DiffPruning, float> model(tiny_gpt2(), c, 3);
  const double start = model.adapter().expected_density();
  peft::AdamWOptions options;
  options.lr = 1e-1;
  peft::AdamW<float> optimizer(model.trainable_parameters(), options);
  for (int step = 0; step < 80; ++step) {
    Tape<float> tape;
    auto out = model.forward(tape, padded_batch());
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
  }
  const double end = model.adapter().expected_density();
  MESSAGE("expected density " << start << " -> " << end << " (target 0.1)");
  CHECK(start > 0.8);
  CHECK(end < 0.3);
  model.adapter().prune();
  CHECK(model.adapter().trained_entries() ==
        peft::count_parameters<peft::DiffPruning>(model.config(),
                                                  peft::linear_shapes<Gpt2>(model.config()), c)
            .trainable);
}

TEST_CASE("selective: structured masks pick rows, heads and the last layers") {
  {  // last k layers: every projection of layer 1, none of layer 0
    auto model = make_model<Structured<Llama, Unit::Layers, Rule::Last>, double>();
    for (auto* lin : model.linear_modules()) {
      const auto* m = model.adapter().diffs().find(lin->site);
      CHECK((m != nullptr) == (lin->layer == 1));
      if (m) CHECK(m->delta.line_values.value().numel() == lin->in_features * lin->out_features);
    }
  }
  {  // GQA heads (2 query heads share 1 kv head): the one group is q's 8 rows, k's and v's 4
    auto model = make_model<Structured<Llama, Unit::Heads, Rule::First>, double>();
    for (auto* lin : model.linear_modules()) {
      const auto* m = model.adapter().diffs().find(lin->site);
      const std::string& n = lin->name;
      if (n.find("self_attn") == std::string::npos) {
        CHECK(m == nullptr);
        continue;
      }
      REQUIRE(m != nullptr);
      const std::size_t lines = m->delta.lines->lines.size();
      if (n.find("q_proj") != std::string::npos || n.find("o_proj") != std::string::npos)
        CHECK(lines == 8);
      else
        CHECK(lines == 4);
      CHECK((m->delta.lines->axis == peft::ops::LineAxis::Columns) ==
            (n.find("o_proj") != std::string::npos));
    }
  }
  {  // rows by score: the row of largest norm in each module
    auto model = make_model<Structured<Gpt2, Unit::Rows, Rule::Score>, double>();
    for (auto* lin : model.linear_modules()) {
      const auto* m = model.adapter().diffs().find(lin->site);
      REQUIRE(m != nullptr);
      const std::int32_t chosen = m->delta.lines->lines.at(0);
      const peft::RowMatrix<double> w = lin->weight_out_in();
      Eigen::Index best;
      w.rowwise().squaredNorm().maxCoeff(&best);
      CHECK(chosen == best);
    }
  }
}

TEST_CASE("selective: adapter configs round-trip and load as their policy") {
  const ModelConfig mc = tiny_gpt2();
  auto round = [&](const auto& config) {
    using Config = std::decay_t<decltype(config)>;
    const nlohmann::json j = config.to_json(mc);
    return std::make_pair(j, Config::from_json(j, "test").to_json(mc));
  };
  CHECK(round(Structured<Gpt2, Unit::Heads, Rule::Score>::config()).first ==
        round(Structured<Gpt2, Unit::Heads, Rule::Score>::config()).second);
  CHECK(round(DiffPrune<Gpt2, true>::config()).first ==
        round(DiffPrune<Gpt2, true>::config()).second);
  CHECK_THROWS_AS(peft::UnstructuredMaskConfig::from_json(
                      {{"peft_type", "SPARSE_MASK"}, {"selection", "fisher"}}, "x"),
                  peft::ConfigError);
  CHECK_THROWS_WITH_AS(peft::StructuredMaskConfig::from_json(
                           {{"peft_type", "STRUCTURED_MASK"}, {"unit", "blocks"}}, "x"),
                       doctest::Contains("field 'unit'"), peft::ConfigError);
  peft::UnstructuredMaskConfig too_many;
  too_many.budget.count = 1 << 20;
  CHECK_THROWS_WITH_AS((Decoder<Gpt2, peft::UnstructuredMask, double>(mc, too_many, 1)),
                       doctest::Contains("exceeds"), peft::ConfigError);
}

#undef ALL_CASES
#undef PROJECTION_CASES
}  // namespace test_selective
