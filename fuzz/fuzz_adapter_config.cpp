// libFuzzer harness: an adapter_config.json, parsed as the library parses the file
// (io::detail::parse_json_strict, as io::load_json does), then offered to every method of
// peft::BuiltinMethods and to the hybrid manifests (Compose, Gated): method_accepts, then
// config_from_json of each method's config. An accepted config must round-trip through
// config_to_json, and its target rules (target_modules, exclude_modules, layers_to_transform,
// rank and alpha patterns) are matched against the module paths of both architectures, which is
// where a hostile pattern would crash or hang. Expected outcomes and findings: fuzz/harness.hpp.
#include <array>
#include <cstdint>
#include <string>

#include "harness.hpp"
#include "json_mutator.hpp"
#include "peft/io/json.hpp"
#include "peft/methods/hybrid/compose.hpp"
#include "peft/methods/hybrid/unipelt.hpp"
#include "peft/methods/registry.hpp"

namespace {

// Module paths as the two architectures name them (a decoder of 2 layers; layer 1 so that
// layers_to_transform and layers_pattern have an index to find).
constexpr std::array<const char*, 12> kModulePaths = {"transformer.h.1.attn.c_attn",
                                                      "transformer.h.1.attn.c_proj",
                                                      "transformer.h.1.mlp.c_fc",
                                                      "transformer.h.1.mlp.c_proj",
                                                      "transformer.wte",
                                                      "lm_head",
                                                      "model.layers.1.self_attn.q_proj",
                                                      "model.layers.1.self_attn.k_proj",
                                                      "model.layers.1.self_attn.v_proj",
                                                      "model.layers.1.self_attn.o_proj",
                                                      "model.layers.1.mlp.gate_proj",
                                                      "model.layers.1.mlp.down_proj"};

peft::ModelConfig tiny_gpt2() {
  peft::ModelConfig m = peft::ModelConfig::gpt2();
  m.vocab_size = 64, m.hidden_size = 16, m.num_layers = 2, m.num_heads = m.num_kv_heads = 2;
  m.head_dim = 8, m.intermediate_size = 32, m.max_positions = 32;
  return m;
}

void check(bool ok, const char* what) {
  if (!ok) peft::fuzz::finding("adapter_config.json", "check", what);
}

template <class Config>
void use_targets(const Config& c) {
  for (const char* path : kModulePaths) {
    if constexpr (requires { c.targets.selects(std::string(path)); })
      (void)c.targets.selects(std::string(path));
    if constexpr (requires { c.rank_for(std::string(path)); }) (void)c.rank_for(std::string(path));
    if constexpr (requires { c.alpha_for(std::string(path)); })
      (void)c.alpha_for(std::string(path));
  }
}

/// One method's config reader on the input: accepted or rejected with a peft::Error, never
/// anything else. `accepts` decides only whether the round trip is checked: a reader must
/// reject what it does not accept with a clear error too.
template <class Config>
void read_as(const nlohmann::json& j, bool accepts) {
  peft::fuzz::expect_peft_errors_only([&] {
    const Config c = peft::config_from_json<Config>(j, "adapter_config.json");
    use_targets(c);
    if (!accepts) return;
    const peft::ModelConfig model = tiny_gpt2();
    const nlohmann::json written = peft::config_to_json(c, model);
    const Config again = peft::config_from_json<Config>(written, "adapter_config.json (again)");
    check(peft::config_to_json(again, model) == written,
          "config_to_json(config_from_json(written)) != written");
  });
}

void run(const std::uint8_t* data, std::size_t size) {
  const nlohmann::json j =
      peft::io::detail::parse_json_strict(peft::fuzz::as_text(data, size), "adapter_config.json");
  peft::BuiltinMethods::for_each([&]<class P>() {
    bool accepts = false;
    peft::fuzz::expect_peft_errors_only([&] { accepts = peft::method_accepts<P>(j); });
    read_as<typename P::Config>(j, accepts);
  });
  using Composite = peft::Compose<peft::LoRA, peft::IA3>;
  read_as<typename Composite::Config>(j, peft::method_accepts<Composite>(j));
  using GatedLora = peft::Gated<peft::LoRA>;
  read_as<typename GatedLora::Config>(j, peft::method_accepts<GatedLora>(j));
}

// Keys and values of adapter_config.json worth trying (json_mutator.hpp): the fields every
// method reads, peft types, module names, and patterns that stress a regex engine.
constexpr std::string_view kStrings[] = {"peft_type",
                                         "LORA",
                                         "IA3",
                                         "VERA",
                                         "LOHA",
                                         "LOKR",
                                         "ADALORA",
                                         "PREFIX_TUNING",
                                         "PROMPT_TUNING",
                                         "P_TUNING",
                                         "COMPOSE",
                                         "GATED",
                                         "gated_peft_type",
                                         "components",
                                         "method",
                                         "folder",
                                         "config",
                                         "lora",
                                         "ia3",
                                         "r",
                                         "lora_alpha",
                                         "lora_dropout",
                                         "use_rslora",
                                         "use_dora",
                                         "fan_in_fan_out",
                                         "bias",
                                         "none",
                                         "all",
                                         "lora_only",
                                         "init_lora_weights",
                                         "target_modules",
                                         "exclude_modules",
                                         "layers_to_transform",
                                         "layers_pattern",
                                         "rank_pattern",
                                         "alpha_pattern",
                                         "feedforward_modules",
                                         "modules_to_save",
                                         "num_virtual_tokens",
                                         "token_dim",
                                         "num_transformer_submodules",
                                         "num_attention_heads",
                                         "num_layers",
                                         "encoder_hidden_size",
                                         "prefix_projection",
                                         "projection_dim",
                                         "vera_dropout",
                                         "d_initial",
                                         "save_projection",
                                         "alpha",
                                         "rank_dropout",
                                         "module_dropout",
                                         "decompose_both",
                                         "decompose_factor",
                                         "target_r",
                                         "init_r",
                                         "tinit",
                                         "tfinal",
                                         "deltaT",
                                         "beta1",
                                         "beta2",
                                         "orth_reg_weight",
                                         "total_step",
                                         "all-linear",
                                         "q_proj",
                                         "v_proj",
                                         "c_attn",
                                         "c_fc",
                                         "h",
                                         "layers",
                                         ".*",
                                         "(.*)",
                                         "(.*.*)*X",
                                         "(((((((((((x)))))))))))",
                                         "(a|a)*b",
                                         "\\1",
                                         "[",
                                         "(?P<n>x)",
                                         "model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj",
                                         "\\"};

}  // namespace

extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size,
                                               std::size_t max_size, unsigned seed) {
  return peft::fuzz::mutate_json(data, size, max_size, seed, kStrings);
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  peft::fuzz::expect_peft_errors_only([&] { run(data, size); });
  return 0;
}
