// LoRA-FA (include/peft/methods/reparameterized/lora_fa.hpp): A frozen, B's gradient projected by
// (A Aᵀ + 10⁻⁸ I)⁺ / s², AdamW in the Hugging Face form. Checks: the model's gradients against
// finite differences in double (B only: A gets none), the start at the base model, the
// projection and the optimizer form against their formulas written out, the Trainer applying
// both, merge/unmerge, counts from shapes (A frozen), and the reference's cases
// (tests/data/golden_methods/{llama,gpt2}_lora_fa, trained by peft's LoraFAOptimizer).
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <peft/peft.hpp>
#include <peft/testing/golden.hpp>
#include <peft/testing/gradcheck.hpp>
#include <peft/train/trainer.hpp>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_lora_fa {

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

peft::LoraConfig lora_fa_config() {
  peft::LoraConfig c;
  c.r = 3;
  c.lora_alpha = 6;
  c.targets = test_support::both_model_targets();
  return c;
}

template <class Arch, class T>
using Model = Decoder<Arch, peft::LoraFA, T>;

}  // namespace

TEST_CASE_TEMPLATE("LoRA-FA: A frozen, B's gradients match finite differences", Arch,
                   peft::arch::Llama, peft::arch::Gpt2) {
  Model<Arch, double> model(tiny_config<Arch>(), lora_fa_config(), 3);
  perturb_adapter(model, 4);
  std::vector<Var<double>> inputs;
  for (auto& p : model.adapter().parameters()) {
    const bool is_a = p.name.find("lora_A") != std::string::npos;
    CHECK(p.var.requires_grad() == !is_a);
    if (!is_a) inputs.push_back(p.var);
  }
  REQUIRE(!inputs.empty());
  CHECK(model.trainable_parameters().size() == inputs.size());
  const Batch batch = padded_batch();
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

TEST_CASE("LoRA-FA: starts at the base model; merge and unmerge; counts A as frozen") {
  using Arch = peft::arch::Llama;
  Model<Arch, double> model(tiny_config<Arch>(), lora_fa_config(), 21);
  Decoder<Arch, peft::NoPeft, double> base(tiny_config<Arch>(), {}, 21);
  const Batch batch = padded_batch();
  CHECK(max_abs_diff(model.logits(batch), base.logits(batch)) == 0.0);

  perturb_adapter(model, 5);
  const Tensor<double> unmerged = model.logits(batch);
  CHECK(max_abs_diff(unmerged, base.logits(batch)) > 1e-3);
  model.merge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-10);
  model.unmerge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-11);

  std::int64_t trainable = 0, frozen = 0;
  for (const auto& p : model.adapter().parameters())
    (p.var.requires_grad() ? trainable : frozen) += p.var.value().numel();
  const auto count = peft::count_parameters<peft::LoraFA>(
      model.config(), peft::linear_shapes<Arch>(model.config()), lora_fa_config());
  CHECK(count.trainable == trainable);
  CHECK(count.frozen == frozen);
  CHECK(frozen > 0);
}

TEST_CASE("LoRA-FA: the projected gradient is g_B (A Aᵀ + 1e-8 I)⁻¹ / s²") {
  using Arch = peft::arch::Llama;
  Model<Arch, double> model(tiny_config<Arch>(), lora_fa_config(), 8);
  perturb_adapter(model, 9);
  const Batch batch = padded_batch();
  Tape<double> tape;
  auto out = model.forward(tape, batch);
  tape.backward(out.loss);
  // Before: the raw gradients and A of each module, by name.
  std::vector<Tensor<double>> raw, a_of;
  const auto params = model.adapter().parameters();
  for (std::size_t i = 0; i + 1 < params.size(); i += 2) {
    REQUIRE(params[i].name.find("lora_A") != std::string::npos);
    REQUIRE(params[i + 1].name.find("lora_B") != std::string::npos);
    a_of.push_back(params[i].var.value());
    raw.push_back(params[i + 1].var.grad());
  }
  model.adapter().project_gradients();
  const double s = 6.0 / 3.0;
  for (std::size_t k = 0; k < raw.size(); ++k) {
    const auto a = a_of[k].matrix();
    Eigen::MatrixXd gram = a * a.transpose();
    gram.diagonal().array() += 1e-8;
    const Eigen::MatrixXd expected = raw[k].matrix() * gram.inverse() / (s * s);
    const Eigen::MatrixXd got = params[2 * k + 1].var.grad().matrix();
    CHECK((got - expected).cwiseAbs().maxCoeff() < 1e-9 * (1 + expected.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("AdamW, Hugging Face form: eps on the raw √v, decay after the update") {
  Var<double> p(Tensor<double>(peft::Shape{2}), true);
  p.value()[0] = 0.5;
  p.value()[1] = -1.0;
  peft::AdamWOptions o;
  o.lr = 0.1;
  o.eps = 1e-3;
  o.weight_decay = 0.5;
  o.form = peft::AdamWForm::HuggingFace;
  peft::AdamW<double> opt({{"p", p}}, o);
  double w = 0.5, m = 0, v = 0;
  for (int t = 1; t <= 3; ++t) {
    const double g = 0.2 * t;
    p.grad()[0] = g;
    p.grad()[1] = 0;
    opt.step();
    m = 0.9 * m + 0.1 * g;
    v = 0.999 * v + 0.001 * g * g;
    const double step = 0.1 * std::sqrt(1 - std::pow(0.999, t)) / (1 - std::pow(0.9, t));
    w -= step * m / (std::sqrt(v) + 1e-3);
    w -= 0.1 * 0.5 * w;
    CHECK(p.value()[0] == doctest::Approx(w).epsilon(1e-14));
  }
}

TEST_CASE("LoRA-FA: the Trainer projects B's gradient and steps in the Hugging Face form") {
  using Arch = peft::arch::Llama;
  Model<Arch, double> trained(tiny_config<Arch>(), lora_fa_config(), 12);
  Model<Arch, double> manual(tiny_config<Arch>(), lora_fa_config(), 12);
  perturb_adapter(trained, 13);
  perturb_adapter(manual, 13);
  const Batch batch = padded_batch();
  peft::TrainerOptions options;
  options.max_steps = 3;
  options.clip_norm = 0;
  options.adamw.lr = 1e-2;
  options.adamw.weight_decay = 0.1;
  peft::Trainer<Model<Arch, double>> trainer(trained, options,
                                             [&](std::mt19937_64&) { return batch; });
  trainer.run();

  peft::AdamWOptions hf = options.adamw;
  hf.form = peft::AdamWForm::HuggingFace;
  peft::AdamW<double> opt(manual.trainable_parameters(), hf);
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    Tape<double> tape;
    auto out = manual.forward(tape, batch);
    tape.backward(out.loss);
    manual.adapter().project_gradients();
    opt.step();
  }
  const auto a = trained.adapter().parameters(), b = manual.adapter().parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].name);
    CHECK(max_abs_diff(a[i].var.value(), b[i].var.value()) < 1e-13);
  }
}

TEST_CASE("LoRA-FA: the reference's cases (peft's LoraFAOptimizer), case.json naming the policy") {
  for (const char* name : {"llama_lora_fa", "gpt2_lora_fa"}) {
    INFO(name);
    const auto dir = std::filesystem::path(PEFT_TEST_DATA_DIR) / "golden_methods" / name;
    peft::testing::GoldenReport report;
    REQUIRE(
        peft::testing::run_golden_case_throwing<peft::MethodRegistry<peft::LoraFA>>(dir, report));
    for (const auto& c : report.checks) {
      INFO(c.name << ": " << c.error << " (tolerance " << c.tolerance << ")");
      CHECK(c.ok());
    }
    CHECK(report.checks.size() >= 5);
    CHECK(report.passed);
    // The reference's trainable count (A frozen) is this policy's count from shapes.
    const auto case_json = peft::io::load_json(dir / "case.json");
    const auto model_dir = dir / case_json["model_dir"].get<std::string>();
    const auto model =
        peft::ModelConfig::from_json(peft::io::load_json(model_dir / "config.json"), "config.json");
    const auto config = peft::config_from_json<peft::LoraConfig>(
        peft::io::load_json(dir / "adapter" / "adapter_config.json"), "adapter_config.json");
    const auto shapes = std::string(name).starts_with("gpt2")
                            ? peft::linear_shapes<peft::arch::Gpt2>(model)
                            : peft::linear_shapes<peft::arch::Llama>(model);
    CHECK(peft::count_parameters<peft::LoraFA>(model, shapes, config).trainable ==
          case_json["trainable_params"].get<std::int64_t>());
  }
}

}  // namespace test_lora_fa
