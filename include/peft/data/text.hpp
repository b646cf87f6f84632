#pragma once
// Byte-level language modelling on any file: each byte is a token (vocabulary 256), so no
// tokenizer is needed and any text, in any language or encoding, works. The last
// `eval_fraction` of the file is held out (a tail, not a random sample, so the eval text is never
// seen inside a training window).
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/nn/decoder.hpp"

namespace peft::data {

inline constexpr std::int64_t kByteVocabSize = 256;

/// Text files larger than this are refused before they are read: the study's corpora are a few
/// megabytes, and a ByteCorpus holds its text once more (split into head and tail).
inline constexpr std::uint64_t kMaxTextFileBytes = 1ull << 30;

/// The bytes of `path`, whole. Throws FileError when it is missing, not a regular file (a FIFO
/// would block, /dev/zero never ends: io::read_regular_file refuses both before reading), over
/// kMaxTextFileBytes, or empty.
inline std::vector<std::uint8_t> read_bytes(const std::filesystem::path& path) {
  std::vector<std::uint8_t> bytes = io::read_regular_file(path, kMaxTextFileBytes, "text file");
  if (bytes.empty()) throw FileError(io::printable(path.string()) + ": file is empty");
  return bytes;
}

/// A text split into a training head and a held-out tail, served as fixed-length windows.
class ByteCorpus {
 public:
  ByteCorpus(std::vector<std::uint8_t> bytes, std::int64_t seq_len, double eval_fraction = 0.1,
             std::string name = "text")
      : seq_len_(seq_len), name_(std::move(name)) {
    if (seq_len < 2) throw ConfigError("byte corpus: sequence length must be at least 2");
    if (!(eval_fraction > 0 && eval_fraction < 1))
      throw ConfigError("byte corpus: eval fraction must be in (0, 1)");
    const auto n = static_cast<std::int64_t>(bytes.size());
    const std::int64_t eval_size =
        std::max<std::int64_t>(seq_len, static_cast<std::int64_t>(double(n) * eval_fraction));
    if (n - eval_size < seq_len)
      throw ConfigError(name_ + ": " + std::to_string(n) + " bytes is too short for windows of " +
                        std::to_string(seq_len) + " bytes with a held-out tail (need at least " +
                        std::to_string(2 * seq_len) + ")");
    train_.assign(bytes.begin(), bytes.end() - eval_size);
    eval_.assign(bytes.end() - eval_size, bytes.end());
  }

  static ByteCorpus from_file(const std::filesystem::path& path, std::int64_t seq_len,
                              double eval_fraction = 0.1) {
    return ByteCorpus(read_bytes(path), seq_len, eval_fraction, path.string());
  }

  std::int64_t seq_len() const { return seq_len_; }
  std::size_t train_bytes() const { return train_.size(); }
  std::size_t eval_bytes() const { return eval_.size(); }
  const std::string& name() const { return name_; }

  /// Random windows of the training head, drawn with `rng`.
  Batch train_batch(std::mt19937_64& rng, std::int64_t batch_size) const {
    const std::uint64_t starts = train_.size() - static_cast<std::size_t>(seq_len_) + 1;
    std::vector<std::size_t> offsets;
    for (std::int64_t b = 0; b < batch_size; ++b)
      offsets.push_back(static_cast<std::size_t>(rng() % starts));
    return windows(train_, offsets);
  }

  /// Consecutive windows of the held-out tail (at most `max_windows`), in batches. Each window
  /// overlaps the previous by one byte so every tail byte after the first is predicted once.
  std::vector<Batch> eval_batches(std::int64_t max_windows, std::int64_t batch_size) const {
    std::vector<std::size_t> offsets;
    const auto step = static_cast<std::size_t>(seq_len_ - 1);
    for (std::size_t at = 0; at + static_cast<std::size_t>(seq_len_) <= eval_.size() &&
                             static_cast<std::int64_t>(offsets.size()) < max_windows;
         at += step)
      offsets.push_back(at);
    std::vector<Batch> out;
    for (std::size_t i = 0; i < offsets.size(); i += static_cast<std::size_t>(batch_size)) {
      const std::size_t end = std::min(offsets.size(), i + static_cast<std::size_t>(batch_size));
      out.push_back(windows(
          eval_, std::vector<std::size_t>(offsets.begin() + static_cast<std::ptrdiff_t>(i),
                                          offsets.begin() + static_cast<std::ptrdiff_t>(end))));
    }
    return out;
  }

 private:
  Batch windows(const std::vector<std::uint8_t>& source,
                const std::vector<std::size_t>& offsets) const {
    Batch batch;
    batch.batch = static_cast<std::int64_t>(offsets.size());
    batch.seq = seq_len_;
    for (std::size_t at : offsets)
      for (std::int64_t t = 0; t < seq_len_; ++t)
        batch.input_ids.push_back(source[at + static_cast<std::size_t>(t)]);
    return batch;  // no mask, no labels: every next byte is predicted
  }

  std::int64_t seq_len_;
  std::string name_;
  std::vector<std::uint8_t> train_, eval_;
};

/// Bytes → text for printing generations (non-printable bytes as '.').
inline std::string printable_bytes(const std::vector<std::int64_t>& tokens) {
  std::string s;
  for (std::int64_t t : tokens) {
    const auto c = static_cast<unsigned char>(t);
    s += (c == '\n' || c == '\t' || (c >= 32 && c < 127)) ? static_cast<char>(c) : '.';
  }
  return s;
}

}  // namespace peft::data
