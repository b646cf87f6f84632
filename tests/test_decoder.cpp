// The decoder (GPT-2 and LLaMA flavours), model files, target rules and LoRA end to end.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_decoder {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::LoRA;
using peft::LoraConfig;
using peft::ModelConfig;
using peft::Tape;
using peft::Var;

ModelConfig tiny_config(const std::string& type) {
  ModelConfig c;
  c.model_type = type;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.num_heads = 2;
  c.num_kv_heads = type == "llama" ? 1 : 2;
  c.head_dim = 4;
  c.intermediate_size = type == "llama" ? 12 : 32;
  c.max_positions = 16;
  c.tie_word_embeddings = type == "gpt2";
  c.attention_bias = c.mlp_bias = type == "gpt2";
  return c;
}

Batch tiny_batch() {
  Batch b;
  b.batch = 2;
  b.seq = 5;
  b.input_ids = {1, 5, 7, 2, 9, 3, 3, 12, 0, 0};
  b.attention_mask = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
  return b;
}

LoraConfig lora_config(std::vector<std::string> targets, int r = 2) {
  LoraConfig c;
  c.r = r;
  c.lora_alpha = 3;
  c.targets.target_modules.names = std::move(targets);
  c.init = LoraConfig::Init::Gaussian;  // nonzero A
  return c;
}

// B starts at zero; give it values so that gradients of A are not trivially zero.
template <class Model>
void randomise_adapter(Model& model, std::uint64_t seed) {
  for (auto& p : model.adapter().parameters())
    p.var.value() = peft::testing::random_tensor(p.var.shape(), seed++, -0.5, 0.5)
                        .template cast<typename Model::Scalar>();
}

template <class Arch>
void check_decoder_lora_gradients(const std::vector<std::string>& targets) {
  Decoder<Arch, LoRA, double> model(tiny_config(std::string(Arch::model_type)),
                                    lora_config(targets), 7);
  randomise_adapter(model, 100);
  std::vector<Var<double>> inputs;
  for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
  REQUIRE(!inputs.empty());
  const Batch batch = tiny_batch();
  auto f = [&](Tape<double>& tape, std::vector<Var<double>>&) {
    return model.forward(tape, batch).loss;
  };
  const auto result =
      peft::testing::check_gradients(f, inputs, {.step = 1e-6, .rtol = 1e-5, .atol = 1e-8});
  INFO(result.message);
  CHECK(result.ok);
}

}  // namespace

TEST_CASE("LoRA through the whole decoder passes the gradient check (GPT-2 and LLaMA)") {
  check_decoder_lora_gradients<peft::arch::Gpt2>({"c_attn", "c_proj", "c_fc"});
  check_decoder_lora_gradients<peft::arch::Llama>(
      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"});
}

TEST_CASE("full fine-tuning: every base tensor's gradient matches finite differences") {
  for (const std::string type : {"gpt2", "llama"}) {
    CAPTURE(type);
    ModelConfig c = tiny_config(type);
    c.num_layers = 1;
    std::vector<Var<double>> inputs;
    auto check_model = [&](auto& model) {
      model.set_base_trainable(true);
      for (auto& p : model.trainable_parameters()) inputs.push_back(p.var);
      const Batch batch = tiny_batch();
      auto f = [&](Tape<double>& tape, std::vector<Var<double>>&) {
        return model.forward(tape, batch).loss;
      };
      const auto result =
          peft::testing::check_gradients(f, inputs, {.step = 1e-6, .rtol = 1e-5, .atol = 1e-8});
      INFO(result.message);
      CHECK(result.ok);
    };
    if (type == "gpt2") {
      Decoder<peft::arch::Gpt2, peft::NoPeft, double> model(c, {}, 3);
      check_model(model);
    } else {
      Decoder<peft::arch::Llama, peft::NoPeft, double> model(c, {}, 3);
      check_model(model);
    }
  }
}

TEST_CASE("frozen base weights get no gradient buffer during PEFT training") {
  Decoder<peft::arch::Llama, LoRA, float> model(tiny_config("llama"), lora_config({"q_proj"}), 1);
  Tape<float> tape;
  auto out = model.forward(tape, tiny_batch());
  tape.backward(out.loss);
  for (auto& p : model.base_parameters()) CHECK_FALSE(p.var.has_grad());
  for (auto& p : model.adapter().parameters()) CHECK(p.var.has_grad());
  CHECK(model.trainable_parameters().size() == 4);  // A and B in 2 layers
}

TEST_CASE("LoRA with default init starts exactly at the base model") {
  LoraConfig config = lora_config({"c_attn", "c_fc"});
  config.init = LoraConfig::Init::Default;
  Decoder<peft::arch::Gpt2, LoRA, float> adapted(tiny_config("gpt2"), config, 5);
  Decoder<peft::arch::Gpt2, peft::NoPeft, float> base(tiny_config("gpt2"), {}, 5);
  CHECK(adapted.logits(tiny_batch()).values() == base.logits(tiny_batch()).values());
}

TEST_CASE("right padding does not change the logits of real tokens") {
  Decoder<peft::arch::Llama, peft::NoPeft, double> model(tiny_config("llama"), {}, 2);
  Batch a = tiny_batch(), b = tiny_batch();
  b.input_ids[8] = 11;  // different padding tokens
  b.input_ids[9] = 4;
  const auto la = model.logits(a), lb = model.logits(b);
  const std::int64_t V = 13;
  for (std::int64_t i = 0; i < 8 * V; ++i) CHECK(la[i] == lb[i]);
}

TEST_CASE("merge then unmerge restores the base weights; merged logits equal unmerged") {
  for (const std::string type : {"gpt2", "llama"}) {
    auto run = [&](auto& model) {
      randomise_adapter(model, 200);
      std::vector<peft::AlignedVector<float>> before;
      for (auto& p : model.base_parameters()) before.push_back(p.var.value().values());
      const auto unmerged = model.logits(tiny_batch());
      model.merge();
      const auto merged = model.logits(tiny_batch());
      for (std::int64_t i = 0; i < merged.numel(); ++i)
        CHECK(merged[i] == doctest::Approx(unmerged[i]).epsilon(1e-5));
      model.unmerge();
      std::size_t k = 0;
      for (auto& p : model.base_parameters()) {
        const auto& now = p.var.value().values();
        for (std::size_t i = 0; i < now.size(); ++i)
          CHECK(now[i] == doctest::Approx(before[k][i]).epsilon(1e-6));
        ++k;
      }
    };
    if (type == "gpt2") {
      Decoder<peft::arch::Gpt2, LoRA, float> model(tiny_config(type),
                                                   lora_config({"c_attn", "c_proj"}), 9);
      run(model);
    } else {
      Decoder<peft::arch::Llama, LoRA, float> model(tiny_config(type),
                                                    lora_config({"v_proj", "down_proj"}), 9);
      run(model);
    }
  }
}

TEST_CASE("LoRA adapter: save, load, same logits; the config reads back") {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("peft_test_lora_adapter_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  const ModelConfig mc = tiny_config("llama");
  LoraConfig config = lora_config({"q_proj", "v_proj"}, 3);
  config.use_rslora = true;
  Decoder<peft::arch::Llama, LoRA, float> model(mc, config, 4);
  randomise_adapter(model, 300);
  peft::io::save_adapter(dir, config.to_json(mc), model.adapter().parameters());

  const nlohmann::json written = peft::io::load_json(dir / "adapter_config.json");
  const LoraConfig reread = LoraConfig::from_json(written, "written");
  CHECK(reread.r == 3);
  CHECK(reread.use_rslora);
  Decoder<peft::arch::Llama, LoRA, float> loaded(mc, reread, 99);
  peft::io::load_adapter_tensors(
      loaded.adapter().parameters(),
      peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors"));
  // Same base (same seed) is needed for equal logits: copy the base weights across.
  auto src = model.base_parameters();
  auto dst = loaded.base_parameters();
  for (std::size_t i = 0; i < src.size(); ++i) dst[i].var.value() = src[i].var.value();
  CHECK(model.logits(tiny_batch()).values() == loaded.logits(tiny_batch()).values());
  // Bit-exact tensors.
  auto a = model.adapter().parameters(), b = loaded.adapter().parameters();
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(a[i].var.value().values() == b[i].var.value().values());

  // An adapter written for other targets is rejected, naming the tensor.
  Decoder<peft::arch::Llama, LoRA, float> other(mc, lora_config({"q_proj"}, 3), 1);
  CHECK_THROWS_WITH_AS(peft::io::load_adapter_tensors(
                           other.adapter().parameters(),
                           peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors")),
                       doctest::Contains("v_proj"), peft::FileError);
  std::filesystem::remove_all(dir);
}

TEST_CASE("target_modules follow the reference's matching rules") {
  peft::ModuleSelector list;
  list.names = {"c_proj", "q"};
  CHECK(list.matches("transformer.h.0.attn.c_proj"));
  CHECK(list.matches("transformer.h.0.mlp.c_proj"));
  CHECK(list.matches("q"));
  CHECK_FALSE(list.matches("model.layers.0.self_attn.q_proj"));  // suffix must follow a dot
  CHECK_FALSE(list.matches("xc_proj"));
  peft::ModuleSelector regex;
  regex.regex = R"(.*\.(q|v)_proj)";
  CHECK(regex.matches("model.layers.1.self_attn.v_proj"));
  CHECK_FALSE(regex.matches("model.layers.1.self_attn.v_proj.x"));  // full match only
  peft::ModuleSelector all;
  all.all_linear = true;
  CHECK(all.matches("model.layers.0.mlp.up_proj"));
  CHECK_FALSE(all.matches("lm_head", true));

  peft::TargetRules rules;
  rules.target_modules.names = {"q_proj", "v_proj"};
  rules.exclude_modules.names = {"model.layers.0.self_attn.v_proj"};
  rules.layers_to_transform = {0, 2};
  CHECK(rules.selects("model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(rules.selects("model.layers.0.self_attn.v_proj"));  // excluded
  CHECK_FALSE(rules.selects("model.layers.1.self_attn.q_proj"));  // layer not listed
  CHECK(rules.selects("model.layers.2.self_attn.v_proj"));

  peft::PatternMap<int> ranks{{"v_proj", 16}, {"layers.1.self_attn.q_proj", 4}};
  CHECK(peft::pattern_lookup(ranks, "model.layers.0.self_attn.v_proj") == 16);
  CHECK(peft::pattern_lookup(ranks, "model.layers.1.self_attn.q_proj") == 4);
  CHECK_FALSE(peft::pattern_lookup(ranks, "model.layers.0.self_attn.q_proj").has_value());
}

TEST_CASE("rank_pattern and alpha_pattern give per-module ranks and scales") {
  LoraConfig config = lora_config({"q_proj", "v_proj"}, 2);
  config.rank_pattern = {{"v_proj", 4}};
  config.alpha_pattern = {{"v_proj", 8.0}};
  Decoder<peft::arch::Llama, LoRA, float> model(tiny_config("llama"), config, 1);
  for (auto& p : model.adapter().parameters()) {
    if (p.name.find("v_proj.lora_A") != std::string::npos) CHECK(p.var.shape()[0] == 4);
    if (p.name.find("q_proj.lora_A") != std::string::npos) CHECK(p.var.shape()[0] == 2);
  }
  CHECK(config.scaling(4, config.alpha_for("model.layers.0.self_attn.v_proj")) ==
        doctest::Approx(2.0));
}

TEST_CASE("targets that match nothing are an error, as in the reference") {
  CHECK_THROWS_WITH_AS(
      (Decoder<peft::arch::Llama, LoRA, float>(tiny_config("llama"), lora_config({"c_attn"}))),
      doctest::Contains("matched no module"), peft::ConfigError);
}

TEST_CASE("linear_shapes and base_parameter_count agree with the decoder") {
  for (const std::string type : {"gpt2", "llama"}) {
    auto check_model = [&](auto arch_tag, auto& model) {
      using Arch = decltype(arch_tag);
      const auto shapes = peft::linear_shapes<Arch>(model.config());
      const auto modules = model.linear_modules();
      REQUIRE(shapes.size() == modules.size());
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        CHECK(shapes[i].name == modules[i]->name);
        CHECK(shapes[i].in_features == modules[i]->in_features);
        CHECK(shapes[i].out_features == modules[i]->out_features);
      }
      std::int64_t n = 0;
      for (auto& p : model.base_parameters()) n += p.var.value().numel();
      CHECK(peft::base_parameter_count<Arch>(model.config()) == n);
    };
    if (type == "gpt2") {
      Decoder<peft::arch::Gpt2, peft::NoPeft, float> model(tiny_config(type));
      check_model(peft::arch::Gpt2{}, model);
    } else {
      ModelConfig c = tiny_config(type);
      c.tie_word_embeddings = false;
      Decoder<peft::arch::Llama, peft::NoPeft, float> model(c);
      check_model(peft::arch::Llama{}, model);
    }
  }
}

TEST_CASE("config.json errors are clear") {
  nlohmann::json j = {{"model_type", "mamba"}};
  CHECK_THROWS_WITH_AS(ModelConfig::from_json(j, "cfg.json"),
                       doctest::Contains("unknown architecture 'mamba'"), peft::ConfigError);
  j = {{"model_type", "llama"},  {"vocab_size", 10},         {"hidden_size", 8},
       {"num_hidden_layers", 1}, {"num_attention_heads", 3}, {"num_key_value_heads", 2},
       {"intermediate_size", 4}};
  CHECK_THROWS_WITH_AS(ModelConfig::from_json(j, "cfg.json"), doctest::Contains("must divide"),
                       peft::ConfigError);
  j = {{"model_type", "gpt2"}, {"vocab_size", "big"}};
  CHECK_THROWS_WITH_AS(ModelConfig::from_json(j, "cfg.json"), doctest::Contains("vocab_size"),
                       peft::ConfigError);
  // A gpt2 config handed to a LLaMA decoder.
  CHECK_THROWS_AS((Decoder<peft::arch::Llama, peft::NoPeft, float>(tiny_config("gpt2"))),
                  peft::ConfigError);
}

TEST_CASE("model.safetensors errors name the file, the tensor and the expected shape") {
  const ModelConfig mc = tiny_config("llama");
  Decoder<peft::arch::Llama, peft::NoPeft, float> model(mc, {}, 1);
  auto params = model.base_parameters();
  auto write_without = [&](const std::string& skip, const std::string& reshape) {
    peft::io::SafetensorsWriter w;
    for (auto& p : params) {
      if (p.name == skip) continue;
      peft::Shape shape = p.var.shape();
      if (p.name == reshape) shape = peft::Shape{peft::shape_numel(shape)};
      w.add<float>(p.name, shape, std::span<const float>(p.var.value().values()));
    }
    return peft::io::SafetensorsFile::from_bytes(w.to_bytes(), "model.safetensors");
  };
  Decoder<peft::arch::Llama, peft::NoPeft, float> target(mc, {}, 2);
  CHECK_THROWS_WITH_AS(target.load_base_weights(write_without("model.norm.weight", "")),
                       doctest::Contains("model.norm.weight"), peft::FileError);
  CHECK_THROWS_WITH_AS(
      target.load_base_weights(write_without("", "model.layers.0.self_attn.q_proj.weight")),
      doctest::Contains("q_proj"), peft::FileError);
  CHECK_NOTHROW(target.load_base_weights(write_without("", "")));
}

TEST_CASE("Llama 3 rope scaling: high frequencies kept, low ones slowed by the factor") {
  // Llama-3.2-1B's published config.json.
  const nlohmann::json j = nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "use_cache": true, "vocab_size": 128256})");
  const ModelConfig c = ModelConfig::from_json(j, "Llama-3.2-1B/config.json");
  CHECK(c.rope_scaling.type == "llama3");
  CHECK(c.rope_theta == 500000.0);
  const std::vector<float> scaled = peft::rope_inverse_frequencies(c);
  ModelConfig plain = c;
  plain.rope_scaling = {};
  const std::vector<float> base = peft::rope_inverse_frequencies(plain);
  REQUIRE(scaled.size() == 32);
  CHECK(scaled[0] == base[0]);                                           // wavelength 2π: kept
  CHECK(scaled[31] == doctest::Approx(base[31] / 32.0f).epsilon(1e-6));  // longest: slowed
  for (std::size_t i = 0; i < scaled.size(); ++i) CHECK(scaled[i] <= base[i]);
  CHECK(peft::base_parameter_count<peft::arch::Llama>(c) == 1235814400);  // Llama-3.2-1B
}

TEST_CASE("ModelConfig::to_json writes a config.json that reads back to the same config") {
  for (const std::string type : {"gpt2", "llama"}) {
    CAPTURE(type);
    const ModelConfig c = tiny_config(type);
    const ModelConfig back = ModelConfig::from_json(c.to_json(), "written config.json");
    CHECK(back.to_json() == c.to_json());
    CHECK(back.kv_dim() == c.kv_dim());
  }
}

}  // namespace test_decoder
