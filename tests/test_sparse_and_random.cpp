// RandLoRA (shared random bases, trainable diagonals), SHiRA (a sparse random mask of each
// weight) and HiRA (W₀ ⊙ B A). For every method: its model's finite-difference gradients in
// double, merge → unmerge restores the base, save → load → the same logits, the start at the
// base model where the method promises it, counts from shapes equal to the attached tensors;
// the reference's random draws reproduced bit for bit (RandLoRA's bases, SHiRA's mask, against
// the files the reference wrote: tests/data/golden_methods), each update against its definition
// built by hand, and the reference's count lines.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <peft/commands/count.hpp>
#include <peft/methods/reparameterized/hira.hpp>
#include <peft/methods/reparameterized/randlora.hpp>
#include <peft/methods/selective/shira.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <set>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_sparse_and_random {

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

const std::filesystem::path golden_dir =
    std::filesystem::path(PEFT_TEST_DATA_DIR) / "golden_methods";

// start: 0 = bit-exact, 2 = not at the base (a random init).
struct RandLoraCase {
  using Policy = peft::RandLoRA;
  static constexpr const char* name = "randlora";
  static constexpr int start = 0;
  static peft::RandLoraConfig config() {
    peft::RandLoraConfig c;
    c.r = 3;  // ⌈8 / 3⌉ = 3 bases on the 8-wide side: a remainder
    c.randlora_alpha = 6;
    c.projection_prng_key = 4;
    c.targets = targets();
    return c;
  }
};
struct RandLoraSparseCase {
  using Policy = peft::RandLoRA;
  static constexpr const char* name = "randlora sparse, init_weights false";
  static constexpr int start = 2;
  static peft::RandLoraConfig config() {
    peft::RandLoraConfig c = RandLoraCase::config();
    c.sparse = true;
    c.init_weights = false;
    return c;
  }
};
struct ShiraCase {
  using Policy = peft::SHiRA;
  static constexpr const char* name = "shira";
  static constexpr int start = 0;
  static peft::ShiraConfig config() {
    peft::ShiraConfig c;
    c.r = 1;
    c.targets = targets();
    return c;
  }
};
struct ShiraRandomCase {
  using Policy = peft::SHiRA;
  static constexpr const char* name = "shira seeded, init_weights false";
  static constexpr int start = 2;
  static peft::ShiraConfig config() {
    peft::ShiraConfig c = ShiraCase::config();
    c.r = 2;
    c.random_seed = 5;
    c.init_weights = false;
    return c;
  }
};
struct HiraCase {
  using Policy = peft::HiRA;
  static constexpr const char* name = "hira";
  static constexpr int start = 0;
  static peft::HiraConfig config() {
    peft::HiraConfig c;
    c.r = 2;
    c.targets = targets();
    return c;
  }
};
struct HiraGaussianCase {
  using Policy = peft::HiRA;
  static constexpr const char* name = "hira gaussian, a rank pattern (ignored, as the reference)";
  static constexpr int start = 0;
  static peft::HiraConfig config() {
    peft::HiraConfig c = HiraCase::config();
    c.init = peft::HiraConfig::Init::Gaussian;
    c.rank_pattern = peft::PatternMap<int>(std::map<std::string, int>{{"down_proj", 3}}, "test");
    return c;
  }
};
struct HiraRandomCase {
  using Policy = peft::HiRA;
  static constexpr const char* name = "hira init_weights false";
  static constexpr int start = 2;
  static peft::HiraConfig config() {
    peft::HiraConfig c = HiraCase::config();
    c.init = peft::HiraConfig::Init::Random;
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;

#define SPARSE_RANDOM_CASES(Arch)                                                      \
  Case<Arch, RandLoraCase>, Case<Arch, RandLoraSparseCase>, Case<Arch, ShiraCase>,     \
      Case<Arch, ShiraRandomCase>, Case<Arch, HiraCase>, Case<Arch, HiraGaussianCase>, \
      Case<Arch, HiraRandomCase>
#define ALL_CASES SPARSE_RANDOM_CASES(peft::arch::Gpt2), SPARSE_RANDOM_CASES(peft::arch::Llama)

using test_support::case_name;
using test_support::make_model;
using test_support::ModelOf;
namespace checks = test_support::method_checks;

/// The adapter config of a golden case, read by the policy.
template <class P>
typename P::Config golden_config(const std::string& name) {
  return P::Config::from_json(
      peft::io::load_json(golden_dir / name / "adapter" / "adapter_config.json"), name);
}

}  // namespace

TEST_CASE_TEMPLATE("sparse and random methods: analytic gradients match finite differences", C,
                   ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("sparse and random methods: merge and unmerge", C, ALL_CASES) {
  checks::merge_unmerge_unload<C>();
}

TEST_CASE_TEMPLATE("sparse and random methods: the adapted model starts at the base model", C,
                   ALL_CASES) {
  checks::starts_at_base<C>();
}

TEST_CASE_TEMPLATE("sparse and random methods: save, load, same logits; counts from shapes", C,
                   ALL_CASES) {
  const auto count = checks::save_load_and_count<C>("sparse_and_random");
  CHECK(count.frozen == 0);  // the bases and the indices are buffers, as the reference counts
}

TEST_CASE("RandLoRA: the shared bases are the reference's, bit for bit") {
  // The reference's files (scripts/gen_method_cases.py) hold the bases it drew with
  // torch.Generator(projection_prng_key): bf16 kaiming draws / std (dense), ternary ones
  // (sparse); the library draws its own and compares them before loading anything.
  for (const char* name : {"llama_randlora", "gpt2_randlora", "llama_randlora_sparse"}) {
    INFO(name);
    const auto file = peft::io::SafetensorsFile::open(golden_dir / name / "adapter" /
                                                      "adapter_model.safetensors");
    const auto config = golden_config<peft::RandLoRA>(name);
    const auto model_json = peft::io::load_json(golden_dir / name / "case.json");
    const bool gpt2 = std::string(name).starts_with("gpt2");
    auto check_bases = [&](const auto& state) {
      for (const auto& [key, var] : {std::pair{"base_model.randlora_A", state.bases_a()},
                                     std::pair{"base_model.randlora_B", state.bases_b()}}) {
        const auto& info = file.info(key);
        REQUIRE(peft::Shape(info.shape.begin(), info.shape.end()) == var.shape());
        const std::vector<float> reference = file.read<float>(key);
        CHECK(std::equal(reference.begin(), reference.end(), var.value().values().begin(),
                         var.value().values().end()));
      }
    };
    const auto dir = golden_dir / "models" / (gpt2 ? "gpt2-small" : "llama-small");
    if (gpt2)
      check_bases(Decoder<peft::arch::Gpt2, peft::RandLoRA, float>::load(dir, config).adapter());
    else
      check_bases(Decoder<peft::arch::Llama, peft::RandLoRA, float>::load(dir, config).adapter());
    (void)model_json;
  }
}

TEST_CASE("SHiRA: the mask is the reference's, and the update its sparse matrix") {
  const auto config = golden_config<peft::SHiRA>("llama_shira");
  const auto file = peft::io::SafetensorsFile::open(golden_dir / "llama_shira" / "adapter" /
                                                    "adapter_model.safetensors");
  auto model = Decoder<peft::arch::Llama, peft::SHiRA, double>::load(
      golden_dir / "models/llama-small", config);
  int indices = 0;
  for (const auto& p : model.adapter().parameters()) {
    if (!p.name.ends_with(".shira_indices")) continue;
    ++indices;
    INFO(p.name);
    // int32, as the reference writes them; loaded exactly into the frozen double tensor.
    CHECK(file.info(p.name).dtype == peft::io::Dtype::I32);
    const std::vector<std::int64_t> reference = file.read<std::int64_t>(p.name);
    CHECK(std::equal(reference.begin(), reference.end(), p.var.value().values().begin(),
                     p.var.value().values().end(),
                     [](std::int64_t a, double b) { return static_cast<double>(a) == b; }));
    // Row-major order (torch.where of the mask): strictly ascending flat positions.
    const std::int64_t k = p.var.shape()[1];
    for (std::int64_t j = 1; j < k; ++j)
      CHECK(p.var.value()[j - 1] * 1000 + p.var.value()[k + j - 1] <
            p.var.value()[j] * 1000 + p.var.value()[k + j]);
  }
  CHECK(indices == 4);
  // Integers are read only where the adapter holds indices: a trained tensor stored as I32 is
  // something else than a weight, and refused.
  peft::io::SafetensorsWriter odd;
  for (const auto& info : file.tensors())
    if (info.name.ends_with(".shira_weight"))
      odd.add<std::int64_t>(info.name, info.shape, std::vector<std::int64_t>(info.numel(), 1),
                            peft::io::Dtype::I32);
    else
      odd.add_raw(info.name, info.dtype, info.shape, file.raw_bytes(info.name));
  const auto odd_file = peft::io::SafetensorsFile::from_bytes(odd.to_bytes(), "odd.safetensors");
  CHECK_THROWS_WITH_AS(peft::io::load_adapter_tensors(model.adapter().parameters(), odd_file),
                       doctest::Contains("has dtype I32, cannot be read as double"),
                       peft::FileError);
  // ΔW from the merge has exactly the values at the mask and zeros elsewhere.
  perturb_adapter(model, 2);
  std::vector<Tensor<double>> before;
  for (auto* lin : model.linear_modules()) before.push_back(lin->weight.value());
  model.merge();
  const auto params = model.adapter().parameters();
  const auto* q = model.linear_modules()[0];
  const peft::RowMatrix<double> d = q->weight.value().matrix() - before[0].matrix();
  const Tensor<double>& v = params[0].var.value();
  const Tensor<double>& idx = params[1].var.value();
  peft::RowMatrix<double> expected = peft::RowMatrix<double>::Zero(d.rows(), d.cols());
  for (std::int64_t j = 0; j < v.numel(); ++j)
    expected(std::int64_t(idx[j]), std::int64_t(idx[v.numel() + j])) = v[j];
  CHECK((d - expected).cwiseAbs().maxCoeff() < 1e-15);
  CHECK(v.numel() == 2 * (q->in_features + q->out_features));
}

TEST_CASE("HiRA: the forward equals x (W₀ + W₀ ⊙ B A)ᵀ + b built by hand") {
  peft::HiraConfig c;
  c.r = 2;
  c.init = peft::HiraConfig::Init::Random;
  c.targets.target_modules.names = {"c_attn"};
  Decoder<peft::arch::Gpt2, peft::HiRA, double> model(test_support::tiny_gpt2(), c, 4);
  Decoder<peft::arch::Gpt2, peft::NoPeft, double> base(test_support::tiny_gpt2(), {}, 4);
  const auto params = model.adapter().parameters();
  REQUIRE(params.size() == 4);  // two layers' A, B
  for (std::size_t layer = 0; layer < 2; ++layer) {
    const auto& a = params[2 * layer].var.value();
    const auto& b = params[2 * layer + 1].var.value();
    for (auto* lin : base.linear_modules())
      if (lin->name == "transformer.h." + std::to_string(layer) + ".attn.c_attn") {
        const peft::RowMatrix<double> w = lin->weight_out_in();
        const peft::RowMatrix<double> ba = b.matrix() * a.matrix();
        lin->add_to_weight(w.cwiseProduct(ba));
      }
  }
  CHECK(max_abs_diff(model.logits(padded_batch()), base.logits(padded_batch())) < 1e-12);
}

TEST_CASE("sparse and random methods: refusals name the field") {
  peft::ShiraConfig s;
  s.r = 4;  // 4 · (8 + 8) = 64 of q_proj's 64 entries: allowed; 5 is not
  s.targets.target_modules.names = {"q_proj"};
  using Shira = Decoder<peft::arch::Llama, peft::SHiRA, double>;
  CHECK_NOTHROW(Shira(test_support::tiny_llama(), s, 1));
  s.r = 5;
  CHECK_THROWS_WITH_AS(Shira(test_support::tiny_llama(), s, 1), doctest::Contains("which has 64"),
                       peft::ConfigError);
  nlohmann::json j = s.to_json(test_support::tiny_llama());
  CHECK(j["random_seed"] == peft::ShiraConfig::torch_default_seed);
  j["mask_type"] = "custom";
  CHECK_THROWS_AS(peft::ShiraConfig::from_json(j, "adapter_config.json"), peft::ConfigError);
  j = nlohmann::json{
      {"peft_type", "HIRA"}, {"target_modules", {"q_proj"}}, {"init_weights", "pissa"}};
  CHECK_THROWS_WITH_AS(peft::HiraConfig::from_json(j, "adapter_config.json"),
                       doctest::Contains("init_weights"), peft::ConfigError);
}

TEST_CASE("peft count: the reference's RandLoRA, SHiRA and HiRA lines for LLaMA-7B and GPT-2") {
  const auto rows = peft::io::load_json(golden_dir / "counts.json");
  std::set<std::string> seen;
  for (const auto& row : rows) {
    const std::string type = row["adapter_config"]["peft_type"].get<std::string>();
    if (type != "RANDLORA" && type != "SHIRA" && type != "HIRA") continue;
    seen.insert(row["model"].get<std::string>() + " " + type);
    INFO(row["model"].get<std::string>() << " " << type);
    const auto [trainable, all] = peft::commands::count_from_configs(
        row["model_config"], "model_config", row["adapter_config"], "adapter_config");
    CHECK(peft::trainable_parameters_line(trainable, all) == row["line"].get<std::string>());
  }
  CHECK(seen == std::set<std::string>{"llama-7b RANDLORA", "llama-7b SHIRA", "llama-7b HIRA",
                                      "gpt2-124m RANDLORA", "gpt2-124m HIRA"});
}

#undef SPARSE_RANDOM_CASES
#undef ALL_CASES
}  // namespace test_sparse_and_random
