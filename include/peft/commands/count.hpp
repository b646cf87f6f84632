#pragma once
// `peft count MODEL_CONFIG.json ADAPTER_CONFIG.json` as a library function over a method
// registry: the reference's print_trainable_parameters line from shapes alone, "trainable
// params: 294,912 || all params: 124,734,720 || trainable%: 0.2364". The `peft` binary calls it
// with BuiltinMethods; a program with its own methods calls it with its registry
// (peft::BuiltinMethods::with<MyMethod>), or runs peft::commands::main<Registry> (main.hpp).
// Opt-in: not in <peft/peft.hpp>.
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "peft/io/json.hpp"
#include "peft/methods/registry.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/nn/summary.hpp"

namespace peft::commands {

/// The deepest model `count` takes. Counting lists every layer's modules by name (about 1 KB a
/// layer), so memory grows with the layer count; 10,000 layers is ten times the deepest
/// published decoder (DeepNet's 1,000) and takes about 10 MB and milliseconds. A config beyond
/// it is refused with the field named, instead of taking gigabytes (10^6 layers).
inline constexpr std::int64_t kMaxCountLayers = 10000;

/// The largest count `count` reports: counts are exact below 2^53 (they are also printed as a
/// double percentage), and no product of sizes can overflow 64 bits on the way.
inline constexpr double kMaxCountParameters = 9007199254740992.0;  // 2^53

/// (trainable, all) from a model config and an adapter config (both parsed), for the first
/// method of `Registry` that accepts the adapter config; throws ConfigError naming the file
/// when none does or a value is out of range.
template <class Registry = BuiltinMethods>
std::pair<std::int64_t, std::int64_t> count_from_configs(const nlohmann::json& model_json,
                                                         const std::string& model_source,
                                                         const nlohmann::json& adapter_json,
                                                         const std::string& adapter_source) {
  const ModelConfig model = ModelConfig::from_json(model_json, model_source);
  if (model.num_layers > kMaxCountLayers)
    throw ConfigError(
        model_source + ": num_layers: expected at most " + std::to_string(kMaxCountLayers) +
        " (peft count's bound, docs/cli.md), found " + std::to_string(model.num_layers));
  std::int64_t trainable = 0, all = 0;
  const bool known = Registry::visit_for(adapter_json, [&]<class Policy>() {
    const auto config = config_from_json<typename Policy::Config>(adapter_json, adapter_source);
    visit_arch_for(model.model_type, [&]<class Arch>() {
      if (base_weight_bytes<Arch>(model, 1) > kMaxCountParameters)
        throw ConfigError(model_source + ": the model's sizes give more than 2^53 parameters, " +
                          "beyond what peft count reports exactly");
      const ParameterCount c =
          peft::count_parameters<Policy>(model, linear_shapes<Arch>(model), config);
      trainable = c.trainable;
      all = base_parameter_count<Arch>(model) + c.trainable + c.frozen;
    });
  });
  if (!known)
    throw ConfigError(adapter_source + ": peft_type '" + peft_type_text(adapter_json) +
                      "' is not supported");
  return {trainable, all};
}

/// `count MODEL_CONFIG.json ADAPTER_CONFIG.json`: prints the line; the exit status (2: usage).
template <class Registry = BuiltinMethods>
int run_count(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.size() != 2) {
    err << "usage: peft count MODEL_CONFIG.json ADAPTER_CONFIG.json\n";
    return 2;
  }
  const auto [trainable, all] = count_from_configs<Registry>(io::load_json(args[0]), args[0],
                                                             io::load_json(args[1]), args[1]);
  out << trainable_parameters_line(trainable, all) << '\n';
  return 0;
}

}  // namespace peft::commands
