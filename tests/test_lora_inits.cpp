// LoRA's data- and weight-driven initialisations beyond PiSSA: OLoRA (olora.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <peft/peft.hpp>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_lora_inits {

using peft::Decoder;
using test_support::padded_batch;
using test_support::tiny_gpt2;
using test_support::tiny_llama;

peft::LoraConfig olora_config() {
  peft::LoraConfig c;
  c.r = 3;
  c.lora_alpha = 6;  // s = 2: the base keeps W − 2 Q_r R_r
  c.targets = test_support::both_model_targets();
  c.init = peft::LoraConfig::Init::Olora;
  return c;
}

template <class Arch>
void check_olora(const peft::ModelConfig& model_config) {
  const peft::LoraConfig config = olora_config();
  Decoder<Arch, peft::NoPeft, double> base(model_config, {}, 21);
  Decoder<Arch, peft::LoRA, double> model(model_config, config, 21);
  auto base_modules = base.linear_modules();
  auto modules = model.linear_modules();
  int adapted = 0;
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const auto* m = model.adapter().find(modules[i]->site);
    if (!m) continue;
    ++adapted;
    INFO(modules[i]->name);
    const peft::RowMatrix<double> w = base_modules[i]->weight_out_in();
    const peft::RowMatrix<double> a = (*m)[0].value().matrix(), b = (*m)[1].value().matrix();
    CHECK(m->extra.scale == doctest::Approx(2.0));
    // W' + s B A = W.
    CHECK((modules[i]->weight_out_in() + m->extra.scale * b * a - w).cwiseAbs().maxCoeff() < 1e-14);
    // B = Q_r has orthonormal columns; A = R_r is upper triangular (zero below the diagonal).
    const peft::RowMatrix<double> gram = b.transpose() * b;
    CHECK((gram - peft::RowMatrix<double>::Identity(config.r, config.r)).cwiseAbs().maxCoeff() <
          1e-13);
    for (Eigen::Index r = 0; r < a.rows(); ++r)
      for (Eigen::Index c = 0; c < std::min(r, a.cols()); ++c) CHECK(a(r, c) == 0.0);
    // Q R's first r columns are W's: W[:, :r] = Q_r R_r[:, :r] (R upper triangular).
    CHECK((b * a.leftCols(config.r) - w.leftCols(config.r)).cwiseAbs().maxCoeff() < 1e-14);
    // torch.linalg.qr's sign convention (LAPACK's Householder, β = −sign(α)‖x‖): R_00 has
    // the opposite sign of W_00.
    CHECK(a(0, 0) * w(0, 0) < 0);
  }
  CHECK(adapted > 0);
  // The model starts at the base model's output (to rounding: W − sBA + sBA).
  CHECK(test_support::max_abs_diff(model.logits(padded_batch()), base.logits(padded_batch())) <
        1e-12);
}

TEST_CASE("lora olora: B A is W's leading QR part and the model starts at the base") {
  check_olora<peft::arch::Llama>(tiny_llama());
  check_olora<peft::arch::Gpt2>(tiny_gpt2());
}

TEST_CASE("lora olora: the config reads \"olora\" and refuses unknown init names") {
  nlohmann::json j = {{"peft_type", "LORA"},
                      {"r", 4},
                      {"lora_alpha", 8},
                      {"target_modules", {"q_proj"}},
                      {"init_lora_weights", "olora"}};
  const auto config = peft::LoraConfig::from_json(j, "adapter_config.json");
  CHECK(config.init == peft::LoraConfig::Init::Olora);
  CHECK(config.to_json(tiny_llama())["init_lora_weights"] == "olora");
  j["init_lora_weights"] = "qr";
  try {
    (void)peft::LoraConfig::from_json(j, "adapter_config.json");
    FAIL("an unknown init name was accepted");
  } catch (const peft::ConfigError& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("init_lora_weights") != std::string::npos);
    CHECK(what.find("adapter_config.json") != std::string::npos);
  }
}

TEST_CASE("lora olora: a rank above min(out, in) is refused naming the module") {
  peft::LoraConfig config = olora_config();
  config.r = 1000;
  try {
    Decoder<peft::arch::Llama, peft::LoRA, double> model(tiny_llama(), config, 3);
    FAIL("rank 1000 was accepted");
  } catch (const peft::ConfigError& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("OLoRA: rank 1000") != std::string::npos);
  }
}

}  // namespace test_lora_inits
