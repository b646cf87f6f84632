// HF-PEFT-style conveniences: the print_trainable_parameters line (from counts and from a live
// model), saving a base model in the reference layout, Trainer deduction with an evaluator,
// and the reference's per-model-type config defaults.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <peft/commands/count.hpp>
#include <peft/io/model_file.hpp>
#include <peft/nn/summary.hpp>
#include <peft/peft.hpp>
#include <random>
#include <string>
#include <type_traits>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_conveniences {

namespace {

namespace fs = std::filesystem;
using peft::ModelConfig;

fs::path scratch_dir(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("peft_test_conveniences_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  return dir;
}

fs::path golden_models_dir() {
#ifdef PEFT_GOLDEN_DIR
  if (fs::is_directory(fs::path(PEFT_GOLDEN_DIR) / "models"))
    return fs::path(PEFT_GOLDEN_DIR) / "models";
#endif
  return {};
}

/// Every base tensor of `a` and `b`, by name, bit for bit.
template <class A, class B>
void check_same_base(A& a, B& b) {
  const auto pa = a.base_parameters();
  const auto pb = b.base_parameters();
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].name);
    CHECK(pa[i].name == pb[i].name);
    CHECK(pa[i].var.shape() == pb[i].var.shape());
    CHECK(pa[i].var.value().values() == pb[i].var.value().values());
  }
}

/// The live model's summary against the count from shapes (what `peft count` prints).
template <class Arch, class Policy>
peft::ParameterSummary check_against_shapes(const ModelConfig& mc,
                                            const typename Policy::Config& config) {
  peft::Decoder<Arch, Policy, float> model(mc, config, 1);
  const peft::ParameterSummary s = peft::parameter_summary(model);
  const peft::ParameterCount c =
      peft::count_parameters<Policy>(mc, peft::linear_shapes<Arch>(mc), config);
  const std::int64_t all = peft::base_parameter_count<Arch>(mc) + c.trainable + c.frozen;
  CHECK(s.base == peft::base_parameter_count<Arch>(mc));
  CHECK(s.trainable == c.trainable);
  CHECK(s.all == s.base + s.adapter_trainable + s.adapter_frozen);
  if (s.adapter_frozen == 0) {
    CHECK(s.all == all);
    CHECK(peft::trainable_parameters_line(model) ==
          peft::trainable_parameters_line(c.trainable, all));
  }
  return s;
}

}  // namespace

TEST_CASE("conveniences: the trainable-parameters line is the reference's, byte for byte") {
  CHECK(peft::trainable_parameters_line(294912, 124734720) ==
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364");
  CHECK(peft::trainable_parameters_line(0, 0) ==
        "trainable params: 0 || all params: 0 || trainable%: 0.0000");
  CHECK(peft::trainable_parameters_line(4194304, 6742609920) ==
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622");
  CHECK(peft::with_thousands(1234567) == "1,234,567");
  CHECK(peft::with_thousands(-1000) == "-1,000");
  CHECK(peft::with_thousands(999) == "999");
}

TEST_CASE("conveniences: a live model's count agrees with the count from shapes") {
  using peft::arch::Gpt2;
  using peft::arch::Llama;
  const ModelConfig gpt2 = test_support::tiny_gpt2(), llama = test_support::tiny_llama();
  peft::LoraConfig lora;
  lora.r = 2;
  lora.lora_alpha = 4;
  lora.targets.target_modules.names = {"c_attn"};
  check_against_shapes<Gpt2, peft::LoRA>(gpt2, lora);
  lora.targets.target_modules.names = {"q_proj", "v_proj"};
  check_against_shapes<Llama, peft::LoRA>(llama, lora);
  check_against_shapes<Llama, peft::DoRA>(llama, peft::DoraConfig{lora});
  check_against_shapes<Gpt2, peft::IA3>(gpt2, {});
  check_against_shapes<Llama, peft::IA3>(llama, {});
  check_against_shapes<Gpt2, peft::BitFit>(gpt2, {});
  // LN tuning and BitFit train base tensors in place: in "all" twice, as the reference's
  // LN tuning (a trained copy beside the frozen norm) and `peft count` count them.
  const auto ln = check_against_shapes<Gpt2, peft::LNTuning>(gpt2, {});
  CHECK(ln.trainable > 0);
  check_against_shapes<Llama, peft::LNTuning>(llama, {});

  // VeRA: without the saved projections, the reference's count; with them (the default), the
  // summary counts the two frozen shared matrices the adapter lists, which the reference keeps
  // as buffers (documented in summary.hpp).
  peft::VeraConfig vera;
  vera.r = 4;
  vera.targets.target_modules.names = {"q_proj", "v_proj"};
  vera.save_projection = false;
  CHECK(check_against_shapes<Llama, peft::VeRA>(llama, vera).adapter_frozen == 0);
  vera.save_projection = true;
  const auto saved = check_against_shapes<Llama, peft::VeRA>(llama, vera);
  CHECK(saved.adapter_frozen > 0);
}

TEST_CASE("conveniences: the live count of the published GPT-2 line and of full fine-tuning") {
  // GPT-2 124M with LoRA r=8 on c_attn (the reference's documented line), built for real would
  // be 0.5 GB of float: the same line from a 2-layer GPT-2 is checked against `peft count`.
  ModelConfig mc = ModelConfig::gpt2();
  mc.vocab_size = 50, mc.hidden_size = 16, mc.num_layers = 2, mc.num_heads = mc.num_kv_heads = 2;
  mc.head_dim = 8, mc.intermediate_size = 64, mc.max_positions = 16;
  peft::LoraConfig lora;
  lora.r = 8;
  lora.targets.target_modules.names = {"c_attn"};
  peft::Decoder<peft::arch::Gpt2, peft::LoRA, float> model(mc, lora, 1);
  const auto [trainable, all] = peft::commands::count_from_configs(
      mc.to_json(), "config.json", lora.to_json(mc), "adapter_config.json");
  CHECK(peft::trainable_parameters_line(model) == peft::trainable_parameters_line(trainable, all));
  CHECK(trainable == 2 * 8 * (16 + 48));

  model.set_base_trainable(true);
  const peft::ParameterSummary full = peft::parameter_summary(model);
  CHECK(full.trainable == full.all);
  CHECK(full.all == all);
  CHECK(full.line() == peft::trainable_parameters_line(all, all));
}

TEST_CASE_TEMPLATE("conveniences: save_model writes a folder Decoder::load reads back bit for bit",
                   Arch, peft::arch::Gpt2, peft::arch::Llama) {
  const ModelConfig mc = test_support::tiny_config<Arch>();
  peft::Decoder<Arch, peft::NoPeft, float> model(mc, {}, 5);
  // Make every tensor distinct from a fresh model's (norms 1, biases 0 otherwise).
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& p : model.base_parameters())
    for (float& x : p.var.value().values()) x = normal(rng);

  const fs::path dir = scratch_dir(std::string(Arch::model_type));
  peft::io::save_model(model, dir);
  CHECK(fs::is_regular_file(dir / "config.json"));
  CHECK(fs::is_regular_file(dir / "model.safetensors"));
  for (const auto& entry : fs::directory_iterator(dir)) CHECK(entry.path().extension() != ".tmp");

  auto back = peft::Decoder<Arch, peft::NoPeft, float>::load(dir);
  CHECK(back.config().to_json() == mc.to_json());
  check_same_base(model, back);
  const peft::Batch batch = test_support::padded_batch();
  CHECK(back.logits(batch).values() == model.logits(batch).values());

  // The file holds exactly the reference's names, F32, lm_head.weight only when untied.
  const auto file = peft::io::SafetensorsFile::open(dir / "model.safetensors");
  CHECK(file.contains("lm_head.weight") == !mc.tie_word_embeddings);
  CHECK(file.tensors().size() == model.base_parameters().size());
  for (const auto& info : file.tensors()) CHECK(info.dtype == peft::io::Dtype::F32);

  // A model with an adapter attached loads its base from the same folder.
  peft::LoraConfig lora;
  lora.targets.target_modules.names = {Arch::learned_positions ? "c_attn" : "q_proj"};
  auto adapted = peft::Decoder<Arch, peft::LoRA, float>::load(dir, lora, 3);
  check_same_base(model, adapted);
  fs::remove_all(dir);
}

TEST_CASE("conveniences: save_model of the golden models reproduces their tensors") {
  const fs::path models = golden_models_dir();
  if (models.empty()) return;
  auto check = [&]<class Arch>(const std::string& name) {
    INFO(name);
    auto model = peft::Decoder<Arch, peft::NoPeft, float>::load(models / name);
    const fs::path dir = scratch_dir("golden_" + name);
    peft::io::save_model(model, dir);
    const auto original = peft::io::SafetensorsFile::open(models / name / "model.safetensors");
    const auto written = peft::io::SafetensorsFile::open(dir / "model.safetensors");
    CHECK(written.metadata().at("format") == "pt");
    for (const auto& p : model.base_parameters()) {
      INFO(p.name);
      CHECK(written.read<float>(p.name, p.var.shape()) ==
            original.read<float>(p.name, p.var.shape()));
    }
    const ModelConfig a =
        ModelConfig::from_json(peft::io::load_json(models / name / "config.json"), name);
    const ModelConfig b = ModelConfig::from_json(peft::io::load_json(dir / "config.json"), name);
    CHECK(a.to_json() == b.to_json());
    fs::remove_all(dir);
  };
  check.operator()<peft::arch::Gpt2>("gpt2-tiny");
  check.operator()<peft::arch::Llama>("llama-tiny");
}

TEST_CASE("conveniences: a failed save leaves nothing under the final names") {
  const ModelConfig mc = test_support::tiny_llama();
  peft::Decoder<peft::arch::Llama, peft::NoPeft, float> model(mc, {}, 5);
  const fs::path dir = scratch_dir("failed");
  // Where the model folder should be there is a file: refused before anything is written.
  fs::create_directories(dir.parent_path());
  std::ofstream(dir) << "x";
  CHECK_THROWS_WITH_AS(peft::io::save_model(model, dir), doctest::Contains("is not a folder"),
                       peft::FileError);
  CHECK(fs::is_regular_file(dir));
  for (const fs::directory_entry& entry : fs::directory_iterator(dir.parent_path()))
    CHECK(entry.path().filename().string().find(".peft-tmp-") == std::string::npos);
  fs::remove(dir);
  // The old writer's fixed temporary name, taken by a folder, no longer disturbs a save.
  fs::create_directories(dir / "config.json.tmp");
  CHECK_NOTHROW(peft::io::save_model(model, dir));
  CHECK(fs::is_regular_file(dir / "config.json"));
  CHECK(fs::is_regular_file(dir / "model.safetensors"));

  // A folder that cannot be created (its parent is a file) throws before writing anything.
  const fs::path file = scratch_dir("a_file");
  fs::create_directories(file.parent_path());
  std::ofstream(file) << "x";
  CHECK_THROWS_AS(peft::io::save_model(model, file / "model"), peft::FileError);
  fs::remove_all(dir);
  fs::remove(file);
}

TEST_CASE("conveniences: Trainer deduces its model type with and without an evaluator") {
  ModelConfig mc = ModelConfig::llama();
  mc.vocab_size = peft::data::TaskVocab::size;
  mc.hidden_size = 16, mc.num_layers = 1, mc.num_heads = mc.num_kv_heads = 2, mc.head_dim = 8;
  mc.intermediate_size = 32, mc.max_positions = 32;
  using Model = peft::Decoder<peft::arch::Llama, peft::LoRA, float>;
  peft::LoraConfig lora;
  lora.r = 2;
  lora.targets.target_modules.names = {"q_proj", "v_proj"};
  Model model(mc, lora, 3);
  const peft::data::TaskMixture task{
      {peft::data::TaskKind::Copy}, {.min_length = 1, .max_length = 4}, 0};
  const std::vector<peft::Batch> eval = task.eval_batches(2, 4, 8);
  peft::TrainerOptions options;
  options.max_steps = 2;
  options.eval_every = 1;
  const auto batches = [&](std::mt19937_64& rng) { return task.train_batch(rng, 4); };

  peft::Trainer with_eval(model, options, batches,
                          [&](Model& m) { return peft::evaluate(m, eval); });
  static_assert(std::is_same_v<decltype(with_eval), peft::Trainer<Model>>);
  const peft::TrainResult result = with_eval.run();
  CHECK(result.steps == 2);
  CHECK(result.evals.size() == 3);  // steps 0 (eval_at_start), 1 and 2

  peft::Trainer without_eval(model, options, batches);
  static_assert(std::is_same_v<decltype(without_eval), peft::Trainer<Model>>);
  const peft::Trainer<Model>::Evaluator typed = [&](Model& m) { return peft::evaluate(m, eval); };
  peft::Trainer with_typed_eval(model, options, batches, typed);
  static_assert(std::is_same_v<decltype(with_typed_eval), peft::Trainer<Model>>);
  peft::Trainer with_generic_eval(model, options, batches,
                                  [&](auto& m) { return peft::evaluate(m, eval); });
  static_assert(std::is_same_v<decltype(with_generic_eval), peft::Trainer<Model>>);
  CHECK(with_generic_eval.run().evals.size() == 3);
}

TEST_CASE("conveniences: per-model-type config defaults are the reference's") {
  const ModelConfig llama = ModelConfig::llama();
  CHECK(llama.model_type == "llama");
  CHECK(!llama.attention_bias);
  CHECK(!llama.mlp_bias);
  CHECK(!llama.tie_word_embeddings);
  CHECK(llama.norm_eps == 1e-6);
  CHECK(llama.rope_theta == 10000.0);
  CHECK(llama.head_dim * llama.num_heads == llama.hidden_size);
  CHECK_NOTHROW(llama.validate("LlamaConfig()"));

  const ModelConfig gpt2 = ModelConfig::gpt2();
  CHECK(gpt2.attention_bias);
  CHECK(gpt2.mlp_bias);
  CHECK(gpt2.tie_word_embeddings);
  CHECK(gpt2.norm_eps == 1e-5);
  CHECK(gpt2.intermediate_size == 4 * gpt2.hidden_size);
  CHECK_NOTHROW(gpt2.validate("GPT2Config()"));
  // GPT2Config() is GPT-2 124M: 124,439,808 parameters.
  CHECK(peft::base_parameter_count<peft::arch::Gpt2>(gpt2) == 124439808);

  CHECK(ModelConfig::for_model_type("llama").to_json() == llama.to_json());
  CHECK(ModelConfig::for_model_type("gpt2").to_json() == gpt2.to_json());
  CHECK_THROWS_AS(ModelConfig::for_model_type("bert", "x.json"), peft::ConfigError);

  // A reference LLaMA config.json leaves the flags out: they mean LlamaConfig's defaults.
  nlohmann::json j = {{"model_type", "llama"},    {"vocab_size", 32},
                      {"hidden_size", 16},        {"num_hidden_layers", 1},
                      {"num_attention_heads", 2}, {"intermediate_size", 24}};
  const ModelConfig read = ModelConfig::from_json(j, "config.json");
  CHECK(!read.attention_bias);
  CHECK(!read.mlp_bias);
  CHECK(!read.tie_word_embeddings);
  CHECK(read.norm_eps == 1e-6);
  CHECK(read.rope_theta == 10000.0);
  j["attention_bias"] = true;  // set explicitly, kept
  CHECK(ModelConfig::from_json(j, "config.json").attention_bias);
  CHECK(!ModelConfig::from_json(j, "config.json").mlp_bias);

  // A small LLaMA from the named constructor has no bias tensors.
  ModelConfig small = ModelConfig::llama();
  small.vocab_size = 12, small.hidden_size = 8, small.num_layers = 1;
  small.num_heads = small.num_kv_heads = 2, small.head_dim = 4, small.intermediate_size = 12;
  peft::Decoder<peft::arch::Llama, peft::NoPeft, float> model(small, {}, 1);
  for (const auto& p : model.base_parameters()) CHECK(p.name.find(".bias") == std::string::npos);

  // Rotary scaling survives to_json → from_json (so a saved model keeps it).
  ModelConfig scaled = small;
  scaled.rope_scaling.type = "llama3";
  scaled.rope_scaling.factor = 8;
  scaled.rope_scaling.original_max_position_embeddings = 16;
  const ModelConfig back = ModelConfig::from_json(scaled.to_json(), "written");
  CHECK(back.rope_scaling.type == "llama3");
  CHECK(back.rope_scaling.factor == 8);
  CHECK(back.rope_scaling.original_max_position_embeddings == 16);
  CHECK(peft::rope_inverse_frequencies(back) == peft::rope_inverse_frequencies(scaled));
}

TEST_CASE("conveniences: the README's snippet prints the line it shows") {
  ModelConfig base = ModelConfig::llama();
  base.vocab_size = 512, base.hidden_size = 64, base.num_layers = 2;
  base.num_heads = base.num_kv_heads = 4, base.head_dim = 16, base.intermediate_size = 176;
  peft::LoraConfig lora;
  lora.r = 8, lora.targets.target_modules.names = {"q_proj", "v_proj"};
  peft::Decoder<peft::arch::Llama, peft::LoRA, float> model(base, lora, /*seed=*/1);
  CHECK(peft::trainable_parameters_line(model) ==
        "trainable params: 4,096 || all params: 170,304 || trainable%: 2.4051");
}

}  // namespace test_conveniences
