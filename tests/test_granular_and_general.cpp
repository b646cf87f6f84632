// GraLoRA (k × k blocks, each its own low-rank pair; the hybrid LoRA pair) and GLoRA
// (W0 + W0 ⊙ A + B, b0 + b0 ⊙ D + E + W0 C with lora / vector / constant / none paths). For every
// case: the whole tiny model's finite-difference gradients in double, merge → unmerge restores
// the base (weights and biases), save → load → the same logits, the start at the base model where
// the init promises it, counts from shapes equal to the attached tensors; config errors; the
// reference's cases (tests/data/golden_methods) and count lines for published shapes.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <peft/commands/count.hpp>
#include <peft/methods/reparameterized/glora.hpp>
#include <peft/methods/reparameterized/gralora.hpp>
#include <peft/peft.hpp>
#include <peft/testing/golden.hpp>
#include <peft/testing/gradcheck.hpp>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_granular_and_general {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::Tape;
using peft::Tensor;
using peft::Var;
using test_support::max_abs_diff;
using test_support::padded_batch;
using test_support::perturb_adapter;
using test_support::tiny_config;
using Registry = peft::MethodRegistry<peft::GraLoRA, peft::GLoRA>;
peft::TargetRules targets() { return test_support::both_model_targets(); }

// start: 0 = bit-exact at the base model, 2 = not at the base (a random init).
struct GraloraCase {
  using Policy = peft::GraLoRA;
  static constexpr const char* name = "gralora k 2";
  static constexpr int start = 0;
  static peft::GraloraConfig config() {
    peft::GraloraConfig c;
    c.r = 4;
    c.alpha = 8;
    c.gralora_k = 2;
    c.targets = targets();
    return c;
  }
};
struct GraloraHybridCase {
  using Policy = peft::GraLoRA;
  static constexpr const char* name = "gralora k 4, hybrid_r 2, random init";
  static constexpr int start = 2;
  static peft::GraloraConfig config() {
    peft::GraloraConfig c = GraloraCase::config();
    c.gralora_k = 4;
    c.hybrid_r = 2;
    c.init_weights = false;
    return c;
  }
};
using Path = peft::GloraConfig::Path;
struct GloraCase {
  using Policy = peft::GLoRA;
  static constexpr const char* name = "glora lora, lora, constant";
  static constexpr int start = 0;
  static peft::GloraConfig config() {
    peft::GloraConfig c;
    c.r = 2;
    c.targets = targets();
    return c;
  }
};
struct GloraVectorCase {
  using Policy = peft::GLoRA;
  static constexpr const char* name = "glora vectors, random init";
  static constexpr int start = 2;
  static peft::GloraConfig config() {
    peft::GloraConfig c = GloraCase::config();
    c.config_A_B = c.config_C = c.config_D_E = Path::Vector;
    c.init_weights = false;
    return c;
  }
};
struct GloraConstantCase {
  using Policy = peft::GLoRA;
  static constexpr const char* name = "glora constants, C none, random init";
  static constexpr int start = 2;
  static peft::GloraConfig config() {
    peft::GloraConfig c = GloraCase::config();
    c.config_A_B = c.config_D_E = Path::Constant;
    c.config_C = Path::None;
    c.init_weights = false;
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;

#define METHOD_CASES(Arch)                                                       \
  Case<Arch, GraloraCase>, Case<Arch, GraloraHybridCase>, Case<Arch, GloraCase>, \
      Case<Arch, GloraVectorCase>, Case<Arch, GloraConstantCase>
#define ALL_CASES METHOD_CASES(peft::arch::Gpt2), METHOD_CASES(peft::arch::Llama)

using test_support::case_name;
using test_support::make_model;
using test_support::ModelOf;
namespace checks = test_support::method_checks;

}  // namespace

TEST_CASE_TEMPLATE("GraLoRA, GLoRA: analytic gradients match finite differences", C, ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("GraLoRA, GLoRA: merge and unmerge", C, ALL_CASES) {
  checks::merge_unmerge_unload<C>();
}

TEST_CASE_TEMPLATE("GraLoRA, GLoRA: the adapted model starts at the base model", C, ALL_CASES) {
  checks::starts_at_base<C>();
}

TEST_CASE_TEMPLATE("GraLoRA, GLoRA: save, load, same logits; counts from shapes", C, ALL_CASES) {
  const auto count = checks::save_load_and_count<C>("granular");
  CHECK(count.frozen == 0);
}

TEST_CASE("GraLoRA: ΔW block (j, n) is A_n's j-th column group times B_j's n-th row group") {
  peft::GraloraConfig c = GraloraCase::config();
  c.init_weights = false;
  c.targets.target_modules.names = {"down_proj"};  // [8, 12]: blocks [4, 6], sub-rank 2
  Decoder<peft::arch::Llama, peft::GraLoRA, double> model(test_support::tiny_llama(), c, 4);
  const auto params = model.adapter().parameters();
  const Tensor<double>&a = params[0].var.value(), &b = params[1].var.value();
  const peft::RowMatrix<double> before = model.linear_modules()[6]->weight_out_in();
  REQUIRE(model.linear_modules()[6]->name == "model.layers.0.mlp.down_proj");
  model.merge();
  const peft::RowMatrix<double> delta = model.linear_modules()[6]->weight_out_in() - before;
  double worst = 0;
  for (int o = 0; o < 8; ++o)
    for (int i = 0; i < 12; ++i) {
      const int j = o / 4, n = i / 6;
      double sum = 0;
      for (int t = 0; t < 2; ++t)  // a[n, i % 6, j·2 + t] · b[j, n·2 + t, o % 4]
        sum += a[(n * 6 + i % 6) * 4 + j * 2 + t] * b[(j * 4 + n * 2 + t) * 4 + o % 4];
      worst = std::max(worst, std::abs(delta(o, i) - 2.0 * sum));  // scaling 8 / 4
    }
  CHECK(worst < 1e-13);
}

TEST_CASE("GraLoRA, GLoRA: config errors name the field") {
  peft::GraloraConfig g = GraloraCase::config();
  g.r = 3;
  CHECK_THROWS_WITH_AS(g.validate("adapter_config.json"),
                       doctest::Contains("field 'r': expected a multiple of gralora_k (2)"),
                       peft::ConfigError);
  g.r = 6;
  g.gralora_k = 3;  // q_proj [8, 8]
  using GraModel = Decoder<peft::arch::Llama, peft::GraLoRA, double>;
  CHECK_THROWS_WITH_AS(GraModel(test_support::tiny_llama(), g, 1),
                       doctest::Contains("gralora_k (3) must divide both sides"),
                       peft::ConfigError);
  nlohmann::json j = GloraCase::config().to_json(test_support::tiny_llama());
  j["config_C"] = "constant";
  CHECK_THROWS_WITH_AS(peft::GloraConfig::from_json(j, "adapter_config.json"),
                       doctest::Contains("field 'config_C': expected one of \"lora\" \"vector\""),
                       peft::ConfigError);
}

TEST_CASE("GraLoRA, GLoRA: the reference's cases and count lines") {
  const std::filesystem::path root = std::filesystem::path(PEFT_TEST_DATA_DIR) / "golden_methods";
  for (const char* name : {"llama_gralora", "llama_gralora_hybrid", "gpt2_gralora", "llama_glora",
                           "llama_glora_vector", "llama_glora_constant"}) {
    INFO(std::string(name));
    peft::testing::GoldenReport report;
    peft::testing::run_golden_case_throwing<Registry>(root / name, report);
    for (const auto& c : report.checks)
      MESSAGE(std::string(name) << " " << c.name << ": " << c.error << " (tolerance " << c.tolerance
                                << ")");
    CHECK(report.checks.size() > 3);
    CHECK(report.passed);
    // The config we write has the reference's fields, with its values (target_modules aside:
    // the reference writes a set, in no fixed order; peft_version, auto_mapping and task_type
    // are metadata).
    const auto reference = peft::io::load_json(root / name / "adapter" / "adapter_config.json");
    const auto model = peft::ModelConfig::from_json(
        peft::io::load_json(root / name / ".." / "models" /
                            (std::string(name).starts_with("gpt2") ? "gpt2-small" : "llama-small") /
                            "config.json"),
        "config.json");
    const nlohmann::json ours =
        std::string(name).find("glora_") != std::string::npos || std::string(name) == "llama_glora"
            ? peft::GloraConfig::from_json(reference, name).to_json(model)
            : peft::GraloraConfig::from_json(reference, name).to_json(model);
    for (const auto& item : ours.items()) {
      // Named locals, not a structured binding: clang 14 (the sanitizer build's compiler) does
      // not let doctest's INFO lambda capture a binding.
      const std::string key = item.key();
      const nlohmann::json& value = item.value();
      if (key != "target_modules" && key != "peft_version" && key != "auto_mapping" &&
          key != "task_type") {
        INFO(key);
        CHECK(reference.contains(key));
        if (reference.contains(key)) CHECK(reference[key] == value);
      }
    }
  }
  int rows = 0;
  for (const auto& row : peft::io::load_json(root / "counts.json")) {
    const std::string type = row["adapter_config"]["peft_type"].get<std::string>();
    if (type != "GRALORA" && type != "GLORA") continue;
    INFO(row["model"].get<std::string>() << " " << type);
    const auto [trainable, all] = peft::commands::count_from_configs<Registry>(
        row["model_config"], "model_config", row["adapter_config"], "adapter_config");
    CHECK(peft::trainable_parameters_line(trainable, all) == row["line"].get<std::string>());
    ++rows;
  }
  CHECK(rows == 5);
}

#undef METHOD_CASES
#undef ALL_CASES
}  // namespace test_granular_and_general
