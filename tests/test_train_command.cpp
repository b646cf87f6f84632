// `peft train` (include/peft/commands/train.hpp) in-process with a LoRA-only registry, and the
// data it reads (include/peft/data/token_data.hpp): a golden-case model fine-tuned on a text file
// as bytes, a small model with GPT-2's vocabulary fine-tuned with GPT-2's tokenizer, JSONL pairs
// with the loss on the completion only, llm.c and raw uint16 token files, and bad data named by
// file and line before any training. The kill-and-resume check of the binary is
// tests/train_kill_resume.cmake.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <peft/commands/report_errors.hpp>
#include <peft/commands/train.hpp>
#include <peft/io/model_file.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_train_command {

#ifndef PEFT_GOLDEN_DIR
#define PEFT_GOLDEN_DIR "../shared/golden"
#endif
#ifndef PEFT_GPT2_TOKENIZER_DIR
#define PEFT_GPT2_TOKENIZER_DIR "../shared/data/gpt2"
#endif

namespace {

namespace fs = std::filesystem;
using LoraOnly = peft::MethodRegistry<peft::LoRA>;

fs::path scratch(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("peft_test_train_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

const fs::path kGolden = PEFT_GOLDEN_DIR;
const fs::path kTinyModel = kGolden / "models/gpt2-tiny";
const fs::path kLoraConfig = kGolden / "gpt2_lora/adapter/adapter_config.json";

struct Run {
  int status = -1;
  std::string out, err;
};

Run train(std::vector<std::string> args) {
  std::ostringstream out, err;
  Run r;
  r.status = peft::commands::report_errors(
      "train", err, [&] { return peft::commands::run_train<LoraOnly>(args, out, err); });
  r.out = out.str();
  r.err = err.str();
  return r;
}

std::vector<std::string> lines_of(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string text_corpus() {
  std::string text;
  for (int i = 0; i < 60; ++i)
    text += "The quick brown fox jumps over the lazy dog, " + std::to_string(i) + " times.\n";
  return text;
}

}  // namespace

TEST_CASE("peft train: a golden model on a text file as bytes, saved in the reference layout") {
  if (!fs::exists(kTinyModel / "config.json")) return;
  const fs::path dir = scratch("bytes");
  write(dir / "train.txt", text_corpus());
  const Run r = train({kTinyModel.string(),
                       "--adapter-config",
                       kLoraConfig.string(),
                       "--data",
                       (dir / "train.txt").string(),
                       "--out",
                       (dir / "out").string(),
                       "--seq-len",
                       "32",
                       "--batch",
                       "4",
                       "--steps",
                       "30",
                       "--lr",
                       "1e-2",
                       "--threads",
                       "1",
                       "--no-progress",
                       "--eval-every",
                       "10"});
  INFO(r.out << r.err);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("trainable params: 8,192") != std::string::npos);
  CHECK(r.out.find("completed 30 steps") != std::string::npos);
  const fs::path adapter = dir / "out/adapter";
  REQUIRE(fs::exists(adapter / "adapter_model.safetensors"));
  REQUIRE(fs::exists(adapter / "adapter_config.json"));
  // The reference layout: the reference's config and key names, loadable into a fresh model.
  const nlohmann::json config = peft::io::load_json(adapter / "adapter_config.json");
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["r"] == 4);
  using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;
  Model model = Model::load(kTinyModel, peft::LoraConfig::from_json(config, "saved"), 7);
  const peft::io::SafetensorsFile file =
      peft::io::SafetensorsFile::open(adapter / "adapter_model.safetensors");
  CHECK(file.contains("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"));
  peft::io::load_adapter_tensors(model.adapter().parameters(), file);

  // The log: one line per step and per evaluation; the validation loss went down.
  const std::vector<std::string> log = lines_of(dir / "out/log.jsonl");
  int steps = 0;
  std::vector<double> val;
  for (const std::string& line : log) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("loss")) ++steps;
    if (j.contains("val_loss")) val.push_back(j["val_loss"].get<double>());
  }
  CHECK(steps == 30);
  REQUIRE(val.size() == 4);  // steps 0, 10, 20, 30
  CHECK(val.back() < val.front());
  CHECK(peft::io::load_json(dir / "out/run.json")["steps"] == 30);
}

TEST_CASE("peft train: a model with GPT-2's vocabulary and the GPT-2 tokenizer; JSONL pairs") {
  const fs::path gpt2 = PEFT_GPT2_TOKENIZER_DIR;
  if (!fs::exists(gpt2 / "vocab.json")) return;
  const fs::path dir = scratch("gpt2_vocab");
  peft::ModelConfig c = test_support::tiny_gpt2();
  c.vocab_size = 50257;
  c.num_layers = 1;
  c.max_positions = 64;
  {
    peft::Decoder<peft::arch::Gpt2, peft::NoPeft, float> base(c, {}, 3);
    peft::io::save_model(base, dir / "model");
  }
  nlohmann::json lora = {{"peft_type", "LORA"},
                         {"r", 2},
                         {"lora_alpha", 4},
                         {"target_modules", {"c_attn"}},
                         {"fan_in_fan_out", true}};
  write(dir / "lora.json", lora.dump());
  std::string jsonl;
  for (int i = 0; i < 24; ++i)
    jsonl += nlohmann::json{{"prompt", "Q: what is " + std::to_string(i) + " plus one?"},
                            {"completion", " A: " + std::to_string(i + 1) + "."}}
                 .dump() +
             "\n";
  write(dir / "pairs.jsonl", jsonl);
  write(dir / "text.txt", text_corpus());
  const Run r = train({(dir / "model").string(),
                       "--adapter-config",
                       (dir / "lora.json").string(),
                       "--data",
                       (dir / "text.txt").string(),
                       (dir / "pairs.jsonl").string(),
                       "--tokenizer",
                       gpt2.string(),
                       "--out",
                       (dir / "out").string(),
                       "--seq-len",
                       "24",
                       "--batch",
                       "4",
                       "--epochs",
                       "2",
                       "--lr",
                       "5e-3",
                       "--threads",
                       "1",
                       "--no-progress",
                       "--lora-plus-ratio",
                       "16"});
  INFO(r.out << r.err);
  REQUIRE(r.status == 0);
  CHECK(fs::exists(dir / "out/adapter/adapter_model.safetensors"));
  CHECK(r.out.find("validation sequences of 24 tokens") != std::string::npos);

  // The tokenized pairs: loss on the completion's tokens only, padding masked.
  const peft::data::BpeTokenizer tok = peft::data::BpeTokenizer::load(gpt2);
  const peft::data::TokenDataReader reader(&tok, c.vocab_size);
  const std::vector<peft::data::Document> docs = reader.read(dir / "pairs.jsonl");
  REQUIRE(docs.size() == 24);
  const peft::data::SequenceSet set = peft::data::SequenceSet::build(docs, 24, 50256, 0.0);
  CHECK(set.size() == 24);
  const peft::Batch b = set.train_batch({0});
  const std::vector<std::int32_t> prompt = tok.encode("Q: what is 0 plus one?", false);
  const std::vector<std::int32_t> completion = tok.encode(" A: 1.", false);
  REQUIRE(b.labels.size() == 24);
  for (std::size_t t = 0; t < 24; ++t) {
    const bool in_prompt = t < prompt.size();
    const bool in_completion = !in_prompt && t < prompt.size() + completion.size();
    CHECK(b.attention_mask[t] == (in_prompt || in_completion ? 1 : 0));
    CHECK(b.labels[t] == (in_completion ? completion[t - prompt.size()] : -100));
  }
}

TEST_CASE("training data: packing, token files, epochs") {
  const fs::path dir = scratch("data");
  const peft::data::TokenDataReader bytes(nullptr, 384);
  write(dir / "a.txt", "abcdefghij");
  write(dir / "b.txt", "0123456789");
  std::vector<peft::data::Document> docs = bytes.read(dir / "a.txt");
  const std::vector<peft::data::Document> more = bytes.read(dir / "b.txt");
  docs.insert(docs.end(), more.begin(), more.end());
  // Packed with an EOS (300) between documents: 21 tokens, chunks of 4, the remainder dropped.
  const peft::data::SequenceSet set = peft::data::SequenceSet::build(docs, 4, 300, 0.0);
  CHECK(set.size() == 5);
  CHECK(set.train_batch({2}).input_ids == std::vector<std::int64_t>{'i', 'j', 300, '0'});
  CHECK(set.train_batch({0}).labels.empty());  // every token is a label

  // llm.c's .bin (version 1, uint16) and a raw .u16 file give the same tokens.
  std::vector<std::int32_t> header(256, 0);
  header[0] = peft::data::kLlmcMagic;
  header[1] = 1;
  header[2] = 3;
  const std::uint16_t tokens[3] = {7, 300, 383};
  {
    std::ofstream bin(dir / "t.bin", std::ios::binary);
    bin.write(reinterpret_cast<const char*>(header.data()), 1024);
    bin.write(reinterpret_cast<const char*>(tokens), sizeof tokens);
    std::ofstream u16(dir / "t.u16", std::ios::binary);
    u16.write(reinterpret_cast<const char*>(tokens), sizeof tokens);
  }
  CHECK(bytes.read(dir / "t.bin")[0].ids == std::vector<std::int32_t>{7, 300, 383});
  CHECK(bytes.read(dir / "t.u16")[0].ids == std::vector<std::int32_t>{7, 300, 383});

  // Epochs: every item once per epoch, the order a function of (seed, draw) alone.
  peft::data::EpochSampler a(7, 42), b(7, 42);
  std::vector<std::int64_t> first;
  for (int d = 0; d < 7; ++d) first.push_back(a(d));
  std::vector<std::int64_t> sorted = first;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6});
  CHECK(b(9) == a(9));  // b jumps straight to epoch 1
  CHECK(b(3) == first[3]);
}

TEST_CASE("peft train: bad data is an error naming the file and line, before training") {
  if (!fs::exists(kTinyModel / "config.json")) return;
  const fs::path dir = scratch("bad");
  const auto run = [&](const std::string& file, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {kTinyModel.string(),
                                     "--adapter-config",
                                     kLoraConfig.string(),
                                     "--data",
                                     (dir / file).string(),
                                     "--out",
                                     (dir / ("out_" + file)).string(),
                                     "--no-progress",
                                     "--seq-len",
                                     "16"};
    args.insert(args.end(), extra.begin(), extra.end());
    const Run r = train(args);
    CHECK(!fs::exists(dir / ("out_" + file) / "checkpoint"));  // nothing trained
    return r;
  };
  write(dir / "empty.txt", "");
  write(dir / "broken.jsonl", "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{not json}\n");
  write(dir / "nofield.jsonl", "{\"text\": \"fine\"}\n{\"body\": \"x\"}\n");
  const std::uint16_t beyond[2] = {5, 60000};
  std::ofstream(dir / "beyond.u16", std::ios::binary)
      .write(reinterpret_cast<const char*>(beyond), sizeof beyond);
  write(dir / "short.txt", "tiny");
  write(dir / "ok.txt", text_corpus());

  Run r = run("missing.txt");
  CHECK(r.status == 1);
  CHECK(r.err.find("missing.txt") != std::string::npos);
  r = run("empty.txt");
  CHECK(r.err.find("empty.txt: data file is empty") != std::string::npos);
  r = run("broken.jsonl");
  CHECK(r.err.find("broken.jsonl:3") != std::string::npos);
  r = run("nofield.jsonl");
  CHECK(r.err.find("nofield.jsonl:2: expected a field \"text\"") != std::string::npos);
  r = run("beyond.u16");
  CHECK(r.err.find("beyond.u16: token 1: id 60000 is beyond the model's vocabulary of 384") !=
        std::string::npos);
  r = run("short.txt");
  CHECK(r.err.find("no sequence of --seq-len 16 tokens") != std::string::npos);
  r = run("ok.txt", {"--seq-len", "65"});
  CHECK(r.status == 2);
  CHECK(r.err.find("--seq-len: expected at most the model's 64 positions") != std::string::npos);
  r = run("ok.txt", {"--steps", "3", "--epochs", "2"});
  CHECK(r.status == 2);
  r = run("ok.txt", {"--device", "cuda"});
  CHECK(r.status == 2);
  CHECK(r.err.find("--device: this build trains on the CPU") != std::string::npos);
  r = run("ok.txt", {"--resume"});
  CHECK(r.status == 1);
  CHECK(r.err.find("--resume: no checkpoint to continue") != std::string::npos);
}

}  // namespace test_train_command
