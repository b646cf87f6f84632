#pragma once
// Base models in the reference layout: a folder with config.json (as transformers writes it)
// and model.safetensors (every base tensor by its reference name), which Decoder::load and
// transformers' from_pretrained both read.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/core/error.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/nn/config.hpp"

namespace peft::io {

namespace detail {

/// Writes `bytes` to `path` + ".tmp"; returns that path. Removes it and throws FileError when
/// the write fails.
inline std::filesystem::path write_temporary(const std::filesystem::path& path,
                                             std::span<const char> bytes) {
  std::filesystem::path temporary = path;
  temporary += ".tmp";
  std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
  if (out) out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    throw FileError(printable(temporary.string()) + ": write failed");
  }
  return temporary;
}

}  // namespace detail

/// Writes `dir/config.json` and `dir/model.safetensors` for the given config and base tensors
/// (stored as `stored`, F32 by default, with {"format": "pt"} metadata). Both files are first
/// written in full as ".tmp" siblings and only then renamed into place, so a failed write
/// leaves no half-written file under either final name (and any previous files intact).
template <class T>
void save_model_files(const std::filesystem::path& dir, const ModelConfig& config,
                      const std::vector<NamedParameter<T>>& base_tensors,
                      Dtype stored = Dtype::F32) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw FileError(printable(dir.string()) + ": cannot create folder: " + ec.message());
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const NamedParameter<T>& p : base_tensors)
    writer.add<T>(p.name, p.var.shape(), std::span<const T>(p.var.value().values()), stored);
  const std::vector<std::uint8_t> tensor_bytes = writer.to_bytes();
  const std::string config_text = config.to_json().dump(2) + "\n";

  const std::filesystem::path tensors_path = dir / "model.safetensors";
  const std::filesystem::path config_path = dir / "config.json";
  const std::filesystem::path tensors_tmp = detail::write_temporary(
      tensors_path, std::span<const char>(reinterpret_cast<const char*>(tensor_bytes.data()),
                                          tensor_bytes.size()));
  std::filesystem::path config_tmp;
  try {
    config_tmp = detail::write_temporary(config_path, config_text);
  } catch (...) {
    std::filesystem::remove(tensors_tmp, ec);
    throw;
  }
  // Tensors first: a config.json beside them is what marks the folder as a model.
  const std::pair<std::filesystem::path, std::filesystem::path> renames[] = {
      {tensors_tmp, tensors_path}, {config_tmp, config_path}};
  for (const auto& [from, to] : renames) {
    std::filesystem::rename(from, to, ec);
    if (ec) {
      const std::string message = ec.message();
      std::filesystem::remove(tensors_tmp, ec);
      std::filesystem::remove(config_tmp, ec);
      throw FileError(printable(to.string()) + ": cannot rename " + printable(from.string()) +
                      " into place: " + message);
    }
  }
}

/// Saves a model's base (config.json + model.safetensors, every tensor of base_parameters()
/// by its reference name, lm_head.weight included when the head is untied) so that
/// `Decoder<Arch, Policy, T>::load(dir)` and transformers read it back. The adapter is not
/// saved (an attached, unmerged adapter leaves the base weights as they were loaded).
template <class Model>
void save_model(Model& model, const std::filesystem::path& dir, Dtype stored = Dtype::F32) {
  save_model_files(dir, model.config(), model.base_parameters(), stored);
}

}  // namespace peft::io
