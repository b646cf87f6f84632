// libFuzzer harness: the safetensors reader (header parse + tensor table validation) on bytes in
// memory, then every accepted tensor read as each element type, then a round trip through the
// writer. Expected outcomes and findings: fuzz/harness.hpp.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

#include "harness.hpp"
#include "json_mutator.hpp"
#include "peft/io/safetensors.hpp"

namespace {

using peft::io::SafetensorsFile;

void check(bool ok, const char* what) {
  if (!ok) peft::fuzz::finding("safetensors invariant broken", "check", what);
}

template <class T>
void read_as(const SafetensorsFile& file, const peft::io::TensorInfo& info) {
  peft::fuzz::expect_peft_errors_only([&] {
    const std::vector<T> values = file.read<T>(info.name);
    check(values.size() == static_cast<std::size_t>(info.numel()), "read size != numel");
    (void)file.read<T>(info.name, info.shape);
  });
}

void run(const std::uint8_t* data, std::size_t size) {
  const SafetensorsFile file =
      SafetensorsFile::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz.safetensors");
  // What the reader promises about an accepted file (safetensors.hpp): every tensor's bytes lie
  // inside the data section and match its shape and dtype.
  std::uint64_t header = 0;
  std::memcpy(&header, data, sizeof header);
  const std::uint64_t data_size = size - 8 - header;
  for (const peft::io::TensorInfo& info : file.tensors()) {
    check(info.begin <= info.end && info.end <= data_size, "tensor bytes outside the data section");
    check(info.byte_size() ==
              static_cast<std::uint64_t>(info.numel()) * peft::io::dtype_size(info.dtype),
          "byte size != numel * dtype size");
    check(file.contains(info.name), "listed tensor not found by name");
    check(file.raw_bytes(info.name).size() == info.byte_size(), "raw_bytes size");
    read_as<float>(file, info);
    read_as<double>(file, info);
    read_as<std::int64_t>(file, info);
  }

  // Round trip: what the reader accepted, the writer writes and the reader reads back equal.
  peft::io::SafetensorsWriter writer;
  peft::fuzz::expect_peft_errors_only([&] {
    for (const auto& [key, value] : file.metadata()) writer.set_metadata(key, value);
    for (const peft::io::TensorInfo& info : file.tensors())
      writer.add_raw(info.name, info.dtype, info.shape, file.raw_bytes(info.name));
    const SafetensorsFile again = SafetensorsFile::from_bytes(writer.to_bytes(), "round trip");
    check(again.tensors().size() == file.tensors().size(), "round trip: tensor count");
    check(again.metadata() == file.metadata(), "round trip: metadata");
    for (const peft::io::TensorInfo& info : file.tensors()) {
      const auto a = file.raw_bytes(info.name);
      const auto b = again.raw_bytes(info.name);
      check(again.info(info.name).shape == info.shape && again.info(info.name).dtype == info.dtype,
            "round trip: shape or dtype");
      check(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0),
            "round trip: bytes");
    }
  });
}

// Header keys and values worth trying (json_mutator.hpp).
constexpr std::string_view kStrings[] = {
    "dtype", "shape", "data_offsets", "__metadata__", "F64", "F32", "F16",
    "BF16",  "I64",   "U8",           "format",       "pt",  "w",   "input_ids"};

}  // namespace

// Half of the mutations change the JSON header as a tree and rewrite the length prefix, so
// that type confusion and edge numbers reach the tensor table's checks (a byte mutation mostly
// breaks the length or the JSON); the rest are libFuzzer's own.
extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size,
                                               std::size_t max_size, unsigned seed) {
  std::uint64_t header = 0;
  if (size >= 8) std::memcpy(&header, data, sizeof header);
  if (seed % 2 == 0 || size < 8 || header == 0 || header > size - 8)
    return LLVMFuzzerMutate(data, size, max_size);
  const std::size_t rest = size - 8 - static_cast<std::size_t>(header);
  if (max_size < 8 + rest + 2) return LLVMFuzzerMutate(data, size, max_size);
  std::vector<std::uint8_t> text(data + 8, data + 8 + header);
  const std::size_t room = max_size - 8 - rest;
  text.resize(std::max<std::size_t>(room, text.size()));
  const std::size_t text_size = peft::fuzz::mutate_json(
      text.data(), static_cast<std::size_t>(header), room, seed / 2, kStrings);
  std::vector<std::uint8_t> tail(data + 8 + header, data + size);
  const std::uint64_t new_header = text_size;
  std::memcpy(data, &new_header, sizeof new_header);
  std::memcpy(data + 8, text.data(), text_size);
  if (!tail.empty()) std::memcpy(data + 8 + text_size, tail.data(), tail.size());
  return 8 + text_size + tail.size();
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  peft::fuzz::expect_peft_errors_only([&] { run(data, size); });
  return 0;
}
