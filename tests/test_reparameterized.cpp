// The reparameterized family: LoRA (default, PiSSA), DoRA, VeRA, LoHa, LoKr, AdaLoRA, DyLoRA.
// For every method: a finite-difference gradient check in double, merge → unmerge restores the
// base, save → load → the same logits, the adapted model starts at the base model where the
// method promises it; a project-written adapter has the golden files' keys, shapes and config
// fields; counts as the reference prints them; AdaLoRA's budget ends at target_r; DyLoRA at
// several ranks equals LoRA cut to that rank.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <peft/commands/count.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <set>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_reparameterized {

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

using test_support::max_abs_diff;
using test_support::perturb_adapter;
peft::TargetRules targets() { return test_support::both_model_targets(); }

// One case per method configuration: its policy, its config, what it promises.
struct LoraCase {
  using Policy = peft::LoRA;
  static constexpr const char* name = "lora";
  static constexpr bool exact_start = true;
  static peft::LoraConfig config() {
    peft::LoraConfig c;
    c.r = 3;
    c.lora_alpha = 6;
    c.targets = targets();
    return c;
  }
};
struct PissaCase {
  using Policy = peft::LoRA;
  static constexpr const char* name = "lora pissa";
  static constexpr bool exact_start = false;  // W − sBA + sBA: equal to rounding
  static peft::LoraConfig config() {
    peft::LoraConfig c = LoraCase::config();
    c.init = peft::LoraConfig::Init::Pissa;
    return c;
  }
};
struct DoraCase {
  using Policy = peft::DoRA;
  static constexpr const char* name = "dora";
  static constexpr bool exact_start = true;
  static peft::DoraConfig config() { return {LoraCase::config()}; }
};
struct VeraCase {
  using Policy = peft::VeRA;
  static constexpr const char* name = "vera";
  static constexpr bool exact_start = true;
  static peft::VeraConfig config() {
    peft::VeraConfig c;
    c.r = 4;
    c.targets = targets();
    return c;
  }
};
struct LohaCase {
  using Policy = peft::LoHa;
  static constexpr const char* name = "loha factored";
  static constexpr bool exact_start = true;
  static peft::LohaConfig config() {
    peft::LohaConfig c;
    c.options.r = 2;
    c.options.alpha = 3;
    c.options.targets = targets();
    return c;
  }
};
struct LohaDenseCase {
  using Policy = peft::LoHa;
  static constexpr const char* name = "loha with ΔW built";
  static constexpr bool exact_start = true;
  static peft::LohaConfig config() { return LohaCase::config(); }
};
struct LokrCase {
  using Policy = peft::LoKr;
  static constexpr const char* name = "lokr full factors";
  static constexpr bool exact_start = true;
  static peft::LokrConfig config() {
    peft::LokrConfig c;
    c.options.r = 4;
    c.options.alpha = 2;
    c.options.targets = targets();
    return c;
  }
};
struct LokrDecomposedCase {
  using Policy = peft::LoKr;
  static constexpr const char* name = "lokr decomposed";
  static constexpr bool exact_start = true;
  static peft::LokrConfig config() {
    peft::LokrConfig c = LokrCase::config();
    c.options.r = 1;
    c.decompose_both = true;
    c.decompose_factor = 2;  // 8 = 2·4, w1 [2, 2] and w2 [4, 4] both cut to rank 1
    return c;
  }
};
struct AdaloraCase {
  using Policy = peft::AdaLoRA;
  static constexpr const char* name = "adalora";
  static constexpr bool exact_start = true;
  static peft::AdaLoraConfig config() {
    peft::AdaLoraConfig c;
    c.init_r = 4;
    c.target_r = 2;
    c.lora_alpha = 5;
    c.total_step = 12;
    c.tinit = 2;
    c.tfinal = 3;
    c.targets = targets();
    return c;
  }
};
struct DyloraCase {
  using Policy = peft::DyLoRA;
  static constexpr const char* name = "dylora at rank 2 of 4";
  static constexpr bool exact_start = true;
  static peft::DyLoraConfig config() {
    peft::DyLoraConfig c;
    c.r = 4;
    c.lora_alpha = 4;
    c.eval_rank = 2;
    c.targets = targets();
    return c;
  }
};

template <class ArchT, class CaseT>
struct Case {
  using Arch = ArchT;
  using Method = CaseT;
  using Policy = typename CaseT::Policy;
};

#define REPARAMETERIZED_CASES(Arch)                                                        \
  Case<Arch, LoraCase>, Case<Arch, PissaCase>, Case<Arch, DoraCase>, Case<Arch, VeraCase>, \
      Case<Arch, LohaCase>, Case<Arch, LohaDenseCase>, Case<Arch, LokrCase>,               \
      Case<Arch, LokrDecomposedCase>, Case<Arch, AdaloraCase>, Case<Arch, DyloraCase>

#define ALL_CASES REPARAMETERIZED_CASES(peft::arch::Gpt2), REPARAMETERIZED_CASES(peft::arch::Llama)

template <class C, class T>
using ModelOf = Decoder<typename C::Arch, typename C::Policy, T>;

// Both LoHa forward paths on the same small layers (the choice is by size otherwise).
template <class C, class Model>
void choose_path(Model& model) {
  if constexpr (std::is_same_v<typename C::Method, LohaCase>) model.adapter().set_factored(true);
  if constexpr (std::is_same_v<typename C::Method, LohaDenseCase>)
    model.adapter().set_factored(false);
}

template <class C, class T>
ModelOf<C, T> make_model(std::uint64_t seed = 11) {
  ModelOf<C, T> model(tiny_config<typename C::Arch>(), C::Method::config(), seed);
  choose_path<C>(model);
  return model;
}

template <class C>
std::string case_name() {
  return std::string(C::Arch::model_type) + " " + C::Method::name;
}

std::filesystem::path scratch_dir(const std::string& name) {
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("peft_test_reparameterized_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  return dir;
}

std::filesystem::path golden_cases_dir() {
#ifdef PEFT_GOLDEN_DIR
  if (std::filesystem::is_directory(PEFT_GOLDEN_DIR)) return PEFT_GOLDEN_DIR;
#endif
  for (const char* candidate : {"shared/golden", "../shared/golden", "/work/shared/golden"})
    if (std::filesystem::is_directory(candidate)) return candidate;
  return {};
}

}  // namespace

TEST_CASE_TEMPLATE("reparameterized: analytic gradients match finite differences", C, ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 3);
  const Batch batch = padded_batch();
  std::vector<Var<double>> inputs;
  for (auto& p : model.trainable_parameters()) {
    // DoRA's row norm depends on A and B but is a constant in backward (as in the reference),
    // so finite differences over A and B see a term the gradient leaves out by design: check
    // m here and A, B through the op with the norm held fixed (below).
    if (std::is_same_v<typename C::Policy, peft::DoRA> && !p.name.ends_with("magnitude_vector"))
      continue;
    inputs.push_back(p.var);
  }
  REQUIRE(!inputs.empty());
  peft::testing::GradCheckOptions options;
  options.rtol = 1e-5;
  options.atol = 1e-7;
  constexpr bool with_loss = std::is_same_v<typename C::Policy, peft::AdaLoRA>;  // + regulariser
  const auto result = peft::testing::check_gradients(
      [&](Tape<double>& tape, std::vector<Var<double>>&) {
        auto out = model.forward(tape, batch, with_loss);
        return with_loss ? out.loss : out.logits;
      },
      inputs, options);
  INFO(result.message);
  CHECK(result.ok);
}

TEST_CASE_TEMPLATE("reparameterized: merge and unmerge", C, ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 5);
  const Batch batch = padded_batch();
  std::vector<Tensor<double>> weights;
  for (auto* lin : model.linear_modules()) weights.push_back(lin->weight.value());
  const Tensor<double> unmerged = model.logits(batch);
  model.merge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-10);
  model.unmerge();
  auto modules = model.linear_modules();
  for (std::size_t i = 0; i < modules.size(); ++i)
    CHECK(max_abs_diff(modules[i]->weight.value(), weights[i]) < 1e-13);
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-12);
  // unload: merged for good, no adapter tensors left.
  model.adapter().unload(modules);
  CHECK(model.adapter().parameters().empty());
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-10);
}

TEST_CASE_TEMPLATE("reparameterized: float32 unmerge restores the base to float rounding", C,
                   REPARAMETERIZED_CASES(peft::arch::Llama)) {
  INFO(case_name<C>());
  auto model = make_model<C, float>();
  perturb_adapter(model, 6);
  std::vector<Tensor<float>> weights;
  for (auto* lin : model.linear_modules()) weights.push_back(lin->weight.value());
  model.merge();
  model.unmerge();
  auto modules = model.linear_modules();
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const double scale = weights[i].vector().cwiseAbs().maxCoeff();
    CHECK(max_abs_diff(modules[i]->weight.value(), weights[i]) <= 4e-7 * std::max(scale, 1.0));
  }
}

TEST_CASE_TEMPLATE("reparameterized: the adapted model starts at the base model", C, ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>(21);
  Decoder<typename C::Arch, peft::NoPeft, double> base(tiny_config<typename C::Arch>(), {}, 21);
  const Batch batch = padded_batch();
  const double diff = max_abs_diff(model.logits(batch), base.logits(batch));
  if (C::Method::exact_start)
    CHECK(diff == 0.0);
  else
    CHECK(diff < 1e-12);
}

TEST_CASE_TEMPLATE("reparameterized: save, load, same logits", C,
                   REPARAMETERIZED_CASES(peft::arch::Llama)) {
  INFO(case_name<C>());
  auto model = make_model<C, float>();
  perturb_adapter(model, 7);
  const Batch batch = padded_batch();
  const auto dir = scratch_dir(case_name<C>());
  peft::io::save_adapter(dir, C::Method::config().to_json(model.config()),
                         model.adapter().parameters());

  const auto json = peft::io::load_json(dir / "adapter_config.json");
  CHECK(C::Policy::accepts(json));
  auto config = C::Policy::Config::from_json(json, "saved config");
  // Same seed: the same base weights (for PiSSA, the same residual base).
  ModelOf<C, float> loaded(tiny_config<typename C::Arch>(), config, 11);
  choose_path<C>(loaded);
  peft::io::load_adapter_tensors(
      loaded.adapter().parameters(),
      peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors"));
  const auto saved = model.adapter().parameters();
  const auto reloaded = loaded.adapter().parameters();
  REQUIRE(saved.size() == reloaded.size());
  for (std::size_t i = 0; i < saved.size(); ++i) {
    CHECK(saved[i].name == reloaded[i].name);
    CHECK(saved[i].var.value().values() == reloaded[i].var.value().values());  // bit-exact
    CHECK(saved[i].var.requires_grad() == reloaded[i].var.requires_grad());
  }
  CHECK(model.logits(batch).values() == loaded.logits(batch).values());
}

// Op-level checks: the fused ops in both weight layouts, DoRA's with its norm held fixed.
namespace {
using Inputs = std::vector<Var<double>>;
Var<double> input(const peft::Shape& shape, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return Var<double>(peft::testing::random_tensor(shape, seed, lo, hi), true);
}
void check_op(const peft::testing::DoubleFunction& f, Inputs inputs) {
  peft::testing::GradCheckOptions options;
  options.rtol = 1e-6;
  options.atol = 1e-8;
  const auto result = peft::testing::check_gradients(f, std::move(inputs), options);
  INFO(result.message);
  CHECK(result.ok);
}
}  // namespace

TEST_CASE("reparameterized ops: analytic gradients match finite differences") {
  using peft::ops::WeightLayout;
  for (WeightLayout layout : {WeightLayout::OutIn, WeightLayout::InOut}) {
    const bool out_in = layout == WeightLayout::OutIn;
    const peft::Shape w_shape = out_in ? peft::Shape{6, 4} : peft::Shape{4, 6};
    SUBCASE("dora_linear") {
      const Tensor<double> norm = peft::testing::random_tensor({6}, 9, 0.5, 1.5);
      check_op(
          [&](Tape<double>& t, Inputs& x) {
            return peft::ops::dora_linear(t, x[0], x[1], x[2], layout, x[3], x[4], x[5], norm, 0.7);
          },
          {input({2, 3, 4}, 1), input(w_shape, 2), input({6}, 3), input({2, 4}, 4),
           input({6, 2}, 5), input({6}, 6, 0.5, 1.5)});
    }
    SUBCASE("vera_linear") {
      Var<double> shared_a(peft::testing::random_tensor({3, 5}, 7));  // frozen, wider than in
      Var<double> shared_b(peft::testing::random_tensor({8, 3}, 8));  // taller than out
      check_op(
          [&](Tape<double>& t, Inputs& x) {
            return peft::ops::vera_linear(t, x[0], x[1], x[2], layout, shared_a, shared_b, x[3],
                                          x[4]);
          },
          {input({2, 3, 4}, 1), input(w_shape, 2), input({6}, 3), input({3}, 4), input({6}, 5)});
    }
    SUBCASE("kronecker_linear") {
      check_op(
          [&](Tape<double>& t, Inputs& x) {
            return peft::ops::kronecker_linear(t, x[0], x[1], x[2], layout, x[3], x[4], 0.8);
          },
          {input({2, 3, 4}, 1), input(w_shape, 2), input({6}, 3), input({2, 2}, 4),
           input({3, 2}, 5)});
    }
  }
  SUBCASE("row_kron") {
    check_op([](Tape<double>& t, Inputs& x) { return peft::ops::row_kron(t, x[0], x[1]); },
             {input({4, 2}, 1), input({4, 3}, 2)});
  }
  SUBCASE("orthogonality_penalty") {
    check_op(
        [](Tape<double>& t, Inputs& x) { return peft::ops::orthogonality_penalty(t, x[0], true); },
        {input({3, 5}, 1)});
    check_op(
        [](Tape<double>& t, Inputs& x) { return peft::ops::orthogonality_penalty(t, x[0], false); },
        {input({5, 3}, 2)});
  }
}

TEST_CASE("kronecker_linear equals the product with the built Kronecker matrix") {
  Tape<double> tape(false);
  Var<double> x(peft::testing::random_tensor({3, 6}, 1));
  Var<double> w(peft::testing::random_tensor({8, 6}, 2));
  Var<double> w1(peft::testing::random_tensor({2, 3}, 3));
  Var<double> w2(peft::testing::random_tensor({4, 2}, 4));
  const Tensor<double> y = peft::ops::kronecker_linear(tape, x, w, Var<double>{},
                                                       peft::ops::WeightLayout::OutIn, w1, w2, 0.5)
                               .value();
  peft::RowMatrix<double> kron(8, 6);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      kron.block(i * 4, j * 2, 4, 2) = w1.value().matrix()(i, j) * w2.value().matrix();
  const peft::RowMatrix<double> expected =
      x.value().matrix() * (w.value().matrix() + 0.5 * kron).transpose();
  CHECK((y.matrix() - expected).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("lokr factorization follows the reference's rules") {
  using peft::detail::lokr_factorization;
  using Pair = std::pair<std::int64_t, std::int64_t>;
  CHECK(lokr_factorization(64) == Pair{8, 8});
  CHECK(lokr_factorization(32) == Pair{4, 8});
  CHECK(lokr_factorization(768) == Pair{24, 32});
  CHECK(lokr_factorization(127) == Pair{1, 127});
  CHECK(lokr_factorization(12) == Pair{3, 4});
  CHECK(lokr_factorization(64, 4) == Pair{4, 16});  // the factor divides: used as it is
  CHECK(lokr_factorization(64, 3) == Pair{2, 32});  // it does not: divisors up to 3
  CHECK(lokr_factorization(2048, 16) == Pair{16, 128});
  const auto shape = peft::detail::LokrShape::of(64, 32, 4, -1, false);
  CHECK(shape.out_l == 4);
  CHECK(shape.out_k == 8);
  CHECK(shape.full_w1);
  CHECK(shape.full_w2);  // r = 4 is not below max(8, 8) / 2
  CHECK_FALSE(peft::detail::LokrShape::of(64, 32, 3, -1, false).full_w2);
}

TEST_CASE("adalora: the budget schedule and a run that ends at target_r") {
  peft::AdaLoraConfig config = AdaloraCase::config();
  Decoder<peft::arch::Llama, peft::AdaLoRA, double> model(tiny_llama(), config, 4);
  auto& adapter = model.adapter();
  const std::int64_t modules = static_cast<std::int64_t>(adapter.attached_modules());
  REQUIRE(modules == 6);  // q, v, down in two layers
  CHECK(adapter.initial_budget() == 4 * modules);
  CHECK(adapter.target_budget() == 2 * modules);
  CHECK(adapter.budget_schedule(0) == std::pair<std::int64_t, bool>{24, false});
  CHECK(adapter.budget_schedule(2) == std::pair<std::int64_t, bool>{24, false});
  // (24 − 12)·(1 − 1/7)³ + 12 = 19.55… → 19
  CHECK(adapter.budget_schedule(3) == std::pair<std::int64_t, bool>{19, true});
  CHECK(adapter.budget_schedule(9).first == 12);
  CHECK(adapter.budget_schedule(11) == std::pair<std::int64_t, bool>{12, true});
  std::int64_t previous = adapter.initial_budget();
  for (int step = 3; step <= 9; ++step) {
    CHECK(adapter.budget_schedule(step).first <= previous);
    previous = adapter.budget_schedule(step).first;
  }

  perturb_adapter(model, 8, 0.2);  // E non-zero, so every triplet has a score
  const Batch batch = padded_batch();
  peft::AdamWOptions options;
  options.lr = 1e-2;
  peft::AdamW<double> optimizer(model.trainable_parameters(), options);
  for (int step = 0; step < config.total_step; ++step) {
    Tape<double> tape;
    auto out = model.forward(tape, batch);
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
    const std::int64_t budget = adapter.update_and_allocate(step);
    if (step > config.tinit) CHECK(adapter.kept_triplets() == budget);
  }
  CHECK(adapter.kept_triplets() == config.target_r * modules);
  CHECK(adapter.nonzero_singular_values() <= config.target_r * modules);

  // The reference's saved layout after allocation: rank_pattern in the config, tensors cut to
  // the kept triplets; loading it gives each module its kept rank.
  const auto allocated = adapter.allocated_config();
  CHECK(allocated.rank_pattern.size() == static_cast<std::size_t>(modules));
  const auto dir = scratch_dir("adalora allocated");
  peft::io::save_adapter(dir, allocated.to_json(model.config()), adapter.allocated_parameters());
  const auto json = peft::io::load_json(dir / "adapter_config.json");
  Decoder<peft::arch::Llama, peft::AdaLoRA, double> loaded(
      tiny_llama(), peft::AdaLoraConfig::from_json(json, "allocated"), 4);
  peft::io::load_adapter_tensors(
      loaded.adapter().parameters(),
      peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors"));
  std::int64_t total_rank = 0;
  for (auto& p : loaded.adapter().parameters())
    if (p.name.ends_with("lora_E")) total_rank += p.var.value().numel();
  CHECK(total_rank == config.target_r * modules);
}

TEST_CASE("dylora: evaluated at rank b it is LoRA cut to rank b") {
  peft::DyLoraConfig config = DyloraCase::config();
  Decoder<peft::arch::Llama, peft::DyLoRA, double> model(tiny_llama(), config, 5);
  perturb_adapter(model, 9);
  const Batch batch = padded_batch();
  for (int b : {1, 2, 3, 4}) {
    INFO("rank " << b);
    model.adapter().set_rank(b);
    peft::LoraConfig lora;
    lora.r = b;
    lora.lora_alpha = config.lora_alpha;
    lora.targets = config.targets;
    Decoder<peft::arch::Llama, peft::LoRA, double> cut(tiny_llama(), lora, 5);
    auto dy = model.adapter().parameters();
    auto lp = cut.adapter().parameters();
    REQUIRE(dy.size() == lp.size());
    for (std::size_t i = 0; i < dy.size(); ++i) {
      const auto& src = dy[i].var.value();
      auto& dst = lp[i].var.value();
      if (dy[i].name.ends_with("lora_A.weight"))
        dst.matrix() = src.matrix().topRows(b);
      else
        dst.matrix() = src.matrix().leftCols(b);
    }
    CHECK(max_abs_diff(model.logits(batch), cut.logits(batch)) < 1e-12);
  }
  CHECK_THROWS_AS(model.adapter().set_rank(5), peft::ConfigError);

  // Rank sampling: seeded, within 1..r, and every rank turns up.
  Decoder<peft::arch::Llama, peft::DyLoRA, double> again(tiny_llama(), config, 5);
  std::set<int> seen;
  for (int i = 0; i < 64; ++i) {
    const int b = model.adapter().sample_rank();
    CHECK(b == again.adapter().sample_rank());
    CHECK(b >= 1);
    CHECK(b <= config.r);
    seen.insert(b);
  }
  CHECK(seen.size() == static_cast<std::size_t>(config.r));
}

TEST_CASE("lora pissa: the factors are the principal part of W and the base keeps the rest") {
  peft::LoraConfig config = PissaCase::config();
  Decoder<peft::arch::Llama, peft::NoPeft, double> base(tiny_llama(), {}, 13);
  Decoder<peft::arch::Llama, peft::LoRA, double> model(tiny_llama(), config, 13);
  auto base_modules = base.linear_modules();
  auto modules = model.linear_modules();
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const auto* m = model.adapter().find(modules[i]->site);
    if (!m) continue;
    const peft::RowMatrix<double> w = base_modules[i]->weight_out_in();
    const peft::RowMatrix<double> product =
        m->extra.scale * ((*m)[1].value().matrix() * (*m)[0].value().matrix());
    CHECK((modules[i]->weight_out_in() + product - w).cwiseAbs().maxCoeff() < 1e-14);
    // s B A is the best rank-r approximation: its error is the (r+1)-th singular value.
    Eigen::JacobiSVD<peft::RowMatrix<double>> svd(w);
    CHECK(std::abs((w - product).norm() -
                   svd.singularValues().tail(svd.singularValues().size() - config.r).norm()) <
          1e-12);
  }
}

TEST_CASE("reparameterized: project-written adapters have the golden files' layout") {
  const auto dir = golden_cases_dir();
  if (dir.empty()) return;
  auto check_case = [&]<class Policy>(const std::string& name) {
    INFO(name);
    const auto case_dir = dir / name;
    const auto golden_json = peft::io::load_json(case_dir / "adapter" / "adapter_config.json");
    REQUIRE(Policy::accepts(golden_json));
    const auto config = Policy::Config::from_json(golden_json, name);
    auto model =
        Decoder<peft::arch::Llama, Policy, float>::load(case_dir / "../models/llama-tiny", config);
    nlohmann::json written = config.to_json(model.config());
    // target_modules is a set in the reference: compare it as one.
    auto as_set = [](const nlohmann::json& j) { return j.get<std::set<std::string>>(); };
    CHECK(as_set(written["target_modules"]) == as_set(golden_json["target_modules"]));
    written["target_modules"] = golden_json["target_modules"];
    CHECK(written == golden_json);
    const auto file =
        peft::io::SafetensorsFile::open(case_dir / "adapter" / "adapter_model.safetensors");
    const auto params = model.adapter().parameters();
    CHECK(params.size() == file.tensors().size());
    for (const auto& p : params) {
      REQUIRE(file.contains(p.name));
      const auto& shape = file.info(p.name).shape;
      CHECK(p.var.shape() == peft::Shape(shape.begin(), shape.end()));
    }
  };
  check_case.operator()<peft::LoRA>("llama_lora_rslora");
  check_case.operator()<peft::DoRA>("llama_dora");
  check_case.operator()<peft::VeRA>("llama_vera");
  check_case.operator()<peft::LoHa>("llama_loha");
  check_case.operator()<peft::LoKr>("llama_lokr");
  check_case.operator()<peft::AdaLoRA>("llama_adalora");
}

TEST_CASE("reparameterized: counts agree with the golden cases") {
  const auto dir = golden_cases_dir();
  if (dir.empty()) return;
  for (const char* name : {"gpt2_lora", "llama_lora_rslora", "llama_dora", "llama_vera",
                           "llama_loha", "llama_lokr", "llama_adalora"}) {
    INFO(name);
    const auto case_json = peft::io::load_json(dir / name / "case.json");
    const auto model_dir = dir / name / case_json["model_dir"].get<std::string>();
    const auto [trainable, all] = peft::commands::count_from_configs(
        peft::io::load_json(model_dir / "config.json"), "config.json",
        peft::io::load_json(dir / name / "adapter" / "adapter_config.json"), "adapter_config.json");
    CHECK(trainable == case_json["trainable_params"].get<std::int64_t>());
    CHECK(all == case_json["all_params"].get<std::int64_t>());
  }
}

namespace {
// Published model configs, as transformers writes them (the fields count needs).
nlohmann::json gpt2_124m() {
  return {{"model_type", "gpt2"}, {"vocab_size", 50257},
          {"n_embd", 768},        {"n_layer", 12},
          {"n_head", 12},         {"n_positions", 1024},
          {"n_inner", nullptr},   {"layer_norm_epsilon", 1e-5}};
}
nlohmann::json llama_7b() {
  return {{"model_type", "llama"},      {"vocab_size", 32000},
          {"hidden_size", 4096},        {"num_hidden_layers", 32},
          {"num_attention_heads", 32},  {"num_key_value_heads", 32},
          {"intermediate_size", 11008}, {"max_position_embeddings", 2048},
          {"rms_norm_eps", 1e-6},       {"tie_word_embeddings", false}};
}
nlohmann::json llama_32_1b() {
  return {
      {"model_type", "llama"},   {"vocab_size", 128256},      {"hidden_size", 2048},
      {"num_hidden_layers", 16}, {"num_attention_heads", 32}, {"num_key_value_heads", 8},
      {"head_dim", 64},          {"intermediate_size", 8192}, {"max_position_embeddings", 131072},
      {"rms_norm_eps", 1e-5},    {"rope_theta", 500000.0},    {"tie_word_embeddings", true}};
}
nlohmann::json adapter(const std::string& type, int r, std::vector<std::string> targets,
                       bool dora = false) {
  nlohmann::json j = {{"peft_type", type}, {"r", r}, {"target_modules", targets}};
  if (type == "LORA") j["lora_alpha"] = 16, j["use_dora"] = dora;
  return j;
}
std::string count_line(const nlohmann::json& model, const nlohmann::json& adapter_json) {
  const auto [t, a] = peft::commands::count_from_configs(model, "model", adapter_json, "adapter");
  return peft::trainable_parameters_line(t, a);
}
}  // namespace

TEST_CASE("peft count: the reference's lines for published models") {
  // GPT-2 124M, LoRA r=8 on c_attn: the reference's documented line.
  CHECK(count_line(gpt2_124m(), adapter("LORA", 8, {"c_attn"})) ==
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364");
  // LLaMA-7B, LoRA r=8 on q_proj, v_proj: the line of the reference's README.
  CHECK(count_line(llama_7b(), adapter("LORA", 8, {"q_proj", "v_proj"})) ==
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622");
  // Llama-3.2-1B (1,235,814,400 parameters, tied head), LoRA r=8 on q_proj, v_proj.
  CHECK(count_line(llama_32_1b(), adapter("LORA", 8, {"q_proj", "v_proj"})) ==
        "trainable params: 851,968 || all params: 1,236,666,368 || trainable%: 0.0689");
  // DoRA adds the magnitude vector [out] per module.
  CHECK(count_line(llama_7b(), adapter("LORA", 8, {"q_proj", "v_proj"}, true)) ==
        "trainable params: 4,456,448 || all params: 6,742,872,064 || trainable%: 0.0661");
  CHECK(count_line(gpt2_124m(), adapter("LORA", 8, {"c_attn"}, true)) ==
        "trainable params: 322,560 || all params: 124,762,368 || trainable%: 0.2585");
  // VeRA: λ_d [r] and λ_b [out] per module; the shared projections are not parameters.
  CHECK(count_line(llama_7b(), adapter("VERA", 256, {"q_proj", "v_proj"})) ==
        "trainable params: 278,528 || all params: 6,738,694,144 || trainable%: 0.0041");
  CHECK(count_line(llama_32_1b(), adapter("VERA", 256, {"q_proj", "v_proj"})) ==
        "trainable params: 49,152 || all params: 1,235,863,552 || trainable%: 0.0040");
  CHECK(count_line(gpt2_124m(), adapter("VERA", 256, {"c_attn"})) ==
        "trainable params: 30,720 || all params: 124,470,528 || trainable%: 0.0247");
}

#undef REPARAMETERIZED_CASES
#undef ALL_CASES
}  // namespace test_reparameterized
