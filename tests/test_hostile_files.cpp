// Regression tests for issue 18's file defects: each hostile file ends in a one-line FileError /
// ConfigError naming the file and the tensor or field (or a correct result), quickly. Large
// inputs (40k tensors, a 2 GiB file) are generated here, in a scratch folder under the working
// directory (the build folder under ctest), never committed; the 2 GiB file is sparse.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <peft/data/text.hpp>
#include <peft/io/adapter_file.hpp>
#include <peft/io/atomic_file.hpp>
#include <peft/io/json.hpp>
#include <peft/io/model_file.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/nn/decoder.hpp>
#include <peft/nn/model_shapes.hpp>
#include <peft/train/checkpoint.hpp>
#include <string>
#include <vector>

#include "../cli/inspect.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_hostile_files {

namespace fs = std::filesystem;
using peft::ConfigError;
using peft::FileError;
namespace io = peft::io;

namespace {

/// A fresh scratch folder per test case, under the system's temporary folder (never the
/// working directory, which may be a checkout).
fs::path scratch(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("peft_test_hostile_files_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

const fs::path kGolden = PEFT_GOLDEN_DIR;

/// A copy of the golden gpt2-tiny model whose tensors pass through `edit` (name, values) and
/// whose config.json through `edit_config`.
template <class EditTensors, class EditConfig>
fs::path edited_gpt2(const fs::path& dir, EditTensors&& edit, EditConfig&& edit_config) {
  const fs::path source = kGolden / "models" / "gpt2-tiny";
  const io::SafetensorsFile file = io::SafetensorsFile::open(source / "model.safetensors");
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const io::TensorInfo& info : file.tensors()) {
    std::vector<float> values = file.read<float>(info.name);
    edit(writer, info, values);
  }
  fs::create_directories(dir);
  writer.write(dir / "model.safetensors");
  nlohmann::json config = io::load_json(source / "config.json");
  edit_config(config);
  write_text(dir / "config.json", config.dump(2));
  return dir;
}

void keep(io::SafetensorsWriter& writer, const io::TensorInfo& info,
          const std::vector<float>& values) {
  writer.add<float>(info.name, info.shape, values);
}

using Gpt2 = peft::Decoder<peft::arch::Gpt2, peft::NoPeft, float>;
using Llama = peft::Decoder<peft::arch::Llama, peft::NoPeft, float>;

std::vector<peft::NamedParameter<float>> tiny_adapter(float fill) {
  std::vector<peft::NamedParameter<float>> params;
  for (const char* name :
       {"base_model.model.layer.lora_A.weight", "base_model.model.layer.lora_B.weight"}) {
    peft::Tensor<float> t(peft::Shape{2, 3});
    for (std::size_t i = 0; i < t.values().size(); ++i)
      t.values()[i] = fill + static_cast<float>(i);
    params.push_back({name, peft::Var<float>(std::move(t), true)});  // trained, as A and B are
  }
  return params;
}

bool has_temporaries(const fs::path& folder) {
  for (const fs::directory_entry& entry : fs::directory_iterator(folder)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".peft-tmp-") != std::string::npos || name.find(".tmp") != std::string::npos)
      return true;
  }
  return false;
}

}  // namespace

// Defect 3: NaN in an adapter tensor or a base weight passed for a result.
TEST_CASE("hostile files: a NaN in an adapter tensor is an error naming the file and tensor") {
  const fs::path dir = scratch("nan_adapter");
  auto saved = tiny_adapter(1.0f);
  saved[1].var.value().values()[4] = std::numeric_limits<float>::quiet_NaN();
  io::save_adapter(dir / "adapter", nlohmann::json{{"peft_type", "LORA"}}, saved);
  const auto file = io::SafetensorsFile::open(dir / "adapter" / "adapter_model.safetensors");
  CHECK_THROWS_WITH_AS(
      io::load_adapter_tensors(tiny_adapter(0.0f), file),
      doctest::Contains("adapter_model.safetensors: tensor 'base_model.model.layer.lora_B.weight' "
                        "holds non-finite values (1 of 6, first at element 4: nan)"),
      FileError);
}

TEST_CASE("hostile files: a NaN or infinite base weight is an error at load naming the tensor") {
  const fs::path dir = scratch("nan_base");
  const auto poison = [](float bad) {
    return [bad](io::SafetensorsWriter& w, const io::TensorInfo& info, std::vector<float> v) {
      if (info.name == "transformer.h.1.mlp.c_fc.weight") v[7] = bad;
      w.add<float>(info.name, info.shape, v);
    };
  };
  edited_gpt2(dir / "nan", poison(std::nanf("")), [](nlohmann::json&) {});
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "nan"),
                       doctest::Contains("model.safetensors: tensor "
                                         "'transformer.h.1.mlp.c_fc.weight' holds non-finite"),
                       FileError);
  edited_gpt2(dir / "inf", poison(-INFINITY), [](nlohmann::json&) {});
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "inf"), doctest::Contains("element 7: -inf"), FileError);
  // F64 data that only becomes infinite as float is caught too.
  edited_gpt2(
      dir / "f64",
      [](io::SafetensorsWriter& w, const io::TensorInfo& info, const std::vector<float>& v) {
        std::vector<double> d(v.begin(), v.end());
        if (info.name == "transformer.wte.weight") d[0] = 1e300;
        w.add<double>(info.name, info.shape, d, io::Dtype::F64);
      },
      [](nlohmann::json&) {});
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "f64"),
                       doctest::Contains("'transformer.wte.weight' holds non-finite"), FileError);
  // And the untouched copy loads.
  edited_gpt2(dir / "good", keep, [](nlohmann::json&) {});
  CHECK_NOTHROW(Gpt2::load(dir / "good"));
}

TEST_CASE("hostile files: checkpoints with non-finite tensors are refused") {
  const fs::path dir = scratch("nan_checkpoint");
  auto params = tiny_adapter(1.0f);
  for (auto& p : params) p.var.set_requires_grad(true);
  peft::AdamW<float> optimizer(params, {});
  peft::save_checkpoint(dir, params, optimizer, nlohmann::json::object());
  auto restored = tiny_adapter(0.0f);
  for (auto& p : restored) p.var.set_requires_grad(true);
  peft::AdamW<float> again(restored, {});
  CHECK_NOTHROW(peft::load_checkpoint(dir, restored, again));
  params[0].var.value().values()[0] = INFINITY;
  peft::save_checkpoint(dir, params, optimizer, nlohmann::json::object());
  CHECK_THROWS_WITH_AS(peft::load_checkpoint(dir, restored, again),
                       doctest::Contains("'param/base_model.model.layer.lora_A.weight' holds "
                                         "non-finite"),
                       FileError);
}

// Defect 4: weights allocated from config.json before the checkpoint's header was checked.
TEST_CASE("hostile files: the checkpoint header is checked against config.json before allocation") {
  const fs::path dir = scratch("vocab");
  // vocab 5e6 against a checkpoint of vocab 384: used to allocate 5 GB, then fail on the shape.
  edited_gpt2(dir / "big_vocab", keep, [](nlohmann::json& c) { c["vocab_size"] = 5000000; });
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "big_vocab"),
                       doctest::Contains("model.safetensors: tensor 'transformer.wte.weight' has "
                                         "shape [384, 64], expected [5000000, 64] for this config"),
                       FileError);
  // A size beyond any model is refused as a field of config.json (ModelConfig::Limits)...
  edited_gpt2(dir / "absurd", keep, [](nlohmann::json& c) { c["vocab_size"] = 1000000000000; });
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "absurd"),
                       doctest::Contains("config.json: field 'vocab_size': expected an integer in "
                                         "[1, 16777216], found 1000000000000"),
                       ConfigError);
  // ... and sizes each plausible but together beyond this machine's memory before anything else,
  // naming them.
  edited_gpt2(dir / "huge", keep, [](nlohmann::json& c) {
    c["vocab_size"] = 16777216;
    c["n_embd"] = 1048576;
  });
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "huge"),
                       doctest::Contains("config.json: a model of vocab_size 16777216"),
                       ConfigError);
  edited_gpt2(dir / "layers", keep, [](nlohmann::json& c) {
    c["n_layer"] = 65536;
    c["n_embd"] = 4096;
  });
  CHECK_THROWS_WITH_AS(Gpt2::load(dir / "layers"), doctest::Contains("65536 layers"), ConfigError);
  // The same bound guards a model built in code.
  peft::ModelConfig c = peft::ModelConfig::gpt2();
  c.vocab_size = 1000000000000;
  CHECK_THROWS_WITH_AS(Gpt2{c}, doctest::Contains("for its base weights alone"), ConfigError);
}

TEST_CASE("hostile files: base_tensor_shapes lists exactly the decoder's base tensors") {
  const auto agree = [](auto& model, const std::vector<peft::BaseTensorShape>& expected) {
    const auto params = model.base_parameters();
    REQUIRE(params.size() == expected.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      CHECK(params[i].name == expected[i].name);
      CHECK(params[i].var.shape() == expected[i].shape);
    }
  };
  peft::ModelConfig g = peft::ModelConfig::gpt2();
  g.vocab_size = 10, g.hidden_size = 8, g.num_layers = 2, g.num_heads = g.num_kv_heads = 2;
  g.head_dim = 4, g.intermediate_size = 12, g.max_positions = 16;
  Gpt2 gpt2(g);
  agree(gpt2, peft::base_tensor_shapes<peft::arch::Gpt2>(g));
  peft::ModelConfig l = peft::ModelConfig::llama();
  l.vocab_size = 10, l.hidden_size = 8, l.num_layers = 2, l.num_heads = 2, l.num_kv_heads = 1;
  l.head_dim = 4, l.intermediate_size = 12, l.max_positions = 16;
  for (const bool tied : {false, true}) {
    l.tie_word_embeddings = tied;
    Llama llama(l);
    agree(llama, peft::base_tensor_shapes<peft::arch::Llama>(l));
  }
}

// Defect 6 (files half): unknown tensors ignored, I64 converted.
TEST_CASE("hostile files: a tensor the model does not have is an error naming it") {
  const fs::path dir = scratch("extra");
  edited_gpt2(
      dir,
      [](io::SafetensorsWriter& w, const io::TensorInfo& info, const std::vector<float>& v) {
        w.add<float>(info.name, info.shape, v);
        if (info.name == "transformer.wte.weight")
          w.add<float>("transformer.h.7.attn.c_attn.weight", {1}, std::vector<float>{1});
      },
      [](nlohmann::json&) {});
  CHECK_THROWS_WITH_AS(Gpt2::load(dir),
                       doctest::Contains("model.safetensors: tensor "
                                         "'transformer.h.7.attn.c_attn.weight' is not a tensor "
                                         "of this model"),
                       FileError);
}

TEST_CASE("hostile files: I64 data where a float weight is expected is refused, not converted") {
  const fs::path dir = scratch("i64");
  edited_gpt2(
      dir,
      [](io::SafetensorsWriter& w, const io::TensorInfo& info, const std::vector<float>& v) {
        if (info.name == "transformer.ln_f.bias")
          w.add<std::int64_t>(info.name, info.shape, std::vector<std::int64_t>(v.size(), 0),
                              io::Dtype::I64);
        else
          w.add<float>(info.name, info.shape, v);
      },
      [](nlohmann::json&) {});
  CHECK_THROWS_WITH_AS(Gpt2::load(dir),
                       doctest::Contains("tensor 'transformer.ln_f.bias' has dtype I64, expected "
                                         "a float dtype"),
                       FileError);
  auto params = tiny_adapter(1.0f);
  io::SafetensorsWriter writer;
  for (const auto& p : params)
    writer.add<std::int64_t>(p.name, p.var.shape(), std::vector<std::int64_t>(6, 1),
                             io::Dtype::I64);
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "adapter.safetensors");
  CHECK_THROWS_WITH_AS(io::load_adapter_tensors(params, file),
                       doctest::Contains("has dtype I64, cannot be read as float"), FileError);
  // A frozen tensor (an index table, as SHiRA's) is read as integers, exactly, or refused.
  for (auto& p : params) p.var.set_requires_grad(false);
  io::load_adapter_tensors(params, file);
  CHECK(params[0].var.value().values()[5] == 1.0f);
  io::SafetensorsWriter inexact;
  for (const auto& p : params)
    inexact.add<std::int64_t>(p.name, p.var.shape(), std::vector<std::int64_t>(6, (1LL << 24) + 1),
                              io::Dtype::I64);
  CHECK_THROWS_WITH_AS(
      io::load_adapter_tensors(params, io::SafetensorsFile::from_bytes(inexact.to_bytes(), "x")),
      doctest::Contains("element 0 is 16777217, expected an integer of magnitude at most 2^24"),
      FileError);
}

// Defect 7: special files.
TEST_CASE("hostile files: a FIFO, /dev/zero or a folder as a text file fails at once") {
  const fs::path dir = scratch("special");
  const fs::path fifo = dir / "fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // Opened without a writer this used to block forever (ctest's TIMEOUT guards it).
  CHECK_THROWS_WITH_AS(peft::data::read_bytes(fifo),
                       doctest::Contains("fifo: not a regular file (a FIFO)"), FileError);
  CHECK_THROWS_WITH_AS(peft::data::ByteCorpus::from_file("/dev/zero", 16),
                       "/dev/zero: not a regular file (a character device)", FileError);
  CHECK_THROWS_WITH_AS(peft::data::read_bytes(dir), doctest::Contains("(a folder)"), FileError);
  CHECK_THROWS_WITH_AS(io::load_json(fifo), doctest::Contains("not a regular file"), FileError);
  CHECK_THROWS_WITH_AS(io::SafetensorsFile::open("/dev/zero"),
                       doctest::Contains("not a regular file"), FileError);
  CHECK_THROWS_WITH_AS(io::read_regular_file(dir / "absent", 10), doctest::Contains("not found"),
                       FileError);
  write_text(dir / "eleven", "hello world");
  CHECK_THROWS_WITH_AS(io::read_regular_file(dir / "eleven", 10, "text file"),
                       doctest::Contains("text file of 11 bytes is over the limit of 10 bytes"),
                       FileError);
  CHECK(io::read_regular_file(dir / "eleven", 11).size() == 11);
}

// Defect 8: adapter saves.
TEST_CASE("hostile files: a symlink planted at a temporary name or the target is not followed") {
  const fs::path dir = scratch("symlink");
  const fs::path victim = dir / "victim.txt";
  write_text(victim, "precious");
  const fs::path adapter = dir / "adapter";
  fs::create_directories(adapter);
  // The old writer's fixed names, and the final names themselves.
  for (const char* name : {"adapter_config.json.tmp", "adapter_model.safetensors.tmp",
                           "adapter_config.json", "adapter_model.safetensors"})
    fs::create_symlink(victim, adapter / name);
  io::save_adapter(adapter, nlohmann::json{{"peft_type", "LORA"}}, tiny_adapter(1.0f));
  CHECK(read_text(victim) == "precious");
  CHECK(!fs::is_symlink(adapter / "adapter_config.json"));
  CHECK(io::load_json(adapter / "adapter_config.json")["peft_type"] == "LORA");
  // write_file_atomically replaces a symlink target name instead of writing through it.
  fs::create_symlink(victim, dir / "results.csv");
  io::write_file_atomically(dir / "results.csv", std::string("a,b\n"));
  CHECK(read_text(victim) == "precious");
  CHECK(read_text(dir / "results.csv") == "a,b\n");
  CHECK(!has_temporaries(dir));
}

TEST_CASE("hostile files: an adapter folder is replaced whole; other files are kept") {
  const fs::path dir = scratch("replace");
  const fs::path adapter = dir / "adapter";
  io::save_adapter(adapter, nlohmann::json{{"r", 1}}, tiny_adapter(1.0f));
  write_text(adapter / "README.md", "notes");
  io::save_adapter(adapter, nlohmann::json{{"r", 2}}, tiny_adapter(5.0f));
  CHECK(io::load_json(adapter / "adapter_config.json")["r"] == 2);
  auto loaded = tiny_adapter(0.0f);
  io::load_adapter_tensors(loaded,
                           io::SafetensorsFile::open(adapter / "adapter_model.safetensors"));
  CHECK(loaded[0].var.value().values()[0] == 5.0f);
  CHECK(read_text(adapter / "README.md") == "notes");
  CHECK(!has_temporaries(adapter));
  CHECK(!has_temporaries(dir));
  // A stale temporary folder left by a killed save is removed by the next save.
  fs::create_directories(dir / ".adapter.peft-tmp-0123456789abcdef");
  io::save_adapter(adapter, nlohmann::json{{"r", 3}}, tiny_adapter(5.0f));
  CHECK(!has_temporaries(dir));
  // A failed fill leaves the old folder untouched and no temporary behind.
  CHECK_THROWS_AS(io::replace_directory_atomically(
                      adapter, [](const fs::path&) { throw FileError("disk full"); }),
                  FileError);
  CHECK(io::load_json(adapter / "adapter_config.json")["r"] == 3);
  CHECK(!has_temporaries(dir));
  // A file where the folder should be is an error, not replaced.
  write_text(dir / "plain", "x");
  CHECK_THROWS_WITH_AS(io::save_adapter(dir / "plain", nlohmann::json{}, tiny_adapter(1.0f)),
                       doctest::Contains("plain: exists and is not a folder"), FileError);
}

TEST_CASE("hostile files: model folders are replaced whole and load back") {
  const fs::path dir = scratch("model_save");
  peft::ModelConfig g = peft::ModelConfig::gpt2();
  g.vocab_size = 10, g.hidden_size = 8, g.num_layers = 1, g.num_heads = g.num_kv_heads = 2;
  g.head_dim = 4, g.intermediate_size = 12, g.max_positions = 16;
  Gpt2 model(g, {}, 3);
  io::save_model(model, dir / "base");
  io::save_model(model, dir / "base");
  Gpt2 again = Gpt2::load(dir / "base");
  CHECK(again.base_parameters()[0].var.value().values() ==
        model.base_parameters()[0].var.value().values());
  CHECK(!has_temporaries(dir));
  CHECK(!has_temporaries(dir / "base"));
}

// Defect 9: quadratic header parsing; inspect reading the whole file.
TEST_CASE("hostile files: a header of 40k tensors parses (linear parser)") {
  io::SafetensorsWriter writer;
  for (int i = 0; i < 40000; ++i)
    writer.add<float>("t" + std::to_string(i), {0}, std::vector<float>{});
  const std::vector<std::uint8_t> bytes = writer.to_bytes();
  // Quadratic, this took 28 s; linear it is a fraction of a second (ctest's TIMEOUT guards it).
  const auto file = io::SafetensorsFile::from_bytes(bytes, "many.safetensors");
  CHECK(file.tensors().size() == 40000);
  CHECK(file.contains("t39999"));
  // The strict checks still hold in the new parser.
  CHECK_THROWS_WITH_AS(io::detail::parse_json_strict(R"({"a": {"b": 1, "b": 2}})", "x.json"),
                       "x.json: duplicate JSON key 'b'", FileError);
  CHECK_THROWS_WITH_AS(
      io::detail::parse_json_strict(std::string(100, '[') + std::string(100, ']'), "deep.json"),
      doctest::Contains("nests deeper than 64 levels"), FileError);
  CHECK_THROWS_WITH_AS(io::detail::parse_json_strict("{\"a\": 1,}", "comma.json"),
                       doctest::Contains("comma.json: invalid JSON at byte offset 8"), FileError);
  const nlohmann::json parsed = io::detail::parse_json_strict(
      R"({"x": [1, -2, 2.5, "s", null, true, {"y": []}], "z": {}})", "ok.json");
  CHECK(parsed ==
        nlohmann::json::parse(R"({"x": [1, -2, 2.5, "s", null, true, {"y": []}], "z": {}})"));
}

TEST_CASE("hostile files: inspect maps a 2 GiB file instead of reading it") {
  const fs::path dir = scratch("big_inspect");
  const fs::path path = dir / "big.safetensors";
  const std::uint64_t data = 2ull << 30;
  std::string header = R"({"big":{"dtype":"F32","shape":[)" + std::to_string(data / 4) +
                       R"(],"data_offsets":[0,)" + std::to_string(data) + "]}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  {
    std::ofstream out(path, std::ios::binary);
    const std::uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header;
  }
  // Sparse: the data section takes no disk space, and reading it would cost 2 GiB of memory.
  fs::resize_file(path, 8 + header.size() + data);
  const std::string listing = peft::cli::detail::describe_safetensors_file(path.string());
  CHECK(listing.find("big  F32  [536870912]") != std::string::npos);
  CHECK(listing.find("1 tensor, 536870912 parameters") != std::string::npos);
  fs::remove(path);
}

}  // namespace test_hostile_files
