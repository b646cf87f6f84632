#pragma once
// Strict reading of command-line text: numbers, comma-separated lists and output folders named
// by flags. One helper for every `peft` command and for experiment/study.hpp, so that every flag
// fails the same way: the whole string must be the number (no "1x", no "2abc" read as 2), in
// range, finite; every failure is a one-line ArgumentError naming the flag, what was expected
// and what was found. The CLI maps ArgumentError to exit status 2 (a usage error).
//
// Not in <peft/peft.hpp>: only the commands and the study parse text.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "peft/core/error.hpp"

namespace peft::io {

/// A command-line value that is not what its flag expects (exit status 2 in the CLI).
class ArgumentError : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

namespace detail {
inline std::string quoted(std::string_view text) {
  // Long hostile values are cut, so that the message stays one readable line.
  constexpr std::size_t kShown = 64;
  std::string out = "'";
  out += text.size() > kShown ? std::string(text.substr(0, kShown)) + "..." : std::string(text);
  for (char& c : out)
    if (c == '\n' || c == '\r') c = ' ';
  return out + "'";
}

inline std::string format_bound(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}
}  // namespace detail

/// A closed range of integers.
struct IntegerRange {
  std::int64_t min = std::numeric_limits<std::int64_t>::min();
  std::int64_t max = std::numeric_limits<std::int64_t>::max();
};

/// The whole of `text` as a decimal integer in [range.min, range.max]; `what` names the value in
/// the message ("--max-new"). Rejects signs other than a leading '-', spaces, trailing text,
/// hexadecimal, exponents and overflow.
inline std::int64_t parse_integer(std::string_view text, std::string_view what,
                                  IntegerRange range = {}) {
  std::int64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  const bool whole = !text.empty() && ec == std::errc() && ptr == end;
  if (!whole || value < range.min || value > range.max)
    throw ArgumentError(std::string(what) + ": expected an integer in [" +
                        std::to_string(range.min) + ", " + std::to_string(range.max) + "], found " +
                        detail::quoted(text) +
                        (ec == std::errc::result_out_of_range ? " (out of range)" : ""));
  return value;
}

/// The whole of `text` as an unsigned decimal integer ≤ max (seeds: every 64-bit value).
inline std::uint64_t parse_unsigned(std::string_view text, std::string_view what,
                                    std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
  std::uint64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end || value > max)
    throw ArgumentError(std::string(what) + ": expected an integer in [0, " + std::to_string(max) +
                        "], found " + detail::quoted(text));
  return value;
}

/// A range of real numbers; an exclusive end leaves that bound itself out ("(0, 1]").
struct NumberRange {
  double min = -std::numeric_limits<double>::max();
  double max = std::numeric_limits<double>::max();
  bool min_exclusive = false;
  bool max_exclusive = false;
};

/// The whole of `text` as a finite decimal number in `range` ("inf", "nan", "1e999", "0x1p3" and
/// "2.5x" are errors).
inline double parse_number(std::string_view text, std::string_view what, NumberRange range = {}) {
  double value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value, std::chars_format::general);
  const bool whole = !text.empty() && ec == std::errc() && ptr == end && std::isfinite(value);
  const bool in_range = whole && (range.min_exclusive ? value > range.min : value >= range.min) &&
                        (range.max_exclusive ? value < range.max : value <= range.max);
  if (!in_range)
    throw ArgumentError(std::string(what) + ": expected a finite number in " +
                        (range.min_exclusive ? "(" : "[") + detail::format_bound(range.min) + ", " +
                        detail::format_bound(range.max) + (range.max_exclusive ? ")" : "]") +
                        ", found " + detail::quoted(text));
  return value;
}

/// `text` split at commas; an empty list or an empty item ("1,,3", "1,") is an error.
inline std::vector<std::string> parse_list(std::string_view text, std::string_view what) {
  std::vector<std::string> items;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    const std::string_view item = text.substr(
        start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    if (item.empty())
      throw ArgumentError(std::string(what) + ": expected a comma-separated list without empty " +
                          "items, found " + detail::quoted(text));
    items.emplace_back(item);
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return items;
}

/// A comma-separated list of integers, each in `range` ("1,2abc,3" and "1,x,3" are errors that
/// name the item).
inline std::vector<std::int64_t> parse_integer_list(std::string_view text, std::string_view what,
                                                    IntegerRange range = {}) {
  std::vector<std::int64_t> out;
  const std::vector<std::string> items = parse_list(text, what);
  out.reserve(items.size());
  for (std::size_t i = 0; i < items.size(); ++i)
    out.push_back(parse_integer(items[i],
                                std::string(what) + " item " + std::to_string(i + 1) + " of " +
                                    std::to_string(items.size()),
                                range));
  return out;
}

/// Creates the output folder `dir` (named by flag `what`) and proves that a file can be created
/// in it, before any compute: a run that would fail at its last step (writing results into
/// /proc, a read-only mount, a path through a regular file) fails at once instead. The probe is
/// created exclusively under a random name and removed again.
inline void require_writable_dir(const std::filesystem::path& dir, std::string_view what) {
  namespace fs = std::filesystem;
  const std::string name = std::string(what) + " " + dir.string();
  std::error_code ec;
  if (dir.empty()) throw ArgumentError(std::string(what) + ": expected a folder, found ''");
  const fs::file_status st = fs::status(dir, ec);
  if (fs::exists(st) && !fs::is_directory(st))
    throw FileError(name + ": expected a folder, found an existing file that is not one");
  if (!fs::exists(st)) {
    fs::create_directories(dir, ec);
    if (ec) throw FileError(name + ": cannot create the output folder (" + ec.message() + ")");
  }
  std::string probe = (dir / ".peft-write-check-XXXXXX").string();
  const int fd = ::mkstemp(probe.data());
  if (fd < 0)
    throw FileError(name + ": cannot write in the output folder (" + std::strerror(errno) + ")");
  ::close(fd);
  ::unlink(probe.c_str());
}

}  // namespace peft::io
