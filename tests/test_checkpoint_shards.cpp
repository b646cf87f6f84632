// Sharded checkpoints (io/checkpoint.hpp): a model split into three shards by
// model.safetensors.index.json loads to bit-identical logits (fp32 and bf16 bases); a malformed
// index is a FileError naming the index and what is wrong, before any weight is read.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <peft/io/checkpoint.hpp>
#include <peft/io/model_file.hpp>
#include <peft/nn/decoder.hpp>
#include <string>
#include <vector>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_checkpoint_shards {

namespace {

namespace fs = std::filesystem;
using Model = peft::Decoder<peft::arch::Llama, peft::NoPeft, float>;

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

void write_bytes(const fs::path& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// A temporary folder: the model saved whole (`whole/`) and split into three shards (`split/`),
// tensors dealt round-robin, with the index transformers writes.
struct ShardedModel {
  fs::path root = fs::temp_directory_path() / ("peft_shards_" + std::to_string(::getpid()));
  fs::path whole = root / "whole", split = root / "split";
  nlohmann::json index;

  ShardedModel() {
    fs::remove_all(root);
    Model model(test_support::tiny_llama(), {}, 4);
    peft::io::save_model(model, whole);
    fs::create_directories(split);
    fs::copy_file(whole / "config.json", split / "config.json");
    const peft::io::SafetensorsFile file =
        peft::io::SafetensorsFile::open(whole / "model.safetensors");
    std::vector<peft::io::SafetensorsWriter> shards(3);
    index["metadata"]["total_size"] = 0;
    std::size_t i = 0;
    for (const peft::io::TensorInfo& info : file.tensors()) {
      const std::size_t s = i++ % 3;
      shards[s].add_raw(info.name, info.dtype, info.shape, file.raw_bytes(info.name));
      index["weight_map"][info.name] = shard_name(s);
    }
    for (std::size_t s = 0; s < 3; ++s) write_bytes(split / shard_name(s), shards[s].to_bytes());
    write_index(index);
  }
  ~ShardedModel() { fs::remove_all(root); }

  static std::string shard_name(std::size_t s) {
    return "model-0000" + std::to_string(s + 1) + "-of-00003.safetensors";
  }
  void write_index(const nlohmann::json& j) const {
    write_text(split / "model.safetensors.index.json", j.dump());
  }
};

}  // namespace

TEST_CASE("a checkpoint in three shards loads to the logits of the whole file, bit for bit") {
  const ShardedModel m;
  CHECK(peft::io::Checkpoint::open(m.split).shard_count() == 3);
  for (const peft::BaseFormat format : {peft::BaseFormat::fp32, peft::BaseFormat::bf16}) {
    CAPTURE(peft::base_format_name(format));
    const peft::Tensor<float> whole =
        Model::load(m.whole, {}, 0, format).logits(test_support::padded_batch());
    const peft::Tensor<float> split =
        Model::load(m.split, {}, 0, format).logits(test_support::padded_batch());
    REQUIRE(whole.numel() == split.numel());
    for (std::int64_t i = 0; i < whole.numel(); ++i) REQUIRE(whole[i] == split[i]);
  }
}

TEST_CASE("a malformed shard index is a FileError naming the index and the fault") {
  const ShardedModel m;
  const auto fails_with = [&](const nlohmann::json& index, const std::string& expected) {
    m.write_index(index);
    CHECK_THROWS_WITH_AS(Model::load(m.split), doctest::Contains(expected.c_str()),
                         peft::FileError);
    CHECK_THROWS_WITH_AS(Model::load(m.split), doctest::Contains("model.safetensors.index.json"),
                         peft::FileError);
  };
  const std::string some_tensor = m.index["weight_map"].begin().key();
  nlohmann::json missing_shard = m.index;
  missing_shard["weight_map"][some_tensor] = "model-00009-of-00003.safetensors";
  m.write_index(missing_shard);
  CHECK_THROWS_WITH_AS(Model::load(m.split), doctest::Contains("model-00009-of-00003.safetensors"),
                       peft::FileError);

  nlohmann::json outside = m.index;
  outside["weight_map"][some_tensor] = "../whole/model.safetensors";
  fails_with(outside, "is not a file name in the checkpoint's folder");

  // The tensor's shard is right, but the index says another: found where it is not listed.
  nlohmann::json moved = m.index;
  const std::string first_shard = moved["weight_map"][some_tensor];
  moved["weight_map"][some_tensor] = first_shard == ShardedModel::shard_name(0)
                                         ? ShardedModel::shard_name(1)
                                         : ShardedModel::shard_name(0);
  fails_with(moved, "the weight_map says");

  nlohmann::json unlisted = m.index;
  unlisted["weight_map"].erase(some_tensor);
  fails_with(unlisted, "is not in the weight_map");

  nlohmann::json extra = m.index;
  extra["weight_map"]["model.layers.9.mlp.up_proj.weight"] = ShardedModel::shard_name(2);
  fails_with(extra, "'model.layers.9.mlp.up_proj.weight' is missing from shard");

  fails_with(nlohmann::json::array(), "expected an object with a \"weight_map\" object");
  nlohmann::json not_a_name = m.index;
  not_a_name["weight_map"][some_tensor] = 3;
  fails_with(not_a_name, "expected a file name (a string), found number");

  // The same tensor in two shards: shard 3 carries a copy of one of shard 1's tensors.
  m.write_index(m.index);
  const peft::io::SafetensorsFile first =
      peft::io::SafetensorsFile::open(m.split / ShardedModel::shard_name(0));
  const peft::io::SafetensorsFile third =
      peft::io::SafetensorsFile::open(m.split / ShardedModel::shard_name(2));
  peft::io::SafetensorsWriter both;
  for (const peft::io::TensorInfo& info : third.tensors())
    both.add_raw(info.name, info.dtype, info.shape, third.raw_bytes(info.name));
  const peft::io::TensorInfo& copied = first.tensors().front();
  both.add_raw(copied.name, copied.dtype, copied.shape, first.raw_bytes(copied.name));
  write_bytes(m.split / ShardedModel::shard_name(2), both.to_bytes());
  CHECK_THROWS_WITH_AS(Model::load(m.split), doctest::Contains("is in two shards"),
                       peft::FileError);
}

}  // namespace test_checkpoint_shards
