// Tests for peft/io/safetensors.hpp, peft/io/json.hpp and the `peft inspect` command.
// Malformed files are made in memory by mutating the bytes of a valid file, one defect at a time,
// so each test shows that exactly that defect is caught and named.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "../cli/inspect.hpp"
#include "peft/core/error.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "scratch_dir.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_safetensors {

namespace {

namespace io = peft::io;
using Bytes = std::vector<std::uint8_t>;
using nlohmann::json;

const std::string kFile = "bad.safetensors";

bool has(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

/// Three tensors, data laid out widest dtype first: beta I64 [2] at [0,16), alpha F32 [2,3] at
/// [16,40), gamma BF16 [4] at [40,48); metadata {"format": "pt"}.
Bytes valid_file() {
  io::SafetensorsWriter writer;
  writer.add<float>("alpha", {2, 3}, std::vector<float>{1, 2, 3, 4, 5, 6});
  writer.add<std::int64_t>("beta", {2}, std::vector<std::int64_t>{-7, 1LL << 40}, io::Dtype::I64);
  writer.add<float>("gamma", {4}, std::vector<float>{0.5f, -1.0f, 2.0f, 3.0f}, io::Dtype::BF16);
  writer.set_metadata("format", "pt");
  return writer.to_bytes();
}

std::uint64_t header_length(const Bytes& bytes) {
  std::uint64_t length = 0;
  std::memcpy(&length, bytes.data(), 8);
  return length;
}

std::string header_text(const Bytes& bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data() + 8),
                     static_cast<std::size_t>(header_length(bytes)));
}

Bytes data_section(const Bytes& bytes) {
  return Bytes(bytes.begin() + static_cast<std::ptrdiff_t>(8 + header_length(bytes)), bytes.end());
}

/// Builds a file from raw header text (not padded, not validated) and a data section.
Bytes assemble(const std::string& header, const Bytes& data) {
  Bytes bytes(8);
  const std::uint64_t length = header.size();
  std::memcpy(bytes.data(), &length, 8);
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), data.begin(), data.end());
  return bytes;
}

/// The valid file with its header JSON edited by `mutate` (and optionally a different data
/// section).
Bytes with_header(const std::function<void(json&)>& mutate,
                  const std::function<void(Bytes&)>& mutate_data = nullptr) {
  const Bytes valid = valid_file();
  json header = json::parse(header_text(valid));
  mutate(header);
  Bytes data = data_section(valid);
  if (mutate_data) mutate_data(data);
  return assemble(header.dump(), data);
}

Bytes with_length_prefix(Bytes bytes, std::uint64_t length) {
  std::memcpy(bytes.data(), &length, 8);
  return bytes;
}

/// The message of the FileError that opening `bytes` throws; fails the test if it does not.
std::string open_error(const Bytes& bytes) {
  try {
    (void)io::SafetensorsFile::from_bytes(bytes, kFile);
  } catch (const peft::FileError& e) {
    const std::string message = e.what();
    CHECK_MESSAGE(message.rfind(kFile + ": ", 0) == 0,
                  "message does not start with file: ", message);
    CHECK_MESSAGE(!has(message, "\n"), "message spans several lines: ", message);
    return message;
  } catch (const std::exception& e) {
    FAIL("expected peft::FileError, got another exception: " << e.what());
  }
  FAIL("expected peft::FileError, but the file was accepted");
  return {};
}

std::uint32_t float_bits(float value) { return std::bit_cast<std::uint32_t>(value); }

/// A fresh directory per test case (ctest may run cases in parallel processes).
std::filesystem::path scratch_dir(const std::string& purpose) {
  return test_support::scratch_dir("safetensors", purpose);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Conversions

TEST_CASE("safetensors: F16 encoding rounds to nearest even, with subnormals, inf and nan") {
  CHECK(io::f16_bits_from(1.0f) == 0x3c00);
  CHECK(io::f16_bits_from(-2.0f) == 0xc000);
  CHECK(io::f16_bits_from(0.0f) == 0x0000);
  CHECK(io::f16_bits_from(-0.0f) == 0x8000);
  CHECK(io::f16_bits_from(65504.0f) == 0x7bff);  // largest finite
  CHECK(io::f16_bits_from(65519.0f) == 0x7bff);  // below the halfway point
  CHECK(io::f16_bits_from(65520.0f) == 0x7c00);  // tie, rounds to even = inf
  CHECK(io::f16_bits_from(1e10f) == 0x7c00);
  CHECK(io::f16_bits_from(-1e10f) == 0xfc00);
  CHECK(io::f16_bits_from(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(io::f16_bits_from(1.0f + 0x1p-11f) == 0x3c00);             // tie, even stays
  CHECK(io::f16_bits_from(1.0f + 3 * 0x1p-11f) == 0x3c02);         // tie, odd rounds up
  CHECK(io::f16_bits_from(1.0f + 0x1p-11f + 0x1p-20f) == 0x3c01);  // above the tie
  CHECK(io::f16_bits_from(0x1p-14f) == 0x0400);                    // smallest normal
  CHECK(io::f16_bits_from(0x1p-24f) == 0x0001);                    // smallest subnormal
  CHECK(io::f16_bits_from(1023 * 0x1p-24f) == 0x03ff);             // largest subnormal
  CHECK(io::f16_bits_from(0x1p-25f) == 0x0000);                    // tie with 0: even
  CHECK(io::f16_bits_from(3 * 0x1p-25f) == 0x0002);                // tie: 1.5 ulp -> 2
  CHECK(io::f16_bits_from(0x1.8p-25f) == 0x0001);                  // above the tie
  CHECK(io::f16_bits_from(0x1p-30f) == 0x0000);
  CHECK(io::f16_bits_from(-0x1p-30f) == 0x8000);
  CHECK(io::f16_bits_from(0x1.ffcp-15f) == 0x0400);  // subnormal rounding carries into normal
  CHECK(io::f16_bits_from(std::numeric_limits<float>::denorm_min()) == 0x0000);
  const std::uint16_t nan_bits = io::f16_bits_from(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan_bits & 0x7c00) == 0x7c00);
  CHECK((nan_bits & 0x03ff) != 0);
  // A signalling NaN whose payload lives only in low bits must not turn into infinity.
  CHECK((io::f16_bits_from(std::bit_cast<float>(0x7f800001u)) & 0x03ff) != 0);

  // From double the rounding happens once: going through float first would lose the 2^-40 and
  // round the resulting tie down to 0x3c00.
  CHECK(io::f16_bits_from(1.0 + 0x1p-11 + 0x1p-40) == 0x3c01);
}

TEST_CASE("safetensors: F16 decoding is exact and every bit pattern survives a round trip") {
  CHECK(io::f16_bits_to_float(0x3c00) == 1.0f);
  CHECK(io::f16_bits_to_float(0x0001) == 0x1p-24f);
  CHECK(io::f16_bits_to_float(0x03ff) == 1023 * 0x1p-24f);
  CHECK(io::f16_bits_to_float(0x7bff) == 65504.0f);
  CHECK(io::f16_bits_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(io::f16_bits_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  CHECK(std::signbit(io::f16_bits_to_float(0x8000)));
  CHECK(std::isnan(io::f16_bits_to_float(0x7e00)));
  CHECK(std::isnan(io::f16_bits_to_float(0x7c01)));
  int mismatches = 0;
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto half = static_cast<std::uint16_t>(bits);
    const float value = io::f16_bits_to_float(half);
    if ((half & 0x7c00) == 0x7c00 && (half & 0x03ff) != 0) {
      if (!std::isnan(value) || (io::f16_bits_from(value) & 0x03ff) == 0) ++mismatches;
    } else if (io::f16_bits_from(value) != half) {
      ++mismatches;
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("safetensors: F16/BF16 encoding picks the nearest value for random floats") {
  // Brute-force check against the neighbours: the chosen value is at least as close as the
  // next value up and down, and on a tie it has an even mantissa.
  std::mt19937 rng(20240611);
  std::uniform_real_distribution<float> exponent(-30.0f, 17.0f);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  int bad_f16 = 0;
  int bad_bf16 = 0;
  for (int i = 0; i < 20000; ++i) {
    const float x =
        std::ldexp(mantissa(rng), static_cast<int>(exponent(rng))) * (i % 2 == 0 ? 1.0f : -1.0f);
    const auto check = [x](std::uint16_t bits, float (*decode)(std::uint16_t)) {
      const double chosen = decode(bits);
      if (std::isinf(chosen)) return std::fabs(x) >= 65520.0f;
      const double error = std::fabs(static_cast<double>(x) - chosen);
      for (const int step : {-1, 1}) {
        const auto neighbour_bits = static_cast<std::uint16_t>((bits & 0x7fff) + step);
        const double neighbour =
            decode(static_cast<std::uint16_t>(neighbour_bits | (bits & 0x8000)));
        if (std::isnan(neighbour) || std::isinf(neighbour)) continue;
        const double other = std::fabs(static_cast<double>(x) - neighbour);
        if (other < error) return false;
        if (other == error && (bits & 1) != 0) return false;
      }
      return true;
    };
    if (!check(io::f16_bits_from(x), io::f16_bits_to_float)) ++bad_f16;
    if (!check(io::bf16_bits_from(x), io::bf16_bits_to_float)) ++bad_bf16;
  }
  CHECK(bad_f16 == 0);
  CHECK(bad_bf16 == 0);
}

TEST_CASE("safetensors: BF16 encoding rounds to nearest even, with subnormals, inf and nan") {
  CHECK(io::bf16_bits_from(1.0f) == 0x3f80);
  CHECK(io::bf16_bits_from(-1.0f) == 0xbf80);
  CHECK(io::bf16_bits_from(1.0f + 0x1p-8f) == 0x3f80);      // tie, even stays
  CHECK(io::bf16_bits_from(1.0f + 3 * 0x1p-8f) == 0x3f82);  // tie, odd rounds up
  CHECK(io::bf16_bits_from(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);
  CHECK(io::bf16_bits_from(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to inf
  CHECK(io::bf16_bits_from(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(io::bf16_bits_from(0x1p-133f) == 0x0001);  // smallest bf16 subnormal
  CHECK(io::bf16_bits_from(0x1p-134f) == 0x0000);  // tie with 0: even
  CHECK(io::bf16_bits_from(0x1.8p-134f) == 0x0001);
  CHECK(io::bf16_bits_from(-0.0f) == 0x8000);
  CHECK(io::bf16_bits_from(1.0 + 0x1p-8 + 0x1p-40) == 0x3f81);  // single rounding from double
  const std::uint16_t nan_bits = io::bf16_bits_from(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan_bits & 0x7f80) == 0x7f80);
  CHECK((nan_bits & 0x007f) != 0);
  CHECK((io::bf16_bits_from(std::bit_cast<float>(0x7f800001u)) & 0x007f) != 0);

  int mismatches = 0;
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto value16 = static_cast<std::uint16_t>(bits);
    const float value = io::bf16_bits_to_float(value16);
    CHECK(float_bits(value) == bits << 16);
    if (std::isnan(value)) {
      if (!std::isnan(io::bf16_bits_to_float(io::bf16_bits_from(value)))) ++mismatches;
    } else if (io::bf16_bits_from(value) != value16) {
      ++mismatches;
    }
  }
  CHECK(mismatches == 0);
}

// ------------------------------------------------------------------------------------------
// Round trips

TEST_CASE("safetensors: F32 round trip is bit-exact") {
  const std::vector<float> values = {0.0f,
                                     -0.0f,
                                     1.0f,
                                     -3.25f,
                                     std::numeric_limits<float>::min(),
                                     std::numeric_limits<float>::denorm_min(),
                                     std::numeric_limits<float>::max(),
                                     std::numeric_limits<float>::lowest(),
                                     std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(),
                                     std::bit_cast<float>(0x7fc12345u),  // NaN with payload
                                     0.1f};
  io::SafetensorsWriter writer;
  writer.add<float>("x", {3, 4}, values);
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "f32.safetensors");
  const std::vector<float> back = file.read<float>("x", {3, 4});
  REQUIRE(back.size() == values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    CHECK(float_bits(back[i]) == float_bits(values[i]));
  }
  CHECK(file.info("x").dtype == io::Dtype::F32);
  CHECK(file.info("x").numel() == 12);
  CHECK(file.info("x").end - file.info("x").begin == 48);
  // Widening to double is exact.
  const std::vector<double> wide = file.read<double>("x");
  CHECK(wide[3] == -3.25);
  CHECK(wide[5] == static_cast<double>(std::numeric_limits<float>::denorm_min()));
}

TEST_CASE("safetensors: F64 round trip is exact, and narrowing to float rounds") {
  const std::vector<double> values = {0.1, -1e300, 1e-310, 3.0, std::nan("")};
  io::SafetensorsWriter writer;
  writer.add<double>("d", {5}, values, io::Dtype::F64);
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "f64.safetensors");
  const std::vector<double> back = file.read<double>("d");
  for (std::size_t i = 0; i < 4; ++i) CHECK(back[i] == values[i]);
  CHECK(std::isnan(back[4]));
  const std::vector<float> narrow = file.read<float>("d");
  CHECK(narrow[0] == 0.1f);
  CHECK(std::isinf(narrow[1]));
  CHECK(narrow[3] == 3.0f);
}

TEST_CASE("safetensors: F16 and BF16 round trips through a file") {
  const std::vector<float> values = {1.0f,
                                     1.0f + 0x1p-11f,
                                     1.0f + 3 * 0x1p-11f,
                                     65520.0f,
                                     0x1p-24f,
                                     0x1p-25f,
                                     -0.0f,
                                     std::numeric_limits<float>::quiet_NaN(),
                                     -std::numeric_limits<float>::infinity(),
                                     0.333333f};
  io::SafetensorsWriter writer;
  writer.add<float>("h", {10}, values, io::Dtype::F16);
  writer.add<float>("b", {2, 5}, values, io::Dtype::BF16);
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "half.safetensors");
  const std::vector<float> half = file.read<float>("h");
  const std::vector<float> brain = file.read<float>("b", {2, 5});
  const std::vector<double> half_wide = file.read<double>("h");
  for (std::size_t i = 0; i < values.size(); ++i) {
    const float expected_half = io::f16_bits_to_float(io::f16_bits_from(values[i]));
    const float expected_brain = io::bf16_bits_to_float(io::bf16_bits_from(values[i]));
    if (std::isnan(values[i])) {
      CHECK(std::isnan(half[i]));
      CHECK(std::isnan(brain[i]));
      continue;
    }
    CHECK(float_bits(half[i]) == float_bits(expected_half));
    CHECK(float_bits(brain[i]) == float_bits(expected_brain));
    CHECK(half_wide[i] == static_cast<double>(expected_half));
  }
  CHECK(half[1] == 1.0f);
  CHECK(half[2] == 1.0f + 0x1p-9f);
  CHECK(std::isinf(half[3]));
  CHECK(half[4] == 0x1p-24f);
  CHECK(half[5] == 0.0f);
  CHECK(std::signbit(half[6]));
  // Raw bytes are the little-endian bit patterns.
  const auto raw = file.raw_bytes("h");
  REQUIRE(raw.size() == 20);
  CHECK(raw[0] == 0x00);
  CHECK(raw[1] == 0x3c);

  // Writing from double rounds once.
  io::SafetensorsWriter from_double;
  from_double.add<double>("h", {1}, std::vector<double>{1.0 + 0x1p-11 + 0x1p-40}, io::Dtype::F16);
  const auto file2 = io::SafetensorsFile::from_bytes(from_double.to_bytes(), "h2.safetensors");
  CHECK(file2.read<float>("h")[0] == 1.0f + 0x1p-10f);
}

TEST_CASE("safetensors: I64 round trip; I64 is never read as floating point") {
  const std::vector<std::int64_t> values = {0,
                                            -1,
                                            42,
                                            std::numeric_limits<std::int64_t>::min(),
                                            std::numeric_limits<std::int64_t>::max(),
                                            -100};
  io::SafetensorsWriter writer;
  writer.add<std::int64_t>("ids", {2, 3}, values, io::Dtype::I64);
  writer.add<std::int64_t>("as_float", {6}, values, io::Dtype::F32);
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "i64.safetensors");
  CHECK(file.read<std::int64_t>("ids", {2, 3}) == values);
  // Integer data where a float is expected means the file holds something else: refused.
  CHECK_THROWS_WITH_AS(file.read<double>("ids"),
                       "i64.safetensors: tensor 'ids' has dtype I64, cannot be read as double "
                       "(expected F64, F32, F16 or BF16)",
                       peft::FileError);
  CHECK_THROWS_AS(file.read<float>("ids"), peft::FileError);
  CHECK(file.info("as_float").dtype == io::Dtype::F32);
  CHECK(file.read<float>("as_float")[5] == -100.0f);
}

TEST_CASE(
    "safetensors: I32 (the reference's index tensors) reads as int64 only, written in range") {
  const std::vector<std::int64_t> values = {0,
                                            -1,
                                            11007,
                                            std::numeric_limits<std::int32_t>::min(),
                                            std::numeric_limits<std::int32_t>::max(),
                                            7};
  io::SafetensorsWriter writer;
  writer.add<std::int64_t>("indices", {2, 3}, values, io::Dtype::I32);
  writer.add<float>("weight", {1}, std::vector<float>{1.5f});
  const auto bytes = writer.to_bytes();
  const auto file = io::SafetensorsFile::from_bytes(bytes, "i32.safetensors");
  CHECK(file.info("indices").dtype == io::Dtype::I32);
  CHECK(file.info("indices").byte_size() == 24);
  CHECK(file.read<std::int64_t>("indices", {2, 3}) == values);
  CHECK_THROWS_WITH_AS(file.read<float>("indices"),
                       "i32.safetensors: tensor 'indices' has dtype I32, cannot be read as float "
                       "(expected F64, F32, F16 or BF16)",
                       peft::FileError);
  // The Rust writer's order: F32 before I32 in the data section.
  CHECK(file.info("weight").begin == 0);
  CHECK(file.info("indices").begin == 4);
  io::SafetensorsWriter bad;
  CHECK_THROWS_WITH_AS(
      bad.add<std::int64_t>("big", {1}, std::vector<std::int64_t>{1LL << 31}, io::Dtype::I32),
      doctest::Contains("beyond I32's range"), peft::ConfigError);
  CHECK_THROWS_WITH_AS(bad.add<float>("f", {1}, std::vector<float>{1.0f}, io::Dtype::I32),
                       doctest::Contains("cannot be stored as I32"), peft::ConfigError);
}

TEST_CASE("safetensors: scalars and empty tensors") {
  io::SafetensorsWriter writer;
  writer.add<float>("scalar", {}, std::vector<float>{2.5f});
  writer.add<float>("empty", {0, 4}, std::vector<float>{});
  writer.add<float>("after", {1}, std::vector<float>{7.0f});
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "small.safetensors");
  CHECK(file.read<float>("scalar", {}) == std::vector<float>{2.5f});
  CHECK(file.read<float>("empty", {0, 4}).empty());
  CHECK(file.info("empty").numel() == 0);
  CHECK(file.read<float>("after") == std::vector<float>{7.0f});

  // A file with no tensors at all is valid.
  const auto none = io::SafetensorsFile::from_bytes(io::SafetensorsWriter().to_bytes(), "none");
  CHECK(none.tensors().empty());
  CHECK(none.metadata().empty());
}

TEST_CASE("safetensors: writer layout matches the format") {
  const Bytes bytes = valid_file();
  const std::uint64_t length = header_length(bytes);
  CHECK((8 + length) % 8 == 0);
  const std::string header = header_text(bytes);
  CHECK(header.front() == '{');
  CHECK(header.find_last_not_of(' ') == header.rfind('}'));  // only spaces after the JSON
  const json parsed = json::parse(header);
  CHECK(parsed["__metadata__"] == json({{"format", "pt"}}));
  CHECK(parsed["beta"]["data_offsets"] == json({0, 16}));
  CHECK(parsed["alpha"]["data_offsets"] == json({16, 40}));
  CHECK(parsed["gamma"]["data_offsets"] == json({40, 48}));
  CHECK(parsed["gamma"]["dtype"] == "BF16");
  CHECK(parsed["alpha"]["shape"] == json({2, 3}));
  CHECK(bytes.size() == 8 + length + 48);
  // Keys in sorted order.
  CHECK(header.find("\"__metadata__\"") < header.find("\"alpha\""));
  CHECK(header.find("\"alpha\"") < header.find("\"beta\""));
  CHECK(header.find("\"beta\"") < header.find("\"gamma\""));

  // Every tensor starts aligned to its element size, whatever the mix of dtypes (the Python
  // writer's order: widest dtype first, then by name).
  io::SafetensorsWriter mixed;
  mixed.add<float>("a_half", {3}, std::vector<float>{1, 2, 3}, io::Dtype::F16);
  mixed.add<float>("b_brain", {1}, std::vector<float>{1}, io::Dtype::BF16);
  mixed.add<float>("c_single", {1}, std::vector<float>{1}, io::Dtype::F32);
  mixed.add<double>("d_double", {1}, std::vector<double>{1}, io::Dtype::F64);
  mixed.add<std::int64_t>("e_long", {1}, std::vector<std::int64_t>{1}, io::Dtype::I64);
  mixed.add<std::int64_t>("f_long", {1}, std::vector<std::int64_t>{2}, io::Dtype::I64);
  const Bytes mixed_bytes = mixed.to_bytes();
  CHECK((8 + header_length(mixed_bytes)) % 8 == 0);
  const auto mixed_file = io::SafetensorsFile::from_bytes(mixed_bytes, "mixed.safetensors");
  for (const io::TensorInfo& info : mixed_file.tensors()) {
    CHECK_MESSAGE(info.begin % io::dtype_size(info.dtype) == 0, info.name);
  }
  CHECK(mixed_file.info("e_long").begin == 0);
  CHECK(mixed_file.info("f_long").begin == 8);
  CHECK(mixed_file.info("d_double").begin == 16);
  CHECK(mixed_file.info("c_single").begin == 24);
  CHECK(mixed_file.info("b_brain").begin == 28);
  CHECK(mixed_file.info("a_half").begin == 30);
  CHECK(mixed_file.read<std::int64_t>("f_long") == std::vector<std::int64_t>{2});

  // No metadata set: no __metadata__ key.
  io::SafetensorsWriter plain;
  plain.add<float>("w", {1}, std::vector<float>{1.0f});
  CHECK(!has(header_text(plain.to_bytes()), "__metadata__"));
}

TEST_CASE("safetensors: metadata round trip") {
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "line1\nline2 \"quoted\" \xc3\xa9");
  writer.add<float>("w", {1}, std::vector<float>{1.0f});
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "meta.safetensors");
  const std::map<std::string, std::string> expected = {
      {"format", "pt"}, {"note", "line1\nline2 \"quoted\" \xc3\xa9"}};
  CHECK(file.metadata() == expected);
  CHECK(file.tensors().size() == 1);
  CHECK(!file.contains("__metadata__"));
}

TEST_CASE("safetensors: file written, then read back; tensors sorted by name") {
  const auto dir = scratch_dir("write_read");
  const auto path = dir / "model.safetensors";
  io::SafetensorsWriter writer;
  writer.add<float>("z.weight", {2, 2}, std::vector<float>{1, 2, 3, 4});
  writer.add<double>("a.bias", {2}, std::vector<double>{0.5, -0.5}, io::Dtype::F64);
  writer.add<std::int64_t>("m.ids", {3}, std::vector<std::int64_t>{1, 2, 3}, io::Dtype::I64);
  writer.set_metadata("format", "pt");
  writer.write(path);
  CHECK(std::filesystem::exists(path));
  CHECK(!std::filesystem::exists(dir / "model.safetensors.tmp"));

  const auto file = io::SafetensorsFile::open(path);
  CHECK(file.name() == path.string());
  REQUIRE(file.tensors().size() == 3);
  CHECK(file.tensors()[0].name == "a.bias");
  CHECK(file.tensors()[1].name == "m.ids");
  CHECK(file.tensors()[2].name == "z.weight");
  CHECK(file.read<float>("z.weight", {2, 2}) == std::vector<float>{1, 2, 3, 4});
  CHECK(file.read<double>("a.bias") == std::vector<double>{0.5, -0.5});
  CHECK(file.read<std::int64_t>("m.ids") == std::vector<std::int64_t>{1, 2, 3});
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.contains("m.ids"));
  CHECK(!file.contains("m"));

  // Overwriting an existing file works (rename replaces it).
  io::SafetensorsWriter second;
  second.add<float>("only", {1}, std::vector<float>{9.0f});
  second.write(path);
  CHECK(io::SafetensorsFile::open(path).tensors().size() == 1);

  CHECK_THROWS_WITH_AS(writer.write(dir / "no_such_dir" / "x.safetensors"),
                       doctest::Contains("x.safetensors"), peft::FileError);
  CHECK_THROWS_WITH_AS(io::SafetensorsFile::open(dir / "missing.safetensors"),
                       doctest::Contains("missing.safetensors: file not found"), peft::FileError);
  CHECK_THROWS_WITH_AS(io::SafetensorsFile::open(dir), doctest::Contains("not a regular file"),
                       peft::FileError);
  std::filesystem::remove_all(dir);
}

TEST_CASE("safetensors: writer refuses misuse") {
  io::SafetensorsWriter writer;
  writer.add<float>("w", {2}, std::vector<float>{1, 2});
  CHECK_THROWS_WITH_AS(writer.add<float>("w", {2}, std::vector<float>{1, 2}),
                       doctest::Contains("duplicate tensor name 'w'"), peft::ConfigError);
  CHECK_THROWS_WITH_AS(writer.add<float>("v", {2, 2}, std::vector<float>{1, 2}),
                       doctest::Contains("4 elements"), peft::ShapeError);
  CHECK_THROWS_AS(writer.add<float>("v", {-1}, std::vector<float>{}), peft::ConfigError);
  CHECK_THROWS_AS(writer.add<float>("__metadata__", {1}, std::vector<float>{1}), peft::ConfigError);
  CHECK_THROWS_AS(writer.add<float>("v", {1}, std::vector<float>{1}, io::Dtype::I64),
                  peft::ConfigError);
  CHECK_THROWS_AS(writer.add<float>("bad\xff", {1}, std::vector<float>{1}), peft::ConfigError);
  CHECK_THROWS_AS(writer.add_raw("r", io::Dtype::F32, {1}, Bytes{1, 2, 3}), peft::ShapeError);
  // The failed adds left nothing behind.
  const auto file = io::SafetensorsFile::from_bytes(writer.to_bytes(), "w.safetensors");
  CHECK(file.tensors().size() == 1);
}

TEST_CASE("safetensors: add_raw copies a tensor unchanged") {
  const auto source = io::SafetensorsFile::from_bytes(valid_file(), "src.safetensors");
  io::SafetensorsWriter writer;
  for (const io::TensorInfo& info : source.tensors()) {
    writer.add_raw(info.name, info.dtype, info.shape, source.raw_bytes(info.name));
  }
  writer.set_metadata("format", "pt");
  CHECK(writer.to_bytes() == valid_file());
}

// ------------------------------------------------------------------------------------------
// Reading errors on valid files

TEST_CASE("safetensors: read with the wrong expected shape, missing tensor, wrong type") {
  const auto file = io::SafetensorsFile::from_bytes(valid_file(), kFile);
  CHECK_THROWS_WITH_AS(file.read<float>("alpha", {3, 2}),
                       "bad.safetensors: tensor 'alpha' has shape [2, 3], expected [3, 2]",
                       peft::FileError);
  CHECK_THROWS_WITH_AS(file.read<float>("alpha", {6}),
                       "bad.safetensors: tensor 'alpha' has shape [2, 3], expected [6]",
                       peft::FileError);
  CHECK_THROWS_WITH_AS(file.read<float>("zeta"), "bad.safetensors: no tensor 'zeta'",
                       peft::FileError);
  CHECK_THROWS_WITH_AS(file.info("zeta"), "bad.safetensors: no tensor 'zeta'", peft::FileError);
  CHECK_THROWS_WITH_AS(file.raw_bytes("zeta"), "bad.safetensors: no tensor 'zeta'",
                       peft::FileError);
  try {
    (void)file.read<std::int64_t>("alpha");
    FAIL("reading F32 as int64 should throw");
  } catch (const peft::FileError& e) {
    const std::string message = e.what();
    CHECK(has(message, kFile));
    CHECK(has(message, "'alpha'"));
    CHECK(has(message, "F32"));
    CHECK(has(message, "int64"));
  }
  CHECK(file.read<std::int64_t>("beta") == std::vector<std::int64_t>{-7, 1LL << 40});
  CHECK(file.read<float>("gamma") == std::vector<float>{0.5f, -1.0f, 2.0f, 3.0f});
}

// ------------------------------------------------------------------------------------------
// Malformed files: one defect each

TEST_CASE("safetensors malformed: truncated file") {
  const Bytes valid = valid_file();
  for (const std::size_t length : {0, 1, 7}) {
    const std::string message = open_error(Bytes(valid.begin(), valid.begin() + length));
    CHECK(has(message, "is " + std::to_string(length) + " bytes, expected at least 8"));
  }
  const std::uint64_t header = header_length(valid);
  for (const std::size_t length :
       {std::size_t{8}, std::size_t{9}, static_cast<std::size_t>(8 + header / 2),
        static_cast<std::size_t>(8 + header - 1)}) {
    const std::string message = open_error(Bytes(valid.begin(), valid.begin() + length));
    CHECK(has(message, "header length " + std::to_string(header) + " is larger than the " +
                           std::to_string(length - 8) + " bytes"));
  }
  // Header complete, data cut short: the last tensor runs past the end.
  for (const std::size_t cut : {1, 8, 9, 40}) {
    const std::string message = open_error(Bytes(valid.begin(), valid.end() - cut));
    CHECK(has(message, "past the end of the data section"));
  }
  // Cut the data section down to nothing.
  const std::string message = open_error(Bytes(valid.begin(), valid.end() - 48));
  CHECK(has(message, "past the end of the data section (0 bytes)"));
}

TEST_CASE("safetensors malformed: header length lies") {
  const Bytes valid = valid_file();
  const std::uint64_t rest = valid.size() - 8;
  std::string message = open_error(with_length_prefix(valid, rest + 1));
  CHECK(has(message, "header length " + std::to_string(rest + 1) + " is larger than the " +
                         std::to_string(rest) + " bytes that follow it"));
  message = open_error(with_length_prefix(valid, 1ULL << 63));
  CHECK(has(message, "header length 9223372036854775808 exceeds the limit of 104857600"));
  message = open_error(with_length_prefix(valid, std::numeric_limits<std::uint64_t>::max()));
  CHECK(has(message, "exceeds the limit"));
  // Too short: the JSON is cut off.
  message = open_error(with_length_prefix(valid, header_length(valid) - 10));
  CHECK(has(message, "invalid JSON"));
  // Length 0: empty header.
  message = open_error(with_length_prefix(valid, 0));
  CHECK(has(message, "invalid JSON"));
}

TEST_CASE("safetensors malformed: header larger than the bound") {
  const Bytes valid = valid_file();
  const std::string message =
      open_error(with_length_prefix(valid, io::kMaxSafetensorsHeaderBytes + 1));
  CHECK(has(message, "header length 104857601 exceeds the limit of 104857600 bytes"));
}

TEST_CASE("safetensors malformed: header is not valid JSON") {
  const Bytes data = data_section(valid_file());
  for (const std::string& header :
       {std::string("{not json}     "), std::string("{\"a\": {\"dtype\": \"F32\",}}"),
        std::string("{\"a\": 1} trailing"), std::string("{\"x\": NaN}"),
        std::string("{\"x\": \"\xff\xfe\"}"), std::string("{} // comment"),
        std::string("{\"x\": \"a\0b\"}", 12)}) {
    const std::string message = open_error(assemble(header, data));
    CHECK(has(message, "invalid JSON"));
  }
  // The position of the error is reported.
  const std::string message = open_error(assemble("{\"alpha\": ?}", data));
  CHECK(has(message, "at byte offset 10"));
}

TEST_CASE("safetensors malformed: header JSON is not an object") {
  const Bytes data = data_section(valid_file());
  for (const char* header : {"[1, 2]", "\"text\"", "42", "null", "true"}) {
    const std::string message = open_error(assemble(header, data));
    CHECK(has(message, "header expected a JSON object"));
  }
}

TEST_CASE("safetensors malformed: missing dtype, shape or data_offsets") {
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    const std::string message = open_error(with_header([&](json& h) { h["beta"].erase(field); }));
    CHECK(has(message, "tensor 'beta' is missing field '" + std::string(field) + "'"));
  }
  const std::string message =
      open_error(with_header([](json& h) { h["beta"]["extra"] = "surprise"; }));
  CHECK(has(message, "tensor 'beta' has unexpected field 'extra'"));
}

TEST_CASE("safetensors malformed: fields of the wrong type") {
  struct Case {
    std::function<void(json&)> mutate;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {[](json& h) { h["alpha"] = 7; }, "tensor 'alpha' expected an object"},
      {[](json& h) { h["alpha"] = json::array(); }, "tensor 'alpha' expected an object"},
      {[](json& h) { h["alpha"]["dtype"] = 5; },
       "tensor 'alpha' field 'dtype' expected a string, found number 5"},
      {[](json& h) { h["alpha"]["dtype"] = nullptr; },
       "field 'dtype' expected a string, found null"},
      {[](json& h) { h["alpha"]["shape"] = "2x3"; },
       "tensor 'alpha' field 'shape' expected an array of non-negative integers, found string"},
      {[](json& h) {
         h["alpha"]["shape"] = {2.0, 3};
       },
       "tensor 'alpha' field 'shape[0]' expected a non-negative integer, found number 2.0"},
      {[](json& h) {
         h["alpha"]["shape"] = {"2", 3};
       },
       "field 'shape[0]' expected a non-negative integer, found string"},
      {[](json& h) {
         h["alpha"]["shape"] = {json::array(), 3};
       },
       "found array"},
      {[](json& h) { h["alpha"]["data_offsets"] = json::object(); },
       "tensor 'alpha' field 'data_offsets' expected an array of 2 non-negative integers"},
      {[](json& h) {
         h["alpha"]["data_offsets"] = {16, 40, 40};
       },
       "found array of 3 elements"},
      {[](json& h) { h["alpha"]["data_offsets"] = {16}; }, "found array of 1 elements"},
      {[](json& h) {
         h["alpha"]["data_offsets"] = {16.0, 40};
       },
       "field 'data_offsets[0]' expected a non-negative integer, found number 16.0"},
      {[](json& h) {
         h["alpha"]["data_offsets"] = {16, "40"};
       },
       "field 'data_offsets[1]' expected a non-negative integer, found string"},
      {[](json& h) {
         h["alpha"]["data_offsets"] = {-1, 40};
       },
       "field 'data_offsets[0]' expected a non-negative integer, found number -1"},
  };
  for (const Case& test_case : cases) {
    const std::string message = open_error(with_header(test_case.mutate));
    CHECK_MESSAGE(has(message, test_case.expected), message);
  }
}

TEST_CASE("safetensors malformed: integers beyond 64 bits") {
  // 2^64 does not fit any integer type, so the parser turns it into a float: refused.
  const Bytes valid = valid_file();
  std::string header = header_text(valid);
  const std::string from = "\"data_offsets\":[16,40]";
  REQUIRE(header.find(from) != std::string::npos);
  header.replace(header.find(from), from.size(), "\"data_offsets\":[16,18446744073709551616]");
  std::string message = open_error(assemble(header, data_section(valid)));
  CHECK(has(message, "tensor 'alpha' field 'data_offsets[1]' expected a non-negative integer"));
  // A dimension above INT64_MAX cannot be stored in the shape.
  message = open_error(with_header([](json& h) {
    h["alpha"]["shape"] = {std::uint64_t{1} << 63, 0};
  }));
  CHECK(has(message, "tensor 'alpha' shape[0] = 9223372036854775808 does not fit in int64"));
}

TEST_CASE("safetensors malformed: negative shape entry") {
  const std::string message = open_error(with_header([](json& h) {
    h["alpha"]["shape"] = {-2, -3};
  }));
  CHECK(has(message,
            "tensor 'alpha' field 'shape[0]' expected a non-negative integer, "
            "found number -2"));
}

TEST_CASE("safetensors malformed: unknown dtype") {
  for (const char* dtype : {"F8_E4M3", "I16", "i32", "f32", "", "BOOL", "U8"}) {
    const std::string message =
        open_error(with_header([&](json& h) { h["alpha"]["dtype"] = dtype; }));
    CHECK(has(message, "tensor 'alpha' has unsupported dtype '" + std::string(dtype) + "'"));
    CHECK(has(message, "expected one of F64, F32, F16, BF16, I64, I32"));
  }
}

TEST_CASE("safetensors malformed: reversed offsets") {
  const std::string message = open_error(with_header([](json& h) {
    h["alpha"]["data_offsets"] = {24, 0};
  }));
  CHECK(has(message, "tensor 'alpha' has data_offsets [24, 0]: begin is after end"));
}

TEST_CASE("safetensors malformed: offsets past the end") {
  std::string message = open_error(with_header([](json& h) {
    h["gamma"]["data_offsets"] = {40, 56};
  }));
  CHECK(has(message,
            "tensor 'gamma' has data_offsets [40, 56] past the end of the data section "
            "(48 bytes)"));
  message = open_error(with_header([](json& h) {
    h["gamma"]["data_offsets"] = {std::numeric_limits<std::uint64_t>::max() - 7,
                                  std::numeric_limits<std::uint64_t>::max()};
  }));
  CHECK(has(message, "tensor 'gamma'"));
  CHECK(has(message, "past the end"));
}

TEST_CASE("safetensors malformed: overlapping tensors") {
  // alpha moved onto the tail of beta; the data section keeps its size, so the bytes [32, 40)
  // would also be a hole, but the overlap comes first in offset order.
  const std::string message = open_error(with_header([](json& h) {
    h["alpha"]["data_offsets"] = {8, 32};
  }));
  CHECK(has(message, "tensors 'beta' (bytes [0, 16)) and 'alpha' (bytes [8, 32)) overlap"));
  // Two names for exactly the same bytes.
  const std::string same = open_error(with_header([](json& h) { h["delta"] = h["gamma"]; }));
  CHECK(has(same, "'delta'"));
  CHECK(has(same, "'gamma'"));
  CHECK(has(same, "overlap"));
  // An empty tensor placed inside another one.
  const std::string inside = open_error(with_header([](json& h) {
    h["empty"] = {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {4, 4}}};
  }));
  CHECK(has(inside, "'empty'"));
  CHECK(has(inside, "overlap"));
}

TEST_CASE("safetensors malformed: holes in the data section") {
  // Eight bytes inserted before gamma, gamma moved after them.
  std::string message = open_error(with_header(
      [](json& h) {
        h["gamma"]["data_offsets"] = {48, 56};
      },
      [](Bytes& data) { data.insert(data.begin() + 40, 8, 0); }));
  CHECK(has(message, "hole in the data section: bytes [40, 48) before tensor 'gamma'"));
  CHECK(has(message, "previous tensor 'alpha' ends at 40"));
  // Eight bytes before the first tensor.
  message = open_error(with_header(
      [](json& h) {
        h["beta"]["data_offsets"] = {8, 24};
        h["alpha"]["data_offsets"] = {24, 48};
        h["gamma"]["data_offsets"] = {48, 56};
      },
      [](Bytes& data) { data.insert(data.begin(), 8, 0); }));
  CHECK(has(message, "bytes [0, 8) before tensor 'beta' belong to no tensor"));
  // Trailing bytes after the last tensor.
  message = open_error(with_header([](json&) {}, [](Bytes& data) { data.push_back(0); }));
  CHECK(has(message, "data section has 49 bytes but the tensors cover 48"));
  // No tensors but data present.
  message = open_error(assemble("{}      ", Bytes(8, 0)));
  CHECK(has(message, "data section has 8 bytes but the tensors cover 0"));
}

TEST_CASE("safetensors malformed: shape product overflowing uint64") {
  std::string message = open_error(with_header([](json& h) {
    h["alpha"]["shape"] = {std::uint64_t{1} << 32, std::uint64_t{1} << 32, 1};
  }));
  CHECK(has(message,
            "tensor 'alpha' has shape [4294967296, 4294967296, 1] whose size in F32 "
            "overflows 64 bits"));
  // A wrapped product would be exactly 0 here: 2^62 * 4 bytes = 2^64.
  message = open_error(with_header([](json& h) {
    h["alpha"]["shape"] = {std::uint64_t{1} << 62};
    h["alpha"]["data_offsets"] = {0, 0};
  }));
  CHECK(has(message, "tensor 'alpha'"));
  CHECK(has(message, "overflows 64 bits"));
  // An overflowing prefix is refused even if a later 0 makes the product 0.
  message = open_error(with_header([](json& h) {
    h["alpha"]["shape"] = {std::uint64_t{1} << 40, std::uint64_t{1} << 40, 0};
  }));
  CHECK(has(message, "overflows 64 bits"));
}

TEST_CASE("safetensors malformed: shape product not matching the byte length") {
  std::string message = open_error(with_header([](json& h) { h["alpha"]["shape"] = {2, 2}; }));
  CHECK(has(message,
            "tensor 'alpha' has shape [2, 2] and dtype F32, expected 16 bytes, found "
            "data_offsets [16, 40] spanning 24 bytes"));
  // Right shape, wrong dtype size.
  message = open_error(with_header([](json& h) { h["alpha"]["dtype"] = "F64"; }));
  CHECK(has(message, "tensor 'alpha' has shape [2, 3] and dtype F64, expected 48 bytes"));
}

TEST_CASE("safetensors malformed: metadata that is not an object of strings") {
  std::string message = open_error(with_header([](json& h) { h["__metadata__"]["format"] = 1; }));
  CHECK(has(message, "'__metadata__' entry 'format' expected a string, found number 1"));
  message = open_error(with_header([](json& h) { h["__metadata__"]["nested"] = {{"a", "b"}}; }));
  CHECK(has(message, "'__metadata__' entry 'nested' expected a string, found object"));
  message = open_error(with_header([](json& h) { h["__metadata__"] = "pt"; }));
  CHECK(has(message, "'__metadata__' expected an object of strings, found string"));
  message = open_error(with_header([](json& h) { h["__metadata__"] = nullptr; }));
  CHECK(has(message, "'__metadata__' expected an object of strings, found null"));
}

TEST_CASE("safetensors malformed: duplicate keys and absurd nesting") {
  const Bytes valid = valid_file();
  const Bytes data = data_section(valid);
  // The same tensor twice; a reader keeping the first and one keeping the last would disagree.
  std::string header = header_text(valid);
  const std::size_t close = header.rfind('}');
  header.insert(close, ",\"alpha\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]}");
  std::string message = open_error(assemble(header, data));
  CHECK(has(message, "duplicate JSON key 'alpha'"));
  // A duplicated field inside one entry.
  message = open_error(
      assemble("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,4]}}",
               Bytes(4, 0)));
  CHECK(has(message, "duplicate JSON key 'dtype'"));
  // Deep nesting is refused early instead of built.
  message = open_error(assemble(
      "{\"__metadata__\":" + std::string(10000, '[') + std::string(10000, ']') + "}", Bytes{}));
  CHECK(has(message, "nests deeper than"));
}

TEST_CASE("safetensors malformed: control characters in names stay on one line") {
  const std::string message = open_error(with_header([](json& h) {
    h["evil\nname"] = h["alpha"];
    h.erase("alpha");
    h["evil\nname"]["dtype"] = "I16";
  }));
  CHECK(has(message, "tensor 'evil\\x0aname'"));
}

// ------------------------------------------------------------------------------------------
// Fuzzing

TEST_CASE("safetensors fuzz: random mutations never crash; open succeeds or throws FileError") {
  const Bytes valid = valid_file();
  const std::size_t header_end = static_cast<std::size_t>(8 + header_length(valid));
  std::mt19937_64 rng(0x5afe7e45);
  const auto pick = [&rng](std::size_t bound) {  // uniform in [0, bound)
    return static_cast<std::size_t>(rng() % bound);
  };
  static constexpr char kJsonChars[] = "{}[]\",:0123456789-.eE aFIB_";
  int accepted = 0;
  int rejected = 0;
  int wrong_exception = 0;
  for (int iteration = 0; iteration < 2000; ++iteration) {
    Bytes bytes = valid;
    const int mutations = 1 + static_cast<int>(pick(3));
    for (int m = 0; m < mutations && !bytes.empty(); ++m) {
      switch (pick(8)) {
        case 0:  // flip a bit anywhere
          bytes[pick(bytes.size())] ^= static_cast<std::uint8_t>(1u << pick(8));
          break;
        case 1:  // truncate
          bytes.resize(pick(bytes.size() + 1));
          break;
        case 2:  // a JSON-ish character inside the header
          if (bytes.size() > 8) {
            bytes[8 + pick(std::min(bytes.size(), header_end) - 8)] =
                static_cast<std::uint8_t>(kJsonChars[pick(sizeof(kJsonChars) - 1)]);
          }
          break;
        case 3: {  // change a digit in the header (offsets, shapes) keeping the JSON valid
          std::vector<std::size_t> digits;
          for (std::size_t i = 8; i < std::min(bytes.size(), header_end); ++i) {
            if (bytes[i] >= '0' && bytes[i] <= '9') digits.push_back(i);
          }
          if (!digits.empty())
            bytes[digits[pick(digits.size())]] = static_cast<std::uint8_t>('0' + pick(10));
          break;
        }
        case 4:  // a lying header length
          if (bytes.size() >= 8) {
            const std::uint64_t length = pick(2) == 0 ? header_length(bytes) + pick(17) - 8 : rng();
            std::memcpy(bytes.data(), &length, 8);
          }
          break;
        case 5:  // insert a byte
          bytes.insert(bytes.begin() + static_cast<std::ptrdiff_t>(pick(bytes.size() + 1)),
                       static_cast<std::uint8_t>(rng()));
          break;
        case 6:  // delete a byte
          bytes.erase(bytes.begin() + static_cast<std::ptrdiff_t>(pick(bytes.size())));
          break;
        default:  // random garbage appended
          for (std::size_t k = pick(16); k > 0; --k)
            bytes.push_back(static_cast<std::uint8_t>(rng()));
          break;
      }
    }
    try {
      const auto file = io::SafetensorsFile::from_bytes(bytes, "fuzz.safetensors");
      // Whatever was accepted must be fully readable.
      for (const io::TensorInfo& info : file.tensors()) {
        const auto values = file.read<double>(info.name, info.shape);
        if (static_cast<std::int64_t>(values.size()) != info.numel()) ++wrong_exception;
        if (info.dtype == io::Dtype::I64) (void)file.read<std::int64_t>(info.name);
      }
      ++accepted;
    } catch (const peft::FileError& e) {
      if (!has(e.what(), "fuzz.safetensors")) ++wrong_exception;
      ++rejected;
    } catch (const std::exception& e) {
      ++wrong_exception;
      MESSAGE("unexpected exception: " << e.what());
    }
  }
  CHECK(wrong_exception == 0);
  CHECK(accepted + rejected == 2000);
  CHECK(rejected > 0);
  MESSAGE("fuzz: " << accepted << " accepted, " << rejected << " rejected");
}

// ------------------------------------------------------------------------------------------
// Reference files from the Python stack, when the checkout has them

namespace {
// The build passes PEFT_GOLDEN_DIR as a macro; without it, look in the usual places.
std::filesystem::path golden_dir() {
#ifdef PEFT_GOLDEN_DIR
  if (std::filesystem::is_directory(PEFT_GOLDEN_DIR)) return PEFT_GOLDEN_DIR;
#endif
  for (const char* candidate :
       {"shared/golden", "../shared/golden", "../../shared/golden", "/work/shared/golden"}) {
    if (std::filesystem::is_directory(candidate)) return candidate;
  }
  return {};
}
}  // namespace

TEST_CASE("safetensors: reads files written by the Python reference stack") {
  const auto dir = golden_dir();
  if (dir.empty()) {
    MESSAGE("golden files not found; skipped");
    return;
  }
  const auto model_path = dir / "models" / "gpt2-tiny" / "model.safetensors";
  if (std::filesystem::exists(model_path)) {
    const auto model = io::SafetensorsFile::open(model_path);
    CHECK(model.metadata().at("format") == "pt");
    CHECK(!model.tensors().empty());
    for (const io::TensorInfo& info : model.tensors()) {
      CHECK(info.dtype == io::Dtype::F32);
      const auto values = model.read<float>(info.name, info.shape);
      CHECK(static_cast<std::int64_t>(values.size()) == info.numel());
    }
  }
  const auto expected_path = dir / "gpt2_lora" / "expected.safetensors";
  if (std::filesystem::exists(expected_path)) {
    const auto expected = io::SafetensorsFile::open(expected_path);
    const io::TensorInfo& ids = expected.info("input_ids");
    CHECK(ids.dtype == io::Dtype::I64);
    REQUIRE(ids.shape.size() == 2);
    const auto input_ids = expected.read<std::int64_t>("input_ids", ids.shape);
    const auto labels = expected.read<std::int64_t>("labels", ids.shape);
    const auto mask = expected.read<std::int64_t>("attention_mask", ids.shape);
    for (std::size_t i = 0; i < input_ids.size(); ++i) {
      CHECK(input_ids[i] >= 0);
      CHECK((mask[i] == 0 || mask[i] == 1));
      CHECK(labels[i] == (mask[i] == 1 ? input_ids[i] : -100));
    }
    const auto loss = expected.read<float>("loss", {1});
    CHECK(std::isfinite(loss[0]));
  }
}

// ------------------------------------------------------------------------------------------
// JSON helpers

TEST_CASE("json: load_json refuses missing, oversized and malformed files") {
  const auto dir = scratch_dir("load_json");
  CHECK_THROWS_WITH_AS(io::load_json(dir / "absent.json"),
                       doctest::Contains("absent.json: file not found"), peft::FileError);
  const auto write_text = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name, std::ios::binary) << text;
    return dir / name;
  };
  const auto bad = write_text("bad.json", "{\n  \"r\": 8,\n  \"alpha\": ,\n}");
  try {
    (void)io::load_json(bad);
    FAIL("expected FileError");
  } catch (const peft::FileError& e) {
    const std::string message = e.what();
    CHECK(has(message, "bad.json"));
    CHECK(has(message, "line 3"));
    CHECK(!has(message, "\n"));
  }
  CHECK_THROWS_WITH_AS(io::load_json(write_text("dup.json", "{\"r\": 1, \"r\": 2}")),
                       doctest::Contains("duplicate JSON key 'r'"), peft::FileError);
  {
    std::ofstream big(dir / "big.json", std::ios::binary);
    big << "[" << std::string(io::kMaxJsonFileBytes, ' ') << "]";
  }
  CHECK_THROWS_WITH_AS(io::load_json(dir / "big.json"), doctest::Contains("over the limit"),
                       peft::FileError);
  const json good = io::load_json(write_text("good.json", "{\"r\": 8, \"name\": \"x\"}"));
  CHECK(good["r"] == 8);
  std::filesystem::remove_all(dir);
}

TEST_CASE("json: json_get and json_get_or check types") {
  const json config = json::parse(R"({"r": 8, "alpha": 16.5, "name": "lora", "on": true,
      "targets": ["q", "v"], "bad_targets": ["q", 3], "neg": -1, "big": 4294967296,
      "frac": 4.5, "nothing": null, "ranks": {"a": 1, "b": 2}})");
  const std::string file = "adapter_config.json";
  CHECK(io::json_get<int>(config, "r", file) == 8);
  CHECK(io::json_get<double>(config, "r", file) == 8.0);
  CHECK(io::json_get<double>(config, "alpha", file) == 16.5);
  CHECK(io::json_get<std::string>(config, "name", file) == "lora");
  CHECK(io::json_get<bool>(config, "on", file));
  CHECK(io::json_get<std::vector<std::string>>(config, "targets", file) ==
        std::vector<std::string>{"q", "v"});
  CHECK(io::json_get<std::map<std::string, int>>(config, "ranks", file).at("b") == 2);
  CHECK(io::json_get<std::int64_t>(config, "big", file) == 4294967296LL);

  CHECK_THROWS_WITH_AS(io::json_get<int>(config, "missing", file),
                       "adapter_config.json: field 'missing' expected integer, found nothing "
                       "(missing)",
                       peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<int>(config, "name", file),
                       "adapter_config.json: field 'name' expected integer, found string \"lora\"",
                       peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<int>(config, "frac", file),
                       doctest::Contains("field 'frac' expected integer, found number 4.5"),
                       peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<int>(config, "big", file),
                       doctest::Contains("field 'big' expected integer in ["), peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<unsigned>(config, "neg", file),
                       doctest::Contains("expected non-negative integer, found number -1"),
                       peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<std::vector<std::string>>(config, "bad_targets", file),
                       doctest::Contains("field 'bad_targets[1]' expected string, found number 3"),
                       peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<bool>(config, "r", file),
                       doctest::Contains("field 'r' expected boolean, found number 8"),
                       peft::FileError);
  CHECK_THROWS_WITH_AS(io::json_get<int>(json::array(), "r", file),
                       doctest::Contains("expected a JSON object"), peft::FileError);

  CHECK(io::json_get_or(config, "missing", 4, file) == 4);
  CHECK(io::json_get_or(config, "nothing", 0.5, file) == 0.5);
  CHECK(io::json_get_or(config, "r", 4, file) == 8);
  CHECK(io::json_get_or(config, "missing", "default", file) == "default");
  CHECK(io::json_get_or(config, "name", "default", file) == "lora");
  CHECK_THROWS_AS(io::json_get_or(config, "name", 4, file), peft::FileError);
}

// ------------------------------------------------------------------------------------------
// peft inspect

TEST_CASE("inspect: lists tensors aligned, reports errors in one line") {
  const auto dir = scratch_dir("inspect");
  const auto path = dir / "listing.safetensors";
  io::SafetensorsWriter writer;
  writer.add<float>("a.long.tensor.name", {2, 3}, std::vector<float>(6, 1.0f));
  writer.add<std::int64_t>("ids", {4}, std::vector<std::int64_t>(4, 1), io::Dtype::I64);
  writer.add<float>("s", {}, std::vector<float>{1.0f}, io::Dtype::BF16);
  writer.write(path);

  std::ostringstream out;
  std::ostringstream err;
  CHECK(peft::cli::run_inspect({path.string()}, out, err) == 0);
  CHECK(err.str().empty());
  const std::string expected =
      "a.long.tensor.name  F32   [2, 3]\n"
      "ids                 I64   [4]\n"
      "s                   BF16  []\n" +
      path.string() + ": 3 tensors, 11 parameters\n";
  CHECK(out.str() == expected);

  std::ostringstream out2;
  std::ostringstream err2;
  CHECK(peft::cli::run_inspect({}, out2, err2) == 2);
  CHECK(has(err2.str(), "usage"));

  const auto broken = dir / "broken.safetensors";
  {
    Bytes bytes = valid_file();
    bytes.resize(bytes.size() - 3);
    std::ofstream(broken, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
  }
  std::ostringstream out3;
  std::ostringstream err3;
  CHECK(peft::cli::run_inspect({path.string(), broken.string()}, out3, err3) == 1);
  CHECK(out3.str().empty());
  const std::string error_text = err3.str();
  CHECK(error_text.rfind("peft inspect: error: " + broken.string() + ": ", 0) == 0);
  CHECK(has(error_text, "'gamma'"));
  CHECK(std::count(error_text.begin(), error_text.end(), '\n') == 1);
  std::filesystem::remove_all(dir);
}

}  // namespace test_safetensors
