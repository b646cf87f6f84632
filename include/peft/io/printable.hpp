#pragma once
// printable(): text from a file made safe for a one-line message (json.hpp re-exports it).
#include <cstddef>
#include <string>
#include <string_view>

namespace peft::io {

/// Makes text from a file or a path safe to put inside a one-line message: control characters
/// are escaped as \xNN (a tensor name holding a newline must not forge a second log line) and
/// very long text is cut, because a hostile header can hold a name megabytes long.
inline std::string printable(std::string_view text, std::size_t max_chars = 200) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size() < max_chars ? text.size() : max_chars);
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (out.size() >= max_chars) {
      out += "...";
      break;
    }
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte < 0x20 || byte == 0x7f) {
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xf];
    } else {
      out += static_cast<char>(byte);
    }
  }
  return out;
}

}  // namespace peft::io
