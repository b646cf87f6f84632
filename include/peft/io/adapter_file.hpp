#pragma once
// Adapter files in the reference layout: a folder with adapter_config.json and
// adapter_model.safetensors, tensors keyed "base_model.model.<module path>.<name>".
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

/// A frozen tensor stored with an integer dtype (I64, I32: the reference's index tensors, e.g.
/// SHiRA's shira_indices) as T, each value checked to be exact in T.
template <class T>
std::vector<T> exact_from_integers(const SafetensorsFile& file, const std::string& name,
                                   const std::vector<std::int64_t>& shape) {
  const std::vector<std::int64_t> ints = file.read<std::int64_t>(name, shape);
  constexpr std::int64_t exact = std::int64_t{1} << std::numeric_limits<T>::digits;
  std::vector<T> out(ints.size());
  for (std::size_t i = 0; i < ints.size(); ++i) {
    if (ints[i] > exact || ints[i] < -exact)
      throw FileError(file.name() + ": tensor '" + name + "' element " + std::to_string(i) +
                      " is " + std::to_string(ints[i]) + ", expected an integer of magnitude " +
                      "at most 2^" + std::to_string(std::numeric_limits<T>::digits) +
                      " (exact in the model's precision)");
    out[i] = static_cast<T>(ints[i]);
  }
  return out;
}

/// Copies every listed tensor from `file`, checking presence, shape, dtype (a float one; a
/// frozen tensor may also be stored as I64 or I32, as the reference stores indices) and that
/// every value is finite. A tensor in the file
/// that no parameter claims is an error too: it means the adapter was made for other targets.
template <class T>
void load_adapter_tensors(const std::vector<NamedParameter<T>>& params,
                          const SafetensorsFile& file) {
  std::set<std::string> claimed;
  for (NamedParameter<T> p : params) {
    if (!file.contains(p.name))
      throw FileError(file.name() + ": missing tensor '" + p.name + "' (expected shape " +
                      shape_string(p.var.shape()) + ")");
    const bool indices = !p.var.requires_grad() && !is_floating_dtype(file.info(p.name).dtype);
    p.var.value() =
        Tensor<T>(p.var.shape(), indices ? exact_from_integers<T>(file, p.name, p.var.shape())
                                         : file.template read_finite<T>(p.name, p.var.shape()));
    claimed.insert(p.name);
  }
  for (const TensorInfo& info : file.tensors())
    if (!claimed.count(info.name))
      throw FileError(file.name() + ": tensor '" + info.name +
                      "' belongs to no module of this adapter (different target_modules?)");
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (F32, {"format": "pt"})
/// as one unit: both go into a new folder beside `dir`, which then replaces `dir` whole
/// (io::replace_directory_atomically), so a crash at any moment leaves the previous adapter or
/// this one, never the new tensors with the old config. Other files in `dir` are kept.
template <class T>
void save_adapter(const std::filesystem::path& dir, const nlohmann::json& config,
                  const std::vector<NamedParameter<T>>& params) {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const NamedParameter<T>& p : params)
    writer.add<T>(p.name, p.var.shape(), std::span<const T>(p.var.value().values()), Dtype::F32);
  const std::vector<std::uint8_t> tensors = writer.to_bytes();
  const std::string config_text = config.dump(2) + "\n";
  replace_directory_atomically(dir, [&](const std::filesystem::path& fresh) {
    write_file_atomically(fresh / "adapter_model.safetensors", tensors);
    write_file_atomically(fresh / "adapter_config.json", config_text);
  });
}

}  // namespace peft::io
