// AdapterFusion (AdapterHub's method, not in HF peft: no reference cases). Checked against the
// paper's formula computed token by token here (q = Q x + b_Q, k_n = K a_n + b_K, v_n = V a_n,
// s = softmax(q·k), out = Σ s_n v_n + x), the finite-difference gradients of the whole tiny
// model in double, frozen adapters (no gradient, no optimizer state, unchanged by a step),
// V = I with equal adapters giving the single adapter, save → load → the same logits (adapters
// drawn from seeds and adapters loaded from their own folders), counts from shapes, and the
// config's errors.
#include <doctest/doctest.h>

#include <filesystem>
#include <peft/commands/count.hpp>
#include <peft/peft.hpp>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_adapter_fusion {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::Tape;
using peft::Tensor;
using test_support::max_abs_diff;
using test_support::padded_batch;
using test_support::scratch_dir;
using test_support::tiny_config;

template <class Config>
Config random_members(Config c, int n, std::int64_t width = 4) {
  for (int i = 0; i < n; ++i) {
    typename Config::Member m;
    m.config.bottleneck_size = width;
    m.seed = 100 + i;
    c.adapters.push_back(m);
  }
  return c;
}

struct DynamicCase {  // AdapterHub's "dynamic" defaults, two Pfeiffer adapters
  using Policy = peft::AdapterFusion;
  static constexpr const char* name = "adapter fusion dynamic";
  static Policy::Config config() { return random_members(Policy::Config{}, 2); }
};
struct StaticSerialCase {  // "static" (no V), three serial adapters, ReLU and tanh
  using Policy = peft::SerialAdapterFusion;
  static constexpr const char* name = "serial adapter fusion static";
  static Policy::Config config() {
    Policy::Config c = random_members(Policy::Config{}, 3, 2);
    c.adapters[1].config.activation = peft::detail::Activation::Tanh;
    c.value = c.value_initialized = c.regularization = false;
    return c;
  }
};
struct OptionsCase {  // the cheap options: residual before, V after the mix, no query; block 1
  using Policy = peft::AdapterFusion;
  static constexpr const char* name = "adapter fusion options";
  static Policy::Config config() {
    Policy::Config c = random_members(Policy::Config{}, 2, 3);
    for (auto& m : c.adapters) m.config.layers_to_transform = {1};
    c.residual_before = true;
    c.value_before_softmax = false;
    c.query = false;
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;
#define METHOD_CASES(Arch) \
  Case<Arch, DynamicCase>, Case<Arch, StaticSerialCase>, Case<Arch, OptionsCase>
#define ALL_CASES METHOD_CASES(peft::arch::Gpt2), METHOD_CASES(peft::arch::Llama)
namespace checks = test_support::method_checks;

using Vector = Eigen::VectorXd;
using Matrix = Eigen::MatrixXd;

Matrix matrix_of(const Tensor<double>& t) {
  const std::int64_t cols = t.shape().back(), rows = t.numel() / cols;
  Matrix m(rows, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) m(i, j) = t[i * cols + j];
  return m;
}

/// The tensor named `suffix` among `params` (the first whose name ends with it).
Tensor<double> named(const std::vector<peft::NamedParameter<double>>& params,
                     const std::string& suffix) {
  for (const auto& p : params)
    if (p.name.size() >= suffix.size() &&
        p.name.compare(p.name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return p.var.value();
  FAIL("no tensor " << suffix);
  return {};
}

}  // namespace

TEST_CASE_TEMPLATE("AdapterFusion: analytic gradients match finite differences", C, ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("AdapterFusion: save, load, same logits; counts from shapes", C, ALL_CASES) {
  const peft::ParameterCount count = checks::save_load_and_count<C>("adapter_fusion");
  auto model = test_support::make_model<C, double>();
  std::int64_t frozen = 0;
  for (std::size_t n = 0; n < C::Method::config().adapters.size(); ++n)
    for (const auto& p : model.adapter().adapter_parameters(n)) {
      CHECK(!p.var.requires_grad());
      frozen += p.var.value().numel();
    }
  CHECK(count.frozen == frozen);
}

TEST_CASE("AdapterFusion: the regulariser 0.01 Σ ‖I − V‖², and its gradient") {
  using Arch = peft::arch::Llama;
  Decoder<Arch, peft::AdapterFusion, double> model(tiny_config<Arch>(), DynamicCase::config(), 3);
  test_support::perturb_adapter(model, 4, 0.1);
  double expected = 0;
  for (const auto& p : model.adapter().parameters())
    if (p.name.find(".value.weight") != std::string::npos) {
      const Matrix v = matrix_of(p.var.value());
      expected += 0.01 * (v - Matrix::Identity(v.rows(), v.cols())).squaredNorm();
    }
  CHECK(expected > 0);
  Tape<double> tape(false);
  CHECK(model.adapter().extra_loss(tape).value()[0] == doctest::Approx(expected).epsilon(1e-13));
  std::vector<peft::Var<double>> inputs;
  for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
  const auto result = peft::testing::check_gradients(
      [&](Tape<double>& t, std::vector<peft::Var<double>>&) {
        return model.adapter().extra_loss(t);
      },
      inputs, {});
  INFO(result.message);
  CHECK(result.ok);
}

TEST_CASE_TEMPLATE("AdapterFusion: the frozen adapters get no gradient, no optimizer state", Arch,
                   peft::arch::Gpt2, peft::arch::Llama) {
  Decoder<Arch, peft::SerialAdapterFusion, double> model(tiny_config<Arch>(),
                                                         StaticSerialCase::config(), 3);
  std::vector<std::vector<Tensor<double>>> before(3);
  for (std::size_t n = 0; n < 3; ++n)
    for (const auto& p : model.adapter().adapter_parameters(n)) before[n].push_back(p.var.value());
  peft::AdamWOptions options;
  options.lr = 1e-2;
  peft::AdamW<double> optimizer(model.trainable_parameters(), options);
  std::int64_t fusion = 0;
  for (const auto& p : model.adapter().parameters()) fusion += p.var.value().numel();
  CHECK(optimizer.first_moments().size() == model.adapter().parameters().size());
  CHECK(optimizer.state_bytes() == 2 * sizeof(double) * static_cast<std::size_t>(fusion));
  for (int step = 0; step < 2; ++step) {
    optimizer.zero_grad();
    Tape<double> tape;
    auto out = model.forward(tape, padded_batch());
    tape.backward(out.loss);
    for (std::size_t n = 0; n < 3; ++n)
      for (const auto& p : model.adapter().adapter_parameters(n)) CHECK(!p.var.has_grad());
    optimizer.step();
  }
  for (std::size_t n = 0; n < 3; ++n) {
    const auto params = model.adapter().adapter_parameters(n);
    for (std::size_t i = 0; i < params.size(); ++i)
      CHECK(params[i].var.value().values() == before[n][i].values());
  }
}

TEST_CASE_TEMPLATE("AdapterFusion: V = I and equal adapters give the single adapter", Arch,
                   peft::arch::Gpt2, peft::arch::Llama) {
  peft::AdapterFusion::Config c = random_members(peft::AdapterFusion::Config{}, 3);
  for (auto& m : c.adapters) m.seed = 7;  // three equal adapters
  Decoder<Arch, peft::AdapterFusion, double> fused(tiny_config<Arch>(), c, 5);
  test_support::perturb_adapter(fused, 6);  // any Q, K: the softmax weights sum to 1
  for (auto& p : fused.adapter().parameters())
    if (p.name.find(".value.weight") != std::string::npos) {
      const std::int64_t d = p.var.value().dim(0);
      for (std::int64_t i = 0; i < d * d; ++i) p.var.value()[i] = i % (d + 1) == 0 ? 1.0 : 0.0;
    }
  Decoder<Arch, peft::PfeifferAdapter, double> single(tiny_config<Arch>(), c.adapters[0].config, 5);
  const auto from = fused.adapter().adapter_parameters(0);
  auto to = single.adapter().parameters();
  REQUIRE(from.size() == to.size());
  for (std::size_t i = 0; i < to.size(); ++i) {
    CHECK(from[i].name == to[i].name);
    to[i].var.value() = from[i].var.value();
  }
  CHECK(max_abs_diff(fused.logits(padded_batch()), single.logits(padded_batch())) < 1e-12);
}

TEST_CASE("AdapterFusion: the MLP output is the paper's formula, token by token") {
  using Arch = peft::arch::Gpt2;
  peft::AdapterFusion::Config c = random_members(peft::AdapterFusion::Config{}, 3);
  c.adapters[2].config.activation = peft::detail::Activation::Tanh;
  Decoder<Arch, peft::AdapterFusion, double> model(tiny_config<Arch>(), c, 5);
  test_support::perturb_adapter(model, 8);
  auto& state = model.adapter();
  const auto fusion = state.parameters();
  const std::string at = "transformer.h.1.mlp_adapter.adapter_fusion_layer.";
  const Matrix q = matrix_of(named(fusion, at + "query.weight")),
               k = matrix_of(named(fusion, at + "key.weight")),
               v = matrix_of(named(fusion, at + "value.weight"));
  const Vector bq = matrix_of(named(fusion, at + "query.bias")).transpose(),
               bk = matrix_of(named(fusion, at + "key.bias")).transpose();
  Tensor<double> x_tensor(peft::Shape{2, 3, 8});
  for (std::int64_t i = 0; i < x_tensor.numel(); ++i) x_tensor[i] = std::sin(0.7 * double(i) + 1);
  Tape<double> tape(false);
  const peft::Var<double> x(x_tensor);
  const Matrix out = matrix_of(state.after_mlp(tape, 1, x, x).value());
  const Matrix xs = matrix_of(x_tensor);
  for (Eigen::Index t = 0; t < xs.rows(); ++t) {
    const Vector h = xs.row(t).transpose();
    std::vector<Vector> a;
    for (std::size_t n = 0; n < 3; ++n) {
      const auto p = state.adapter_parameters(n);
      const std::string site = "transformer.h.1.mlp_adapter.";
      const Matrix d = matrix_of(named(p, site + "down.weight")),
                   u = matrix_of(named(p, site + "up.weight"));
      const Vector bd = matrix_of(named(p, site + "down.bias")).transpose(),
                   bu = matrix_of(named(p, site + "up.bias")).transpose();
      Vector z = d * h + bd;
      for (Eigen::Index i = 0; i < z.size(); ++i)
        z(i) = n == 2 ? std::tanh(z(i)) : std::max(z(i), 0.0);
      a.push_back(u * z + bu);
    }
    const Vector query = q * h + bq;
    Vector score(3);
    for (int n = 0; n < 3; ++n) score(n) = query.dot(k * a[n] + bk);
    const Vector s =
        (score.array() - score.maxCoeff()).exp() / (score.array() - score.maxCoeff()).exp().sum();
    Vector expected = h;
    for (int n = 0; n < 3; ++n) expected += s(n) * (v * a[n]);
    CHECK((out.row(t).transpose() - expected).cwiseAbs().maxCoeff() < 1e-12);
  }
  // Block 0's query and key start at N(0, 0.02²) and zero biases, V at I + 10⁻⁶ off the diagonal.
  Decoder<Arch, peft::AdapterFusion, double> fresh(tiny_config<Arch>(), c, 5);
  const Matrix v0 =
      matrix_of(named(fresh.adapter().parameters(),
                      "transformer.h.0.mlp_adapter.adapter_fusion_layer.value.weight"));
  CHECK((v0 - Matrix::Identity(8, 8) - Matrix::Constant(8, 8, 1e-6) + 1e-6 * Matrix::Identity(8, 8))
            .cwiseAbs()
            .maxCoeff() == 0.0);
  CHECK(named(fresh.adapter().parameters(), "h.0.mlp_adapter.adapter_fusion_layer.query.bias")
            .vector()
            .isZero());
}

TEST_CASE("AdapterFusion: adapters loaded from their own folders; the fusion folder loads them") {
  using Arch = peft::arch::Llama;
  const auto root = scratch_dir("adapter_fusion", "folders");
  std::vector<std::filesystem::path> dirs;
  for (int n = 0; n < 2; ++n) {  // two trained (here: perturbed) Pfeiffer adapters, saved
    peft::PfeifferAdapter::Config ac;
    ac.bottleneck_size = 4;
    Decoder<Arch, peft::PfeifferAdapter, float> adapter(tiny_config<Arch>(), ac, 30 + n);
    test_support::perturb_adapter(adapter, 40 + n);
    dirs.push_back(root / ("task" + std::to_string(n)));
    peft::save_adapters(adapter, dirs.back());
  }
  peft::AdapterFusion::Config c;
  for (const auto& d : dirs) c.adapters.push_back(peft::AdapterFusion::Config::from_folder(d));
  Decoder<Arch, peft::AdapterFusion, float> model(tiny_config<Arch>(), c, 9);
  test_support::perturb_adapter(model, 10);
  // The adapters hold the saved tensors.
  Decoder<Arch, peft::PfeifferAdapter, float> first(tiny_config<Arch>(), c.adapters[0].config, 1);
  peft::load_adapter_state<peft::PfeifferAdapter>(dirs[0], first.adapter(), first.linear_modules());
  const auto loaded = model.adapter().adapter_parameters(0), saved = first.adapter().parameters();
  REQUIRE(loaded.size() == saved.size());
  for (std::size_t i = 0; i < saved.size(); ++i)
    CHECK(loaded[i].var.value().values() == saved[i].var.value().values());
  // Saved as a fusion folder (fusion tensors only), loaded through the registry's path.
  const auto fusion_dir = root / "fusion";
  peft::save_adapters(model, fusion_dir);
  const auto file = peft::io::SafetensorsFile::open(fusion_dir / "adapter_model.safetensors");
  CHECK(file.tensors().size() == model.adapter().parameters().size());
  const auto json = peft::io::load_json(fusion_dir / "adapter_config.json");
  CHECK(json["adapters"][1]["folder"] ==
        std::filesystem::absolute(dirs[1]).lexically_normal().string());
  const auto config = peft::config_from_json<peft::AdapterFusion::Config>(
      json, (fusion_dir / "adapter_config.json").string());
  Decoder<Arch, peft::AdapterFusion, float> back(tiny_config<Arch>(), config, 9);  // the same base
  peft::load_adapter_state<peft::AdapterFusion>(fusion_dir, back.adapter(), back.linear_modules());
  CHECK(back.logits(padded_batch()).values() == model.logits(padded_batch()).values());
  // A relative folder is read relative to the fusion's config.
  nlohmann::json relative = json;
  relative["adapters"][0]["folder"] = "../task0";
  const auto again = peft::AdapterFusion::Config::from_json(
      relative, (fusion_dir / "adapter_config.json").string());
  CHECK(std::filesystem::equivalent(again.adapters[0].folder, dirs[0]));
  // A folder whose tensors do not have the recorded shapes is refused, naming the tensor.
  relative["adapters"][0]["config"]["bottleneck_size"] = 2;
  const auto wrong = peft::AdapterFusion::Config::from_json(
      relative, (fusion_dir / "adapter_config.json").string());
  CHECK_THROWS_WITH_AS((Decoder<Arch, peft::AdapterFusion, float>(tiny_config<Arch>(), wrong, 1)),
                       doctest::Contains("down.weight"), peft::Error);
  std::filesystem::remove_all(root);
}

TEST_CASE("AdapterFusion: configs refused with the field named; counts on LLaMA-7B") {
  const nlohmann::json member = {{"config", {{"peft_type", "PFEIFFER_ADAPTER"}}}, {"seed", 1}};
  nlohmann::json j = {{"peft_type", "ADAPTER_FUSION"},
                      {"adapter_peft_type", "PFEIFFER_ADAPTER"},
                      {"adapters", {member}}};
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(j, "f.json"),
                       doctest::Contains("f.json: field 'adapters': expected at least 2 adapters "
                                         "to fuse, found 1"),
                       peft::ConfigError);
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::State<float>(peft::AdapterFusion::Config{}),
                       doctest::Contains("at least 2 adapters"), peft::ConfigError);
  j["adapters"].push_back(member);
  CHECK_NOTHROW(peft::AdapterFusion::Config::from_json(j, "f.json"));
  nlohmann::json bad = j;
  bad["temperatur"] = true;
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(bad, "f.json"),
                       doctest::Contains("f.json: unknown field 'temperatur'"), peft::ConfigError);
  bad = j;
  bad["adapters"][1]["sed"] = 2;
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(bad, "f.json"),
                       doctest::Contains("adapters[1]: unknown field 'sed'"), peft::ConfigError);
  bad = j;
  bad["temperature"] = true;
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(bad, "f.json"),
                       doctest::Contains("temperature"), peft::ConfigError);
  bad = j;
  bad["adapters"][1]["config"]["layers_to_transform"] = {0};
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(bad, "f.json"),
                       doctest::Contains("adapters[1]: layers_to_transform differs"),
                       peft::ConfigError);
  bad = j;
  bad["adapters"][1]["config"]["peft_type"] = "SERIAL_ADAPTER";
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(bad, "f.json"),
                       doctest::Contains("expected 'PFEIFFER_ADAPTER'"), peft::ConfigError);
  bad = j;
  bad["adapters"][1] = {{"seed", 3}};
  CHECK_THROWS_WITH_AS(peft::AdapterFusion::Config::from_json(bad, "f.json"),
                       doctest::Contains("expected a 'folder' or a 'config'"), peft::ConfigError);
  CHECK(peft::AdapterFusion::accepts(j));
  CHECK(!peft::SerialAdapterFusion::accepts(j));

  const auto rows = peft::io::load_json(std::filesystem::path(PEFT_TEST_DATA_DIR) /
                                        "golden_methods" / "counts.json");
  nlohmann::json llama;
  for (const auto& row : rows)
    if (row["model"] == "llama-7b") llama = row["model_config"];
  REQUIRE(!llama.is_null());
  // 32 blocks · (Q, b_Q, K, b_K: 2 (4096² + 4096); V: 4096²), through the registry.
  CHECK(peft::commands::count_from_configs(llama, "llama", j, "adapter_fusion").first ==
        32 * (2 * (4096 * 4096 + 4096) + 4096 * 4096));
}

#undef METHOD_CASES
#undef ALL_CASES
}  // namespace test_adapter_fusion
