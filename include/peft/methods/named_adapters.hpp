#pragma once
// Named adapters on disk, in the reference's layout: PeftModel.save_pretrained writes the
// adapter "default" into the folder itself and every other adapter into a sub-folder named after
// it; PeftModel.load_adapter(folder, adapter_name) reads one folder into a new named adapter.
//
//   auto model = Decoder<arch::Gpt2, LoRA>::load("gpt2", {.r = 8});   // adapter "default"
//   load_adapter(model, "adapters/french", "french");                  // a second adapter
//   model.set_adapter("french");                                       // the active one
//   save_adapters(model, "out");          // out/ (default), out/french/
//
// The Decoder's side (add, set, delete, disable, list, per-row adapters in a batch) is in
// nn/decoder.hpp, "NAMED ADAPTERS"; docs/methods/named-adapters.md says what the reference does
// and where this differs.
#include <filesystem>
#include <string>

#include "peft/io/json.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/hybrid/compose.hpp"
#include "peft/methods/policy.hpp"

namespace peft {

namespace detail {
template <class P>
concept ComposePolicy = requires { typename ComposeOf<typename P::Config>::type; };
}  // namespace detail

/// Writes one adapter state of method P into `dir` in the reference layout (a composite as
/// save_composite writes it), replacing the folder as one unit; other entries of `dir` (the
/// sub-folders of other adapters) are kept.
template <class P, class State>
void save_adapter_state(const std::filesystem::path& dir, State& state, const ModelConfig& model) {
  if constexpr (detail::ComposePolicy<P>)
    save_composite_state(dir, state, model);
  else
    detail::save_component<P>(dir, state, model);
}

/// Reads the tensors of a folder written for method P into `state` (which has the folder's
/// config), checking every tensor as load_adapter_tensors does.
template <class P, class State, class T>
void load_adapter_state(const std::filesystem::path& dir, State& state,
                        const std::vector<nn::Linear<T>*>& linears) {
  if constexpr (detail::ComposePolicy<P>)
    load_composite_state(dir, state, linears);
  else
    detail::load_component(dir, state, linears);
}

/// The folder save_adapters gives adapter `name` under `dir`: `dir` itself for "default", else
/// `dir/name` (the reference's layout).
inline std::filesystem::path adapter_folder(const std::filesystem::path& dir,
                                            const std::string& name) {
  return name == kDefaultAdapterName ? dir : dir / name;
}

/// Saves every adapter of `model` (or only `name`, when given) under `dir` in the reference
/// layout. Each adapter's folder is written atomically on its own: a crash leaves each one the
/// old adapter or the new, whole. Merged adapters are saved as their tensors (as the reference).
template <class Model>
void save_adapters(Model& model, const std::filesystem::path& dir, const std::string& name = "") {
  using P = typename Model::AdapterPolicy;
  for (const std::string& n : model.adapter_names())
    if (name.empty() || n == name)
      save_adapter_state<P>(adapter_folder(dir, n), model.adapter(n), model.config());
  if (!name.empty() && !model.has_adapter(name)) (void)model.adapter(name);  // the clear error
}

/// Reads the adapter folder `dir` (adapter_config.json + adapter_model.safetensors, as the
/// reference writes them) into a new adapter called `name` of `model`, not made active (as the
/// reference's load_adapter). The config must be one of the model's method (P::accepts); on any
/// error the model is left as it was (the new adapter is removed) and the error names the file.
template <class Model>
typename Model::Adapter& load_adapter(Model& model, const std::filesystem::path& dir,
                                      const std::string& name) {
  using P = typename Model::AdapterPolicy;
  const std::filesystem::path config_path = dir / "adapter_config.json";
  const nlohmann::json json = io::load_json(config_path);
  if (!method_accepts<P>(json))
    throw ConfigError(config_path.string() + ": not an adapter of this model's method (" +
                      std::string(method_title<P>()) + ")");
  auto config = config_from_json<typename P::Config>(json, config_path.string());
  typename Model::Adapter& state = model.add_adapter(name, config);
  try {
    load_adapter_state<P>(dir, state, model.linear_modules());
  } catch (...) {
    model.delete_adapter(name);
    throw;
  }
  return state;
}

}  // namespace peft
