#pragma once
// BaseFormat: how a model stores its frozen base weights (fp32, bf16, fp16, NF4). What each format
// covers, and the products on it: core/frozen_weight.hpp.
#include <cstddef>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"

namespace peft {

/// How a model holds its frozen base weights (core/frozen_weight.hpp says which tensors).
enum class BaseFormat { fp32, bf16, fp16, nf4 };

inline std::string_view base_format_name(BaseFormat format) {
  switch (format) {
    case BaseFormat::fp32:
      return "fp32";
    case BaseFormat::bf16:
      return "bf16";
    case BaseFormat::fp16:
      return "fp16";
    case BaseFormat::nf4:
      return "nf4";
  }
  return "?";
}

/// Bytes per base element, for size bounds (check_plausible_size): `dense_bytes` (sizeof(T))
/// for fp32, 2 for bf16 and fp16, 1 for NF4 (half a byte plus scales; 1 is an upper bound).
inline std::size_t base_element_bytes(BaseFormat format, std::size_t dense_bytes) {
  switch (format) {
    case BaseFormat::fp32:
      return dense_bytes;
    case BaseFormat::bf16:
    case BaseFormat::fp16:
      return 2;
    case BaseFormat::nf4:
      return 1;
  }
  return dense_bytes;
}

/// "fp32", "bf16", "fp16" or "nf4"; anything else is a ConfigError naming `source` (a flag or a
/// field).
inline BaseFormat parse_base_format(std::string_view text, std::string_view source) {
  if (text == "fp32") return BaseFormat::fp32;
  if (text == "bf16") return BaseFormat::bf16;
  if (text == "fp16") return BaseFormat::fp16;
  if (text == "nf4") return BaseFormat::nf4;
  throw ConfigError(std::string(source) + ": expected fp32, bf16, fp16 or nf4, found '" +
                    std::string(text.substr(0, 64)) + "'");
}

}  // namespace peft
