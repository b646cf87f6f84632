// libFuzzer harness: the tokenizer files (include/peft/data/tokenizer.hpp). The input is either
// a tokenizer.json, or (first byte 'M') "M" vocab.json NUL merges.txt; an optional NUL then
// starts a text that the accepted tokenizer encodes. Whatever is accepted must encode and decode
// without failing outside the library's errors, give ids inside its vocabulary, and, for a
// tokenizer that maps every byte and adds nothing (no added tokens, no template, no prefix
// space), give back the text's bytes from decode_bytes(encode(text)). Expected outcomes and
// findings: fuzz/harness.hpp.
#include <cstdint>
#include <string>
#include <string_view>

#include "harness.hpp"
#include "json_mutator.hpp"
#include "peft/data/tokenizer.hpp"

namespace {

void check(bool ok, const char* what) {
  if (!ok) peft::fuzz::finding("tokenizer", "check", what);
}

void run(const std::uint8_t* data, std::size_t size) {
  std::string_view input = peft::fuzz::as_text(data, size);
  const bool two_files = !input.empty() && input[0] == 'M';
  if (two_files) input.remove_prefix(1);
  std::string_view vocab_or_json = input, merges, text = "Hello world, it's 2026!\n  \t x's";
  const std::size_t nul = input.find('\0');
  if (nul != std::string_view::npos) {
    vocab_or_json = input.substr(0, nul);
    std::string_view rest = input.substr(nul + 1);
    if (two_files) {
      const std::size_t second = rest.find('\0');
      merges = rest.substr(0, second);
      if (second != std::string_view::npos) text = rest.substr(second + 1);
    } else {
      text = rest;
    }
  }
  const peft::data::BpeTokenizer tok =
      two_files
          ? peft::data::BpeTokenizer::from_vocab_and_merges_text(vocab_or_json, merges,
                                                                 "vocab.json", "merges.txt")
          : peft::data::BpeTokenizer::from_tokenizer_json_text(vocab_or_json, "tokenizer.json");
  const std::vector<std::int32_t> ids = tok.encode(text, true, "text");
  for (const std::int32_t id : ids) check(id >= 0 && id < tok.vocab_size(), "id out of range");
  (void)tok.decode(ids);
  (void)tok.decode(ids, true);
  if (two_files) {
    // Every byte maps to a token of its own when the vocabulary has the 256 byte characters.
    bool all_bytes = true;
    for (int b = 0; b < 256 && all_bytes; ++b) {
      std::string ch;
      peft::data::unicode::append_utf8(ch, peft::data::byte_to_code_point()[std::size_t(b)]);
      all_bytes = tok.token_to_id(ch).has_value();
    }
    if (all_bytes)
      check(tok.decode_bytes(tok.encode(text, false)) == text, "decode_bytes(encode(t)) != t");
  }
}

// Keys and values of tokenizer.json worth trying (json_mutator.hpp).
constexpr std::string_view kStrings[] = {"model",
                                         "type",
                                         "BPE",
                                         "vocab",
                                         "merges",
                                         "dropout",
                                         "unk_token",
                                         "fuse_unk",
                                         "byte_fallback",
                                         "ignore_merges",
                                         "continuing_subword_prefix",
                                         "end_of_word_suffix",
                                         "added_tokens",
                                         "id",
                                         "content",
                                         "single_word",
                                         "lstrip",
                                         "rstrip",
                                         "normalized",
                                         "special",
                                         "normalizer",
                                         "pre_tokenizer",
                                         "Sequence",
                                         "pretokenizers",
                                         "ByteLevel",
                                         "add_prefix_space",
                                         "use_regex",
                                         "Split",
                                         "pattern",
                                         "Regex",
                                         "behavior",
                                         "Isolated",
                                         "invert",
                                         "decoder",
                                         "post_processor",
                                         "TemplateProcessing",
                                         "single",
                                         "SpecialToken",
                                         "special_tokens",
                                         "ids",
                                         "processors",
                                         "<|endoftext|>",
                                         "\u0120",
                                         "\u0120t",
                                         "'s",
                                         "\u010a",
                                         peft::data::SplitPattern::kGpt2,
                                         peft::data::SplitPattern::kLlama3,
                                         peft::data::SplitPattern::kQwen2};

}  // namespace

extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size,
                                               std::size_t max_size, unsigned seed) {
  return peft::fuzz::mutate_json(data, size, max_size, seed, kStrings);
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  peft::fuzz::expect_peft_errors_only([&] { run(data, size); });
  return 0;
}
