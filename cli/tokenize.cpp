// `peft tokenize TOKENIZER TEXT_FILE`: the ids of a text file as one JSON array, with a byte-level
// BPE tokenizer (include/peft/data/tokenizer.hpp); `--decode` reads such an array and prints the
// text. TOKENIZER is a folder holding tokenizer.json or vocab.json + merges.txt, or the
// tokenizer.json itself. docs/cli.md, "peft tokenize".
#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <peft/data/tokenizer.hpp>
#include <peft/io/atomic_file.hpp>
#include <peft/io/json.hpp>
#include <peft/io/parse_text.hpp>
#include <peft/io/printable.hpp>
#include <string>
#include <vector>

#include "commands.hpp"

namespace peft::cli {

namespace {

constexpr const char* kUsage =
    "usage: peft tokenize TOKENIZER TEXT_FILE [--no-special-tokens]\n"
    "       peft tokenize TOKENIZER IDS_FILE --decode [--skip-special-tokens]\n";

/// Text files up to this size are tokenized in one piece (the ids take about as many bytes).
constexpr std::uint64_t kMaxTokenizeInputBytes = 1ull << 30;

}  // namespace

int run_tokenize(const std::vector<std::string>& args, std::ostream& out, std::ostream& /*err*/) {
  std::vector<std::string> positional;
  bool decode = false, special = true, skip_special = false;
  for (const std::string& arg : args) {
    if (arg == "--decode") {
      decode = true;
    } else if (arg == "--no-special-tokens") {
      special = false;
    } else if (arg == "--skip-special-tokens") {
      skip_special = true;
    } else if (arg == "--help" || arg == "-h") {
      out << kUsage;
      return 0;
    } else if (arg.starts_with("--")) {
      throw io::ArgumentError("unknown flag " + io::printable(arg) + "\n" + kUsage);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2)
    throw io::ArgumentError("expected TOKENIZER and one input file, found " +
                            std::to_string(positional.size()) + " arguments\n" + kUsage);
  if (decode && !special)
    throw io::ArgumentError("--no-special-tokens is for encoding\n" + std::string(kUsage));
  if (!decode && skip_special)
    throw io::ArgumentError("--skip-special-tokens is for --decode\n" + std::string(kUsage));

  const data::BpeTokenizer tokenizer = data::BpeTokenizer::load(positional[0]);
  const std::string& input = positional[1];
  const std::vector<std::uint8_t> bytes =
      io::read_regular_file(input, kMaxTokenizeInputBytes, "input file");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  if (!decode) {
    const std::vector<std::int32_t> ids = tokenizer.encode(text, special, input);
    std::string line = "[";
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (i) line += ", ";
      line += std::to_string(ids[i]);
    }
    out << line << "]\n";
    return 0;
  }
  const nlohmann::json list = io::detail::parse_json_strict(text, input);
  if (!list.is_array())
    throw FileError(io::printable(input) + ": expected a JSON array of token ids, found " +
                    io::describe_json(list));
  std::vector<std::int32_t> ids;
  ids.reserve(list.size());
  for (std::size_t i = 0; i < list.size(); ++i) {
    const nlohmann::json& id = list[i];
    if (!id.is_number_integer() ||
        (id.is_number_unsigned()
             ? id.get<std::uint64_t>() >= std::uint64_t(tokenizer.vocab_size())
             : (id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= tokenizer.vocab_size())))
      throw FileError(io::printable(input) + ": element " + std::to_string(i) +
                      ": expected a token id in [0, " + std::to_string(tokenizer.vocab_size()) +
                      "), found " + io::describe_json(id));
    ids.push_back(static_cast<std::int32_t>(id.get<std::int64_t>()));
  }
  out << tokenizer.decode(ids, skip_special);
  return 0;
}

}  // namespace peft::cli
