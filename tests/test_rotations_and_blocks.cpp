// RoAd (2-D rotations and scales of paired output features: road_1, road_2, road_4) and DeLoRA
// (a normalised low-rank update with a learnable boundary and the base weight's column norms).
// For every method: its model's finite-difference gradients in double, merge → unmerge restores
// the base (weights and biases), save → load → the same logits, the start at the base model where
// the method promises it, counts from shapes equal to the attached tensors; RoAd's merged R a
// rotation per pair (road_1, α = 1), DeLoRA's ‖ΔW‖_F within its boundary and its captured norms;
// the configs' errors; the reference's counts for LLaMA-7B.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <peft/commands/count.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_rotations_and_blocks {

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
peft::TargetRules targets() { return test_support::both_model_targets(); }

// start: 0 = bit-exact, 2 = not at the base (a random init).
struct RoadCase {
  using Policy = peft::RoAd;
  static constexpr const char* name = "road_1";
  static constexpr int start = 0;  // θ = 0, α = 1: y ⊙ 1 + rot(y) ⊙ 0
  static peft::RoadConfig config() {
    peft::RoadConfig c;
    c.group_size = 4;
    c.targets = targets();
    return c;
  }
};
struct Road2Case {
  using Policy = peft::RoAd;
  static constexpr const char* name = "road_2, random init";
  static constexpr int start = 2;
  static peft::RoadConfig config() {
    peft::RoadConfig c = RoadCase::config();
    c.variant = peft::RoadConfig::Variant::Road2;
    c.init_weights = false;
    return c;
  }
};
struct Road4Case {
  using Policy = peft::RoAd;
  static constexpr const char* name = "road_4, groups of 2";
  static constexpr int start = 0;
  static peft::RoadConfig config() {
    peft::RoadConfig c = RoadCase::config();
    c.variant = peft::RoadConfig::Variant::Road4;
    c.group_size = 2;
    return c;
  }
};
struct DeloraCase {
  using Policy = peft::DeLoRA;
  static constexpr const char* name = "delora";
  static constexpr int start = 0;  // B = 0
  static peft::DeloraConfig config() {
    peft::DeloraConfig c;
    c.r = 2;
    c.delora_lambda = 3;
    c.targets = targets();
    return c;
  }
};
struct DeloraPatternCase {
  using Policy = peft::DeLoRA;
  static constexpr const char* name = "delora, patterns, random init";
  static constexpr int start = 2;
  static peft::DeloraConfig config() {
    peft::DeloraConfig c = DeloraCase::config();
    c.init_weights = false;
    c.rank_pattern = peft::PatternMap<int>({{"v_proj", 1}, {"c_fc", 3}});
    c.lambda_pattern = peft::PatternMap<double>({{"down_proj", 0.5}});
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;

#define METHOD_CASES(Arch)                                                                    \
  Case<Arch, RoadCase>, Case<Arch, Road2Case>, Case<Arch, Road4Case>, Case<Arch, DeloraCase>, \
      Case<Arch, DeloraPatternCase>
#define ALL_CASES METHOD_CASES(peft::arch::Gpt2), METHOD_CASES(peft::arch::Llama)

using test_support::case_name;
using test_support::make_model;
using test_support::ModelOf;
namespace checks = test_support::method_checks;

}  // namespace

TEST_CASE_TEMPLATE("rotations and blocks: analytic gradients match finite differences", C,
                   ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("rotations and blocks: merge and unmerge", C, ALL_CASES) {
  checks::merge_unmerge_unload<C>();
}

TEST_CASE_TEMPLATE("rotations and blocks: the adapted model starts at the base model", C,
                   ALL_CASES) {
  checks::starts_at_base<C>();
}

TEST_CASE_TEMPLATE("rotations and blocks: save, load, same logits; counts from shapes", C,
                   METHOD_CASES(peft::arch::Llama)) {
  checks::save_load_and_count<C>("rotations");
}

TEST_CASE("RoAd road_1 with α = 1: the merged R rotates each pair of W's rows, norms kept") {
  peft::RoadConfig c;
  c.group_size = 4;
  c.targets.target_modules.names = {"q_proj"};
  Decoder<peft::arch::Llama, peft::RoAd, double> model(test_support::tiny_llama(), c, 3);
  auto params = model.adapter().parameters();
  REQUIRE(params.size() == 4);  // θ and α of two layers' q_proj
  std::mt19937_64 rng(4);
  std::uniform_real_distribution<double> u(-3.0, 3.0);
  for (auto& p : params)
    if (p.name.ends_with("road_theta"))
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i) p.var.value()[i] = u(rng);
  auto* q = model.linear_modules()[0];
  const peft::RowMatrix<double> w = q->weight_out_in();
  const Tensor<double> theta = params[0].var.value();
  model.merge();
  const peft::RowMatrix<double> merged = q->weight_out_in();
  // Pair (i, i + 2) of each group of 4 shares θ[group · 2 + i % 2]: [c −s; s c] on the two rows.
  for (std::int64_t i = 0; i < q->out_features; ++i) {
    if (i % 4 >= 2) continue;
    const double t = theta[i / 4 * 2 + i % 2];
    const auto first = std::cos(t) * w.row(i) - std::sin(t) * w.row(i + 2);
    const auto second = std::sin(t) * w.row(i) + std::cos(t) * w.row(i + 2);
    CHECK((merged.row(i) - first).cwiseAbs().maxCoeff() < 1e-14);
    CHECK((merged.row(i + 2) - second).cwiseAbs().maxCoeff() < 1e-14);
    CHECK(std::abs(merged.row(i).squaredNorm() + merged.row(i + 2).squaredNorm() -
                   w.row(i).squaredNorm() - w.row(i + 2).squaredNorm()) < 1e-13);
  }
}

TEST_CASE("DeLoRA: delora_w_norm holds W's column norms, ‖ΔW‖_F stays within λ · max norm") {
  peft::DeloraConfig c;
  c.r = 3;
  c.delora_lambda = 2.5;
  c.init_weights = false;
  c.targets.target_modules.names = {"down_proj"};
  Decoder<peft::arch::Llama, peft::DeLoRA, double> model(test_support::tiny_llama(), c, 6);
  perturb_adapter(model, 8, 1.0);
  auto* down = model.linear_modules()[6];
  REQUIRE(down->name.ends_with("down_proj"));
  const peft::RowMatrix<double> w = down->weight_out_in();
  const auto params = model.adapter().parameters();
  REQUIRE(params[3].name.ends_with("delora_w_norm"));
  CHECK(!params[3].var.requires_grad());
  for (std::int64_t j = 0; j < down->in_features; ++j)
    CHECK(std::abs(params[3].var.value()[j] - w.col(j).norm()) < 1e-14);
  const double lambda = params[2].var.value()[0];
  model.merge();
  const double delta = (down->weight_out_in() - w).norm();
  CHECK(delta > 0);
  CHECK(delta <= std::abs(lambda) * params[3].var.value().vector().maxCoeff() * (1 + 1e-12));
}

TEST_CASE("RoAd and DeLoRA: their configs' errors") {
  using Model = Decoder<peft::arch::Llama, peft::RoAd, double>;
  peft::RoadConfig c;
  c.targets.target_modules.names = {"q_proj"};
  c.group_size = 3;
  CHECK_THROWS_WITH_AS(c.validate("adapter_config.json"),
                       doctest::Contains("group_size: expected an even value, found 3"),
                       peft::ConfigError);
  c.group_size = 16;  // q_proj has 8 outputs
  CHECK_THROWS_WITH_AS(Model(test_support::tiny_llama(), c, 1),
                       doctest::Contains("divide model.layers.0.self_attn.q_proj's out_features"),
                       peft::ConfigError);
  nlohmann::json j = {{"peft_type", "ROAD"}, {"variant", "road_3"}, {"target_modules", {"q"}}};
  CHECK_THROWS_WITH_AS(peft::RoadConfig::from_json(j, "adapter_config.json"),
                       doctest::Contains("variant"), peft::ConfigError);
  nlohmann::json d = {{"peft_type", "DELORA"}, {"r", 0}, {"target_modules", {"q"}}};
  CHECK_THROWS_WITH_AS(peft::DeloraConfig::from_json(d, "adapter_config.json"),
                       doctest::Contains("field 'r': expected a positive value"),
                       peft::ConfigError);
  d["r"] = 2;
  d["bias"] = "all";
  CHECK_THROWS_WITH_AS(peft::DeloraConfig::from_json(d, "adapter_config.json"),
                       doctest::Contains("bias"), peft::ConfigError);
}

TEST_CASE("peft count: the reference's lines for RoAd and DeLoRA on LLaMA-7B") {
  const auto rows = peft::io::load_json(std::filesystem::path(PEFT_TEST_DATA_DIR) /
                                        "golden_methods" / "counts.json");
  int seen = 0;
  for (const auto& row : rows) {
    const std::string type = row["adapter_config"]["peft_type"].get<std::string>();
    if (type != "ROAD" && type != "DELORA") continue;
    INFO(row["model"].get<std::string>() << " " << type);
    const auto [trainable, all] = peft::commands::count_from_configs(
        row["model_config"], "model_config", row["adapter_config"], "adapter_config");
    CHECK(peft::trainable_parameters_line(trainable, all) == row["line"].get<std::string>());
    ++seen;
  }
  CHECK(seen == 3);
}

#undef METHOD_CASES
#undef ALL_CASES
}  // namespace test_rotations_and_blocks
