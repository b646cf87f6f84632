// NF4 storage (include/peft/quant/nf4.hpp) against the reference stack: bitsandbytes 0.50.2 on
// the CPU, recorded by scripts/gen_nf4_reference.py in tests/data/nf4/nf4_reference.safetensors.
// Codes, absmax bytes and nested scales are compared bit for bit, dequantized values exactly.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/quant/nf4.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_nf4 {

namespace {

namespace q = peft::quant;

const peft::io::SafetensorsFile& reference() {
#ifndef PEFT_TEST_DATA_DIR
#define PEFT_TEST_DATA_DIR "tests/data"
#endif
  static const peft::io::SafetensorsFile file = peft::io::SafetensorsFile::open(
      std::filesystem::path(PEFT_TEST_DATA_DIR) / "nf4" / "nf4_reference.safetensors");
  return file;
}

std::vector<float> floats(const std::string& name) { return reference().read<float>(name); }

/// The first `count` bytes of a byte string stored as I64 words (see the generator's header).
std::vector<std::uint8_t> bytes(const std::string& name, std::size_t count) {
  const auto raw = reference().raw_bytes(name);
  REQUIRE(raw.size() >= count);
  REQUIRE(raw.size() < count + 8);
  return {raw.begin(), raw.begin() + static_cast<std::ptrdiff_t>(count)};
}

std::uint32_t bits(float value) { return std::bit_cast<std::uint32_t>(value); }

/// Bit-for-bit equality, so that -0.0 and 0.0 (and any last-bit difference) count.
void check_same_bits(const std::vector<float>& mine, const std::vector<float>& theirs,
                     const std::string& what) {
  REQUIRE(mine.size() == theirs.size());
  std::size_t differing = 0, first = 0;
  for (std::size_t i = 0; i < mine.size(); ++i) {
    if (bits(mine[i]) != bits(theirs[i])) {
      if (differing++ == 0) first = i;
    }
  }
  INFO(what << ": " << differing << " of " << mine.size() << " differ, first at " << first);
  if (differing != 0) INFO("mine " << mine[first] << " reference " << theirs[first]);
  CHECK(differing == 0);
}

struct Case {
  std::string name;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 1;
  std::vector<float> input;
};

Case load_case(const std::string& name) {
  Case c{name, reference().read<std::int64_t>(name + ".shape"), 1, floats(name + ".input")};
  for (const auto dim : c.shape) c.numel *= dim;
  REQUIRE(static_cast<std::int64_t>(c.input.size()) == c.numel);
  return c;
}

const char* const kCases[] = {"random",    "bf16",     "tail",     "adversarial",
                              "zero_tail", "all_zero", "all_equal"};

std::size_t blocks_of(std::int64_t numel) {
  return static_cast<std::size_t>((numel + q::kNf4BlockSize - 1) / q::kNf4BlockSize);
}

}  // namespace

TEST_CASE("nf4: the code tables are the reference's floats") {
  check_same_bits({q::kNf4Code.begin(), q::kNf4Code.end()}, floats("nf4_code"), "nf4 code");
  check_same_bits({q::kDynamicCode.begin(), q::kDynamicCode.end()}, floats("dynamic_code"),
                  "dynamic map");
}

TEST_CASE("nf4: first-level codes and absmax match bitsandbytes bit for bit") {
  for (const char* name : kCases) {
    CAPTURE(name);
    const Case c = load_case(name);
    const q::Nf4Blocks blocks = q::quantize_nf4_blocks(
        c.numel, [&](std::int64_t i) { return c.input[static_cast<std::size_t>(i)]; });
    CHECK(blocks.codes == bytes(c.name + ".codes", static_cast<std::size_t>((c.numel + 1) / 2)));
    check_same_bits(blocks.absmax, floats(c.name + ".absmax"), c.name + " absmax");
  }
}

TEST_CASE("nf4: double quantization of the absmax matches bitsandbytes given its offset") {
  for (const char* name : kCases) {
    CAPTURE(name);
    const Case c = load_case(name);
    const std::vector<float> absmax = floats(c.name + ".absmax");
    const float offset = floats(c.name + ".offset").at(0);
    std::vector<float> centred(absmax.size());
    for (std::size_t i = 0; i < absmax.size(); ++i) centred[i] = absmax[i] - offset;
    const q::Blockwise8 nested = q::quantize_blockwise_dynamic(centred, q::kNf4NestedBlockSize);
    CHECK(nested.codes == bytes(c.name + ".absmax_codes", absmax.size()));
    check_same_bits(nested.absmax, floats(c.name + ".nested_absmax"), c.name + " nested scales");
  }
}

TEST_CASE("nf4: the 8-bit dynamic quantizer agrees with bitsandbytes but for two known quirks") {
  // Every input here sits on the fp32 midpoint between two dynamic-map codes, or on a code.
  // libbitsandbytes_cpu 0.50.2 (cquantize_blockwise_cpu_fp32) departs from the nearest code in
  // two ways, both pinned here: (a) near a midpoint it may take the other neighbour, at times
  // the farther one (not only on exact ties: in the second block, whose absmax is not 1, by up
  // to about 0.5% of the gap; the 0.50.2 kernel source was not pinned down); (b) it never picks the
  // seven codes nearest zero (124..130, below 2.1e-5 in magnitude): such values go to code 123 or
  // 131 (-/+0x1.64840cp-16). Ours is the nearest code, ties to the lower one. Ordinary absmax data
  // (every case above) agrees bit for bit; docs/quantization.md says what this means for real
  // tensors.
  const std::vector<float> input = floats("blockwise8.input");
  const q::Blockwise8 out = q::quantize_blockwise_dynamic(input, 256);
  const std::vector<std::uint8_t> theirs = bytes("blockwise8.codes", input.size());
  check_same_bits(out.absmax, floats("blockwise8.absmax"), "blockwise8 absmax");
  std::size_t same = 0, tie = 0, near_zero = 0;
  for (std::size_t i = 0; i < input.size(); ++i) {
    CAPTURE(i);
    const float normed = input[i] / out.absmax[i / 256];
    if (out.codes[i] == theirs[i]) {
      ++same;
    } else if (std::fabs(normed) < 2.2e-5f && (theirs[i] == 123 || theirs[i] == 131)) {
      CHECK(out.codes[i] >= 123);
      CHECK(out.codes[i] <= 131);
      ++near_zero;
    } else {
      // Otherwise a neighbouring code: on this input, where every value is near a midpoint.
      CHECK(std::abs(int(out.codes[i]) - int(theirs[i])) == 1);
      ++tie;
    }
  }
  MESSAGE("blockwise8: " << same << " equal, " << tie << " neighbour choices, " << near_zero
                         << " near-zero values resolved differently");
  CHECK(same > input.size() / 2);
}

TEST_CASE("nf4: dequantizing the reference's stored state gives its values exactly") {
  for (const char* name : kCases) {
    CAPTURE(name);
    const Case c = load_case(name);
    const std::size_t blocks = blocks_of(c.numel);
    const q::Nf4Tensor tensor = q::Nf4Tensor::from_parts(
        c.shape, bytes(c.name + ".codes", static_cast<std::size_t>((c.numel + 1) / 2)),
        bytes(c.name + ".absmax_codes", blocks), floats(c.name + ".nested_absmax"),
        floats(c.name + ".offset").at(0), c.name);
    check_same_bits(tensor.dequantize(), floats(c.name + ".dequant"), c.name + " dequant");
  }
}

TEST_CASE("nf4: Nf4Tensor::quantize reproduces the reference end to end") {
  for (const char* name : kCases) {
    CAPTURE(name);
    const Case c = load_case(name);
    const q::Nf4Tensor tensor = q::Nf4Tensor::quantize(c.input, c.shape, c.name);
    const auto codes = tensor.codes();
    CHECK(std::vector<std::uint8_t>(codes.begin(), codes.end()) ==
          bytes(c.name + ".codes", static_cast<std::size_t>((c.numel + 1) / 2)));
    // The offset is a double-accumulated mean; torch's fp32 mean may differ in its last bits.
    const float reference_offset = floats(c.name + ".offset").at(0);
    const auto ulps = std::abs(static_cast<std::int64_t>(bits(tensor.offset())) -
                               static_cast<std::int64_t>(bits(reference_offset)));
    CHECK(ulps <= 2);
    if (ulps == 0) {
      const auto absmax_codes = tensor.absmax_codes();
      CHECK(std::vector<std::uint8_t>(absmax_codes.begin(), absmax_codes.end()) ==
            bytes(c.name + ".absmax_codes", blocks_of(c.numel)));
      check_same_bits({tensor.nested_scales().begin(), tensor.nested_scales().end()},
                      floats(c.name + ".nested_absmax"), c.name + " nested scales");
      check_same_bits(tensor.dequantize(), floats(c.name + ".dequant"), c.name + " dequant");
    }
  }
}

TEST_CASE("nf4: the bf16 view quantizes the bf16 values exactly like their fp32 copy") {
  const Case c = load_case("bf16");
  const auto raw = reference().raw_bytes("bf16.input");
  REQUIRE(reference().info("bf16.input").dtype == peft::io::Dtype::BF16);
  std::vector<std::uint16_t> bf16(raw.size() / 2);
  std::memcpy(bf16.data(), raw.data(), raw.size());
  const q::Nf4Tensor from_bf16 = q::Nf4Tensor::quantize_bf16(bf16, c.shape, "bf16");
  const q::Nf4Tensor from_fp32 = q::Nf4Tensor::quantize(c.input, c.shape, "bf16");
  CHECK(std::ranges::equal(from_bf16.codes(), from_fp32.codes()));
  CHECK(std::ranges::equal(from_bf16.absmax_codes(), from_fp32.absmax_codes()));
  check_same_bits(from_bf16.dequantize(), from_fp32.dequantize(), "bf16 vs fp32");
}

TEST_CASE("nf4: round trip follows the published algorithm on random and adversarial blocks") {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(64 * 40 + 37);
  for (auto& v : values) v = normal(rng) * 0.1f;
  // Adversarial blocks inside one tensor: all equal, all zero, one huge value, subnormals.
  for (int i = 0; i < 64; ++i) {
    values[64 * 1 + i] = 0.75f;
    values[64 * 2 + i] = 0.0f;
    values[64 * 3 + i] = 1e-3f * normal(rng);
    values[64 * 4 + i] = std::numeric_limits<float>::denorm_min() * static_cast<float>(i - 32);
  }
  values[64 * 3 + 9] = 1e30f;
  const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(values.size())};
  const q::Nf4Tensor tensor = q::Nf4Tensor::quantize(values, shape, "w");
  const std::vector<float> dequant = tensor.dequantize();
  REQUIRE(dequant.size() == values.size());
  for (std::int64_t b = 0; b < tensor.blocks(); ++b) {
    const std::int64_t begin = b * 64, end = std::min<std::int64_t>(begin + 64, tensor.numel());
    double absmax = 0.0;
    for (std::int64_t i = begin; i < end; ++i)
      absmax = std::max(absmax, std::fabs(double(values[i])));
    const float scale = tensor.block_scale(b);
    for (std::int64_t i = begin; i < end; ++i) {
      // The published algorithm: the nearest NF4 code to x / absmax (computed here in double).
      // Away from a midpoint (where fp32 rounding may pick either side) the code must agree.
      // (bitsandbytes divides by max(absmax, 1e-38): a block of subnormals below that maps to 0.)
      const double scaled = values[i] / std::max(absmax, double(1e-38f));
      int nearest = 0;
      for (int k = 1; k < 16; ++k) {
        if (std::fabs(scaled - q::kNf4Code[k]) < std::fabs(scaled - q::kNf4Code[nearest]))
          nearest = k;
      }
      const double margin = std::fabs(std::fabs(scaled - q::kNf4Code[nearest]) - [&] {
        double second = 1e9;
        for (int k = 0; k < 16; ++k)
          if (k != nearest) second = std::min(second, std::fabs(scaled - q::kNf4Code[k]));
        return second;
      }());
      if (margin > 1e-5) CHECK(tensor.code(i) == nearest);
      CHECK(bits(dequant[static_cast<std::size_t>(i)]) ==
            bits(q::kNf4Code[tensor.code(i)] * scale));
    }
    // The reconstructed absmax is within the nested 8-bit step of the true one.
    CHECK(std::fabs(scale - absmax) <= 0.02 * std::fabs(absmax - tensor.offset()) + 1e-30);
  }
  // All-equal and all-zero blocks: every value maps to the +1 code or to the 0 code.
  for (int i = 0; i < 64; ++i) {
    CHECK(tensor.code(64 + i) == 15);
    CHECK(tensor.code(128 + i) == 7);
    CHECK(dequant[static_cast<std::size_t>(128 + i)] == 0.0f);
  }
  CHECK(tensor.code(64 * 3 + 9) == 15);
}

TEST_CASE("nf4: ranges and rows dequantize to slices of the whole") {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::vector<float> values(6 * 100);
  for (auto& v : values) v = uniform(rng);
  const q::Nf4Tensor tensor = q::Nf4Tensor::quantize(values, {6, 100}, "w");
  CHECK(tensor.rows() == 6);
  CHECK(tensor.cols() == 100);
  const std::vector<float> whole = tensor.dequantize();
  std::vector<float> part(200);
  tensor.dequantize_rows(2, 4, part.data());
  check_same_bits(part, {whole.begin() + 200, whole.begin() + 400}, "rows 2..4");
  std::vector<float> odd(77);
  tensor.dequantize(33, 110, odd.data());
  check_same_bits(odd, {whole.begin() + 33, whole.begin() + 110}, "range 33..110");
  CHECK_THROWS_AS(tensor.dequantize_rows(5, 7, part.data()), peft::ShapeError);
  CHECK_THROWS_AS(tensor.dequantize(-1, 3, odd.data()), peft::ShapeError);
}

TEST_CASE("nf4: bytes held for a 4096 x 4096 weight are about 4.13 bits a value") {
  const std::int64_t n = 4096LL * 4096LL;
  const std::size_t blocks = static_cast<std::size_t>(n / 64);
  const q::Nf4Tensor tensor = q::Nf4Tensor::from_parts(
      {4096, 4096}, std::vector<std::uint8_t>(static_cast<std::size_t>(n / 2)),
      std::vector<std::uint8_t>(blocks), std::vector<float>(blocks / 256, 1.0f), 0.0f, "w");
  CHECK(tensor.bytes() == static_cast<std::size_t>(n / 2) + blocks + (blocks / 256) * 4 + 4);
  CHECK(8.0 * static_cast<double>(tensor.bytes()) / static_cast<double>(n) ==
        doctest::Approx(4.127).epsilon(0.001));
}

TEST_CASE("nf4: NaN and infinity are refused with the tensor's name, before any work") {
  std::vector<float> values(130, 0.5f);
  values[77] = std::numeric_limits<float>::quiet_NaN();
  values[90] = std::numeric_limits<float>::infinity();
  try {
    (void)q::Nf4Tensor::quantize(values, {130}, "layers.0.q_proj.weight");
    FAIL("expected ConfigError");
  } catch (const peft::ConfigError& error) {
    const std::string message = error.what();
    CHECK(message ==
          "nf4 quantize: tensor 'layers.0.q_proj.weight' holds non-finite values (2 of 130, "
          "first at element 77: nan), expected finite numbers");
  }
  const std::vector<std::uint16_t> bf16 = {0x3f80, 0xff80};  // 1.0, -inf
  CHECK_THROWS_WITH_AS((void)q::Nf4Tensor::quantize_bf16(bf16, {2}, "head"),
                       doctest::Contains("first at element 1: -inf"), peft::ConfigError);
}

TEST_CASE("nf4: shapes and stored parts that do not fit are ShapeErrors naming the field") {
  const std::vector<float> values(10, 1.0f);
  CHECK_THROWS_WITH_AS((void)q::Nf4Tensor::quantize(values, {3, 4}, "w"),
                       "nf4 quantize: tensor 'w' has 12 elements by its shape but 10 values were "
                       "given",
                       peft::ShapeError);
  CHECK_THROWS_AS((void)q::Nf4Tensor::quantize({}, {0}, "w"), peft::ShapeError);
  CHECK_THROWS_WITH_AS(
      (void)q::Nf4Tensor::from_parts({128}, std::vector<std::uint8_t>(64),
                                     std::vector<std::uint8_t>(3), {1.0f}, 0.0f, "w"),
      "nf4: tensor 'w' field 'absmax_codes' has 3 entries, expected 2 for 128 elements",
      peft::ShapeError);
  CHECK_THROWS_AS((void)q::Nf4Tensor::from_parts(
                      {128}, std::vector<std::uint8_t>(64), std::vector<std::uint8_t>(2),
                      {std::numeric_limits<float>::quiet_NaN()}, 0.0f, "w"),
                  peft::ConfigError);
}

}  // namespace test_nf4
