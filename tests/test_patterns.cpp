// Module patterns and config validation against hostile input (issue 18): target_modules,
// exclude_modules, layers_pattern, rank/alpha_pattern keys and feedforward_modules are matched
// by RE2 in linear time, so a pattern that hangs or crashes a backtracking engine ends in a
// result or a ConfigError naming the field; config values are range-checked with the field
// named. ctest's TIMEOUT guards the "fast" part: nothing here measures time.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/ia3.hpp"
#include "peft/methods/additive/prompt_tuning.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/reparameterized/adalora.hpp"
#include "peft/methods/reparameterized/loha.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/methods/selective/masks.hpp"
#include "peft/methods/target_modules.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_patterns {

namespace {

const std::string kQ = "model.layers.3.self_attn.q_proj";

nlohmann::json lora_json(nlohmann::json changes) {
  nlohmann::json j = {{"peft_type", "LORA"}, {"r", 4}, {"target_modules", {"q_proj"}}};
  for (const auto& [k, v] : changes.items()) j[k] = v;
  return j;
}

template <class C = peft::LoraConfig>
std::string error_of(const nlohmann::json& j) {
  try {
    peft::config_from_json<C>(j, "adapter_config.json");
  } catch (const peft::ConfigError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string nested(int depth, const std::string& core) {
  return std::string(depth, '(') + core + std::string(depth, ')');
}

/// "(.*)(.*)...(.*)X": 8 groups take a backtracking engine seconds on a long path.
std::string eight_groups() {
  std::string p;
  for (int i = 0; i < 8; ++i) p += "(.*)";
  return p + "X";
}

/// A long module path that none of the hostile patterns match ("X" never occurs).
std::string long_path() {
  std::string path = "model";
  for (int i = 0; i < 200; ++i) path += ".layers." + std::to_string(i);
  return path + ".self_attn.q_proj";
}

}  // namespace

TEST_CASE("patterns: 20,000 nested parentheses end in a result or a clear error, not SIGSEGV") {
  // Balanced: a valid pattern; RE2 compiles it without recursion and matches it.
  const std::string deep = nested(20000, ".*q_proj");
  peft::LoraConfig c = peft::LoraConfig::from_json(
      lora_json({{"target_modules", deep}, {"rank_pattern", {{nested(20000, "q_proj"), 2}}}}),
      "adapter_config.json");
  CHECK(c.targets.selects(kQ));
  CHECK_FALSE(c.targets.selects("model.layers.3.self_attn.v_proj"));
  CHECK(c.rank_for(kQ) == 2);
  CHECK(c.rank_for("model.layers.3.self_attn.v_proj") == 4);

  // Unbalanced: an error naming the file and the field.
  const std::string open_only(20000, '(');
  CHECK(contains(error_of(lora_json({{"target_modules", open_only}})),
                 "adapter_config.json: field 'target_modules': expected a regular expression"));
  CHECK(contains(error_of(lora_json({{"exclude_modules", open_only}})), "field 'exclude_modules'"));
  CHECK(
      contains(error_of(lora_json({{"rank_pattern", {{open_only, 2}}}})), "field 'rank_pattern'"));
  CHECK(contains(error_of(lora_json({{"alpha_pattern", {{open_only, 2.0}}}})),
                 "field 'alpha_pattern'"));
  CHECK(contains(error_of(lora_json({{"layers_to_transform", {0}}, {"layers_pattern", open_only}})),
                 "field 'layers_pattern'"));
  // Deeper than RE2's memory budget: refused with a message, not a crash.
  const std::string huge = nested(1'000'000, "a");
  const std::string e = error_of(lora_json({{"target_modules", huge}}));
  CHECK(contains(e, "field 'target_modules'"));
  CHECK(contains(e, "at most 100000 characters"));
}

TEST_CASE("patterns: catastrophic backtracking patterns match in linear time") {
  const std::string path = long_path();
  for (const std::string& hostile : {std::string("(.*.*)*X"), eight_groups()}) {
    CAPTURE(hostile);
    peft::LoraConfig c =
        peft::LoraConfig::from_json(lora_json({{"target_modules", hostile},
                                               {"exclude_modules", hostile},
                                               {"rank_pattern", {{hostile, 2}}},
                                               {"alpha_pattern", {{hostile, 3.0}}}}),
                                    "adapter_config.json");
    CHECK_FALSE(c.targets.target_modules.matches(path));
    CHECK_FALSE(c.targets.exclude_modules.matches(path));
    CHECK(c.rank_for(path) == 4);
    CHECK(c.alpha_for(path) == 8.0);
    CHECK(c.targets.target_modules.matches(path + "X"));  // and it does match where it should

    peft::TargetRules rules = peft::TargetRules::from_json(
        {{"target_modules", {"q_proj"}}, {"layers_to_transform", {3}}, {"layers_pattern", hostile}},
        "adapter_config.json");
    CHECK_FALSE(rules.selects(path));
    CHECK_FALSE(peft::layer_index_of(path, rules.layers_pattern).has_value());

    peft::Ia3Config ia3 = peft::Ia3Config::from_json(
        {{"peft_type", "IA3"}, {"target_modules", hostile}, {"feedforward_modules", hostile}},
        "adapter_config.json");
    CHECK_FALSE(ia3.is_feedforward(path));
  }
}

TEST_CASE("patterns: what RE2 cannot express is an error that says so and names the field") {
  const std::string back = error_of(lora_json({{"target_modules", R"((q)_proj\1)"}}));
  CHECK(contains(back, "adapter_config.json: field 'target_modules'"));
  CHECK(contains(back, "back-references and lookaround"));
  const std::string look = error_of(lora_json({{"rank_pattern", {{"(?=q)q_proj", 2}}}}));
  CHECK(contains(look, "field 'rank_pattern'"));
  CHECK(contains(look, "lookaround"));
  // A key's error is the key's own, not the "(.*\.)?(...)" wrapper's.
  CHECK(contains(error_of(lora_json({{"rank_pattern", {{"q_proj)", 2}}}})), "\"q_proj)\""));
  // Built in code: compiled on assignment, so the error comes before any model is built.
  peft::ModuleSelector s;
  CHECK_THROWS_AS(s.regex = "a{2000}", peft::ConfigError);
  CHECK_THROWS_AS((peft::PatternMap<int>{{"(?<=x)q", 2}}), peft::ConfigError);
}

TEST_CASE("patterns: the reference's semantics (fullmatch, prefix layer match, pattern keys)") {
  // target_modules as a string: re.fullmatch.
  peft::ModuleSelector s;
  s.regex = R"(.*\.(q|v)_proj)";
  CHECK(s.matches("model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(s.matches("model.layers.0.self_attn.q_proj.lora_A"));
  CHECK_FALSE(s.matches("xmodel.layers.0.self_attn.k_proj"));
  s.regex = "q_proj|model.*";  // alternation under fullmatch: either side must cover the path
  CHECK(s.matches("q_proj"));
  CHECK(s.matches("model.layers.0.self_attn.k_proj"));
  CHECK_FALSE(s.matches("x.q_proj"));
  CHECK(s.regex->text() == "q_proj|model.*");
  CHECK(s.to_json() == "q_proj|model.*");

  // Layer index: re.match(r".*\.[^.]*\.(\d+)\.", path) takes the last number followed by a dot
  // (the greedy .*), and an explicit pattern the number after that component.
  CHECK(peft::layer_index_of(kQ) == 3);
  CHECK(peft::layer_index_of("transformer.h.11.attn.c_attn") == 11);
  CHECK(peft::layer_index_of("a.h.1.b.2.c") == 2);
  CHECK_FALSE(peft::layer_index_of("lm_head").has_value());
  CHECK_FALSE(peft::layer_index_of("model.layers.3").has_value());  // needs a dot after it
  const std::vector<peft::LayerPattern> h{"h"}, layers{"layers"}, either{"layers", "h"};
  CHECK(peft::layer_index_of("a.h.1.b.2.c", h) == 1);
  CHECK_FALSE(peft::layer_index_of("a.h.1.b.2.c", layers).has_value());
  CHECK(peft::layer_index_of("a.h.1.b.2.c", either) == 1);
  CHECK(peft::layer_index_of("x.blocks.7.y", std::vector<peft::LayerPattern>{"bl.*s"}) == 7);
  // A prefix match: what follows the index is free; a group in the pattern does not shift it.
  CHECK(peft::layer_index_of("m.layers.5.q", std::vector<peft::LayerPattern>{"(lay)(ers)"}) == 5);
  // An index beyond int reads as no index (no layers_to_transform entry can list it).
  CHECK_FALSE(peft::layer_index_of("m.layers.99999999999.q").has_value());
  // A top-level "|" whose match misses the digits: no index (the reference fails on it).
  CHECK_FALSE(peft::layer_index_of("m.h.q", std::vector<peft::LayerPattern>{"h|zzz"}).has_value());

  // rank_pattern keys: the whole path matches "(.*\.)?(key)"; the first key in key order wins.
  peft::PatternMap<int> ranks{{"v_proj", 16}, {"layers\\.1\\..*", 4}, {"q", 9}};
  CHECK(ranks.lookup("model.layers.0.self_attn.v_proj") == 16);
  CHECK(ranks.lookup("model.layers.1.self_attn.q_proj") == 4);
  CHECK_FALSE(ranks.lookup("model.layers.0.self_attn.q_proj").has_value());  // "q" is not a suffix
  CHECK(ranks.lookup("q") == 9);
  CHECK_FALSE(ranks.lookup("model.layers.0.self_attn.xv_proj").has_value());  // needs the dot
  CHECK(peft::pattern_lookup(ranks, "model.layers.0.self_attn.v_proj") == 16);

  // Round trip: patterns are written as their text.
  const peft::LoraConfig c =
      peft::LoraConfig::from_json(lora_json({{"target_modules", ".*q_proj"},
                                             {"layers_to_transform", {1, 3}},
                                             {"layers_pattern", "layers"},
                                             {"rank_pattern", {{"q_proj", 2}}}}),
                                  "f");
  nlohmann::json written;
  c.targets.to_json(written);
  CHECK(written["target_modules"] == ".*q_proj");
  CHECK(written["layers_pattern"] == "layers");
  CHECK(written["layers_to_transform"] == nlohmann::json({1, 3}));
  CHECK(c.targets.selects(kQ));
  CHECK_FALSE(c.targets.selects("model.layers.2.self_attn.q_proj"));
  // Copies share the compiled pattern and match alike.
  const peft::LoraConfig copy = c;
  CHECK(copy.targets.selects(kQ));
  CHECK(copy.rank_for(kQ) == 2);
}

TEST_CASE("config validation: layers_to_transform is a list of int32 layer indices >= 0") {
  const std::string big = error_of(lora_json({{"layers_to_transform", {4294967296}}}));
  CHECK(big ==
        "adapter_config.json: field 'layers_to_transform': expected a layer index (an integer "
        "from 0 to 2147483647), found 4294967296");
  CHECK(contains(error_of(lora_json({{"layers_to_transform", {0.5}}})),
                 "field 'layers_to_transform': expected a layer index"));
  CHECK(
      contains(error_of(lora_json({{"layers_to_transform", 0.5}})), "field 'layers_to_transform'"));
  CHECK(contains(error_of(lora_json({{"layers_to_transform", {-1}}})),
                 "field 'layers_to_transform'"));
  CHECK(contains(error_of(lora_json({{"layers_to_transform", "0"}})),
                 "field 'layers_to_transform': expected a layer index or a list of them"));
  CHECK(contains(error_of(lora_json({{"layers_pattern", 3}})), "field 'layers_pattern'"));
  CHECK(
      contains(error_of(lora_json({{"layers_pattern", {"layers", 3}}})), "field 'layers_pattern'"));
  CHECK(
      contains(error_of(lora_json({{"target_modules", {"q_proj", 7}}})), "field 'target_modules'"));
  CHECK(contains(error_of(lora_json({{"target_modules", 7}})), "field 'target_modules'"));
  // What stays accepted: one index, a list, null.
  CHECK(peft::LoraConfig::from_json(lora_json({{"layers_to_transform", 2}}), "f")
            .targets.layers_to_transform == std::vector<int>{2});
  CHECK(peft::LoraConfig::from_json(lora_json({{"layers_to_transform", nullptr}}), "f")
            .targets.layers_to_transform.empty());
  // The bottleneck adapters' own layers_to_transform: the same rules.
  using Serial = peft::BottleneckAdapterConfig<peft::detail::AdapterPlacement::Serial>;
  const nlohmann::json serial = {{"peft_type", "SERIAL_ADAPTER"}, {"layers_to_transform", {-1}}};
  CHECK(contains(error_of<Serial>(serial), "field 'layers_to_transform'"));
}

TEST_CASE("config validation: dropouts, ranks, scales and sizes are range-checked by field") {
  CHECK(contains(error_of(lora_json({{"lora_dropout", -0.5}})),
                 "adapter_config.json: field 'lora_dropout': expected a probability in [0, 1)"));
  CHECK(contains(error_of(lora_json({{"lora_dropout", 2.0}})), "field 'lora_dropout'"));
  CHECK(peft::LoraConfig::from_json(lora_json({{"lora_dropout", 0.1}}), "f").lora_dropout == 0.1);
  CHECK(contains(error_of(lora_json({{"r", -3}})), "field 'r': expected a positive value"));
  CHECK(contains(error_of(lora_json({{"r", 80000000}})), "field 'r': expected at most 65536"));
  CHECK(contains(error_of(lora_json({{"rank_pattern", {{"q_proj", 1 << 20}}}})),
                 "field 'rank_pattern'"));
  CHECK(contains(error_of(lora_json({{"lora_alpha", 1e308}})),
                 "field 'lora_alpha': expected a number of magnitude at most 3.4e38"));
  CHECK(contains(error_of(lora_json({{"alpha_pattern", {{"q_proj", -1e300}}}})),
                 "field 'alpha_pattern'"));
  CHECK(contains(error_of(lora_json({{"lora_alpha", "8"}})),
                 "field 'lora_alpha': expected a number"));
  // Values the reference accepts stay accepted (a negative or zero alpha is a valid float).
  CHECK(peft::LoraConfig::from_json(lora_json({{"lora_alpha", -16}}), "f").lora_alpha == -16.0);
  CHECK(peft::LoraConfig::from_json(lora_json({{"r", 65536}}), "f").r == 65536);

  const nlohmann::json loha = {{"peft_type", "LOHA"}, {"target_modules", {"q_proj"}}};
  auto with = [](nlohmann::json j, const char* key, nlohmann::json v) {
    j[key] = std::move(v);
    return j;
  };
  CHECK(contains(error_of<peft::LohaConfig>(with(loha, "rank_dropout", 2.0)),
                 "field 'rank_dropout'"));
  CHECK(contains(error_of<peft::LohaConfig>(with(loha, "alpha", 1e39)), "field 'alpha'"));
  CHECK(contains(error_of<peft::LohaConfig>(with(loha, "r", 0.5)), "field 'r'"));

  const nlohmann::json ada = {
      {"peft_type", "ADALORA"}, {"target_modules", {"q_proj"}}, {"total_step", 100}};
  CHECK(contains(error_of<peft::AdaLoraConfig>(with(ada, "init_r", 100000)), "field 'init_r'"));
  CHECK(contains(error_of<peft::AdaLoraConfig>(with(ada, "r", -1)), "field 'r'"));

  const nlohmann::json prompt = {{"peft_type", "PROMPT_TUNING"}};
  CHECK(contains(error_of<peft::PromptTuningConfig>(with(prompt, "num_virtual_tokens", 1 << 30)),
                 "field 'num_virtual_tokens'"));
  CHECK(contains(error_of<peft::PromptTuningConfig>(with(prompt, "token_dim", -4)),
                 "field 'token_dim'"));
}

TEST_CASE("config validation: a wrong-typed peft_type names the file and the field") {
  CHECK(error_of(lora_json({{"peft_type", 3}})) ==
        "adapter_config.json: field 'peft_type': expected a string, found 3");
  CHECK(error_of<peft::Ia3Config>({{"peft_type", {1, 2}}}) ==
        "adapter_config.json: field 'peft_type': expected a string, found [1,2]");
  // Asking whether a method reads a config never throws on a wrong type.
  CHECK_FALSE(peft::UnstructuredMask::accepts({{"peft_type", 3}}));
  const nlohmann::json mask = {{"peft_type", "SPARSE_MASK"}, {"selection", 3}};
  CHECK(peft::UnstructuredMask::accepts(mask));  // then its reader names the field
  CHECK(contains(error_of<peft::UnstructuredMaskConfig>(mask), "field 'selection'"));
  CHECK_FALSE(peft::UnstructuredMask::accepts(nlohmann::json::array()));
  CHECK(peft::detail::string_or(nlohmann::json(3), "peft_type", "none") == "none");
}

}  // namespace test_patterns
