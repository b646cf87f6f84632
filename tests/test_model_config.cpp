// config.json as hostile input: every field is checked for type and range before anything is
// computed from it, and the error names the file and the field (issue 18; nn/config.hpp).
#include <doctest/doctest.h>

#include <peft/nn/config.hpp>
#include <string>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_model_config {

namespace {

nlohmann::json gpt2_json() {
  return {{"model_type", "gpt2"}, {"vocab_size", 50257}, {"n_embd", 768},
          {"n_layer", 12},        {"n_head", 12},        {"n_positions", 1024}};
}
nlohmann::json llama_json() {
  return {{"model_type", "llama"},  {"vocab_size", 32000},      {"hidden_size", 64},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"intermediate_size", 176}};
}
std::string error_of(const nlohmann::json& j) {
  try {
    (void)peft::ModelConfig::from_json(j, "dir/config.json");
  } catch (const peft::ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("config.json: valid files still read as the reference writes them") {
  CHECK(peft::ModelConfig::from_json(gpt2_json(), "config.json").intermediate_size == 3072);
  const peft::ModelConfig l = peft::ModelConfig::from_json(llama_json(), "config.json");
  CHECK(l.head_dim == 16);
  CHECK(l.max_positions == 2048);
}

TEST_CASE("config.json: sizes out of range name the field, expected and found") {
  struct Case {
    const char* field;
    nlohmann::json value;
    const char* expected;
  };
  const Case gpt2_cases[] = {
      {"n_embd", 1e300, "field 'n_embd': expected an integer in [1, 1048576], found 1e+300"},
      {"n_embd", 4611686018427387904ll, "field 'n_embd': expected an integer in [1, 1048576]"},
      {"vocab_size", 5000000000ll, "field 'vocab_size': expected an integer in [1, 16777216]"},
      {"vocab_size", 0, "field 'vocab_size': expected an integer in [1, 16777216], found 0"},
      {"n_layer", 1000000000, "field 'n_layer': expected an integer in [1, 65536]"},
      {"n_head", -3, "field 'n_head': expected an integer in [1, 65536], found -3"},
      {"n_head", 0.5, "field 'n_head': expected an integer in [1, 65536], found 0.5"},
      {"n_inner", "wide", "field 'n_inner': expected an integer in [1, 1048576], found \"wide\""},
      {"layer_norm_epsilon", "x", "field 'layer_norm_epsilon': expected a finite number"},
      {"activation_function", 7, "field 'activation_function': expected a string, found 7"},
      {"tie_word_embeddings", 1, "field 'tie_word_embeddings': expected true or false"},
  };
  for (const Case& c : gpt2_cases) {
    nlohmann::json j = gpt2_json();
    j[c.field] = c.value;
    const std::string error = error_of(j);
    CAPTURE(error);
    CHECK(error.rfind("dir/config.json: ", 0) == 0);
    CHECK(error.find(c.expected) != std::string::npos);
  }
  const Case llama_cases[] = {
      {"head_dim", -4, "field 'head_dim': expected an integer in [1, 65536], found -4"},
      {"num_key_value_heads", 1e9, "field 'num_key_value_heads': expected an integer"},
      {"max_position_embeddings", 1ll << 40, "field 'max_position_embeddings'"},
      {"rope_scaling", 3, "field 'rope_scaling': expected an object, found 3"},
      {"hidden_act", nullptr, ""},  // null: the default (silu)
  };
  for (const Case& c : llama_cases) {
    nlohmann::json j = llama_json();
    j[c.field] = c.value;
    const std::string error = error_of(j);
    CAPTURE(error);
    if (std::string(c.expected).empty())
      CHECK(error.empty());
    else
      CHECK(error.find(c.expected) != std::string::npos);
  }
}

TEST_CASE("config.json: a zero read from the file (an unsigned JSON integer) is out of range") {
  // nlohmann stores a parsed non-negative integer as unsigned; 0 heads once reached a division.
  for (const char* field : {"num_attention_heads", "hidden_size", "num_key_value_heads"}) {
    nlohmann::json j = llama_json();
    j[field] = nlohmann::json::parse("0");
    CHECK(j[field].is_number_unsigned());
    const std::string error = error_of(j);
    CAPTURE(error);
    CHECK(error.find(std::string("field '") + field + "': expected an integer in [1, ") !=
          std::string::npos);
  }
  CHECK(error_of(nlohmann::json::parse(
                     R"({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                "num_hidden_layers": 2, "num_attention_heads": 0, "head_dim": 4,
                "intermediate_size": 32})"))
            .find("field 'num_attention_heads'") != std::string::npos);
}

TEST_CASE("config.json: nested rope fields and non-finite numbers are named with their object") {
  nlohmann::json j = llama_json();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", "x"}};
  CHECK(error_of(j).find("field 'rope_scaling.factor': expected a finite number, found \"x\"") !=
        std::string::npos);
  j["rope_scaling"] = {{"rope_type", 5}};
  CHECK(error_of(j).find("field 'rope_scaling.rope_type': expected a string, found 5") !=
        std::string::npos);
  j = llama_json();
  j["rms_norm_eps"] = -1.0;
  CHECK(error_of(j).find("eps and rope theta must be positive and finite") != std::string::npos);
  j = llama_json();
  j["model_type"] = 3;
  CHECK(error_of(j) == "dir/config.json: field 'model_type': expected a string, found 3");
  j.erase("model_type");
  CHECK(error_of(j).find("field 'model_type' missing") != std::string::npos);
  CHECK(error_of(nlohmann::json::array()) == "dir/config.json: expected a JSON object");
}

}  // namespace test_model_config
