#pragma once
// Exact conversions between float/double and the two 16-bit float formats a checkpoint stores
// (IEEE 754 binary16 "F16" and bfloat16 "BF16"), by bit manipulation, so they are exact and
// portable (no reliance on _Float16 or on the FPU's rounding mode). Used by the safetensors
// reader and writer (io/safetensors.hpp) and by fp16/bf16 frozen weights (core/frozen_weight.hpp).
#include <bit>
#include <cmath>
#include <cstdint>

namespace peft::float16 {

namespace detail {

/// Rounds a double to the nearest value of a binary floating-point format with kExpBits
/// exponent bits and kMantBits stored mantissa bits (ties to even), returning its bit pattern.
/// Starting from double means a float input is rounded once, never twice.
template <int kExpBits, int kMantBits>
std::uint16_t encode_narrow_float(double value) {
  static_assert(1 + kExpBits + kMantBits == 16);
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr std::uint64_t kExpAllOnes = (std::uint64_t{1} << kExpBits) - 1;
  constexpr std::uint64_t kInfBits = kExpAllOnes << kMantBits;

  const auto bits = std::bit_cast<std::uint64_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 63) << 15);
  const auto exponent = static_cast<int>((bits >> 52) & 0x7ff);
  const std::uint64_t mantissa = bits & ((std::uint64_t{1} << 52) - 1);

  if (exponent == 0x7ff) {
    if (mantissa == 0) return static_cast<std::uint16_t>(sign | kInfBits);
    // NaN: keep the top payload bits and force the quiet bit so the result stays a NaN even
    // when the surviving payload bits are all zero.
    const std::uint64_t payload = mantissa >> (52 - kMantBits);
    return static_cast<std::uint16_t>(sign | kInfBits | (std::uint64_t{1} << (kMantBits - 1)) |
                                      payload);
  }
  // Double subnormals are below 2^-1022, far under half of any target's smallest subnormal.
  if (exponent == 0) return sign;

  const std::uint64_t significand = mantissa | (std::uint64_t{1} << 52);  // 53 bits
  int target_exponent = exponent - 1023 + kBias;
  int dropped_bits = 52 - kMantBits;
  if (target_exponent < 1) {
    // Subnormal in the target: the significand shifts further right, exponent field is 0.
    dropped_bits += 1 - target_exponent;
    target_exponent = 0;
  }
  // Everything shifted out and the value is below half the smallest subnormal: rounds to zero.
  if (dropped_bits > 53) return sign;

  std::uint64_t kept = significand >> dropped_bits;
  const std::uint64_t remainder = significand & ((std::uint64_t{1} << dropped_bits) - 1);
  const std::uint64_t halfway = std::uint64_t{1} << (dropped_bits - 1);
  if (remainder > halfway || (remainder == halfway && (kept & 1) != 0)) ++kept;

  // `kept` still holds the implicit leading 1 (normal case), so adding (exponent - 1) puts the
  // exponent in place, and a rounding carry out of the mantissa bumps the exponent by itself.
  // In the subnormal case a carry turns the result into the smallest normal, also correct.
  std::uint64_t encoded = kept;
  if (target_exponent >= 1) {
    encoded += static_cast<std::uint64_t>(target_exponent - 1) << kMantBits;
  }
  if (encoded >= kInfBits) return static_cast<std::uint16_t>(sign | kInfBits);
  return static_cast<std::uint16_t>(sign | encoded);
}

/// Exact widening of a narrow float bit pattern to double (every F16/BF16 value is exactly
/// representable as a float, hence as a double).
template <int kExpBits, int kMantBits>
double decode_narrow_float(std::uint16_t bits) {
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr unsigned kExpAllOnes = (1u << kExpBits) - 1;
  const std::uint64_t sign = static_cast<std::uint64_t>(bits >> 15) << 63;
  const unsigned exponent = (bits >> kMantBits) & kExpAllOnes;
  const std::uint64_t mantissa = bits & ((1u << kMantBits) - 1);

  if (exponent == kExpAllOnes) {  // inf, or NaN with its payload kept
    return std::bit_cast<double>(sign | (std::uint64_t{0x7ff} << 52) |
                                 (mantissa << (52 - kMantBits)));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^(1 - bias - kMantBits), exact
    const double magnitude = std::ldexp(static_cast<double>(mantissa), 1 - kBias - kMantBits);
    return sign != 0 ? -magnitude : magnitude;
  }
  const std::uint64_t double_exponent = exponent - static_cast<unsigned>(kBias) + 1023u;
  return std::bit_cast<double>(sign | (double_exponent << 52) | (mantissa << (52 - kMantBits)));
}

}  // namespace detail

/// IEEE 754 binary16, round to nearest even; overflow gives inf, NaN stays NaN.
inline std::uint16_t f16_bits_from(double value) {
  return detail::encode_narrow_float<5, 10>(value);
}
inline std::uint16_t f16_bits_from(float value) {
  return detail::encode_narrow_float<5, 10>(static_cast<double>(value));
}
/// bfloat16 (the top half of a float), round to nearest even; NaN stays NaN.
inline std::uint16_t bf16_bits_from(double value) {
  return detail::encode_narrow_float<8, 7>(value);
}
inline std::uint16_t bf16_bits_from(float value) {
  return detail::encode_narrow_float<8, 7>(static_cast<double>(value));
}
inline float f16_bits_to_float(std::uint16_t bits) {
  return static_cast<float>(detail::decode_narrow_float<5, 10>(bits));
}
inline float bf16_bits_to_float(std::uint16_t bits) {
  // A bfloat16 is exactly the upper 16 bits of the float with the same value.
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

}  // namespace peft::float16
