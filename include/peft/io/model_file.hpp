#pragma once
// Base models in the reference layout: a folder with config.json (as transformers writes it)
// and model.safetensors (every base tensor by its reference name), which Decoder::load and
// transformers' from_pretrained both read.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/core/base_format.hpp"
#include "peft/core/error.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/nn/config.hpp"

namespace peft::io {

/// Writes `dir/config.json` and `dir/model.safetensors` for the given config and base tensors
/// (stored as `stored`, F32 by default, with {"format": "pt"} metadata). The folder is replaced
/// as a whole (io::replace_directory_atomically): a failed write or a crash leaves the previous
/// model, never new tensors beside an old config. Other files in `dir` are kept.
template <class T>
void save_model_files(const std::filesystem::path& dir, const ModelConfig& config,
                      const std::vector<NamedParameter<T>>& base_tensors,
                      Dtype stored = Dtype::F32) {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const NamedParameter<T>& p : base_tensors)
    writer.add<T>(p.name, p.var.shape(), std::span<const T>(p.var.value().values()), stored);
  const std::vector<std::uint8_t> tensor_bytes = writer.to_bytes();
  const std::string config_text = config.to_json().dump(2) + "\n";
  replace_directory_atomically(dir, [&](const std::filesystem::path& fresh) {
    write_file_atomically(fresh / "model.safetensors", tensor_bytes);
    write_file_atomically(fresh / "config.json", config_text);
  });
}

/// Saves a model's base (config.json + model.safetensors, every tensor of base_parameters()
/// by its reference name, lm_head.weight included when the head is untied) so that
/// `Decoder<Arch, Policy, T>::load(dir)` and transformers read it back. The adapter is not
/// saved (an attached, unmerged adapter leaves the base weights as they were loaded).
template <class Model>
void save_model(Model& model, const std::filesystem::path& dir, Dtype stored = Dtype::F32) {
  if constexpr (requires { model.base_format(); })
    if (model.base_format() != BaseFormat::fp32)
      throw ConfigError(printable(dir.string()) + ": saving a base held in " +
                        std::string(base_format_name(model.base_format())) +
                        " is not supported; save the fp32 model it was built or loaded from");
  save_model_files(dir, model.config(), model.base_parameters(), stored);
}

}  // namespace peft::io
