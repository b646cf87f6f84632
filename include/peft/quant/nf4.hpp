#pragma once
// NF4 storage for frozen weights: QLoRA's 4-bit NormalFloat with double quantization, laid out
// byte for byte as bitsandbytes stores it (quantize_4bit(A, blocksize=64,
// compress_statistics=True, quant_type="nf4")), so that later work can read and write the
// reference's serialised 4-bit checkpoints and the kernels can dequantize block by block.
//
// The format (docs/quantization.md, "NF4 storage"):
//   - the tensor is flattened row-major and cut into blocks of 64 values (the last may be
//     shorter); each block has an fp32 absmax and each value becomes the index (0..15) of the
//     nearest NF4 code value to value / absmax;
//   - codes are packed two per byte: element 2i in the high nibble, element 2i+1 in the low one
//     (an odd count pads the last low nibble with code 7, the 0.0 code, as bitsandbytes does);
//   - double quantization: offset = mean of the absmaxes; (absmax - offset) is quantized to one
//     byte per 64-block with the signed 8-bit "dynamic" map in blocks of 256 absmaxes, each
//     with its own fp32 scale (its absmax);
//   - dequantization: scale_b = dynamic[absmax_code_b] * nested_scale[b / 256] + offset, then
//     value = nf4[code] * scale_b, all in fp32 exactly as the reference computes it.
//
// What follows the reference bit for bit (tests/test_nf4.cpp against
// tests/data/nf4/nf4_reference.safetensors, bitsandbytes 0.50.2 on the CPU): the 4-bit codes
// and fp32 absmaxes (backends/default/ops.py quantize_4bit: reciprocal multiply for full
// blocks, division for the tail block, clamp to [-1, 1], torch.bucketize on the code midpoints
// so a value on a midpoint takes the lower code; absmax 0 is clamped to 1e-38 for the division,
// and stored clamped only for the tail block) and every dequantized value of a stored state.
// Two known differences: (1) the offset: bitsandbytes takes torch's fp32 mean, whose last bits
// depend on torch's thread count and vector width; here it is the mean accumulated in double and
// rounded once (deterministic, within an ulp or two of torch's); (2) the nested 8-bit codes are
// the nearest dynamic-map code (ties to the lower); libbitsandbytes_cpu 0.50.2 agrees on every
// recorded tensor but departs from nearest on adversarial inputs near a midpoint and never picks
// the seven codes nearest zero (docs/quantization.md; the test pins both).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"

namespace peft::quant {

/// Values per NF4 block (bitsandbytes' default and QLoRA's choice).
inline constexpr std::int64_t kNf4BlockSize = 64;
/// Absmaxes per block of the double quantization (bitsandbytes: quantize_blockwise(blocksize=256)).
inline constexpr std::int64_t kNf4NestedBlockSize = 256;

/// The 16 NF4 code values, bitsandbytes.functional.get_4bit_type("nf4") as fp32 (ascending;
/// index 7 is 0.0). Written as hexadecimal literals so they are the reference's exact floats.
inline constexpr std::array<float, 16> kNf4Code = {
    -0x1p+0f,        -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0.0f,
    0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c3497p-2f,   0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f};

/// The signed 8-bit dynamic map, bitsandbytes.functional.create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8) as fp32, ascending: the code of the nested absmaxes.
/// (Its first entry is -0.99296875: the CPU quantizer clamps anything below to it.)
inline constexpr std::array<float, 256> kDynamicCode = {
    -0x1.fc6666p-1f,  -0x1.f53334p-1f,  -0x1.eep-1f,      -0x1.e6ccccp-1f,
    -0x1.df999ap-1f,  -0x1.d86666p-1f,  -0x1.d13334p-1f,  -0x1.cap-1f,
    -0x1.c2ccccp-1f,  -0x1.bb999ap-1f,  -0x1.b46666p-1f,  -0x1.ad3334p-1f,
    -0x1.a6p-1f,      -0x1.9eccccp-1f,  -0x1.97999ap-1f,  -0x1.906666p-1f,
    -0x1.893334p-1f,  -0x1.82p-1f,      -0x1.7accccp-1f,  -0x1.73999ap-1f,
    -0x1.6c6668p-1f,  -0x1.653334p-1f,  -0x1.5ep-1f,      -0x1.56ccccp-1f,
    -0x1.4f999ap-1f,  -0x1.486668p-1f,  -0x1.413334p-1f,  -0x1.3ap-1f,
    -0x1.32ccccp-1f,  -0x1.2b999ap-1f,  -0x1.246668p-1f,  -0x1.1d3334p-1f,
    -0x1.16p-1f,      -0x1.0eccccp-1f,  -0x1.079998p-1f,  -0x1.006666p-1f,
    -0x1.f26664p-2f,  -0x1.e4p-2f,      -0x1.d59998p-2f,  -0x1.c73334p-2f,
    -0x1.b8ccccp-2f,  -0x1.aa6666p-2f,  -0x1.9cp-2f,      -0x1.8d9998p-2f,
    -0x1.7f3334p-2f,  -0x1.70ccccp-2f,  -0x1.626666p-2f,  -0x1.54p-2f,
    -0x1.459998p-2f,  -0x1.373334p-2f,  -0x1.28ccccp-2f,  -0x1.1a6668p-2f,
    -0x1.0cp-2f,      -0x1.fb3332p-3f,  -0x1.de6666p-3f,  -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f,  -0x1.88p-3f,      -0x1.6b3334p-3f,  -0x1.4e6666p-3f,
    -0x1.31999ap-3f,  -0x1.14ccccp-3f,  -0x1.fp-4f,       -0x1.b66668p-4f,
    -0x1.93d70ap-4f,  -0x1.8851eep-4f,  -0x1.7ccccep-4f,  -0x1.7147aep-4f,
    -0x1.65c29p-4f,   -0x1.5a3d7p-4f,   -0x1.4eb854p-4f,  -0x1.433334p-4f,
    -0x1.37ae14p-4f,  -0x1.2c28f6p-4f,  -0x1.20a3d6p-4f,  -0x1.151ebap-4f,
    -0x1.09999ap-4f,  -0x1.fc28f6p-5f,  -0x1.e51ebap-5f,  -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f,  -0x1.ap-5f,       -0x1.88f5c2p-5f,  -0x1.71eb86p-5f,
    -0x1.5ae146p-5f,  -0x1.43d70ap-5f,  -0x1.2ccccep-5f,  -0x1.15c29p-5f,
    -0x1.fd70a4p-6f,  -0x1.cf5c2ap-6f,  -0x1.a147aep-6f,  -0x1.733334p-6f,
    -0x1.451ebap-6f,  -0x1.170a3ep-6f,  -0x1.d1eb86p-7f,  -0x1.75c29p-7f,
    -0x1.3e76c8p-7f,  -0x1.2c083p-7f,   -0x1.19999ap-7f,  -0x1.072b02p-7f,
    -0x1.e978d4p-8f,  -0x1.c49ba6p-8f,  -0x1.9fbe76p-8f,  -0x1.7ae148p-8f,
    -0x1.56041ap-8f,  -0x1.3126e8p-8f,  -0x1.0c49bap-8f,  -0x1.ced914p-9f,
    -0x1.851eb8p-9f,  -0x1.3b645ap-9f,  -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f,   -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0.0f,
    0x1.27476ep-21f,  0x1.b43528p-19f,  0x1.040bfep-17f,  0x1.64840cp-16f,
    0x1.6f0068p-15f,  0x1.15df66p-14f,  0x1.743e96p-14f,  0x1.47ae16p-13f,
    0x1.19ce0ap-12f,  0x1.8fc506p-12f,  0x1.02de02p-11f,  0x1.3dd982p-11f,
    0x1.78d5p-11f,    0x1.b3d07cp-11f,  0x1.eecbfep-11f,  0x1.4fdf3ap-10f,
    0x1.e353f8p-10f,  0x1.3b645ap-9f,   0x1.851eb8p-9f,   0x1.ced914p-9f,
    0x1.0c49bap-8f,   0x1.3126e8p-8f,   0x1.56041ap-8f,   0x1.7ae148p-8f,
    0x1.9fbe76p-8f,   0x1.c49ba6p-8f,   0x1.e978d4p-8f,   0x1.072b02p-7f,
    0x1.19999ap-7f,   0x1.2c083p-7f,    0x1.3e76c8p-7f,   0x1.75c29p-7f,
    0x1.d1eb86p-7f,   0x1.170a3ep-6f,   0x1.451ebap-6f,   0x1.733334p-6f,
    0x1.a147aep-6f,   0x1.cf5c2ap-6f,   0x1.fd70a4p-6f,   0x1.15c29p-5f,
    0x1.2ccccep-5f,   0x1.43d70ap-5f,   0x1.5ae146p-5f,   0x1.71eb86p-5f,
    0x1.88f5c2p-5f,   0x1.ap-5f,        0x1.b70a3ep-5f,   0x1.ce147ap-5f,
    0x1.e51ebap-5f,   0x1.fc28f6p-5f,   0x1.09999ap-4f,   0x1.151ebap-4f,
    0x1.20a3d6p-4f,   0x1.2c28f6p-4f,   0x1.37ae14p-4f,   0x1.433334p-4f,
    0x1.4eb854p-4f,   0x1.5a3d7p-4f,    0x1.65c29p-4f,    0x1.7147aep-4f,
    0x1.7ccccep-4f,   0x1.8851eep-4f,   0x1.93d70ap-4f,   0x1.b66668p-4f,
    0x1.fp-4f,        0x1.14ccccp-3f,   0x1.31999ap-3f,   0x1.4e6666p-3f,
    0x1.6b3334p-3f,   0x1.88p-3f,       0x1.a4ccccp-3f,   0x1.c1999ap-3f,
    0x1.de6666p-3f,   0x1.fb3332p-3f,   0x1.0cp-2f,       0x1.1a6668p-2f,
    0x1.28ccccp-2f,   0x1.373334p-2f,   0x1.459998p-2f,   0x1.54p-2f,
    0x1.626666p-2f,   0x1.70ccccp-2f,   0x1.7f3334p-2f,   0x1.8d9998p-2f,
    0x1.9cp-2f,       0x1.aa6666p-2f,   0x1.b8ccccp-2f,   0x1.c73334p-2f,
    0x1.d59998p-2f,   0x1.e4p-2f,       0x1.f26664p-2f,   0x1.006666p-1f,
    0x1.079998p-1f,   0x1.0eccccp-1f,   0x1.16p-1f,       0x1.1d3334p-1f,
    0x1.246668p-1f,   0x1.2b999ap-1f,   0x1.32ccccp-1f,   0x1.3ap-1f,
    0x1.413334p-1f,   0x1.486668p-1f,   0x1.4f999ap-1f,   0x1.56ccccp-1f,
    0x1.5ep-1f,       0x1.653334p-1f,   0x1.6c6668p-1f,   0x1.73999ap-1f,
    0x1.7accccp-1f,   0x1.82p-1f,       0x1.893334p-1f,   0x1.906666p-1f,
    0x1.97999ap-1f,   0x1.9eccccp-1f,   0x1.a6p-1f,       0x1.ad3334p-1f,
    0x1.b46666p-1f,   0x1.bb999ap-1f,   0x1.c2ccccp-1f,   0x1.cap-1f,
    0x1.d13334p-1f,   0x1.d86666p-1f,   0x1.df999ap-1f,   0x1.e6ccccp-1f,
    0x1.eep-1f,       0x1.f53334p-1f,   0x1.fc6666p-1f,   0x1p+0f,
};

namespace detail {

/// Midpoints between neighbouring NF4 codes, computed as the reference computes them in fp32
/// ((code[i] + code[i+1]) / 2, backends/default/ops.py _get_4bit_quantize_bounds).
inline constexpr std::array<float, 15> nf4_midpoints() {
  std::array<float, 15> mid{};
  for (std::size_t i = 0; i < mid.size(); ++i) mid[i] = (kNf4Code[i] + kNf4Code[i + 1]) / 2.0f;
  return mid;
}
inline constexpr std::array<float, 15> kNf4Midpoints = nf4_midpoints();

/// The smallest absmax the reference divides by (absmax.clamp(min=1e-38), a subnormal float).
inline constexpr float kMinAbsmax = 1e-38f;

/// torch.bucketize(x, midpoints, right=False): the number of midpoints strictly below x, so a
/// value exactly on a midpoint takes the lower code.
inline std::uint8_t nf4_index(float scaled) {
  unsigned index = 0;
  for (const float mid : kNf4Midpoints) index += mid < scaled ? 1u : 0u;
  return static_cast<std::uint8_t>(index);
}

/// The nearest dynamic-map code to `normed`, found as bitsandbytes' csrc/common.cpp
/// quantize_block describes it: the code at or below the value (the first one for values below
/// it), then the next one only if it is strictly closer in fp32. NaN (0 / 0: a block of zeros)
/// gives 0, as the reference does. (The 0.50.2 binary differs near midpoints and near zero.)
inline std::uint8_t dynamic_index(float normed) {
  if (std::isnan(normed)) return 0;
  const auto above = std::upper_bound(kDynamicCode.begin(), kDynamicCode.end(), normed);
  std::size_t index = above == kDynamicCode.begin()
                          ? 0
                          : static_cast<std::size_t>(above - kDynamicCode.begin()) - 1;
  if (index < 255) {
    const float left = std::fabs(normed - kDynamicCode[index]);
    const float right = std::fabs(normed - kDynamicCode[index + 1]);
    if (right < left) ++index;
  }
  return static_cast<std::uint8_t>(index);
}

inline float bf16_to_float(std::uint16_t bits) {
  std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float value;
  static_assert(sizeof(value) == sizeof(wide));
  __builtin_memcpy(&value, &wide, sizeof(value));
  return value;
}

inline std::string describe_value(float value) {
  if (std::isnan(value)) return "nan";
  return value > 0 ? "inf" : "-inf";
}

/// Throws ConfigError naming the tensor, how many values are not finite and the first one.
template <class Load>
void check_finite(std::int64_t count, Load&& load, std::string_view what, std::string_view name) {
  std::int64_t bad = 0, first = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(load(i))) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad != 0) {
    throw ConfigError(std::string(what) + ": tensor '" + std::string(name) +
                      "' holds non-finite values (" + std::to_string(bad) + " of " +
                      std::to_string(count) + ", first at element " + std::to_string(first) + ": " +
                      describe_value(load(first)) + "), expected finite numbers");
  }
}

inline std::int64_t checked_numel(const std::vector<std::int64_t>& shape, std::string_view name) {
  std::int64_t count = 1;
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  text += "]";
  if (shape.empty()) {
    throw ShapeError("nf4: tensor '" + std::string(name) +
                     "' has shape [], expected at least one dimension");
  }
  for (const std::int64_t dim : shape) {
    if (dim <= 0) {
      throw ShapeError("nf4: tensor '" + std::string(name) + "' has shape " + text +
                       ", expected every dimension to be positive");
    }
    if (count > std::numeric_limits<std::int64_t>::max() / dim) {
      throw ShapeError("nf4: tensor '" + std::string(name) + "' has shape " + text +
                       " whose element count overflows int64");
    }
    count *= dim;
  }
  return count;
}

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace detail

/// First level of NF4: packed 4-bit codes and one fp32 absmax per 64-block.
struct Nf4Blocks {
  std::vector<std::uint8_t> codes;  // ceil(n / 2) bytes, element 2i in the high nibble
  std::vector<float> absmax;        // ceil(n / 64)
};

/// Blockwise 8-bit quantization with the dynamic map: one code per value, one fp32 absmax per
/// block (bitsandbytes quantize_blockwise on the CPU).
struct Blockwise8 {
  std::vector<std::uint8_t> codes;
  std::vector<float> absmax;
};

/// NF4-quantizes `count` values read by `load(i)` (finite: the caller checks), exactly as
/// bitsandbytes' CPU quantize_4bit(blocksize=64, quant_type="nf4").
template <class Load>
Nf4Blocks quantize_nf4_blocks(std::int64_t count, Load&& load) {
  Nf4Blocks out;
  out.codes.assign(static_cast<std::size_t>(detail::ceil_div(count, 2)), 0);
  out.absmax.resize(static_cast<std::size_t>(detail::ceil_div(count, kNf4BlockSize)));
  const std::int64_t full_blocks = count / kNf4BlockSize;
  for (std::size_t block = 0; block < out.absmax.size(); ++block) {
    const std::int64_t begin = static_cast<std::int64_t>(block) * kNf4BlockSize;
    const std::int64_t end = std::min(begin + kNf4BlockSize, count);
    float absmax = 0.0f;
    for (std::int64_t i = begin; i < end; ++i) absmax = std::max(absmax, std::fabs(load(i)));
    const bool tail = static_cast<std::int64_t>(block) >= full_blocks;
    const float divisor = std::max(absmax, detail::kMinAbsmax);
    // The reference multiplies full blocks by a reciprocal and divides the tail block; the two
    // differ in the last bit, which can move a value across a midpoint.
    const float reciprocal = 1.0f / divisor;
    out.absmax[block] = tail ? divisor : absmax;
    for (std::int64_t i = begin; i < end; ++i) {
      const float scaled = std::clamp(tail ? load(i) / divisor : load(i) * reciprocal, -1.0f, 1.0f);
      const std::uint8_t index = detail::nf4_index(scaled);
      auto& byte = out.codes[static_cast<std::size_t>(i / 2)];
      byte = static_cast<std::uint8_t>(i % 2 == 0 ? (byte & 0x0f) | (index << 4) : byte | index);
    }
  }
  if (count % 2 != 0) {
    // The reference pads the flattened values with one 0.0, whose code is 7.
    out.codes.back() = static_cast<std::uint8_t>(out.codes.back() | detail::nf4_index(0.0f));
  }
  return out;
}

/// bitsandbytes' CPU quantize_blockwise(values, code=dynamic, blocksize): division by the
/// block's absmax, the nearest dynamic code (ties to the lower code); values must be finite.
inline Blockwise8 quantize_blockwise_dynamic(std::span<const float> values,
                                             std::int64_t blocksize) {
  if (blocksize <= 0) {
    throw ConfigError("nf4: blockwise 8-bit blocksize " + std::to_string(blocksize) +
                      ", expected a positive block size");
  }
  Blockwise8 out;
  const auto count = static_cast<std::int64_t>(values.size());
  out.codes.resize(values.size());
  out.absmax.resize(static_cast<std::size_t>(detail::ceil_div(count, blocksize)));
  for (std::size_t block = 0; block < out.absmax.size(); ++block) {
    const std::int64_t begin = static_cast<std::int64_t>(block) * blocksize;
    const std::int64_t end = std::min(begin + blocksize, count);
    float absmax = 0.0f;
    for (std::int64_t i = begin; i < end; ++i) absmax = std::max(absmax, std::fabs(values[i]));
    out.absmax[block] = absmax;
    for (std::int64_t i = begin; i < end; ++i) {
      out.codes[static_cast<std::size_t>(i)] = detail::dynamic_index(values[i] / absmax);
    }
  }
  return out;
}

/// The double quantization's offset: the mean of the absmaxes, accumulated in double and rounded
/// once (bitsandbytes uses torch's fp32 mean; see the note at the top of this file).
inline float absmax_mean(std::span<const float> absmax) {
  double sum = 0.0;
  for (const float value : absmax) sum += value;
  return static_cast<float>(sum / static_cast<double>(absmax.size()));
}

/// A tensor held in NF4 with double quantization. Immutable once built; copies are deep.
/// Element order is the row-major flattening of shape(); a rank-r tensor is seen by
/// dequantize_rows as a matrix [shape[0], numel / shape[0]] (a 1-D tensor as [1, n]).
class Nf4Tensor {
 public:
  /// Quantizes fp32 values (row-major, `shape`'s element count). NaN or infinity is a
  /// ConfigError naming `name`, thrown before any work; a shape that does not match the data is
  /// a ShapeError.
  static Nf4Tensor quantize(std::span<const float> values, std::vector<std::int64_t> shape,
                            std::string name) {
    const std::int64_t count = checked_count(shape, values.size(), name);
    const auto load = [&](std::int64_t i) { return values[static_cast<std::size_t>(i)]; };
    detail::check_finite(count, load, "nf4 quantize", name);
    return from_blocks(quantize_nf4_blocks(count, load), std::move(shape), std::move(name));
  }

  /// Quantizes bf16 values given as their bit patterns (as a BF16 checkpoint stores them); each
  /// is widened to fp32 exactly, as the reference does (A.float()), with no fp32 copy of the
  /// tensor.
  static Nf4Tensor quantize_bf16(std::span<const std::uint16_t> bf16_bits,
                                 std::vector<std::int64_t> shape, std::string name) {
    const std::int64_t count = checked_count(shape, bf16_bits.size(), name);
    const auto load = [&](std::int64_t i) {
      return detail::bf16_to_float(bf16_bits[static_cast<std::size_t>(i)]);
    };
    detail::check_finite(count, load, "nf4 quantize", name);
    return from_blocks(quantize_nf4_blocks(count, load), std::move(shape), std::move(name));
  }

  /// Assembles a tensor from stored parts (a serialised 4-bit checkpoint, or the reference's
  /// QuantState: weight bytes, absmax (uint8), state2.absmax, offset), checking every size
  /// against the shape (ShapeError) and that the scales are finite (ConfigError).
  static Nf4Tensor from_parts(std::vector<std::int64_t> shape, std::vector<std::uint8_t> codes,
                              std::vector<std::uint8_t> absmax_codes,
                              std::vector<float> nested_scales, float offset, std::string name) {
    const std::int64_t count = detail::checked_numel(shape, name);
    const auto expect = [&](std::string_view field, std::size_t found, std::int64_t expected) {
      if (static_cast<std::int64_t>(found) != expected) {
        throw ShapeError("nf4: tensor '" + name + "' field '" + std::string(field) + "' has " +
                         std::to_string(found) + " entries, expected " + std::to_string(expected) +
                         " for " + std::to_string(count) + " elements");
      }
    };
    const std::int64_t blocks = detail::ceil_div(count, kNf4BlockSize);
    expect("codes", codes.size(), detail::ceil_div(count, 2));
    expect("absmax_codes", absmax_codes.size(), blocks);
    expect("nested_scales", nested_scales.size(), detail::ceil_div(blocks, kNf4NestedBlockSize));
    detail::check_finite(
        static_cast<std::int64_t>(nested_scales.size()),
        [&](std::int64_t i) { return nested_scales[static_cast<std::size_t>(i)]; },
        "nf4 from_parts (nested_scales)", name);
    detail::check_finite(
        1, [&](std::int64_t) { return offset; }, "nf4 from_parts (offset)", name);
    Nf4Tensor tensor;
    tensor.shape_ = std::move(shape);
    tensor.name_ = std::move(name);
    tensor.numel_ = count;
    tensor.codes_ = std::move(codes);
    tensor.absmax_codes_ = std::move(absmax_codes);
    tensor.nested_scales_ = std::move(nested_scales);
    tensor.offset_ = offset;
    return tensor;
  }

  const std::vector<std::int64_t>& shape() const { return shape_; }
  const std::string& name() const { return name_; }
  std::int64_t numel() const { return numel_; }
  std::int64_t rows() const { return shape_.size() == 1 ? 1 : shape_[0]; }
  std::int64_t cols() const { return numel_ / rows(); }
  std::int64_t blocks() const { return static_cast<std::int64_t>(absmax_codes_.size()); }

  /// Packed codes, ceil(numel / 2) bytes: element 2i in the high nibble of byte i.
  std::span<const std::uint8_t> codes() const { return codes_; }
  /// One dynamic-map code per 64-block: the quantized (absmax - offset).
  std::span<const std::uint8_t> absmax_codes() const { return absmax_codes_; }
  /// One fp32 scale per 256 blocks (bitsandbytes' state2.absmax).
  std::span<const float> nested_scales() const { return nested_scales_; }
  /// The mean subtracted from the absmaxes before their quantization (state.offset).
  float offset() const { return offset_; }

  /// Bytes held by the quantized data: codes, absmax codes, nested scales and the offset
  /// (about 4.127 bits per value for large tensors). The shape and name are not counted.
  std::size_t bytes() const {
    return codes_.size() + absmax_codes_.size() + nested_scales_.size() * sizeof(float) +
           sizeof(float);
  }

  /// The dequantized absmax of 64-block `block`, in the reference's fp32 order:
  /// dynamic[code] * nested_scale, then + offset.
  float block_scale(std::int64_t block) const {
    const float nested = kDynamicCode[absmax_codes_[static_cast<std::size_t>(block)]] *
                         nested_scales_[static_cast<std::size_t>(block / kNf4NestedBlockSize)];
    return nested + offset_;
  }

  /// The code (0..15) of element `index` of the flattened tensor.
  std::uint8_t code(std::int64_t index) const {
    const std::uint8_t byte = codes_[static_cast<std::size_t>(index / 2)];
    return static_cast<std::uint8_t>(index % 2 == 0 ? byte >> 4 : byte & 0x0f);
  }

  /// Writes elements [begin, end) of the flattened tensor, dequantized, to out[0, end - begin).
  /// Any range works; ranges on 64-block boundaries touch each block once. Throws ShapeError on a
  /// range outside the tensor.
  void dequantize(std::int64_t begin, std::int64_t end, float* out) const {
    if (begin < 0 || end < begin || end > numel_) {
      throw ShapeError("nf4: tensor '" + name_ + "' dequantize range [" + std::to_string(begin) +
                       ", " + std::to_string(end) + ") is outside [0, " + std::to_string(numel_) +
                       ")");
    }
    std::int64_t i = begin;
    while (i < end) {
      const std::int64_t block = i / kNf4BlockSize;
      const std::int64_t block_end = std::min(end, (block + 1) * kNf4BlockSize);
      const float scale = block_scale(block);
      for (; i < block_end; ++i) *out++ = kNf4Code[code(i)] * scale;
    }
  }

  /// Rows [row_begin, row_end) of the [rows(), cols()] view, dequantized, row-major into out
  /// ((row_end - row_begin) * cols() floats). ShapeError on rows outside the tensor.
  void dequantize_rows(std::int64_t row_begin, std::int64_t row_end, float* out) const {
    if (row_begin < 0 || row_end < row_begin || row_end > rows()) {
      throw ShapeError("nf4: tensor '" + name_ + "' dequantize_rows [" + std::to_string(row_begin) +
                       ", " + std::to_string(row_end) + ") is outside [0, " +
                       std::to_string(rows()) + ")");
    }
    dequantize(row_begin * cols(), row_end * cols(), out);
  }

  /// The whole tensor dequantized to fp32 (for tests and merging; the kernels use ranges).
  std::vector<float> dequantize() const {
    std::vector<float> out(static_cast<std::size_t>(numel_));
    dequantize(0, numel_, out.data());
    return out;
  }

 private:
  Nf4Tensor() = default;

  static std::int64_t checked_count(const std::vector<std::int64_t>& shape, std::size_t given,
                                    const std::string& name) {
    const std::int64_t count = detail::checked_numel(shape, name);
    if (static_cast<std::uint64_t>(count) != given) {
      throw ShapeError("nf4 quantize: tensor '" + name + "' has " + std::to_string(count) +
                       " elements by its shape but " + std::to_string(given) +
                       " values were given");
    }
    return count;
  }

  static Nf4Tensor from_blocks(Nf4Blocks blocks, std::vector<std::int64_t> shape,
                               std::string name) {
    const float offset = absmax_mean(blocks.absmax);
    std::vector<float> centred(blocks.absmax.size());
    for (std::size_t i = 0; i < centred.size(); ++i) centred[i] = blocks.absmax[i] - offset;
    Blockwise8 nested = quantize_blockwise_dynamic(centred, kNf4NestedBlockSize);
    return from_parts(std::move(shape), std::move(blocks.codes), std::move(nested.codes),
                      std::move(nested.absmax), offset, std::move(name));
  }

  std::vector<std::int64_t> shape_;
  std::string name_;
  std::int64_t numel_ = 0;
  std::vector<std::uint8_t> codes_;
  std::vector<std::uint8_t> absmax_codes_;
  std::vector<float> nested_scales_;
  float offset_ = 0.0f;
};

}  // namespace peft::quant
