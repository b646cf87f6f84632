// The method contract's building blocks (include/peft/methods/policy.hpp): config field tables,
// the Projection's order of contributions, one selection for attaching and counting, and the
// open registry.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "peft/methods/config_fields.hpp"
#include "peft/methods/registry.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/nn/projection.hpp"
#include "peft/testing/gradcheck.hpp"
#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_contract {

namespace {

nlohmann::json lora_json(nlohmann::json changes) {
  nlohmann::json j = {{"peft_type", "LORA"}, {"r", 4}, {"target_modules", {"q_proj"}}};
  for (const auto& [k, v] : changes.items()) j[k] = v;
  return j;
}

std::string error_of(const nlohmann::json& j) {
  try {
    peft::LoraConfig::from_json(j, "adapter_config.json");
  } catch (const peft::ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE(
    "config fields: reading is strict and errors name the file, the field, expected and found") {
  CHECK(peft::LoraConfig::from_json(lora_json({}), "f").r == 4);
  CHECK(error_of(lora_json({{"r", 0.5}})) ==
        "adapter_config.json: field 'r': expected an integer, found 0.5");
  CHECK(error_of(lora_json({{"r", 4294967296}})).find("field 'r'") != std::string::npos);
  CHECK(error_of(lora_json({{"r", 0}})) ==
        "adapter_config.json: field 'r': expected a positive value, found 0");
  CHECK(error_of(lora_json({{"lora_dropout", 1.0}})).find("a probability in [0, 1)") !=
        std::string::npos);
  CHECK(error_of(lora_json({{"lora_dropout", -0.5}})).find("lora_dropout") != std::string::npos);
  CHECK(error_of(lora_json({{"use_rslora", 1}})).find("expected true or false") !=
        std::string::npos);
  CHECK(error_of(lora_json({{"bias", "all"}})).find("field 'bias'") != std::string::npos);
  CHECK(error_of(lora_json({{"init_lora_weights", "corda"}})).find("one of true false") !=
        std::string::npos);
  CHECK(error_of(lora_json({{"rank_pattern", {{"q_proj", -2}}}})).find("rank_pattern") !=
        std::string::npos);
  CHECK(error_of(lora_json({{"peft_type", "IA3"}})).find("expected 'LORA'") != std::string::npos);
  CHECK(error_of(nlohmann::json::array()).find("expected a JSON object") != std::string::npos);
  // Keys the reference adds in later versions are ignored; absent keys keep the defaults.
  const auto c = peft::LoraConfig::from_json(lora_json({{"some_future_field", 3}}), "f");
  CHECK(c.lora_alpha == 8.0);
  CHECK(c.init == peft::LoraConfig::Init::Default);
}

TEST_CASE("config fields: what is written reads back to the same config and the same JSON") {
  peft::LoraConfig c =
      peft::LoraConfig::from_json(lora_json({{"lora_alpha", 16},
                                             {"use_rslora", true},
                                             {"init_lora_weights", "gaussian"},
                                             {"rank_pattern", {{"v_proj", 2}}},
                                             {"alpha_pattern", {{"v_proj", 3.5}}}}),
                                  "f");
  const peft::ModelConfig model = test_support::tiny_llama();
  const nlohmann::json written = c.to_json(model);
  CHECK(written["lora_alpha"] == 16);  // integral values as integers, as the reference writes
  CHECK(written["alpha_pattern"]["v_proj"] == 3.5);
  CHECK(written["fan_in_fan_out"] == false);
  CHECK(peft::LoraConfig::from_json(written, "w").to_json(model) == written);
}

TEST_CASE("projection: contributions combine in the documented order") {
  using T = double;
  peft::nn::Linear<T> lin("m", 3, 2, peft::ops::WeightLayout::OutIn, true);
  lin.weight.value() = peft::testing::random_tensor(peft::Shape{2, 3}, 1);
  lin.bias.value() = peft::testing::random_tensor(peft::Shape{2}, 2);
  peft::Var<T> x(peft::testing::random_tensor(peft::Shape{4, 3}, 3));
  peft::Var<T> s(peft::testing::random_tensor(peft::Shape{3}, 4));     // input scale
  peft::Var<T> a(peft::testing::random_tensor(peft::Shape{1, 3}, 5));  // A [r, in]
  peft::Var<T> b(peft::testing::random_tensor(peft::Shape{2, 1}, 6));  // B [out, r]
  peft::Var<T> l(peft::testing::random_tensor(peft::Shape{2}, 7));     // output scale
  peft::Var<T> beta(peft::testing::random_tensor(peft::Shape{2}, 8));  // output shift
  peft::Tape<T> tape(false);
  peft::Projection<T> p(tape, lin, x);
  // Given out of order on purpose: the order of application is fixed by kind.
  p.scale_output(l);
  p.add_low_rank(a, b, 0.5);
  p.shift_output(beta);
  p.scale_input(s);
  const peft::Tensor<T> y = p.compute().value();
  for (std::int64_t n = 0; n < 4; ++n)
    for (std::int64_t o = 0; o < 2; ++o) {
      double base = lin.bias.value()[o], low = 0;
      for (std::int64_t i = 0; i < 3; ++i) {
        const double xi = x.value()[n * 3 + i] * s.value()[i];
        base += lin.weight.value()[o * 3 + i] * xi;
        low += a.value()[i] * xi;
      }
      const double expected = (base + 0.5 * b.value()[o] * low) * l.value()[o] + beta.value()[o];
      CHECK(y[n * 2 + o] == doctest::Approx(expected).epsilon(1e-12));
    }
  // An empty projection is the base product.
  peft::Projection<T> empty(tape, lin, x);
  CHECK(empty.compute().value().values() == lin.forward_base(tape, x).value().values());
  // Two replacements of one product are refused.
  peft::Projection<T> twice(tape, lin, x);
  const auto f = [](peft::Tape<T>& t, const peft::nn::Linear<T>& m, const peft::Var<T>& v) {
    return m.forward_base(t, v);
  };
  twice.replace_product(f);
  CHECK_THROWS_AS(twice.replace_product(f), peft::ConfigError);
}

TEST_CASE("projection: the gradient through every contribution kind matches (double)") {
  using T = double;
  peft::nn::Linear<T> lin("m", 3, 2, peft::ops::WeightLayout::InOut, true);
  lin.weight.value() = peft::testing::random_tensor(peft::Shape{3, 2}, 1);
  lin.bias.value() = peft::testing::random_tensor(peft::Shape{2}, 2);
  std::vector<peft::Var<T>> inputs = {
      peft::Var<T>(peft::testing::random_tensor(peft::Shape{2, 2, 3}, 3), true),  // x
      peft::Var<T>(peft::testing::random_tensor(peft::Shape{3}, 4), true),        // s
      peft::Var<T>(peft::testing::random_tensor(peft::Shape{2, 3}, 5), true),     // A
      peft::Var<T>(peft::testing::random_tensor(peft::Shape{2, 2}, 6), true),     // B
      peft::Var<T>(peft::testing::random_tensor(peft::Shape{2}, 7), true),        // l
      peft::Var<T>(peft::testing::random_tensor(peft::Shape{2}, 8), true)};       // β
  const auto result = peft::testing::check_gradients(
      [&](peft::Tape<T>& tape, std::vector<peft::Var<T>>& in) {
        peft::Projection<T> p(tape, lin, in[0]);
        p.scale_input(in[1]);
        p.add_low_rank(in[2], in[3], 0.7);
        p.add_low_rank(in[2], in[3], -0.2);  // a second term takes the unfused path
        p.add_delta([&](peft::Tape<T>& t, const peft::Var<T>& x) {
          return peft::ops::scale(t, lin.forward_base(t, x), T(0.1));
        });
        p.scale_output(in[4]);
        p.shift_output(in[5]);
        p.map_output(
            [](peft::Tape<T>& t, const peft::Var<T>& y) { return peft::ops::mul(t, y, y); });
        return p.compute();
      },
      inputs);
  INFO(result.message);
  CHECK(result.ok);
}

namespace {
struct Renamed {
  using family = peft::family::Reparameterized;
  static constexpr std::string_view name = "renamed_lora";
  using Config = peft::LoraConfig;
  template <class T>
  using State = peft::LoRA::State<T>;
  static bool accepts(const nlohmann::json& j) { return j.value("peft_type", "") == "RENAMED"; }
};
}  // namespace

TEST_CASE("registry: an outside method joins the builtin ones without editing the library") {
  using Methods = peft::BuiltinMethods::with<Renamed>;
  CHECK(Methods::size == peft::BuiltinMethods::size + 1);
  bool named = false, dispatched = false, builtin = false;
  CHECK(
      Methods::visit_named("renamed_lora", [&]<class P>() { named = std::is_same_v<P, Renamed>; }));
  CHECK(Methods::visit_for(nlohmann::json{{"peft_type", "RENAMED"}},
                           [&]<class P>() { dispatched = std::is_same_v<P, Renamed>; }));
  CHECK(Methods::visit_for(lora_json({}),
                           [&]<class P>() { builtin = std::is_same_v<P, peft::LoRA>; }));
  CHECK((named && dispatched && builtin));
  CHECK_FALSE(peft::BuiltinMethods::visit_named("renamed_lora", []<class P>() {}));
  CHECK_FALSE(Methods::visit_for(nlohmann::json{{"peft_type", "NOPE"}}, []<class P>() {}));
  const auto names = Methods::names();
  CHECK(names.back() == "renamed_lora");
}

TEST_CASE("site table: counting from shapes and attaching read one declaration") {
  const peft::ModelConfig model = test_support::tiny_llama();
  peft::LoraConfig c;
  c.r = 3;
  c.targets.target_modules.names = {"q_proj", "down_proj"};
  c.targets.layers_to_transform = {1};
  c.rank_pattern = {{"down_proj", 2}};
  peft::Decoder<peft::arch::Llama, peft::LoRA, float> m(model, c, 1);
  std::int64_t attached = 0;
  for (const auto& p : m.adapter().parameters()) attached += p.var.value().numel();
  const auto counted =
      peft::count_parameters<peft::LoRA>(model, peft::linear_shapes<peft::arch::Llama>(model), c);
  CHECK(counted.trainable == attached);
  CHECK(attached > 0);
  c.targets.layers_to_transform = {7};
  CHECK_THROWS_WITH_AS((peft::Decoder<peft::arch::Llama, peft::LoRA, float>(model, c, 1)),
                       doctest::Contains("LoRA: target_modules [\"q_proj\",\"down_proj\"] matched "
                                         "no module of this model"),
                       peft::ConfigError);
}

}  // namespace test_contract
