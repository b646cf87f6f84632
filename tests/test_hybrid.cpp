// The hybrid family: Compose<P...>, UniPELT (gated LoRA + prefix + serial adapter), the MAM
// adapter, and the design-space search. Gradient checks in double; a composite whose other
// components are zeroed or gated off gives exactly the single component's logits; save → load →
// same logits (and each component folder loads on its own);
// counts from shapes equal the built tensors; two components contribute to one module in order;
// a gate at 1 is the method, at 0 the base; UniPELT and MAM train well below the base loss;
// the search stays within its budget and repeats under a seed. The compile-time composition
// rules are tested by tests/compile_fail/.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <peft/experiment/search.hpp>
#include <peft/methods/hybrid/compose.hpp>
#include <peft/methods/hybrid/mam_adapter.hpp>
#include <peft/methods/hybrid/unipelt.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <string>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_hybrid {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::ModelConfig;
using peft::Tape;
using peft::Tensor;
using peft::Var;

using test_support::padded_batch;
using test_support::tiny_config;
using test_support::tiny_gpt2;
using test_support::tiny_llama;

double max_abs_diff(const Tensor<double>& a, const Tensor<double>& b) {
  REQUIRE(a.shape() == b.shape());
  return (a.vector() - b.vector()).cwiseAbs().maxCoeff();
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

std::filesystem::path scratch_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("peft_test_hybrid_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  return dir;
}

/// LoRA on the attention projections, IA3 on the MLP output projection.
template <class Arch>
peft::LoraConfig attention_lora() {
  peft::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  if constexpr (std::is_same_v<Arch, peft::arch::Gpt2>)
    c.targets.target_modules.names = {"c_attn"};
  else
    c.targets.target_modules.names = {"q_proj", "v_proj"};
  return c;
}
template <class Arch>
peft::Ia3Config mlp_ia3() {
  peft::Ia3Config c;
  const std::string down = std::is_same_v<Arch, peft::arch::Gpt2> ? "mlp.c_proj" : "down_proj";
  c.targets.target_modules.names = {down};
  c.feedforward_modules.names = {down};
  return c;
}
peft::PrefixTuningConfig small_prefix() {
  peft::PrefixTuningConfig c;
  c.num_virtual_tokens = 3;
  return c;
}
template <class Adapter>
typename Adapter::Config small_adapter() {
  typename Adapter::Config c;
  c.bottleneck_size = 3;
  return c;
}

using Mixed = peft::Compose<peft::LoRA, peft::IA3, peft::SerialAdapter>;
using MixedWithPrefix =
    peft::Compose<peft::LoRA, peft::IA3, peft::PrefixTuning, peft::SerialAdapter>;

template <class Arch, class Policy>
typename Policy::Config hybrid_config() {
  const ModelConfig m = tiny_config<Arch>();
  if constexpr (std::is_same_v<Policy, Mixed>)
    return Mixed::Config(attention_lora<Arch>(), mlp_ia3<Arch>(),
                         small_adapter<peft::SerialAdapter>());
  else if constexpr (std::is_same_v<Policy, MixedWithPrefix>)
    return MixedWithPrefix::Config(attention_lora<Arch>(), mlp_ia3<Arch>(), small_prefix(),
                                   small_adapter<peft::SerialAdapter>());
  else if constexpr (std::is_same_v<Policy, peft::UniPELT>)
    return peft::unipelt_config(
        m, {.lora_r = 2, .lora_alpha = 2, .prefix_tokens = 3, .adapter_width = 3});
  else
    return peft::mam_config({.prefix_tokens = 3, .adapter_width = 3, .scaling = 4.0});
}

template <class ArchT, class PolicyT>
struct Case {
  using Arch = ArchT;
  using Policy = PolicyT;
};

#define HYBRID_CASES                                                                 \
  Case<peft::arch::Gpt2, Mixed>, Case<peft::arch::Llama, MixedWithPrefix>,           \
      Case<peft::arch::Gpt2, peft::UniPELT>, Case<peft::arch::Llama, peft::UniPELT>, \
      Case<peft::arch::Gpt2, peft::MAMAdapter>, Case<peft::arch::Llama, peft::MAMAdapter>

template <class C, class T>
Decoder<typename C::Arch, typename C::Policy, T> make_model(std::uint64_t seed = 3) {
  return Decoder<typename C::Arch, typename C::Policy, T>(
      tiny_config<typename C::Arch>(), hybrid_config<typename C::Arch, typename C::Policy>(), seed);
}

}  // namespace

TEST_CASE_TEMPLATE("hybrid: gradient check in double", C, HYBRID_CASES) {
  auto model = make_model<C, double>();
  perturb_adapter(model, 11);
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

TEST_CASE("hybrid: gradient check with activation checkpointing (UniPELT's prefix gate)") {
  using C = Case<peft::arch::Llama, peft::UniPELT>;
  auto model = make_model<C, double>();
  perturb_adapter(model, 12);
  model.set_activation_checkpointing(true);
  const Batch batch = padded_batch();
  std::vector<Var<double>> inputs;
  for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
  const auto result = peft::testing::check_gradients(
      [&](Tape<double>& tape, std::vector<Var<double>>&) {
        return model.forward(tape, batch, true).loss;
      },
      inputs, {1e-6, 1e-5, 1e-7});
  INFO(result.message);
  CHECK(result.ok);
}

TEST_CASE_TEMPLATE("hybrid: zeroed companions give exactly LoRA's logits", Arch, peft::arch::Gpt2,
                   peft::arch::Llama) {
  // IA3 scales start at 1 and the adapter's up-projection at 0: both are exact identities.
  Decoder<Arch, Mixed, double> composite(tiny_config<Arch>(), hybrid_config<Arch, Mixed>(), 4);
  Decoder<Arch, peft::LoRA, double> single(tiny_config<Arch>(), attention_lora<Arch>(), 4);
  auto& lora = composite.adapter().template component<0>();
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(-0.5, 0.5);
  auto single_params = single.adapter().parameters();
  auto lora_params = lora.parameters();
  REQUIRE(single_params.size() == lora_params.size());
  for (std::size_t i = 0; i < lora_params.size(); ++i) {
    CHECK(lora_params[i].name == single_params[i].name);
    for (std::int64_t k = 0; k < lora_params[i].var.value().numel(); ++k)
      lora_params[i].var.value()[k] = single_params[i].var.value()[k] = u(rng);
  }
  // The same seed gives the same base weights (the adapters draw after the base).
  const Batch batch = padded_batch();
  CHECK(max_abs_diff(composite.logits(batch), single.logits(batch)) == 0.0);
}

TEST_CASE("hybrid: MAM with a zeroed adapter gives exactly prefix tuning's logits") {
  using Arch = peft::arch::Llama;
  Decoder<Arch, peft::MAMAdapter, double> mam(tiny_config<Arch>(),
                                              hybrid_config<Arch, peft::MAMAdapter>(), 4);
  Decoder<Arch, peft::PrefixTuning, double> prefix(tiny_config<Arch>(), small_prefix(), 4);
  auto mam_prefix = mam.adapter().component<0>().parameters();
  auto single = prefix.adapter().parameters();
  REQUIRE(mam_prefix.size() == 1);
  single[0].var.value() = mam_prefix[0].var.value();
  const Batch batch = padded_batch();
  CHECK(max_abs_diff(mam.logits(batch), prefix.logits(batch)) == 0.0);
  // The adapter moves the output once trained.
  perturb_adapter(mam, 6);
  CHECK(max_abs_diff(mam.logits(batch), prefix.logits(batch)) > 1e-6);
}

TEST_CASE_TEMPLATE("hybrid: UniPELT gated off but for the prefix gives prefix tuning's logits",
                   Arch, peft::arch::Gpt2, peft::arch::Llama) {
  Decoder<Arch, peft::UniPELT, double> uni(tiny_config<Arch>(),
                                           hybrid_config<Arch, peft::UniPELT>(), 4);
  perturb_adapter(uni, 8);  // LoRA, adapter and gates all non-trivial
  uni.adapter().template component<0>().set_gates(0.0);
  uni.adapter().template component<1>().set_gates(1.0);
  uni.adapter().template component<2>().set_gates(0.0);
  Decoder<Arch, peft::PrefixTuning, double> prefix(tiny_config<Arch>(), small_prefix(), 4);
  prefix.adapter().parameters()[0].var.value() =
      uni.adapter().template component<1>().inner().parameters()[0].var.value();
  const Batch batch = padded_batch();
  CHECK(max_abs_diff(uni.logits(batch), prefix.logits(batch)) == 0.0);
  // Opening the LoRA gate changes the output: the gate is live.
  uni.adapter().template component<0>().set_gates(0.5);
  CHECK(max_abs_diff(uni.logits(batch), prefix.logits(batch)) > 1e-6);
}

TEST_CASE_TEMPLATE("hybrid: save, load, same logits; component folders load on their own", C,
                   HYBRID_CASES) {
  auto model = make_model<C, double>();
  perturb_adapter(model, 9);
  const Batch batch = padded_batch();
  const Tensor<double> before = model.logits(batch);
  static int saved_cases = 0;
  const auto dir = scratch_dir("save_" + std::to_string(saved_cases++));
  peft::save_composite(dir, model);
  const nlohmann::json manifest = peft::io::load_json(dir / "adapter_config.json");
  CHECK(manifest["peft_type"] == "COMPOSE");
  CHECK(C::Policy::accepts(manifest));
  const auto config = C::Policy::Config::from_json(manifest, "manifest");
  auto loaded = Decoder<typename C::Arch, typename C::Policy, double>(
      tiny_config<typename C::Arch>(), config, 77);  // other random adapter values
  // The same base weights (the seed decides them), then the composite's tensors.
  auto from = model.base_parameters();
  auto to = loaded.base_parameters();
  for (std::size_t i = 0; i < from.size(); ++i) to[i].var.value() = from[i].var.value();
  CHECK(max_abs_diff(loaded.logits(batch), before) > 1e-9);
  peft::load_composite(dir, loaded);
  CHECK(max_abs_diff(loaded.logits(batch), before) < 1e-6);  // saved as F32

  // The first component's folder is a reference-layout adapter of its own policy.
  model.adapter().for_each_indexed([&]<class Q>(auto& state, std::size_t i) {
    if (i != 0) return;
    const auto folder = dir / peft::detail::component_folder<Q>(i);
    const nlohmann::json j = peft::io::load_json(folder / "adapter_config.json");
    CHECK(Q::accepts(j));
    Decoder<typename C::Arch, Q, double> alone(tiny_config<typename C::Arch>(),
                                               Q::Config::from_json(j, folder.string()), 3);
    peft::io::load_adapter_tensors(
        alone.adapter().parameters(),
        peft::io::SafetensorsFile::open(folder / "adapter_model.safetensors"));
    auto mine = state.parameters();
    auto theirs = alone.adapter().parameters();
    REQUIRE(mine.size() == theirs.size());
    for (std::size_t k = 0; k < mine.size(); ++k)
      CHECK((mine[k].var.value().vector().template cast<float>() -
             theirs[k].var.value().vector().template cast<float>())
                .cwiseAbs()
                .maxCoeff() == 0.0f);
  });
  std::filesystem::remove_all(dir);
}

namespace {
template <class Both>
void check_lora_ia3_same_module() {
  using Arch = peft::arch::Gpt2;
  peft::Ia3Config ia3;
  ia3.targets.target_modules.names = {"c_attn"};  // not feed-forward: an output scale
  const typename Both::Config config(attention_lora<Arch>(), ia3);
  static_assert(peft::HasProjectionHook<typename Both::template State<double>, double>);
  {
    // Both components contribute to c_attn, in component order.
    Decoder<Arch, Both, double> model(tiny_gpt2(), config, 3);
    perturb_adapter(model, 13);
    const peft::nn::Linear<double>* lin = model.linear_modules().front();
    REQUIRE(lin->name == "transformer.h.0.attn.c_attn");
    const std::int64_t in = lin->in_features, out = lin->out_features;
    Var<double> x(Tensor<double>(peft::Shape{2, 3, in}), false);
    std::mt19937_64 rng(14);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (std::int64_t i = 0; i < x.value().numel(); ++i) x.value()[i] = u(rng);
    Tape<double> tape(false);
    peft::Projection<double> p(tape, *lin, x);
    model.adapter().adapt(p);
    const Tensor<double> y = p.compute().value();

    const auto* slot = model.adapter().template component<0>().find(lin->site);
    REQUIRE(slot != nullptr);
    Var<double> l;
    for (auto& np : model.adapter().template component<1>().parameters())
      if (np.name == "base_model.model." + lin->name + ".ia3_l") l = np.var;
    REQUIRE(l.defined());
    const Tensor<double> base = lin->forward_base(tape, x).value();
    const auto X = Eigen::Map<const peft::RowMatrix<double>>(x.value().data(), 6, in);
    const peft::RowMatrix<double> delta =
        slot->extra.scale *
        (X * (*slot)[0].value().matrix().transpose() * (*slot)[1].value().matrix().transpose());
    double worst = 0;
    for (std::int64_t row = 0; row < 6; ++row)
      for (std::int64_t c = 0; c < out; ++c) {
        const double want = (base.data()[row * out + c] + delta(row, c)) * l.value()[c];
        worst = std::max(worst, std::abs(y.data()[row * out + c] - want));
      }
    CHECK(worst < 1e-12);
  }
}
}  // namespace

TEST_CASE("hybrid: LoRA and IA3 on the same module: (x Wᵀ + b + s B A x) ⊙ l") {
  check_lora_ia3_same_module<peft::Compose<peft::LoRA, peft::IA3>>();
}

namespace {
/// Gated<P> with every gate forced to 1 gives P's logits (to rounding: the gated term is added
/// apart from the product), with every gate at 0 exactly the base model's; its count from shapes
/// equals the tensors it builds.
template <class Arch, class P>
void check_gated_extremes(const typename P::Config& config) {
  using G = peft::Gated<P>;
  Decoder<Arch, G, double> gated(tiny_config<Arch>(), typename G::Config(config), 4);
  Decoder<Arch, P, double> plain(tiny_config<Arch>(), config, 4);
  Decoder<Arch, peft::NoPeft, double> base(tiny_config<Arch>(), {}, 4);
  perturb_adapter(plain, 15);
  auto mine = gated.adapter().inner().parameters();
  auto theirs = plain.adapter().parameters();
  REQUIRE(mine.size() == theirs.size());
  for (std::size_t i = 0; i < mine.size(); ++i) mine[i].var.value() = theirs[i].var.value();
  const Batch batch = padded_batch();
  gated.adapter().set_gates(1.0);
  CHECK(max_abs_diff(gated.logits(batch), plain.logits(batch)) < 1e-10);
  CHECK(max_abs_diff(plain.logits(batch), base.logits(batch)) > 1e-6);  // P does something
  gated.adapter().set_gates(0.0);
  CHECK(max_abs_diff(gated.logits(batch), base.logits(batch)) == 0.0);

  std::int64_t built = 0;
  for (auto& p : gated.trainable_parameters()) built += p.var.value().numel();
  const ModelConfig m = tiny_config<Arch>();
  CHECK(peft::count_parameters<G>(m, peft::linear_shapes<Arch>(m), config).trainable == built);
}
}  // namespace

TEST_CASE_TEMPLATE("hybrid: Gated<P> with gates at 1 is P, at 0 exactly the base model", Arch,
                   peft::arch::Gpt2, peft::arch::Llama) {
  SUBCASE("LoRA (a low-rank term)") {
    check_gated_extremes<Arch, peft::LoRA>(attention_lora<Arch>());
  }
  SUBCASE("IA3 (output and input scales)") {
    peft::Ia3Config ia3 = mlp_ia3<Arch>();  // down: an input scale
    ia3.targets.target_modules.names.push_back(
        std::is_same_v<Arch, peft::arch::Gpt2> ? "c_attn" : "v_proj");  // an output scale
    check_gated_extremes<Arch, peft::IA3>(ia3);
  }
  SUBCASE("serial adapter (after attention and MLP)") {
    check_gated_extremes<Arch, peft::SerialAdapter>(small_adapter<peft::SerialAdapter>());
  }
}

TEST_CASE("hybrid: merge folds the mergeable components, output unchanged") {
  using Arch = peft::arch::Gpt2;
  Decoder<Arch, MixedWithPrefix, double> model(tiny_gpt2(), hybrid_config<Arch, MixedWithPrefix>(),
                                               2);
  perturb_adapter(model, 10, 0.2);
  const Batch batch = padded_batch();
  const Tensor<double> unmerged = model.logits(batch);
  model.merge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-12);
  model.unmerge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-12);
}

TEST_CASE_TEMPLATE("hybrid: count_parameters equals the tensors a built composite trains", C,
                   HYBRID_CASES) {
  auto model = make_model<C, float>();
  std::int64_t built = 0;
  for (auto& p : model.trainable_parameters()) built += p.var.value().numel();
  const ModelConfig config = tiny_config<typename C::Arch>();
  const auto counted = peft::count_parameters<typename C::Policy>(
      config, peft::linear_shapes<typename C::Arch>(config),
      hybrid_config<typename C::Arch, typename C::Policy>());
  CHECK(counted.trainable == built);
}

TEST_CASE("hybrid: the composite manifest round-trips and names every component") {
  const ModelConfig m = tiny_llama();
  const auto config = hybrid_config<peft::arch::Llama, peft::UniPELT>();
  const nlohmann::json j = config.to_json(m);
  REQUIRE(j["components"].size() == 3);
  CHECK(j["components"][0]["method"] == "gated_lora");
  CHECK(j["components"][1]["folder"] == "1_gated_prefix_tuning");
  CHECK(j["components"][0]["config"]["gated_peft_type"] == "LORA");
  CHECK(peft::UniPELT::accepts(j));
  CHECK_FALSE(peft::MAMAdapter::accepts(j));
  const auto back = peft::UniPELT::Config::from_json(j, "round trip");
  CHECK(back.get<0>().inner.r == 2);
  CHECK(back.get<1>().inner.num_virtual_tokens == 3);
  CHECK(back.get<2>().inner.bottleneck_size == 3);
}

namespace {
// As the additive tests: continue a fixed cycle of 7 tokens, on a 2-layer model whose random base
// weights are scaled to std 0.2.
Batch cycle_batch() {
  Batch batch;
  batch.batch = 2;
  batch.seq = 12;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 12; ++t) batch.input_ids.push_back((3 * t + 5 * b) % 7 + 1);
  return batch;
}
}  // namespace

TEST_CASE_TEMPLATE("hybrid: UniPELT and MAM train well below the base model's loss", P,
                   peft::UniPELT, peft::MAMAdapter) {
  using Arch = peft::arch::Llama;
  ModelConfig config = tiny_llama();
  config.hidden_size = 16;
  config.num_heads = 4;
  config.num_kv_heads = 2;
  config.intermediate_size = 32;
  const Batch batch = cycle_batch();
  auto scale = [](auto& model) {
    for (auto& p : model.base_parameters())
      if (p.var.value().rank() == 2) p.var.value().vector() *= 10.0f;
  };
  Decoder<Arch, peft::NoPeft, float> base(config, {}, 5);
  scale(base);
  double base_loss = 0;
  {
    Tape<float> tape(false);
    base_loss = base.forward(tape, batch).loss.value()[0];
  }
  typename P::Config pc;
  if constexpr (std::is_same_v<P, peft::UniPELT>)
    pc = peft::unipelt_config(
        config, {.lora_r = 4, .lora_alpha = 8, .prefix_tokens = 4, .adapter_width = 8});
  else
    pc = peft::mam_config({.prefix_tokens = 4, .adapter_width = 8, .scaling = 4.0});
  Decoder<Arch, P, float> model(config, pc, 5);
  scale(model);
  peft::AdamWOptions options;
  options.lr = 0.05;
  peft::AdamW<float> optimizer(model.trainable_parameters(), options);
  double loss = 0;
  for (int step = 0; step <= 100; ++step) {
    Tape<float> tape(step < 100);
    auto out = model.forward(tape, batch);
    loss = out.loss.value()[0];
    if (step == 100) break;
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
  }
  MESSAGE(std::string(P::title) << ": base loss " << base_loss << ", trained " << loss);
  CHECK(loss < 0.5 * base_loss);
}

/// A search over a model of d 16 with 4 proxy steps per candidate: seconds, not minutes.
peft::search::SearchOptions tiny_search(std::int64_t budget, std::int64_t candidates,
                                        std::uint64_t seed) {
  peft::search::SearchOptions o;
  o.parameter_budget = budget;
  o.proxy_steps = 4;
  o.max_candidates = candidates;
  o.pretrain_steps = 5;
  o.batch = 4;
  o.eval_examples = 8;
  o.model.hidden_size = 16;
  o.model.num_heads = 2;
  o.model.num_kv_heads = 2;
  o.model.intermediate_size = 32;
  o.seed = seed;
  return o;
}

TEST_CASE("hybrid: search returns a configuration within its budget, repeatably") {
  const peft::search::SearchOptions o = tiny_search(1500, 4, 7);
  const auto first = peft::search::run_search(o);
  REQUIRE(first.rows.size() == 4);
  CHECK(first.over_budget > 0);  // the space has candidates over 1500 parameters
  for (const auto& row : first.rows) {
    CHECK(row.candidate.parameters <= o.parameter_budget);
    CHECK(row.trained_parameters == row.candidate.parameters);
    CHECK(row.steps == o.proxy_steps);
  }
  const auto again = peft::search::run_search(o);
  REQUIRE(again.rows.size() == first.rows.size());
  for (std::size_t i = 0; i < first.rows.size(); ++i) {
    CHECK(again.rows[i].candidate.method == first.rows[i].candidate.method);
    CHECK(again.rows[i].candidate.size_label == first.rows[i].candidate.size_label);
    CHECK(again.rows[i].eval_loss == first.rows[i].eval_loss);
  }
  CHECK(again.best == first.best);

  const auto dir = scratch_dir("search");
  peft::search::write_results(dir, first, o);
  const nlohmann::json chosen = peft::io::load_json(dir / "adapter_config.json");
  const ModelConfig model = ModelConfig::from_json(peft::io::load_json(dir / "config.json"), "cfg");
  // The written config counts, through the registry, to the chosen candidate's parameters.
  bool found = false;
  peft::visit_policy_for(chosen, [&]<class P>() {
    const auto c = P::Config::from_json(chosen, "chosen");
    const auto n =
        peft::count_parameters<P>(model, peft::linear_shapes<peft::arch::Llama>(model), c);
    CHECK(n.trainable == first.rows[first.best].candidate.parameters);
    CHECK(n.trainable <= o.parameter_budget);
    found = true;
  });
  // A composite (MAM, UniPELT) is not in the single-method registry; its manifest says COMPOSE.
  if (!found) CHECK(chosen["peft_type"] == "COMPOSE");
  std::filesystem::remove_all(dir);
}

TEST_CASE("hybrid: search adds the study's methods, one point each at their study config") {
  const peft::search::SearchOptions o = tiny_search(100000, 8, 3);  // the grid's 7 methods and VeRA
  using peft::experiment::entry;
  using Steps = std::int64_t;
  std::vector<peft::experiment::MethodEntry> study;
  study.push_back(entry<peft::VeRA>(5e-2, [](const ModelConfig&, Steps) {
    peft::VeraConfig c;
    c.r = 8;
    c.targets = peft::experiment::modules({"q_proj", "v_proj"});
    return c;
  }));
  study.push_back(entry<peft::LoRA>(1e-2, [](const ModelConfig&, Steps) {  // in the grid already
    return peft::LoraConfig{};
  }));
  study.push_back(entry<peft::IA3>("ia3_unfit", 1e-2, [](const ModelConfig&, Steps) {
    throw peft::ConfigError("this config does not fit");
    return peft::Ia3Config{};
  }));
  std::vector<std::string> unfit;
  const auto grid = peft::search::design_space(o.model);
  const auto space = peft::search::design_space(o.model, study, o.proxy_steps, &unfit);
  REQUIRE(space.size() == grid.size() + 1);
  REQUIRE(unfit.size() == 1);
  CHECK(unfit[0] == "ia3_unfit: this config does not fit");
  const peft::search::Candidate& vera = space.back();
  CHECK(vera.method == "vera");
  CHECK(vera.size_label == "study config");
  CHECK(vera.parameters == 2 * 2 * (8 + 16));  // λ_d [r] and λ_b [out] at q and v of 2 layers
  CHECK(vera.config_json(o.model)["peft_type"] == "VERA");

  // Every method trains once the candidates cover them (round-robin over the methods).
  const auto r = peft::search::run_search(o, nullptr, study);
  REQUIRE(r.rows.size() == 8);
  const auto row = std::find_if(r.rows.begin(), r.rows.end(),
                                [](const auto& x) { return x.candidate.method == "vera"; });
  REQUIRE(row != r.rows.end());
  CHECK(row->trained_parameters == vera.parameters);
  CHECK(row->steps == o.proxy_steps);
  CHECK(std::isfinite(row->eval_loss));
  CHECK(row->note.empty());
}

#undef HYBRID_CASES
}  // namespace test_hybrid
