#pragma once
// A model folder's weights as large models ship them: one `model.safetensors`, or shards listed
// by `model.safetensors.index.json` (transformers' layout: {"metadata": {...}, "weight_map":
// {"tensor name": "model-00001-of-00003.safetensors", ...}}). Every file is memory-mapped
// (SafetensorsFile::map), so reading a tensor touches only its pages: memory grows with what a
// loader keeps, not with the file.
//
// The index is untrusted input and is checked before any shard is read: a JSON object whose
// weight_map maps names to plain file names inside the folder (no '/', no "..", not empty);
// every shard it names exists and is a valid safetensors file; each tensor is in exactly the
// shard the index says (one found in two shards, one missing from its shard, or one in a shard
// the index does not list for it is a FileError naming the index, the tensor and the files).
//
// A mapped file that someone truncates while it is mapped makes the reading process fault
// (SIGBUS), as with every mmap-based loader (the reference's safetensors included); do not
// rewrite a checkpoint while a model is loading from it.
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "peft/io/json.hpp"
#include "peft/io/printable.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

class Checkpoint {
 public:
  static constexpr std::string_view kSingleFile = "model.safetensors";
  static constexpr std::string_view kIndexFile = "model.safetensors.index.json";

  /// The weights of `model_dir`: model.safetensors if it exists, else the index and its shards.
  static Checkpoint open(const std::filesystem::path& model_dir) {
    Checkpoint c;
    const std::filesystem::path single = model_dir / kSingleFile;
    const std::filesystem::path index = model_dir / kIndexFile;
    std::error_code ec;
    if (std::filesystem::exists(single, ec) || !std::filesystem::exists(index, ec)) {
      c.name_ = single.string();
      c.files_.push_back(std::make_shared<const SafetensorsFile>(SafetensorsFile::map(single)));
      for (const TensorInfo& info : c.files_.back()->tensors()) c.owner_[info.name] = 0;
      c.tensors_ = c.files_.back()->tensors();
      return c;
    }
    c.name_ = index.string();
    c.open_shards(model_dir, load_json(index));
    return c;
  }

  /// The single file or the index, as messages name it.
  const std::string& name() const { return name_; }
  /// Every tensor of every file (shards in index order).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool contains(std::string_view tensor) const { return owner_.count(std::string(tensor)) != 0; }
  /// The file that holds `tensor` (FileError naming the checkpoint when none does).
  const SafetensorsFile& file_of(std::string_view tensor) const {
    const auto found = owner_.find(std::string(tensor));
    if (found == owner_.end())
      throw FileError(printable(name_) + ": no tensor '" + printable(tensor) + "'");
    return *files_[found->second];
  }
  const TensorInfo& info(std::string_view tensor) const { return file_of(tensor).info(tensor); }
  std::span<const std::uint8_t> raw_bytes(std::string_view tensor) const {
    return file_of(tensor).raw_bytes(tensor);
  }
  template <class T>
  std::vector<T> read_finite(std::string_view tensor,
                             const std::vector<std::int64_t>& expected_shape) const {
    return file_of(tensor).template read_finite<T>(tensor, expected_shape);
  }
  std::size_t shard_count() const { return files_.size(); }

 private:
  void open_shards(const std::filesystem::path& dir, const nlohmann::json& index) {
    const std::string where = printable(name_);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw FileError(where + ": expected an object with a \"weight_map\" object, found " +
                      std::string(index.is_object() ? "no weight_map object" : index.type_name()));
    const nlohmann::json& map = index["weight_map"];
    if (map.empty()) throw FileError(where + ": weight_map lists no tensor");
    std::map<std::string, std::size_t> shard_index;  // file name → files_ position
    std::vector<std::string> shard_names;
    for (const auto& [tensor, file] : map.items()) {
      if (!file.is_string())
        throw FileError(where + ": weight_map[\"" + printable(tensor) +
                        "\"]: expected a file name (a string), found " + file.type_name());
      const std::string shard = file.get<std::string>();
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos ||
          shard.find('\0') != std::string::npos)
        throw FileError(where + ": weight_map[\"" + printable(tensor) + "\"]: shard '" +
                        printable(shard) +
                        "' is not a file name in the checkpoint's folder (a path outside it?)");
      if (!shard_index.count(shard)) {
        shard_index[shard] = shard_names.size();
        shard_names.push_back(shard);
      }
      owner_[tensor] = shard_index[shard];
    }
    for (const std::string& shard : shard_names)
      files_.push_back(std::make_shared<const SafetensorsFile>(SafetensorsFile::map(dir / shard)));
    // Each tensor in exactly the shard the index names.
    std::map<std::string, std::size_t> found;
    for (std::size_t f = 0; f < files_.size(); ++f)
      for (const TensorInfo& info : files_[f]->tensors()) {
        const auto listed = owner_.find(info.name);
        if (listed == owner_.end())
          throw FileError(where + ": tensor '" + printable(info.name) + "' of shard '" +
                          printable(shard_names[f]) + "' is not in the weight_map");
        if (const auto seen = found.find(info.name); seen != found.end())
          throw FileError(where + ": tensor '" + printable(info.name) + "' is in two shards ('" +
                          printable(shard_names[seen->second]) + "' and '" +
                          printable(shard_names[f]) + "')");
        if (listed->second != f)
          throw FileError(where + ": tensor '" + printable(info.name) + "' is in shard '" +
                          printable(shard_names[f]) + "', the weight_map says '" +
                          printable(shard_names[listed->second]) + "'");
        found[info.name] = f;
        tensors_.push_back(info);
      }
    for (const auto& [tensor, f] : owner_)
      if (!found.count(tensor))
        throw FileError(where + ": tensor '" + printable(tensor) + "' is missing from shard '" +
                        printable(shard_names[f]) + "'");
  }

  std::string name_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, std::size_t> owner_;  // tensor → files_ position
  std::vector<TensorInfo> tensors_;
};

}  // namespace peft::io
