// The additive family: (IA)³, prefix tuning, prompt tuning, P-tuning, serial / Pfeiffer /
// parallel bottleneck adapters, SSF. For every method: a finite-difference gradient check in
// double, save → load → same logits, a short training run that must lower the loss well below
// the base model's; where the method promises it, the adapted model starts at the base model's
// output; IA3 and SSF merge to the unmerged logits; counts as the reference prints them.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <string>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_additive {

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

/// Moves every trainable adapter tensor off its initial value, so that checks see non-trivial
/// adapters (zero up-projections, unit scales).
template <class Model>
void perturb_adapter(Model& model, std::uint64_t seed, double amplitude = 0.3) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-amplitude, amplitude);
  for (auto& p : model.adapter().parameters())
    if (p.var.requires_grad())
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i)
        p.var.value()[i] += static_cast<typename Model::Scalar>(u(rng));
}

// One case per (architecture, method, configuration).
template <class ArchT, class PolicyT>
struct Case {
  using Arch = ArchT;
  using Policy = PolicyT;
};

peft::Ia3Config ia3_config() { return {}; }  // the reference's per-architecture defaults

peft::PrefixTuningConfig prefix_config(bool projection) {
  peft::PrefixTuningConfig c;
  c.num_virtual_tokens = 3;
  c.prefix_projection = projection;
  c.encoder_hidden_size = 5;
  return c;
}

template <class P>
typename P::Config small_config() {
  if constexpr (std::is_same_v<P, peft::IA3>) {
    return ia3_config();
  } else if constexpr (std::is_same_v<P, peft::PrefixTuning>) {
    return prefix_config(false);
  } else if constexpr (std::is_same_v<P, peft::PromptTuning>) {
    peft::PromptTuningConfig c;
    c.num_virtual_tokens = 3;
    return c;
  } else if constexpr (std::is_same_v<P, peft::PTuning>) {
    peft::PTuningConfig c;
    c.num_virtual_tokens = 3;
    c.encoder_hidden_size = 6;
    return c;
  } else if constexpr (std::is_same_v<P, peft::SSF>) {
    return peft::SsfConfig{};
  } else if constexpr (std::is_same_v<P, peft::LoRA>) {  // the key/value cache test's LoRA
    peft::LoraConfig c;
    c.r = 2;
    c.lora_alpha = 4;
    c.targets = peft::TargetRules::from_json(
        {{"target_modules", {"c_attn", "c_proj", "q_proj", "v_proj", "down_proj"}}}, "test");
    return c;
  } else {
    typename P::Config c;
    c.bottleneck_size = 3;
    return c;
  }
}

/// Prefix tuning with its re-parameterisation, as a distinct policy for the test lists.
struct PrefixProjection : peft::PrefixTuning {};

template <class P>
using PolicyOf = std::conditional_t<std::is_same_v<P, PrefixProjection>, peft::PrefixTuning, P>;

template <class P>
typename PolicyOf<P>::Config config_for() {
  if constexpr (std::is_same_v<P, PrefixProjection>)
    return prefix_config(true);
  else
    return small_config<P>();
}

#define ADDITIVE_METHODS(Arch)                                                                    \
  Case<Arch, peft::IA3>, Case<Arch, peft::PrefixTuning>, Case<Arch, PrefixProjection>,            \
      Case<Arch, peft::PromptTuning>, Case<Arch, peft::PTuning>, Case<Arch, peft::SerialAdapter>, \
      Case<Arch, peft::PfeifferAdapter>, Case<Arch, peft::ParallelAdapter>, Case<Arch, peft::SSF>

#define ALL_CASES ADDITIVE_METHODS(peft::arch::Gpt2), ADDITIVE_METHODS(peft::arch::Llama)

template <class C, class T>
using ModelOf = Decoder<typename C::Arch, PolicyOf<typename C::Policy>, T>;

template <class C, class T>
ModelOf<C, T> make_model(std::uint64_t seed = 11) {
  return ModelOf<C, T>(tiny_config<typename C::Arch>(), config_for<typename C::Policy>(), seed);
}

template <class C>
std::string case_name() {
  return std::string(C::Arch::model_type) + " " +
         (std::is_same_v<typename C::Policy, PrefixProjection> ? std::string("prefix_projection")
                                                               : std::string(C::Policy::name));
}

std::filesystem::path scratch_dir(const std::string& name) {
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("peft_test_additive_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  return dir;
}

// The golden cases, when the checkout has them.
std::filesystem::path golden_cases_dir() {
#ifdef PEFT_GOLDEN_DIR
  if (std::filesystem::is_directory(PEFT_GOLDEN_DIR)) return PEFT_GOLDEN_DIR;
#endif
  for (const char* candidate : {"shared/golden", "../shared/golden", "/work/shared/golden"})
    if (std::filesystem::is_directory(candidate)) return candidate;
  return {};
}

}  // namespace

TEST_CASE_TEMPLATE("additive: analytic gradients match finite differences", C, ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 3);
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

TEST_CASE_TEMPLATE("additive: save, load, same logits", C, ALL_CASES) {
  INFO(case_name<C>());
  using Policy = PolicyOf<typename C::Policy>;
  auto model = make_model<C, double>();
  perturb_adapter(model, 5);
  const Batch batch = padded_batch();
  const Tensor<double> before = model.logits(batch);
  // Re-parameterised prompts are saved as the reference saves them: their output.
  if constexpr (requires { model.adapter().fold(); }) model.adapter().fold();
  CHECK(max_abs_diff(model.logits(batch), before) < 1e-12);

  const auto dir = scratch_dir(case_name<C>());
  peft::io::save_adapter(dir, model.adapter().config().to_json(model.config()),
                         model.adapter().parameters());
  const nlohmann::json saved = peft::io::load_json(dir / "adapter_config.json");
  bool loaded_as_policy = false;
  peft::visit_policy_for(saved, [&]<class P>() { loaded_as_policy = std::is_same_v<P, Policy>; });
  CHECK(loaded_as_policy);

  auto config = Policy::Config::from_json(saved, (dir / "adapter_config.json").string());
  ModelOf<C, double> reloaded(tiny_config<typename C::Arch>(), config, 11);
  peft::io::load_adapter_tensors(
      reloaded.adapter().parameters(),
      peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors"));
  CHECK(max_abs_diff(reloaded.logits(batch), before) < 1e-6);  // the file holds float32
  std::filesystem::remove_all(dir);
}

TEST_CASE_TEMPLATE("additive: the adapted model starts at the base model's output", C,
                   Case<peft::arch::Gpt2, peft::IA3>, Case<peft::arch::Llama, peft::IA3>,
                   Case<peft::arch::Gpt2, peft::SSF>, Case<peft::arch::Llama, peft::SSF>,
                   Case<peft::arch::Gpt2, peft::SerialAdapter>,
                   Case<peft::arch::Llama, peft::SerialAdapter>,
                   Case<peft::arch::Gpt2, peft::PfeifferAdapter>,
                   Case<peft::arch::Llama, peft::PfeifferAdapter>,
                   Case<peft::arch::Gpt2, peft::ParallelAdapter>,
                   Case<peft::arch::Llama, peft::ParallelAdapter>) {
  INFO(case_name<C>());
  auto adapted = make_model<C, double>(21);
  Decoder<typename C::Arch, peft::NoPeft, double> base(tiny_config<typename C::Arch>(), {}, 21);
  const Batch batch = padded_batch();
  CHECK(max_abs_diff(adapted.logits(batch), base.logits(batch)) == 0.0);
}

TEST_CASE_TEMPLATE("additive: merged IA3 and SSF give the unmerged logits", C,
                   Case<peft::arch::Gpt2, peft::IA3>, Case<peft::arch::Llama, peft::IA3>,
                   Case<peft::arch::Gpt2, peft::SSF>, Case<peft::arch::Llama, peft::SSF>) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 7, 0.5);
  const Batch batch = padded_batch();
  const Tensor<double> unmerged = model.logits(batch);
  const std::size_t base_tensors = model.base_parameters().size();
  model.merge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-12);
  model.unmerge();
  CHECK(max_abs_diff(model.logits(batch), unmerged) < 1e-12);
  CHECK(model.base_parameters().size() == base_tensors);  // SSF's merge-time biases are gone
}

namespace {
// The training task: continue a fixed cycle of 7 tokens (each token determines the next), on a
// 2-layer model whose random base weights are scaled to std 0.2 (at GPT-2's 0.02 a tiny model's
// logits cannot move far from uniform, whatever the adapter does).
Batch cycle_batch() {
  Batch batch;
  batch.batch = 2;
  batch.seq = 12;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 12; ++t) batch.input_ids.push_back((3 * t + 5 * b) % 7 + 1);
  return batch;
}

template <class Model>
void scale_base_weights(Model& model) {
  for (auto& p : model.base_parameters())
    if (p.var.value().rank() == 2) p.var.value().vector() *= 10.0f;
}

ModelConfig training_config(ModelConfig config) {
  config.hidden_size = 16;
  config.num_heads = 4;
  config.num_kv_heads = config.model_type == "gpt2" ? 4 : 2;
  config.intermediate_size = 32;
  return config;
}

/// Soft prompts only add context, which on a 2-layer random model moves the loss least: they get
/// more virtual tokens, a larger step and a looser bound.
template <class P>
constexpr bool is_soft_prompt =
    std::is_same_v<P, peft::PromptTuning> || std::is_same_v<P, peft::PTuning>;

template <class P>
typename PolicyOf<P>::Config training_method_config() {
  auto c = config_for<P>();
  if constexpr (is_soft_prompt<P>) {
    c.num_virtual_tokens = 8;
    if constexpr (std::is_same_v<P, peft::PTuning>) c.encoder_hidden_size = 16;
  }
  return c;
}
}  // namespace

TEST_CASE_TEMPLATE("additive: each method trains well below the base model's loss", C,
                   ADDITIVE_METHODS(peft::arch::Gpt2), Case<peft::arch::Llama, peft::IA3>,
                   Case<peft::arch::Llama, peft::PrefixTuning>,
                   Case<peft::arch::Llama, peft::SerialAdapter>) {
  // Thresholds after 100 AdamW steps, as a fraction of the base model's loss (about 2.5-2.8):
  // 0.5 for modules that rewrite activations (IA3, SSF, adapters), 0.6 for prefix tuning, 0.8
  // for soft prompts (lr 0.1 instead of 0.05).
  using P = typename C::Policy;
  INFO(case_name<C>());
  const ModelConfig config = training_config(tiny_config<typename C::Arch>());
  const Batch batch = cycle_batch();
  Decoder<typename C::Arch, peft::NoPeft, float> base(config, {}, 5);
  scale_base_weights(base);
  double base_loss = 0;
  {
    Tape<float> tape(false);
    base_loss = base.forward(tape, batch).loss.value()[0];
  }
  ModelOf<C, float> model(config, training_method_config<P>(), 5);
  scale_base_weights(model);
  peft::AdamWOptions options;
  options.lr = is_soft_prompt<P> ? 0.1 : 0.05;
  peft::AdamW<float> optimizer(model.trainable_parameters(), options);
  const int steps = 100;
  double loss = 0;
  for (int step = 0; step <= steps; ++step) {
    Tape<float> tape(step < steps);
    auto out = model.forward(tape, batch);
    loss = out.loss.value()[0];
    if (step == steps) break;
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
  }
  const double bound = is_soft_prompt<P>                                 ? 0.8
                       : std::is_same_v<PolicyOf<P>, peft::PrefixTuning> ? 0.6
                                                                         : 0.5;
  MESSAGE(case_name<C>() << ": base loss " << base_loss << ", trained " << loss);
  CHECK(loss < bound * base_loss);
}

TEST_CASE("additive: adapter configs read the reference's fields") {
  const nlohmann::json ia3 = {{"peft_type", "IA3"},
                              {"target_modules", {"mlp.c_proj", "c_attn"}},
                              {"feedforward_modules", {"mlp.c_proj"}},
                              {"fan_in_fan_out", true}};
  const auto c = peft::Ia3Config::from_json(ia3, "ia3");
  CHECK(c.is_feedforward("transformer.h.0.mlp.c_proj"));
  CHECK_FALSE(c.is_feedforward("transformer.h.0.attn.c_proj"));
  CHECK_THROWS_AS(peft::Ia3Config::from_json({{"peft_type", "IA3"},
                                              {"target_modules", {"c_attn"}},
                                              {"feedforward_modules", {"mlp.c_proj"}}},
                                             "ia3"),
                  peft::ConfigError);

  // A prefix adapter made for another model is refused with the dimension that differs.
  auto prefix = peft::PrefixTuningConfig::from_json({{"peft_type", "PREFIX_TUNING"},
                                                     {"num_virtual_tokens", 2},
                                                     {"num_layers", 3},
                                                     {"token_dim", 8},
                                                     {"num_attention_heads", 2}},
                                                    "prefix");
  CHECK_THROWS_AS((Decoder<peft::arch::Gpt2, peft::PrefixTuning, double>(tiny_gpt2(), prefix)),
                  peft::ConfigError);

  // The reference writes prefix token_dim and heads as the key/value width on GQA models.
  const nlohmann::json written = prefix_config(false).to_json(tiny_llama());
  CHECK(written["token_dim"] == 4);
  CHECK(written["num_attention_heads"] == 1);
  CHECK(written["encoder_hidden_size"] == 5);
}

TEST_CASE("additive: prompt tuning TEXT init takes the token embeddings, repeated to P") {
  peft::PromptTuningConfig c;
  c.num_virtual_tokens = 5;
  c.init = peft::PromptTuningConfig::Init::Text;
  c.init_token_ids = {4, 7};
  Decoder<peft::arch::Gpt2, peft::PromptTuning, double> model(tiny_gpt2(), c, 3);
  const Tensor<double>& prompt = model.adapter().parameters()[0].var.value();
  const Tensor<double>& wte = model.base_parameters()[0].var.value();
  const std::int64_t d = wte.dim(1);
  const std::int64_t ids[] = {4, 7, 4, 7, 4};
  for (std::int64_t i = 0; i < 5; ++i)
    for (std::int64_t j = 0; j < d; ++j) CHECK(prompt[i * d + j] == wte[ids[i] * d + j]);
}

TEST_CASE("additive: prefix tuning places real tokens after the prefix, unseen by padding") {
  // With an all-zero prefix the values add nothing, but the keys still take softmax mass; what
  // must hold exactly is that padding positions change nothing for real tokens.
  Decoder<peft::arch::Llama, peft::PrefixTuning, double> model(tiny_llama(), prefix_config(false),
                                                               2);
  Batch full = padded_batch();
  Batch other = full;
  other.input_ids[8] = 4;  // a different token under the padding
  other.input_ids[9] = 6;
  const Tensor<double> a = model.logits(full), b = model.logits(other);
  const std::int64_t T = full.seq, V = 12;
  for (std::int64_t t = 0; t < 3; ++t)  // the second row's real tokens
    for (std::int64_t v = 0; v < V; ++v)
      CHECK(a[(T + t) * V + v] == doctest::Approx(b[(T + t) * V + v]).epsilon(1e-12));
}

namespace {
/// The reference's print_trainable_parameters numbers, from shapes alone.
std::pair<std::int64_t, std::int64_t> count(const nlohmann::json& model_json,
                                            const nlohmann::json& adapter_json) {
  const ModelConfig model = ModelConfig::from_json(model_json, "model");
  std::int64_t trainable = -1, all = -1;
  const bool known = peft::visit_policy_for(adapter_json, [&]<class Policy>() {
    const auto config = Policy::Config::from_json(adapter_json, "adapter");
    peft::visit_arch_for(model.model_type, [&]<class Arch>() {
      const auto c =
          peft::count_parameters<Policy>(model, peft::linear_shapes<Arch>(model), config);
      trainable = c.trainable;
      all = peft::base_parameter_count<Arch>(model) + c.trainable + c.frozen;
    });
  });
  REQUIRE(known);
  return {trainable, all};
}

// Published configurations (the fields the count needs).
const nlohmann::json gpt2_124m = {{"model_type", "gpt2"}, {"vocab_size", 50257},
                                  {"n_embd", 768},        {"n_layer", 12},
                                  {"n_head", 12},         {"n_positions", 1024}};
const nlohmann::json llama_7b = {
    {"model_type", "llama"},           {"vocab_size", 32000},     {"hidden_size", 4096},
    {"intermediate_size", 11008},      {"num_hidden_layers", 32}, {"num_attention_heads", 32},
    {"max_position_embeddings", 2048}, {"rms_norm_eps", 1e-6},    {"tie_word_embeddings", false}};
// Llama-3.2-1B without its rope_scaling block, which the counting does not depend on.
const nlohmann::json llama32_1b = {{"model_type", "llama"},
                                   {"vocab_size", 128256},
                                   {"hidden_size", 2048},
                                   {"intermediate_size", 8192},
                                   {"num_hidden_layers", 16},
                                   {"num_attention_heads", 32},
                                   {"num_key_value_heads", 8},
                                   {"head_dim", 64},
                                   {"max_position_embeddings", 131072},
                                   {"rms_norm_eps", 1e-5},
                                   {"tie_word_embeddings", true}};
}  // namespace

TEST_CASE("additive: peft count reproduces the reference on published models") {
  const nlohmann::json ia3 = {{"peft_type", "IA3"}};  // the per-architecture defaults
  const nlohmann::json prefix20 = {{"peft_type", "PREFIX_TUNING"}, {"num_virtual_tokens", 20}};
  const nlohmann::json prefix30 = {{"peft_type", "PREFIX_TUNING"}, {"num_virtual_tokens", 30}};
  const nlohmann::json prompt20 = {{"peft_type", "PROMPT_TUNING"}, {"num_virtual_tokens", 20}};
  // GPT-2 124M: 124,439,808 base parameters.
  // IA3: c_attn's 2304 outputs + mlp.c_proj's 3072 inputs, 12 blocks.
  CHECK(count(gpt2_124m, ia3) == std::pair<std::int64_t, std::int64_t>{64'512, 124'504'320});
  CHECK(count(gpt2_124m, prefix20) == std::pair<std::int64_t, std::int64_t>{368'640, 124'808'448});
  CHECK(count(gpt2_124m, prompt20) == std::pair<std::int64_t, std::int64_t>{15'360, 124'455'168});
  // LLaMA-7B: 6,738,415,616 base parameters. The reference's prefix-tuning example prints
  // "trainable params: 7,864,320 || all params: 6,746,279,936" for 30 virtual tokens.
  CHECK(count(llama_7b, prefix30) ==
        std::pair<std::int64_t, std::int64_t>{7'864'320, 6'746'279'936});
  CHECK(count(llama_7b, ia3) == std::pair<std::int64_t, std::int64_t>{614'400, 6'739'030'016});
  CHECK(count(llama_7b, prompt20) == std::pair<std::int64_t, std::int64_t>{81'920, 6'738'497'536});
  // Llama-3.2-1B: 1,235,814,400 base parameters (tied head); prefixes use 8 key/value heads.
  CHECK(count(llama32_1b, ia3) == std::pair<std::int64_t, std::int64_t>{147'456, 1'235'961'856});
  CHECK(count(llama32_1b, prefix20) ==
        std::pair<std::int64_t, std::int64_t>{327'680, 1'236'142'080});
  CHECK(count(llama32_1b, prompt20) ==
        std::pair<std::int64_t, std::int64_t>{40'960, 1'235'855'360});
  // With the re-parameterisation the reference counts the encoder it trains:
  // E [20, 768] + Linear(768, 768) + Linear(768, 12·2·768).
  nlohmann::json projected = prefix20;
  projected["prefix_projection"] = true;
  CHECK(count(gpt2_124m, projected).first == 20 * 768 + (768 * 768 + 768) + (768 * 18432 + 18432));
}

TEST_CASE("additive: counts agree with the golden cases and with the built adapters") {
  const auto dir = golden_cases_dir();
  if (dir.empty()) {
    MESSAGE("golden cases not found; skipped");
    return;
  }
  for (const char* name : {"gpt2_ia3", "llama_ia3", "gpt2_prefix", "llama_prefix", "gpt2_prompt"}) {
    INFO(name);
    const auto case_json = peft::io::load_json(dir / name / "case.json");
    const auto model_json =
        peft::io::load_json(dir / name / case_json["model_dir"].get<std::string>() / "config.json");
    const auto adapter_json = peft::io::load_json(dir / name / "adapter" / "adapter_config.json");
    const auto [trainable, all] = count(model_json, adapter_json);
    CHECK(trainable == case_json["trainable_params"].get<std::int64_t>());
    CHECK(all == case_json["all_params"].get<std::int64_t>());
  }
}

TEST_CASE_TEMPLATE("additive: count_parameters equals the tensors a built adapter trains", C,
                   ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  std::int64_t built = 0;
  for (auto& p : model.trainable_parameters()) built += p.var.value().numel();
  const ModelConfig config = tiny_config<typename C::Arch>();
  const auto counted = peft::count_parameters<PolicyOf<typename C::Policy>>(
      config, peft::linear_shapes<typename C::Arch>(config), config_for<typename C::Policy>());
  CHECK(counted.trainable == built);
}

// ---------------------------------------------------------------------------------------------
// Generation with the key/value cache (Decoder::forward_cached, generate.hpp)

Batch one_row(const std::vector<std::int64_t>& ids) {
  Batch b;
  b.batch = 1;
  b.seq = static_cast<std::int64_t>(ids.size());
  b.input_ids = ids;
  return b;
}

TEST_CASE_TEMPLATE("additive: the key/value cache gives the full forward's logits and tokens", C,
                   ALL_CASES, Case<peft::arch::Gpt2, peft::LoRA>,
                   Case<peft::arch::Llama, peft::LoRA>) {
  INFO(case_name<C>());
  auto model = make_model<C, double>();
  perturb_adapter(model, 13, 0.5);
  const std::int64_t V = model.config().vocab_size;
  const std::vector<std::int64_t> prompt = {1, 5, 7, 2, 9};
  typename ModelOf<C, double>::KvCache cache;
  std::vector<std::int64_t> context = prompt;
  // The prefill, then one token a step; each step's logits against forward() over the whole
  // context (prefix keys, virtual tokens and all).
  peft::Tensor<double> step = model.forward_cached(one_row(prompt), cache);
  double worst = 0;
  for (int n = 0; n < 8; ++n) {
    REQUIRE(step.shape() == peft::Shape{1, 1, V});
    const peft::Tensor<double> full = model.logits(one_row(context));
    const double* last = full.data() + (full.shape()[1] - 1) * V;
    std::int64_t next = 0;
    for (std::int64_t v = 0; v < V; ++v) {
      worst = std::max(worst, std::abs(step.data()[v] - last[v]) / (1 + std::abs(last[v])));
      if (last[v] > last[next]) next = v;
    }
    context.push_back(next);
    step = model.forward_cached(one_row({next}), cache);
  }
  CHECK(worst < 1e-13);  // rounding: the products of one row and of many differ
  Tape<double> no_grad(false);
  const std::int64_t virtual_tokens = model.forward(no_grad, one_row(prompt), false).virtual_tokens;
  CHECK(cache.past == static_cast<std::int64_t>(context.size()) + virtual_tokens);

  // generate(): the same tokens with the cache as without, greedy and sampled.
  peft::GenerateOptions o;
  o.max_new_tokens = 10;
  peft::GenerateOptions uncached = o;
  uncached.use_cache = false;
  CHECK(peft::generate(model, prompt, o) == peft::generate(model, prompt, uncached));
  o.temperature = uncached.temperature = 0.8;
  o.top_p = uncached.top_p = 0.9;
  o.seed = uncached.seed = 5;
  CHECK(peft::generate(model, prompt, o) == peft::generate(model, prompt, uncached));
}

TEST_CASE("additive: past the window the cached generation slides as the uncached one") {
  // 5 prompt tokens and 40 new ones through a 32-position window: the context slides, the
  // cache is rebuilt from it, and the tokens stay those of the uncached path.
  using C = Case<peft::arch::Gpt2, peft::IA3>;
  auto model = make_model<C, double>();
  perturb_adapter(model, 17, 0.5);
  peft::GenerateOptions o;
  o.max_new_tokens = 40;
  o.temperature = 1.0;
  o.seed = 3;
  peft::GenerateOptions uncached = o;
  uncached.use_cache = false;
  const std::vector<std::int64_t> prompt = {1, 5, 7, 2, 9};
  CHECK(peft::generate(model, prompt, o) == peft::generate(model, prompt, uncached));

  typename ModelOf<C, double>::KvCache cache;
  Batch masked = one_row(prompt);
  masked.attention_mask = {1, 1, 1, 1, 1};
  CHECK_THROWS_AS(model.forward_cached(masked, cache), peft::ShapeError);
  model.forward_cached(one_row(prompt), cache);
  Batch two_rows = one_row({1, 2});
  two_rows.batch = 2;
  two_rows.seq = 1;
  CHECK_THROWS_AS(model.forward_cached(two_rows, cache), peft::ShapeError);
}

#undef ADDITIVE_METHODS
#undef ALL_CASES

}  // namespace test_additive
