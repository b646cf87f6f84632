#pragma once
// Pre-tokenization of byte-level BPE tokenizers: UTF-8 decoding, the Unicode classes the
// patterns test (\p{L}, \p{N}, \s), and the split patterns of the GPT-2 and LLaMA-3/Qwen2
// families implemented as scanners.
//
// Why scanners and not a regex engine: the patterns end in `\s+(?!\S)`, a negative lookahead,
// which the linear-time engine the library uses for untrusted patterns (RE2) cannot express, and a
// backtracking engine (std::regex) is neither linear nor Unicode-aware. Each scanner below is the
// pattern's ordered alternation written out, alternative by alternative, with the backtracking
// the pattern implies made explicit; tests/test_tokenizer.cpp compares the result with the
// reference `tokenizers` package (which runs the pattern in Oniguruma) on texts that exercise
// every alternative.
//
// `\s` is Unicode White_Space, as in Oniguruma and Rust's char::is_whitespace; \p{L} and \p{N}
// are the general categories of unicode_tables.hpp (generated, scripts/gen_unicode_tables.py).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"
#include "peft/data/unicode_tables.hpp"

namespace peft::data {

namespace unicode {

namespace detail {
template <std::size_t N>
constexpr bool in_ranges(const CodePointRange (&table)[N], char32_t cp) {
  const CodePointRange* end = table + N;
  const CodePointRange* it = std::upper_bound(
      table, end, static_cast<std::uint32_t>(cp),
      [](std::uint32_t value, const CodePointRange& range) { return value < range.first; });
  return it != table && cp <= (it - 1)->last;
}
}  // namespace detail

inline bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return detail::in_ranges(kLetterRanges, cp);
}

inline bool is_number(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return detail::in_ranges(kNumberRanges, cp);
}

/// A character of regex's Unicode \w (letters, marks, decimal digits, connector punctuation,
/// the joiners): the reference's test for an added token's `single_word` boundaries.
inline bool is_word_char(char32_t cp) {
  if (cp < 0x80) return cp == '_' || is_letter(cp) || is_number(cp);
  return detail::in_ranges(kWordRanges, cp);
}

/// The Unicode White_Space property (25 code points), which `\s` means in Oniguruma.
inline bool is_whitespace(char32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/// The byte offset of the first byte that does not belong to well-formed UTF-8 (overlong forms,
/// surrogates and code points above U+10FFFF are ill-formed), or nullopt when all of `text` is.
inline std::optional<std::size_t> first_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (i + len > n || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    i += len;
  }
  return std::nullopt;
}

/// The code point starting at byte `at` of well-formed UTF-8 (checked beforehand with
/// first_invalid_utf8), and its length in bytes.
struct DecodedCodePoint {
  char32_t cp;
  std::size_t bytes;
};

inline DecodedCodePoint decode_at(std::string_view text, std::size_t at) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + at;
  if (s[0] < 0x80) return {s[0], 1};
  if (s[0] < 0xE0) return {char32_t(s[0] & 0x1F) << 6 | (s[1] & 0x3F), 2};
  if (s[0] < 0xF0)
    return {char32_t(s[0] & 0x0F) << 12 | char32_t(s[1] & 0x3F) << 6 | (s[2] & 0x3F), 3};
  return {char32_t(s[0] & 0x07) << 18 | char32_t(s[1] & 0x3F) << 12 | char32_t(s[2] & 0x3F) << 6 |
              (s[3] & 0x3F),
          4};
}

/// Appends the UTF-8 encoding of `cp` (a valid scalar value).
inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// `bytes` as UTF-8 with every ill-formed part replaced by U+FFFD, one per maximal ill-formed
/// prefix (the Unicode "substitution of maximal subparts" practice, which Rust's
/// String::from_utf8_lossy follows: the reference decoder's last step).
inline std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  std::size_t at = 0;
  while (at < bytes.size()) {
    const std::string_view rest = bytes.substr(at);
    const std::optional<std::size_t> bad = first_invalid_utf8(rest);
    if (!bad) {
      out.append(rest);
      break;
    }
    out.append(rest.substr(0, *bad));
    // The maximal subpart: the lead byte and every continuation byte that still fits the
    // sequence it starts (first_invalid_utf8's ranges), at least one byte.
    const auto* s = reinterpret_cast<const unsigned char*>(rest.data()) + *bad;
    const std::size_t left = rest.size() - *bad;
    std::size_t skip = 1;
    const unsigned char c = s[0];
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    if (len > 0 && left > 1 && s[1] >= lo && s[1] <= hi) {
      skip = 2;
      while (skip < len && skip < left && s[skip] >= 0x80 && s[skip] <= 0xBF) ++skip;
    }
    out += "\xEF\xBF\xBD";
    at += *bad + skip;
  }
  return out;
}

}  // namespace unicode

/// A split pattern the library knows, recognised by its exact text in tokenizer.json.
struct SplitPattern {
  enum class Family {
    gpt2,    ///< 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    llama3,  ///< (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]+[\r\n]*|...
  };
  Family family = Family::gpt2;
  /// llama3 family: the K of \p{N}{1,K}; 0 for a bare \p{N} (Qwen2 writes `\p{N}`: K = 1).
  int max_digits = 3;

  static constexpr std::string_view kGpt2 =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  static constexpr std::string_view kLlama3 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static constexpr std::string_view kQwen2 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

  /// The scanner for `pattern`, or nullopt when it is none of the known patterns.
  static std::optional<SplitPattern> recognise(std::string_view pattern) {
    if (pattern == kGpt2) return SplitPattern{Family::gpt2, 0};
    if (pattern == kLlama3) return SplitPattern{Family::llama3, 3};
    if (pattern == kQwen2) return SplitPattern{Family::llama3, 1};
    return std::nullopt;
  }

  /// The end (a byte offset) of the match that starts at byte `at` < text.size() of well-formed
  /// UTF-8. Every one of the known patterns matches at every position (its last alternative,
  /// `\s+`, takes what the others leave), so the matches tile the text.
  std::size_t match_end(std::string_view text, std::size_t at) const {
    return family == Family::gpt2 ? gpt2_end(text, at) : llama3_end(text, at);
  }

 private:
  enum class Kind { letter, number, space, other };
  static Kind kind_of(char32_t cp) {
    if (unicode::is_letter(cp)) return Kind::letter;
    if (unicode::is_number(cp)) return Kind::number;
    if (unicode::is_whitespace(cp)) return Kind::space;
    return Kind::other;
  }
  struct Cursor {
    std::string_view text;
    bool done(std::size_t at) const { return at >= text.size(); }
    unicode::DecodedCodePoint at(std::size_t i) const { return unicode::decode_at(text, i); }
    Kind kind(std::size_t i) const { return kind_of(at(i).cp); }
    /// The end of the run of code points of kind `k` from `i` (at most `limit` of them).
    std::size_t run(std::size_t i, Kind k, int limit = -1) const {
      for (int n = 0; !done(i) && n != limit; ++n) {
        const unicode::DecodedCodePoint c = at(i);
        if (kind_of(c.cp) != k) break;
        i += c.bytes;
      }
      return i;
    }
  };

  /// 's|'t|'re|'ve|'m|'ll|'d, case-sensitive or (?i:...); the end, or 0 for no match.
  static std::size_t contraction_end(const Cursor& c, std::size_t at, bool fold_case) {
    if (c.text[at] != '\'' || c.done(at + 1)) return 0;
    const auto lower = [&](std::size_t i, std::size_t& bytes) -> char32_t {
      const unicode::DecodedCodePoint d = c.at(i);
      bytes = d.bytes;
      if (!fold_case) return d.cp;
      if (d.cp >= 'A' && d.cp <= 'Z') return d.cp | 0x20;
      if (d.cp == 0x17F) return 's';  // LATIN SMALL LETTER LONG S case-folds to 's'
      return d.cp;
    };
    std::size_t b1 = 0, b2 = 0;
    const char32_t first = lower(at + 1, b1);
    if (first == 's' || first == 't' || first == 'm' || first == 'd') return at + 1 + b1;
    if (c.done(at + 1 + b1)) return 0;
    const char32_t second = lower(at + 1 + b1, b2);
    if ((first == 'r' && second == 'e') || (first == 'v' && second == 'e') ||
        (first == 'l' && second == 'l'))
      return at + 1 + b1 + b2;
    return 0;
  }

  /// \s+(?!\S) then \s+, from a whitespace code point at `at`: the whole run when it ends the
  /// text or is followed by whitespace (impossible: the run is maximal); otherwise the run less its
  /// last code point, when that leaves at least one; otherwise (a single space before a
  /// non-space) the plain \s+ run.
  static std::size_t whitespace_end(const Cursor& c, std::size_t at) {
    std::size_t last_start = at, end = at;
    while (!c.done(end)) {
      const unicode::DecodedCodePoint d = c.at(end);
      if (!unicode::is_whitespace(d.cp)) break;
      last_start = end;
      end += d.bytes;
    }
    if (c.done(end)) return end;
    return last_start > at ? last_start : end;
  }

  static std::size_t gpt2_end(std::string_view text, std::size_t at) {
    const Cursor c{text};
    if (const std::size_t e = contraction_end(c, at, false)) return e;
    const unicode::DecodedCodePoint first = c.at(at);
    const Kind k = kind_of(first.cp);
    if (k != Kind::space) return c.run(at, k);  // \p{L}+, \p{N}+ or [^\s\p{L}\p{N}]+
    if (first.cp == ' ' && !c.done(at + 1)) {   // " ?" then one of the three runs
      const Kind next = c.kind(at + 1);
      if (next != Kind::space) return c.run(at + 1, next);
    }
    return whitespace_end(c, at);
  }

  std::size_t llama3_end(std::string_view text, std::size_t at) const {
    const Cursor c{text};
    if (const std::size_t e = contraction_end(c, at, true)) return e;
    const unicode::DecodedCodePoint first = c.at(at);
    const Kind k = kind_of(first.cp);
    const std::size_t after = at + first.bytes;
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (k == Kind::letter) return c.run(at, Kind::letter);
    const bool crlf = first.cp == '\r' || first.cp == '\n';
    if (k != Kind::number && !crlf && !c.done(after) && c.kind(after) == Kind::letter)
      return c.run(after, Kind::letter);
    // \p{N}{1,K}
    if (k == Kind::number) return c.run(at, Kind::number, max_digits);
    // " ?[^\s\p{L}\p{N}]+[\r\n]*"
    std::size_t other = std::string_view::npos;
    if (k == Kind::other) other = at;
    if (first.cp == ' ' && !c.done(after) && c.kind(after) == Kind::other) other = after;
    if (other != std::string_view::npos) {
      std::size_t e = c.run(other, Kind::other);
      while (!c.done(e) && (text[e] == '\r' || text[e] == '\n')) ++e;
      return e;
    }
    // \s*[\r\n]+: the whitespace run up to and including its last \r or \n.
    std::size_t end = at, last_crlf_end = 0;
    while (!c.done(end)) {
      const unicode::DecodedCodePoint d = c.at(end);
      if (!unicode::is_whitespace(d.cp)) break;
      end += d.bytes;
      if (d.cp == '\r' || d.cp == '\n') last_crlf_end = end;
    }
    if (last_crlf_end > 0) return last_crlf_end;
    return whitespace_end(c, at);
  }
};

}  // namespace peft::data
