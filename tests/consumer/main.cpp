// An outside project's own PEFT method, written against the installed library alone (built by
// tests/consumer/run_consumer_test.cmake with find_package(peft)): OutputShift, a learned shift
// of each targeted module's output, y = x Wᵀ + b + β, β [out] starting at 0. The method is the
// 20 lines between the markers; main() then uses it as a researcher would: gradient check,
// composition with LoRA on the same module and with IA3, composite save and load, counting
// from shapes, the commands' registry, and a run of the study.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <peft/peft.hpp>
#include <sstream>
#include <string>
#ifndef PEFT_CONSUMER_SMOKE
#include <peft/commands/count.hpp>
#include <peft/commands/generate.hpp>
#include <peft/experiment/study.hpp>
#include <peft/testing/gradcheck.hpp>
#endif

// ---- the method: 20 lines ----
struct OutputShift {
  using family = peft::family::Additive;
  static constexpr std::string_view name = "output_shift";
  struct Config {
    static constexpr std::string_view peft_type = "OUTPUT_SHIFT";
    peft::TargetRules targets;
    static auto fields() { return peft::config_fields(peft::targets_field(&Config::targets)); }
  };
  static peft::SiteTensors site_tensors(const Config&, const peft::ModuleSite& m) {
    return {{"shift", {m.out_features}}};
  }
  template <class T>
  static void contribute(const Config&, peft::Projection<T>& p, const peft::SiteSlot<T>& s) {
    p.shift_output(s[0]);
  }
  template <class T>
  using State = peft::SiteState<OutputShift, T>;
};
using Methods = peft::BuiltinMethods::with<OutputShift>;
// ---- end of the method ----

#ifdef PEFT_CONSUMER_SMOKE
// The install checks' short form: the method on the installed headers, one model.
int main() {
  peft::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 20, c.hidden_size = 8, c.num_layers = 1, c.num_heads = 2, c.num_kv_heads = 2;
  c.head_dim = 4, c.intermediate_size = 16, c.max_positions = 16;
  OutputShift::Config shift;
  shift.targets.target_modules.names = {"v_proj"};
  peft::Decoder<peft::arch::Llama, OutputShift, float> model(c, shift, 1);
  if (model.trainable_parameters().size() != 1) return 1;
  std::cout << "consumer ok\n";
  return 0;
}
#else
namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << '\n';
  failures += !ok;
}

peft::ModelConfig tiny_llama() {
  peft::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 20, c.hidden_size = 8, c.num_layers = 2, c.num_heads = 2, c.num_kv_heads = 2;
  c.head_dim = 4, c.intermediate_size = 16, c.max_positions = 16;
  c.attention_bias = c.mlp_bias = false;
  c.tie_word_embeddings = true;
  return c;
}

peft::Batch tiny_batch() {
  peft::Batch b;
  b.batch = 2, b.seq = 5;
  for (int i = 0; i < 10; ++i) b.input_ids.push_back((3 * i + 1) % 20);
  return b;
}

peft::TargetRules targets(std::vector<std::string> names) {
  peft::TargetRules t;
  t.target_modules.names = std::move(names);
  return t;
}

template <class Model>
void randomise(Model& model, std::uint64_t seed) {
  for (auto& p : model.trainable_parameters())
    p.var.value() = peft::testing::random_tensor(p.var.shape(), seed++, -0.5, 0.5);
}

double max_diff(const peft::Tensor<double>& a, const peft::Tensor<double>& b) {
  double d = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

}  // namespace

int main() {
  namespace fs = std::filesystem;
  using Arch = peft::arch::Llama;
  const peft::ModelConfig mc = tiny_llama();
  const peft::Batch batch = tiny_batch();
  const OutputShift::Config shift{targets({"v_proj", "down_proj"})};
  try {
    // 1. Starts at the base; its gradients match finite differences.
    peft::Decoder<Arch, OutputShift, double> model(mc, shift, 1);
    peft::Decoder<Arch, peft::NoPeft, double> base(mc, {}, 1);
    expect(max_diff(model.logits(batch), base.logits(batch)) == 0.0, "starts at the base model");
    randomise(model, 7);
    std::vector<peft::Var<double>> inputs;
    for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
    const auto grad = peft::testing::check_gradients(
        [&](peft::Tape<double>& tape, std::vector<peft::Var<double>>&) {
          return model.forward(tape, batch).loss;
        },
        inputs);
    expect(grad.ok, "gradient check (double): " + grad.message);

    // 2. With LoRA on the same modules, and with IA3: each composite's output is its parts'.
    peft::LoraConfig lora;
    lora.r = 2, lora.lora_alpha = 4;
    lora.targets = targets({"v_proj"});
    using WithLora = peft::Compose<peft::LoRA, OutputShift>;
    peft::Decoder<Arch, WithLora, double> both(mc, {lora, shift}, 1);
    randomise(both, 11);
    peft::Decoder<Arch, peft::LoRA, double> lora_only(mc, lora, 1);
    peft::Decoder<Arch, OutputShift, double> shift_only(mc, shift, 1);
    auto bp = both.adapter().parameters();
    auto lp = lora_only.adapter().parameters();
    auto sp = shift_only.adapter().parameters();
    for (std::size_t i = 0; i < lp.size(); ++i) lp[i].var.value() = bp[i].var.value();
    for (std::size_t i = 0; i < sp.size(); ++i) sp[i].var.value() = bp[lp.size() + i].var.value();
    // On v_proj: y = x Wᵀ + s B A x + β. The sum of the two single-method deltas is the
    // composite's delta only to first order through the rest of the network, so compare the
    // projection itself.
    {
      peft::Tape<double> tape(false);
      auto modules = both.linear_modules();
      const peft::nn::Linear<double>& v = *modules[2];  // model.layers.0.self_attn.v_proj
      peft::Var<double> x(peft::testing::random_tensor(peft::Shape{3, v.in_features}, 5));
      peft::Projection<double> composite(tape, v, x), single_lora(tape, v, x);
      both.adapter().adapt(composite);
      lora_only.adapter().adapt(single_lora);
      const peft::Tensor<double> y = composite.compute().value();
      const peft::Tensor<double> y_lora = single_lora.compute().value();
      double worst = 0;
      for (std::int64_t r = 0; r < 3; ++r)
        for (std::int64_t o = 0; o < v.out_features; ++o)
          worst =
              std::max(worst, std::abs(y[r * v.out_features + o] -
                                       (y_lora[r * v.out_features + o] + sp[0].var.value()[o])));
      expect(v.name == "model.layers.0.self_attn.v_proj" && worst < 1e-12,
             "LoRA and OutputShift on the same module: x W^T + s B A x + shift");
    }
    using WithIa3 = peft::Compose<OutputShift, peft::IA3>;
    peft::Ia3Config ia3;
    ia3.targets = targets({"k_proj", "down_proj"});
    ia3.feedforward_modules.names = {"down_proj"};
    peft::Decoder<Arch, WithIa3, double> with_ia3(mc, {shift, ia3}, 1);
    expect(max_diff(with_ia3.logits(batch), base.logits(batch)) == 0.0,
           "Compose<OutputShift, IA3> starts at the base model");

    // 3. The composite saves in the reference layout and loads back into a fresh model.
    const fs::path dir =
        fs::temp_directory_path() / ("peft-consumer-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    peft::save_composite(dir, both);
    peft::Decoder<Arch, WithLora, double> reloaded(mc, {lora, shift}, 99);
    for (auto& p : reloaded.base_parameters())  // the same base, a different adapter seed
      for (auto& q : both.base_parameters())
        if (p.name == q.name) p.var.value() = q.var.value();
    peft::load_composite(dir, reloaded);
    // The files hold F32, as the reference writes them: equal to F32 rounding of the tensors.
    const double reload_diff = max_diff(reloaded.logits(batch), both.logits(batch));
    expect(reload_diff < 1e-5 && reload_diff < max_diff(both.logits(batch), base.logits(batch)),
           "composite saved and loaded: same logits (to F32 rounding: " +
               std::to_string(reload_diff) + ")");
    const auto manifest = peft::io::load_json(dir / "adapter_config.json");
    const auto shift_file = peft::io::load_json(dir / "1_output_shift" / "adapter_config.json");
    expect(shift_file.value("peft_type", "") == "OUTPUT_SHIFT",
           "component folder holds the method's own adapter_config.json");

    // 4. Counting from shapes agrees with the tensors attach made, and the registry finds it.
    const peft::ParameterCount counted =
        peft::count_parameters<OutputShift>(mc, peft::linear_shapes<Arch>(mc), shift);
    std::int64_t made = 0;
    for (auto& p : model.adapter().parameters()) made += p.var.value().numel();
    expect(counted.trainable == made && made == 2 * (8 + 8), "count from shapes = attached");
    bool found = false;
    Methods::visit_for(shift_file, [&]<class P>() { found = std::is_same_v<P, OutputShift>; });
    expect(found, "the registry dispatches its adapter_config.json to it");
    fs::remove_all(dir);

    // 4b. The registry-dependent commands, as library functions over a registry that holds it
    // (a small one: each method is a model type to compile): `count` and `generate --adapter`.
    using CommandMethods = peft::MethodRegistry<peft::LoRA, OutputShift>;
    const auto [trainable, all] = peft::commands::count_from_configs<CommandMethods>(
        mc.to_json(), "config.json", peft::config_to_json(shift, mc), "adapter_config.json");
    expect(trainable == counted.trainable &&
               all == peft::base_parameter_count<Arch>(mc) + counted.trainable,
           "commands::count_from_configs<Registry> counts it: " +
               peft::trainable_parameters_line(trainable, all));
    {
      const fs::path model_dir = dir.string() + "-model", adapter_dir = dir.string() + "-shift";
      peft::Decoder<Arch, OutputShift, float> shifted(mc, shift, 3);
      float value = 0.25f;
      for (auto& p : shifted.trainable_parameters())
        for (std::int64_t i = 0; i < p.var.value().numel(); ++i) p.var.value()[i] = value *= -1.1f;
      peft::io::save_model(shifted, model_dir);  // the base weights: config.json + safetensors
      peft::io::save_adapter(adapter_dir, peft::config_to_json(shift, mc),
                             shifted.adapter().parameters());
      peft::GenerateOptions options;
      options.max_new_tokens = 4;
      const std::vector<std::int64_t> prompt = {1, 2, 3};
      std::string expected;
      for (std::int64_t t : peft::generate(shifted, prompt, options))
        expected += (expected.empty() ? "" : " ") + std::to_string(t);
      std::ostringstream gen_out, gen_err;
      const int gen_rc = peft::commands::run_generate<CommandMethods>(
          {model_dir.string(), "--adapter", adapter_dir.string(), "--ids", "1,2,3", "--max-new",
           "4"},
          gen_out, gen_err);
      expect(gen_rc == 0 && gen_out.str() == expected + "\n",
             "commands::run_generate<Registry> loads its adapter folder: " + gen_out.str() +
                 gen_err.str());
      fs::remove_all(model_dir);
      fs::remove_all(adapter_dir);
    }

    // 5. The study, with the method as its one row beside `none` and `full` (the smallest
    // settings: a smoke run). run_study_table compiles only the rows it is given; run_study
    // (experiment/study_methods.hpp) would add the library's 27.
    std::ostringstream out, err;
    const fs::path study_dir = dir.string() + "-study";
    const int rc = peft::experiment::run_study_table(
        {"--quick", "--methods", "output_shift", "--out", study_dir.string(), "--pretrain-steps",
         "5", "--steps", "5", "--no-progress"},
        out, err,
        {peft::experiment::entry<OutputShift>(3e-2, [](const peft::ModelConfig&, std::int64_t) {
          return OutputShift::Config{targets({"q_proj", "v_proj"})};
        })});
    expect(rc == 0 && out.str().find("output_shift") != std::string::npos &&
               fs::exists(study_dir / "results.csv"),
           "peft study runs it" + (rc == 0 ? std::string() : ": " + err.str()));
    fs::remove_all(study_dir);
  } catch (const std::exception& e) {
    std::cout << "FAIL  threw: " << e.what() << '\n';
    return 1;
  }
  std::cout << (failures == 0 ? "consumer ok\n" : "consumer FAILED\n");
  return failures == 0 ? 0 : 1;
}
#endif  // PEFT_CONSUMER_SMOKE
