#pragma once
// Training checkpoints: everything a run needs to continue bit-for-bit where it stopped.
//
// A checkpoint is a folder holding
//   checkpoint.safetensors  the trainable tensors ("param/<name>"), AdamW's moments
//                           ("adam_m/<name>", "adam_v/<name>"), and, in the header's metadata
//                           under "peft_checkpoint", the state as JSON: step, AdamW step count,
//                           the data generator's state, the loss history, early-stopping state;
//   checkpoint.json         the same state, pretty-printed for people (a sidecar: never read).
// Both are written with io::write_file_atomically (exclusive temporary, fsync, rename). The rename
// of the safetensors file is the commit point: since the state travels inside it, a crash at any
// moment leaves either the previous checkpoint or the new one, whole, never a mixture of the two.
//
// Tensors are stored in their own precision (F32 for float, F64 for double), so a resumed run
// starts from exactly the numbers the interrupted one had.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/train/optimizer.hpp"

namespace peft {

inline constexpr const char* kCheckpointTensors = "checkpoint.safetensors";
inline constexpr const char* kCheckpointSidecar = "checkpoint.json";
inline constexpr const char* kCheckpointMetadataKey = "peft_checkpoint";

namespace detail {
template <class T>
constexpr io::Dtype exact_dtype() {
  return std::is_same_v<T, double> ? io::Dtype::F64 : io::Dtype::F32;
}
}  // namespace detail

/// Writes `text` to `path` atomically and durably (io::write_file_atomically); what study and
/// search results use.
inline void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
  io::write_file_atomically(path, text);
}

/// Saves `params` (the optimizer's tensors, in its order), the optimizer's moments and step
/// count, and `state` into the folder `dir` (created if needed).
template <class T>
void save_checkpoint(const std::filesystem::path& dir, const std::vector<NamedParameter<T>>& params,
                     AdamW<T>& optimizer, nlohmann::json state) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw FileError(dir.string() + ": cannot create checkpoint folder: " + ec.message());
  if (optimizer.first_moments().size() != params.size())
    throw Error("checkpoint: " + std::to_string(params.size()) +
                " tensors but the optimizer holds " +
                std::to_string(optimizer.first_moments().size()));
  state["optimizer_step"] = optimizer.step_count();
  state["format"] = "peft-checkpoint-1";
  io::SafetensorsWriter writer;
  writer.set_metadata(kCheckpointMetadataKey, state.dump());
  constexpr io::Dtype dtype = detail::exact_dtype<T>();
  for (std::size_t k = 0; k < params.size(); ++k) {
    const NamedParameter<T>& p = params[k];
    writer.add<T>("param/" + p.name, p.var.shape(), std::span<const T>(p.var.value().values()),
                  dtype);
    writer.add<T>("adam_m/" + p.name, p.var.shape(),
                  std::span<const T>(optimizer.first_moments()[k].values()), dtype);
    writer.add<T>("adam_v/" + p.name, p.var.shape(),
                  std::span<const T>(optimizer.second_moments()[k].values()), dtype);
  }
  writer.write(dir / kCheckpointTensors);  // the commit point
  write_text_atomically(dir / kCheckpointSidecar, state.dump(2) + "\n");
}

/// True when `dir` holds a checkpoint (the sidecar alone does not count).
inline bool has_checkpoint(const std::filesystem::path& dir) {
  return std::filesystem::is_regular_file(dir / kCheckpointTensors);
}

/// Reads the state JSON of the checkpoint in `dir` without touching any model.
inline nlohmann::json read_checkpoint_state(const std::filesystem::path& dir) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(dir / kCheckpointTensors);
  const auto it = file.metadata().find(kCheckpointMetadataKey);
  if (it == file.metadata().end())
    throw FileError(file.name() + ": no '" + kCheckpointMetadataKey +
                    "' metadata: not a peft training checkpoint");
  return io::detail::parse_json_strict(it->second, file.name() + " (metadata)");
}

/// Restores tensors and optimizer state saved by save_checkpoint into `params` and
/// `optimizer` (built over the same tensors); returns the saved state JSON.
template <class T>
nlohmann::json load_checkpoint(const std::filesystem::path& dir,
                               const std::vector<NamedParameter<T>>& params, AdamW<T>& optimizer) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(dir / kCheckpointTensors);
  const auto it = file.metadata().find(kCheckpointMetadataKey);
  if (it == file.metadata().end())
    throw FileError(file.name() + ": no '" + kCheckpointMetadataKey +
                    "' metadata: not a peft training checkpoint");
  nlohmann::json state = io::detail::parse_json_strict(it->second, file.name() + " (metadata)");
  if (file.tensors().size() != 3 * params.size())
    throw FileError(file.name() + ": holds " + std::to_string(file.tensors().size()) +
                    " tensors, expected " + std::to_string(3 * params.size()) +
                    " (3 per trainable tensor): a checkpoint of another method or model?");
  for (std::size_t k = 0; k < params.size(); ++k) {
    NamedParameter<T> p = params[k];
    const Shape& shape = p.var.shape();
    p.var.value() = Tensor<T>(shape, file.template read_finite<T>("param/" + p.name, shape));
    optimizer.first_moments()[k] =
        Tensor<T>(shape, file.template read_finite<T>("adam_m/" + p.name, shape));
    optimizer.second_moments()[k] =
        Tensor<T>(shape, file.template read_finite<T>("adam_v/" + p.name, shape));
  }
  optimizer.set_step_count(io::json_get<std::int64_t>(state, "optimizer_step", file.name()));
  return state;
}

}  // namespace peft
