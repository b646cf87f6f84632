#pragma once
// Training data from users' files, as `peft train` reads it (docs/train.md): plain text, JSONL
// ({"text": ...} or {"prompt": ..., "completion": ...}), llm.c's token files (.bin with its
// 256-word header) and raw uint16 token files, turned into fixed-length sequences and served in
// shuffled epochs.
//
//   TokenDataReader reader{tokenizer_or_null, vocab_size};
//   std::vector<Document> examples = reader.read("train.jsonl");     // validated, file:line errors
//   SequenceSet sequences = SequenceSet::build(examples, 256, eos);  // packed / padded
//   EpochSampler sampler(sequences.train_count(), seed);              // batch i: a pure function
//
// Every file is checked whole before training starts: a missing or empty file, a line that is
// not JSON or lacks its field, a token id beyond the vocabulary, an example longer than the
// sequence length: each a FileError naming the file and the line (or the token's index).
//
// Plain text (and JSONL "text") is packed as the reference's group_texts does: the documents'
// tokens are concatenated (an EOS between documents when the tokenizer has one) and cut into
// chunks of exactly seq_len tokens, the remainder dropped; every token of a chunk is a label.
// A prompt/completion pair is one sequence of its own, padded to seq_len (attention mask 0,
// label -100) with the loss on the completion's tokens only.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/data/tokenizer.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/printable.hpp"
#include "peft/nn/decoder.hpp"

namespace peft::data {

/// One training document (a text file, a JSONL line, a token file): its tokens, and how many
/// leading tokens carry no loss (a prompt).
struct Document {
  std::vector<std::int32_t> ids;
  std::int64_t prompt_tokens = 0;  ///< leading tokens without a loss (a pair's prompt)
  bool pair = false;               ///< a prompt/completion pair: a sequence of its own
  bool packable() const { return !pair; }
};

enum class DataFormat { automatic, text, jsonl, llmc_bin, raw_u16 };

inline DataFormat parse_data_format(std::string_view name, std::string_view what) {
  if (name == "auto") return DataFormat::automatic;
  if (name == "text") return DataFormat::text;
  if (name == "jsonl") return DataFormat::jsonl;
  if (name == "bin") return DataFormat::llmc_bin;
  if (name == "u16") return DataFormat::raw_u16;
  throw ConfigError(std::string(what) + ": expected auto, text, jsonl, bin or u16, found '" +
                    io::printable(name) + "'");
}

/// The format a file's name says: .jsonl, .bin (llm.c), .u16 (raw uint16), anything else text.
inline DataFormat format_of(const std::filesystem::path& path) {
  const std::string ext = path.extension().string();
  if (ext == ".jsonl") return DataFormat::jsonl;
  if (ext == ".bin") return DataFormat::llmc_bin;
  if (ext == ".u16") return DataFormat::raw_u16;
  return DataFormat::text;
}

/// llm.c's token files: 256 int32 of header (magic 20240520, version 1: uint16 tokens, version
/// 2: uint32 tokens, then the token count), then the tokens.
inline constexpr std::int32_t kLlmcMagic = 20240520;
/// A data file larger than this is refused before it is read.
inline constexpr std::uint64_t kMaxDataFileBytes = 4ull << 30;

class TokenDataReader {
 public:
  /// `tokenizer`: null reads text as bytes (ids 0-255, the byte-level models' vocabulary).
  TokenDataReader(const BpeTokenizer* tokenizer, std::int64_t vocab_size,
                  DataFormat format = DataFormat::automatic)
      : tokenizer_(tokenizer), vocab_size_(vocab_size), format_(format) {
    if (!tokenizer_ && vocab_size_ < 256)
      throw ConfigError(
          "training data: text as bytes needs a vocabulary of at least 256, the "
          "model has " +
          std::to_string(vocab_size_) + " (give --tokenizer)");
    if (tokenizer_ && tokenizer_->vocab_size() > vocab_size_)
      throw ConfigError("training data: the tokenizer has " +
                        std::to_string(tokenizer_->vocab_size()) + " ids, the model's vocabulary " +
                        std::to_string(vocab_size_) + ": they do not belong together");
  }

  std::vector<Document> read(const std::filesystem::path& path) const {
    const std::string name = io::printable(path.string());
    const DataFormat format = format_ == DataFormat::automatic ? format_of(path) : format_;
    const std::vector<std::uint8_t> bytes =
        io::read_regular_file(path, kMaxDataFileBytes, "data file");
    if (bytes.empty()) throw FileError(name + ": data file is empty");
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    std::vector<Document> out;
    switch (format) {
      case DataFormat::jsonl:
        out = read_jsonl(text, name);
        break;
      case DataFormat::llmc_bin:
        out.push_back(read_llmc(bytes, name));
        break;
      case DataFormat::raw_u16:
        out.push_back(read_u16(bytes, 0, bytes.size(), name));
        break;
      default:
        out.push_back({encode(text, name), 0, false});
    }
    return out;
  }

 private:
  std::vector<std::int32_t> encode(std::string_view text, const std::string& where) const {
    if (tokenizer_) return tokenizer_->encode(text, false, where);
    return std::vector<std::int32_t>(
        reinterpret_cast<const unsigned char*>(text.data()),
        reinterpret_cast<const unsigned char*>(text.data()) + text.size());
  }

  std::vector<Document> read_jsonl(std::string_view text, const std::string& name) const {
    std::vector<Document> out;
    for_each_line(text, [&](std::string_view line, std::size_t line_no) {
      if (line.find_first_not_of(" \t") == std::string_view::npos) return;  // blank lines
      const std::string where = name + ":" + std::to_string(line_no);
      nlohmann::json j;
      try {
        j = io::detail::parse_json_strict(line, where);
      } catch (const FileError& e) {
        // parse_json_strict says "invalid JSON at byte offset N: <parser detail>": the column
        // is what a person needs.
        const std::string message = e.what();
        const std::size_t at_offset = message.find("byte offset ");
        std::size_t column = 0;
        for (std::size_t k = at_offset == std::string::npos ? message.size() : at_offset + 12;
             k < message.size() && message[k] >= '0' && message[k] <= '9'; ++k)
          column = column * 10 + std::size_t(message[k] - '0');
        throw FileError(where + ": not a JSON line (invalid JSON at column " +
                        std::to_string(column + 1) + ")");
      }
      if (!j.is_object())
        throw FileError(where +
                        ": expected an object with \"text\", or \"prompt\" and "
                        "\"completion\", found " +
                        io::describe_json(j));
      if (j.contains("text")) {
        out.push_back({encode(io::json_get<std::string>(j, "text", where), where), 0, false});
      } else if (j.contains("prompt") || j.contains("completion")) {
        Document e;
        e.pair = true;
        e.ids = encode(io::json_get<std::string>(j, "prompt", where), where + " (prompt)");
        e.prompt_tokens = static_cast<std::int64_t>(e.ids.size());
        const std::vector<std::int32_t> completion =
            encode(io::json_get<std::string>(j, "completion", where), where + " (completion)");
        if (completion.empty())
          throw FileError(where + ": field 'completion' is empty: no token to learn");
        e.ids.insert(e.ids.end(), completion.begin(), completion.end());
        out.push_back(std::move(e));
      } else {
        throw FileError(where + ": expected a field \"text\", or \"prompt\" and \"completion\"");
      }
    });
    if (out.empty()) throw FileError(name + ": no example (only blank lines)");
    return out;
  }

  Document read_u16(const std::vector<std::uint8_t>& bytes, std::size_t from, std::size_t to,
                    const std::string& name) const {
    if ((to - from) % 2 != 0)
      throw FileError(name + ": " + std::to_string(to - from) +
                      " bytes of uint16 tokens is an odd number");
    Document e;
    e.ids.resize((to - from) / 2);
    for (std::size_t i = 0; i < e.ids.size(); ++i) {
      const std::int32_t id = bytes[from + 2 * i] | bytes[from + 2 * i + 1] << 8;  // little-endian
      check_id(id, i, name);
      e.ids[i] = id;
    }
    if (e.ids.empty()) throw FileError(name + ": no token");
    return e;
  }

  Document read_llmc(const std::vector<std::uint8_t>& bytes, const std::string& name) const {
    constexpr std::size_t kHeader = 256 * 4;
    if (bytes.size() < kHeader)
      throw FileError(name + ": " + std::to_string(bytes.size()) +
                      " bytes: too short for llm.c's 1024-byte header");
    std::int32_t header[3];
    std::memcpy(header, bytes.data(), sizeof header);
    if (header[0] != kLlmcMagic)
      throw FileError(name + ": header word 0: expected llm.c's magic 20240520, found " +
                      std::to_string(header[0]) +
                      " (a raw uint16 file: name it .u16 or give "
                      "--data-format u16)");
    if (header[1] != 1 && header[1] != 2)
      throw FileError(name +
                      ": header word 1 (version): expected 1 (uint16) or 2 (uint32), found " +
                      std::to_string(header[1]));
    const std::size_t width = header[1] == 1 ? 2 : 4;
    if (header[2] < 0 || std::uint64_t(header[2]) * width != bytes.size() - kHeader)
      throw FileError(name + ": header word 2: " + std::to_string(header[2]) + " tokens of " +
                      std::to_string(width) + " bytes, but the file holds " +
                      std::to_string(bytes.size() - kHeader) + " bytes after the header");
    if (width == 2) return read_u16(bytes, kHeader, bytes.size(), name);
    Document e;
    e.ids.resize(static_cast<std::size_t>(header[2]));
    for (std::size_t i = 0; i < e.ids.size(); ++i) {
      std::uint32_t id;
      std::memcpy(&id, bytes.data() + kHeader + 4 * i, 4);
      check_id(static_cast<std::int64_t>(id), i, name);
      e.ids[i] = static_cast<std::int32_t>(id);
    }
    if (e.ids.empty()) throw FileError(name + ": no token");
    return e;
  }

  void check_id(std::int64_t id, std::size_t index, const std::string& name) const {
    if (id >= vocab_size_)
      throw FileError(name + ": token " + std::to_string(index) + ": id " + std::to_string(id) +
                      " is beyond the model's vocabulary of " + std::to_string(vocab_size_));
  }

  const BpeTokenizer* tokenizer_;
  std::int64_t vocab_size_;
  DataFormat format_;
};

/// The training sequences: packed chunks and padded pairs, each seq_len tokens, and a held-out
/// tail of them for validation.
class SequenceSet {
 public:
  /// Packs or pads `examples` into sequences of `seq_len`; `eos` (or -1) goes between packed
  /// documents; the last `val_fraction` of the sequences (at least one when the fraction is
  /// positive) is held out. Throws ConfigError when no training sequence is left.
  static SequenceSet build(const std::vector<Document>& examples, std::int64_t seq_len,
                           std::int32_t eos, double val_fraction) {
    if (seq_len < 2)
      throw ConfigError("--seq-len: expected at least 2, found " + std::to_string(seq_len));
    SequenceSet s;
    s.seq_len_ = seq_len;
    std::vector<std::int32_t> stream;
    bool first_document = true;
    for (const Document& e : examples) {
      if (e.packable()) {
        if (!first_document && eos >= 0) stream.push_back(eos);
        stream.insert(stream.end(), e.ids.begin(), e.ids.end());
        first_document = false;
        continue;
      }
      if (static_cast<std::int64_t>(e.ids.size()) > seq_len)
        throw ConfigError("a prompt/completion example of " + std::to_string(e.ids.size()) +
                          " tokens is longer than --seq-len " + std::to_string(seq_len) +
                          " (raise it, or shorten the example)");
      s.pairs_.push_back(e);
    }
    s.packed_chunks_ = static_cast<std::int64_t>(stream.size()) / seq_len;
    stream.resize(static_cast<std::size_t>(s.packed_chunks_ * seq_len));
    s.stream_ = std::move(stream);
    const std::int64_t n = s.size();
    if (n == 0)
      throw ConfigError("the data gives no sequence of --seq-len " + std::to_string(seq_len) +
                        " tokens (packed text needs at least that many tokens)");
    if (!(val_fraction >= 0 && val_fraction < 1))
      throw ConfigError("--val-fraction: expected a number in [0, 1), found " +
                        std::to_string(val_fraction));
    s.val_count_ =
        val_fraction > 0 ? std::max<std::int64_t>(1, std::int64_t(double(n) * val_fraction)) : 0;
    if (n - s.val_count_ < 1)
      throw ConfigError("the data gives " + std::to_string(n) + " sequence(s): none is left to " +
                        "train on after the validation split (lower --val-fraction or add data)");
    // Held out: a deterministic spread (every k-th sequence), so that the validation set is not
    // just the last file's tail.
    s.order_.resize(static_cast<std::size_t>(n));
    std::iota(s.order_.begin(), s.order_.end(), 0);
    if (s.val_count_ > 0) {
      std::vector<std::int64_t> train, val;
      const double stride = double(n) / double(s.val_count_);
      std::int64_t next_val = 0;
      for (std::int64_t i = 0, k = 0; i < n; ++i) {
        if (k < s.val_count_ && i == next_val) {
          val.push_back(i);
          ++k;
          next_val = static_cast<std::int64_t>(double(k) * stride);
        } else {
          train.push_back(i);
        }
      }
      s.order_ = train;
      s.order_.insert(s.order_.end(), val.begin(), val.end());
    }
    return s;
  }

  std::int64_t seq_len() const { return seq_len_; }
  std::int64_t size() const { return packed_chunks_ + static_cast<std::int64_t>(pairs_.size()); }
  std::int64_t train_count() const { return size() - val_count_; }
  std::int64_t val_count() const { return val_count_; }

  /// A batch of training sequences by their index in [0, train_count()).
  Batch train_batch(const std::vector<std::int64_t>& indices) const {
    std::vector<std::int64_t> ids;
    for (std::int64_t i : indices) ids.push_back(order_[static_cast<std::size_t>(i)]);
    return batch_of(ids);
  }

  /// The validation sequences, in batches of at most `batch_size`.
  std::vector<Batch> val_batches(std::int64_t batch_size) const {
    std::vector<Batch> out;
    for (std::int64_t i = 0; i < val_count_; i += batch_size) {
      std::vector<std::int64_t> ids;
      for (std::int64_t k = i; k < std::min(val_count_, i + batch_size); ++k)
        ids.push_back(order_[static_cast<std::size_t>(train_count() + k)]);
      out.push_back(batch_of(ids));
    }
    return out;
  }

 private:
  Batch batch_of(const std::vector<std::int64_t>& sequence_ids) const {
    Batch b;
    b.batch = static_cast<std::int64_t>(sequence_ids.size());
    b.seq = seq_len_;
    const auto S = static_cast<std::size_t>(seq_len_);
    bool any_pair = false;
    for (std::int64_t id : sequence_ids) any_pair |= id >= packed_chunks_;
    b.input_ids.reserve(sequence_ids.size() * S);
    if (any_pair) {
      b.attention_mask.reserve(sequence_ids.size() * S);
      b.labels.reserve(sequence_ids.size() * S);
    }
    for (std::int64_t id : sequence_ids) {
      if (id < packed_chunks_) {
        const auto from = stream_.begin() + static_cast<std::ptrdiff_t>(id * seq_len_);
        b.input_ids.insert(b.input_ids.end(), from, from + seq_len_);
        if (any_pair) {
          b.attention_mask.insert(b.attention_mask.end(), S, 1);
          b.labels.insert(b.labels.end(), from, from + seq_len_);
        }
        continue;
      }
      const Document& e = pairs_[static_cast<std::size_t>(id - packed_chunks_)];
      const auto prompt = static_cast<std::size_t>(e.prompt_tokens);
      for (std::size_t t = 0; t < S; ++t) {
        const bool real = t < e.ids.size();
        b.input_ids.push_back(real ? e.ids[t] : 0);
        b.attention_mask.push_back(real ? 1 : 0);
        b.labels.push_back(real && t >= prompt ? e.ids[t] : -100);
      }
    }
    return b;
  }

  std::int64_t seq_len_ = 0;
  std::vector<std::int32_t> stream_;  ///< packed_chunks_ · seq_len tokens
  std::int64_t packed_chunks_ = 0;
  std::vector<Document> pairs_;
  std::vector<std::int64_t> order_;  ///< training sequences, then the validation ones
  std::int64_t val_count_ = 0;
};

/// Shuffled epochs over `count` items: draw k (0-based, across epochs) is a pure function of k
/// and the seed (epoch e's order is a permutation from a generator seeded by (seed, e)), so a run
/// resumed at step s continues with draw s · batch · accumulation, exactly where it stopped.
class EpochSampler {
 public:
  EpochSampler(std::int64_t count, std::uint64_t seed) : count_(count), seed_(seed) {
    if (count_ <= 0) throw ConfigError("epoch sampler: nothing to sample");
  }
  std::int64_t operator()(std::int64_t draw) {
    const std::int64_t epoch = draw / count_;
    if (epoch != epoch_) {
      order_.resize(static_cast<std::size_t>(count_));
      std::iota(order_.begin(), order_.end(), 0);
      std::mt19937_64 rng(seed_ ^ (0x9E3779B97F4A7C15ull * std::uint64_t(epoch + 1)));
      for (std::size_t i = order_.size(); i > 1; --i)  // Fisher-Yates with the generator's bits
        std::swap(order_[i - 1], order_[static_cast<std::size_t>(rng() % i)]);
      epoch_ = epoch;
    }
    return order_[static_cast<std::size_t>(draw % count_)];
  }

 private:
  std::int64_t count_;
  std::uint64_t seed_;
  std::int64_t epoch_ = -1;
  std::vector<std::int64_t> order_;
};

}  // namespace peft::data
