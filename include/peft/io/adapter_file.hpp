#pragma once
// Adapter files in the reference layout: a folder with adapter_config.json and
// adapter_model.safetensors, tensors keyed "base_model.model.<module path>.<name>".
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

/// Copies every listed tensor from `file`, checking presence and shape. A tensor in the file
/// that no parameter claims is an error too: it means the adapter was made for other targets.
template <class T>
void load_adapter_tensors(const std::vector<NamedParameter<T>>& params,
                          const SafetensorsFile& file) {
  std::set<std::string> claimed;
  for (NamedParameter<T> p : params) {
    if (!file.contains(p.name))
      throw FileError(file.name() + ": missing tensor '" + p.name + "' (expected shape " +
                      shape_string(p.var.shape()) + ")");
    p.var.value() = Tensor<T>(p.var.shape(), file.template read<T>(p.name, p.var.shape()));
    claimed.insert(p.name);
  }
  for (const TensorInfo& info : file.tensors())
    if (!claimed.count(info.name))
      throw FileError(file.name() + ": tensor '" + info.name +
                      "' belongs to no module of this adapter (different target_modules?)");
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (F32, {"format": "pt"}),
/// each through a temporary file and a rename.
template <class T>
void save_adapter(const std::filesystem::path& dir, const nlohmann::json& config,
                  const std::vector<NamedParameter<T>>& params) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw FileError(dir.string() + ": cannot create folder: " + ec.message());
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const NamedParameter<T>& p : params)
    writer.add<T>(p.name, p.var.shape(), std::span<const T>(p.var.value().values()), Dtype::F32);
  writer.write(dir / "adapter_model.safetensors");
  const std::filesystem::path config_path = dir / "adapter_config.json";
  const std::filesystem::path tmp = config_path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << config.dump(2) << '\n';
    if (!out) throw FileError(tmp.string() + ": write failed");
  }
  std::filesystem::rename(tmp, config_path, ec);
  if (ec) throw FileError(config_path.string() + ": rename failed: " + ec.message());
}

}  // namespace peft::io
