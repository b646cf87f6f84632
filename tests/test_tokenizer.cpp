// Byte-level BPE (include/peft/data/tokenizer.hpp) against the reference `tokenizers` package:
// tests/data/tokenizer/cases.json holds, for six tokenizer variants built on GPT-2's vocabulary
// (scripts/gen_tokenizer_cases.py), the reference's ids and decoded text for 430 texts that
// cover contractions in both cases, whitespace runs of every kind, digits, punctuation,
// non-Latin scripts, emoji, added tokens and 400 random mixtures (one code point in five drawn
// from all of planes 0-2). Then the files as hostile input: each defect is a FileError naming
// the file and the field or line.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "peft/data/tokenizer.hpp"
#include "peft/io/json.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_tokenizer {

#ifndef PEFT_TEST_DATA_DIR
#define PEFT_TEST_DATA_DIR "tests/data"
#endif
#ifndef PEFT_GPT2_TOKENIZER_DIR
#define PEFT_GPT2_TOKENIZER_DIR "../shared/data/gpt2"
#endif

namespace {

namespace fs = std::filesystem;
using peft::data::BpeTokenizer;

const fs::path kCases = fs::path(PEFT_TEST_DATA_DIR) / "tokenizer";
const fs::path kGpt2 = PEFT_GPT2_TOKENIZER_DIR;

fs::path scratch(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("peft_test_tokenizer_" + std::to_string(::getpid())) / name;
  fs::create_directories(dir);
  return dir;
}

void write(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A variant's tokenizer.json: its shell with GPT-2's vocabulary and merges put back, merges as
/// [left, right] pairs (tokenizers >= 0.20) or, with `string_merges`, as "left right".
fs::path assemble(const std::string& variant, bool string_merges = false) {
  nlohmann::json tok = nlohmann::json::parse(read(kCases / (variant + ".shell.json")));
  tok["model"]["vocab"] = nlohmann::json::parse(read(kGpt2 / "vocab.json"));
  nlohmann::json merges = nlohmann::json::array();
  std::istringstream lines(read(kGpt2 / "merges.txt"));
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line.starts_with("#version")) continue;
    const auto space = line.find(' ');
    if (string_merges)
      merges.push_back(line);
    else
      merges.push_back({line.substr(0, space), line.substr(space + 1)});
  }
  tok["model"]["merges"] = merges;
  const fs::path path = scratch(variant + (string_merges ? "_strings" : "")) / "tokenizer.json";
  write(path, tok.dump());
  return path;
}

bool have_gpt2() {
  if (fs::exists(kGpt2 / "vocab.json") && fs::exists(kGpt2 / "merges.txt")) return true;
  MESSAGE("GPT-2's vocab.json and merges.txt are not at " << kGpt2.string()
                                                          << " (set PEFT_GPT2_TOKENIZER_DIR)");
  return false;
}

void check_variant(const BpeTokenizer& tok, const nlohmann::json& texts,
                   const nlohmann::json& cases, const std::string& name) {
  const auto& ids = cases["ids"];
  const auto& decoded = cases["decoded"];
  REQUIRE(texts.size() == ids.size());
  for (std::size_t i = 0; i < texts.size(); ++i) {
    const std::string text = texts[i].get<std::string>();
    const std::vector<std::int32_t> expected = ids[i].get<std::vector<std::int32_t>>();
    const std::vector<std::int32_t> got = tok.encode(text);
    INFO(name << " text " << i << ": " << nlohmann::json(text).dump());
    CHECK(got == expected);
    CHECK(tok.decode(expected) == (decoded[i].is_null() ? text : decoded[i].get<std::string>()));
  }
}

}  // namespace

TEST_CASE("tokenizer: every variant gives the reference's ids and decoded text") {
  if (!have_gpt2()) return;
  const nlohmann::json cases = nlohmann::json::parse(read(kCases / "cases.json"));
  const auto& variants = cases["variants"];
  const auto& texts = cases["texts"];
  REQUIRE(variants.size() == 6);

  SUBCASE("gpt2_files: vocab.json + merges.txt") {
    const BpeTokenizer tok = BpeTokenizer::load(kGpt2);
    CHECK(tok.vocab_size() == 50257);
    CHECK(tok.merge_count() == 50000);
    CHECK(tok.encode("Hello world") == std::vector<std::int32_t>{15496, 995});
    check_variant(tok, texts, variants["gpt2_files"], "gpt2_files");
  }
  for (const char* name : {"gpt2", "gpt2_added", "prefix_space", "llama3", "qwen2"}) {
    SUBCASE(name) {
      const BpeTokenizer tok = BpeTokenizer::load(assemble(name));
      check_variant(tok, texts, variants[name], name);
    }
  }
  SUBCASE("merges written as \"left right\" strings read the same") {
    const BpeTokenizer tok = BpeTokenizer::load(assemble("llama3", true).parent_path());
    check_variant(tok, texts, variants["llama3"], "llama3 (string merges)");
  }
}

TEST_CASE("tokenizer: decode_bytes(encode(text)) is text, special tokens and the template") {
  if (!have_gpt2()) return;
  const BpeTokenizer gpt2 = BpeTokenizer::load(kGpt2);
  for (const std::string text : {"", "a", "  \n\t x", "Straße 😀 中文 ٣٤٥", "don't 'LL"})
    CHECK(gpt2.decode_bytes(gpt2.encode(text)) == text);

  const BpeTokenizer llama3 = BpeTokenizer::load(assemble("llama3"));
  const std::int32_t bos = llama3.token_to_id("<|begin_of_text|>").value();
  const std::vector<std::int32_t> ids = llama3.encode("Hi there");
  REQUIRE(!ids.empty());
  CHECK(ids.front() == bos);
  CHECK(llama3.encode("Hi there", false) == std::vector<std::int32_t>(ids.begin() + 1, ids.end()));
  CHECK(llama3.decode(ids) == "<|begin_of_text|>Hi there");
  CHECK(llama3.decode(ids, true) == "Hi there");
  CHECK(llama3.added_tokens().size() == 1);
  CHECK(llama3.added_tokens()[0].special);
}

TEST_CASE("tokenizer: UTF-8 in and out") {
  using peft::data::unicode::first_invalid_utf8;
  using peft::data::unicode::utf8_lossy;
  CHECK(!first_invalid_utf8("plain ascii").has_value());
  CHECK(!first_invalid_utf8("\xF0\x9F\x98\x80 \xE4\xB8\xAD").has_value());
  CHECK(first_invalid_utf8("ab\xC0\xAF").value() == 2);         // overlong
  CHECK(first_invalid_utf8("\xED\xA0\x80").value() == 0);       // a surrogate
  CHECK(first_invalid_utf8("x\xF4\x90\x80\x80").value() == 1);  // above U+10FFFF
  CHECK(first_invalid_utf8("\xE4\xB8").value() == 0);           // cut short
  // One U+FFFD per maximal ill-formed subpart, as Rust's from_utf8_lossy.
  CHECK(utf8_lossy("a\xE4\xB8z") == "a\xEF\xBF\xBDz");
  CHECK(utf8_lossy("\x80\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(utf8_lossy("\xF0\x9F\x98") == "\xEF\xBF\xBD");
  CHECK(utf8_lossy("\xED\xA0\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");

  using namespace peft::data::unicode;
  CHECK(is_letter(U'é'));
  CHECK(is_letter(U'中'));
  CHECK(!is_letter(U'٣'));
  CHECK(is_number(U'٣'));
  CHECK(is_number(U'½'));
  CHECK(is_whitespace(0x3000));
  CHECK(is_whitespace(0x85));
  CHECK(!is_whitespace(0x1C));  // Python's str.isspace says yes; White_Space says no
  CHECK(!is_whitespace(0x200B));

  if (!have_gpt2()) return;
  const BpeTokenizer tok = BpeTokenizer::load(kGpt2);
  try {
    (void)tok.encode("ok \xFF no", true, "data.txt");
    FAIL("ill-formed UTF-8 was encoded");
  } catch (const peft::ConfigError& e) {
    CHECK(std::string(e.what()) == "data.txt: not UTF-8 at byte 3 (found byte 0xff)");
  }
  CHECK_THROWS_WITH_AS((void)tok.decode(std::vector<std::int32_t>{15496, 50257}),
                       "token id 50257 (position 1) is not in the vocabulary of 50257 ids",
                       peft::ConfigError);
  CHECK_THROWS_AS((void)tok.decode(std::vector<std::int32_t>{-1}), peft::ConfigError);
}

TEST_CASE("tokenizer: hostile files are FileErrors naming the file and the field or line") {
  const fs::path dir = scratch("hostile");
  const auto two_files = [&](const std::string& vocab, const std::string& merges) {
    write(dir / "vocab.json", vocab);
    write(dir / "merges.txt", merges);
    return BpeTokenizer::load(dir);
  };
  const std::string vocab = R"({"a": 0, "b": 1, "ab": 2, "Ġ": 3})";
  CHECK(two_files(vocab, "#version: 0.2\na b\n").encode("abab") == std::vector<std::int32_t>{2, 2});
  const auto message = [&](auto&& body) {
    try {
      body();
    } catch (const peft::FileError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string v = (dir / "vocab.json").string(), m = (dir / "merges.txt").string();
  CHECK(message([&] { two_files(R"(["a"])", ""); }) ==
        v + ": field 'vocab': expected an object of token -> id, found array");
  CHECK(message([&] {
          two_files(R"({"a": -1})", "");
        }).find("vocab[\"a\"]': expected a token id in [0, 16777216)") != std::string::npos);
  CHECK(message([&] { two_files(R"({"a": 0, "b": 0})", ""); }) ==
        v + ": field 'vocab[\"b\"]': expected an id no other token has, found 0, the id of \"a\"");
  CHECK(message([&] { two_files(R"({"a": 1.5})", ""); }).find("expected a token id (an integer)") !=
        std::string::npos);
  CHECK(message([&] { two_files(vocab, "a b\n\nb a\n"); }) ==
        m + ": line 2: expected two tokens separated by one space, found \"\"");
  CHECK(message([&] { two_files(vocab, "a c\n"); }) ==
        m + ": line 1: token \"c\" is not in the vocabulary");
  CHECK(message([&] { two_files(vocab, "b a\n"); }) ==
        m + ": line 1: token \"ba\" is not in the vocabulary");
  CHECK(message([&] { two_files(vocab, "a b c\n"); }).find("line 1: expected two tokens") !=
        std::string::npos);
  CHECK(message([&] { two_files("{", ""); }).find(v) == 0);

  const auto json_file = [&](const nlohmann::json& j) {
    write(dir / "tokenizer.json", j.dump());
    return message([&] { (void)BpeTokenizer::load(dir / "tokenizer.json"); });
  };
  const std::string t = (dir / "tokenizer.json").string();
  const nlohmann::json good = {
      {"model", {{"type", "BPE"}, {"vocab", nlohmann::json::parse(vocab)}, {"merges", {"a b"}}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}}};
  CHECK(json_file(good) == "no error");
  auto bad = good;
  bad["model"]["type"] = "WordPiece";
  CHECK(json_file(bad) == t + ": field 'model.type': expected \"BPE\", found \"WordPiece\"");
  bad = good;
  bad["model"]["dropout"] = 0.1;
  CHECK(json_file(bad).find("field 'model.dropout'") != std::string::npos);
  bad = good;
  bad["normalizer"] = {{"type", "NFC"}};
  CHECK(json_file(bad).find("field 'normalizer': expected null") != std::string::npos);
  bad = good;
  bad["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", "\\w+"}}}}, {{"type", "ByteLevel"}}}}};
  CHECK(json_file(bad).find("field 'pre_tokenizer.pretokenizers[0].pattern.Regex': expected the "
                            "GPT-2, LLaMA-3 or Qwen2 pattern") != std::string::npos);
  bad = good;
  bad["pre_tokenizer"] = {{"type", "Whitespace"}};
  CHECK(json_file(bad).find("field 'pre_tokenizer.type'") != std::string::npos);
  bad = good;
  bad["pre_tokenizer"] = {{"type", "Sequence"},
                          {"pretokenizers", {{{"type", "ByteLevel"}}, {{"type", "ByteLevel"}}}}};
  CHECK(json_file(bad).find("expected nothing after ByteLevel") != std::string::npos);
  bad = good;
  bad["decoder"] = {{"type", "WordPiece"}};
  CHECK(json_file(bad) ==
        t + ": field 'decoder.type': expected \"ByteLevel\", found \"WordPiece\"");
  bad = good;
  bad["model"]["merges"] = nlohmann::json::array({nlohmann::json::array({"a", "q"})});
  CHECK(json_file(bad) == t + ": field 'model.merges[0]': token \"q\" is not in the vocabulary");
  bad = good;
  bad["model"]["merges"] = {42};
  CHECK(json_file(bad).find("field 'model.merges[0]': expected \"LEFT RIGHT\"") !=
        std::string::npos);
  bad = good;
  bad["added_tokens"] = {{{"id", 99999999}, {"content", "<x>"}}};
  CHECK(json_file(bad).find("added_tokens[0].id': expected a token id") != std::string::npos);
  bad = good;
  bad["added_tokens"] = {{{"id", 7}, {"content", ""}}};
  CHECK(json_file(bad).find("added_tokens[0].content': expected a non-empty string") !=
        std::string::npos);
  bad = good;
  bad["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
      {"special_tokens", nlohmann::json::object()}};
  CHECK(
      json_file(bad).find("field 'post_processor.special_tokens': expected an entry for \"<s>\"") !=
      std::string::npos);
  bad = good;
  bad["post_processor"] = {{"type", "RobertaProcessing"}};
  CHECK(json_file(bad).find("field 'post_processor.type'") != std::string::npos);
  CHECK(message([&] { (void)BpeTokenizer::load(dir / "missing.json"); }).find("missing.json") !=
        std::string::npos);
  const fs::path empty_dir = scratch("empty");
  CHECK(message([&] { (void)BpeTokenizer::load(empty_dir); }).find("no tokenizer here") !=
        std::string::npos);
}

TEST_CASE("tokenizer: added tokens split first, with single_word, lstrip and rstrip") {
  const fs::path dir = scratch("added");
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    peft::data::unicode::append_utf8(ch,
                                     peft::data::byte_to_code_point()[static_cast<std::size_t>(b)]);
    vocab[ch] = b;
  }
  const nlohmann::json j = {
      {"added_tokens",
       {{{"id", 300},
         {"content", "<m>"},
         {"lstrip", true},
         {"rstrip", true},
         {"normalized", false}},
        {{"id", 301}, {"content", "ab"}, {"single_word", true}, {"normalized", false}},
        {{"id", 302}, {"content", "<m>x"}, {"normalized", true}, {"special", true}}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}}};
  write(dir / "tokenizer.json", j.dump());
  const BpeTokenizer tok = BpeTokenizer::load(dir);
  CHECK(tok.vocab_size() == 303);
  // "<m>" strips the spaces around it; "ab" only as a word of its own; the raw pass runs first,
  // so "<m>x" (normalized) never sees the "<m>" that the raw pass took.
  CHECK(tok.encode("q  <m>  r") == std::vector<std::int32_t>{'q', 300, 'r'});
  CHECK(tok.encode("ab xab ab_") ==
        std::vector<std::int32_t>{301, ' ', 'x', 'a', 'b', ' ', 'a', 'b', '_'});
  CHECK(tok.encode("<m>x") == std::vector<std::int32_t>{300, 'x'});
  CHECK(tok.decode(std::vector<std::int32_t>{302, 'y'}, true) == "y");
  CHECK(tok.decode(std::vector<std::int32_t>{302, 'y'}) == "<m>xy");
}

}  // namespace test_tokenizer
