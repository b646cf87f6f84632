#pragma once
// Reader and writer for the safetensors format (https://github.com/huggingface/safetensors):
//   [u64 little-endian N][N bytes of JSON header, space padded][data section]
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} with offsets
// relative to the data section, plus an optional "__metadata__" object of strings.
//
// The reader treats every file as hostile: nothing in the header is trusted (no allocation, no
// pointer arithmetic) until it has been checked against the real file size, and every failure is
// a peft::FileError whose message names the file, the tensor and what was expected vs found.
// The writer produces files the Python safetensors library reads.
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/float16.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/json.hpp"

namespace peft::io {

// The format is little-endian and this code copies element bytes straight into native values.
static_assert(std::endian::native == std::endian::little,
              "safetensors I/O assumes a little-endian host");
static_assert(std::numeric_limits<float>::is_iec559 && std::numeric_limits<double>::is_iec559,
              "safetensors I/O assumes IEEE 754 float and double");

/// Headers larger than this are refused before any allocation (the reference library uses the
/// same 100 MB order of bound; real headers are kilobytes).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100ull * 1024ull * 1024ull;

enum class Dtype { F64, F32, F16, BF16, I64, I32 };

/// The dtype's name as it is spelled in safetensors headers ("F32", "BF16", ...).
inline std::string_view dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
      return "F64";
    case Dtype::F32:
      return "F32";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::I64:
      return "I64";
    case Dtype::I32:
      return "I32";
  }
  return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
      return 8;
    case Dtype::F32:
      return 4;
    case Dtype::F16:
      return 2;
    case Dtype::BF16:
      return 2;
    case Dtype::I64:
      return 8;
    case Dtype::I32:
      return 4;
  }
  return 0;
}

/// Parses a header dtype name; nullopt for anything this library does not support.
inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (const Dtype dtype :
       {Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::I64, Dtype::I32}) {
    if (dtype_name(dtype) == name) return dtype;
  }
  return std::nullopt;
}

/// F64, F32, F16, BF16; the integer dtypes are I64 and I32 (the reference's index tensors:
/// SHiRA's shira_indices).
inline bool is_floating_dtype(Dtype dtype) { return dtype != Dtype::I64 && dtype != Dtype::I32; }

// ---------------------------------------------------------------------------------------------
// The half-precision conversions (F16, BF16) live in core/float16.hpp, shared with the frozen
// weights; they are also reachable here as peft::io::f16_bits_from and so on.
using float16::bf16_bits_from;
using float16::bf16_bits_to_float;
using float16::f16_bits_from;
using float16::f16_bits_to_float;

// ---------------------------------------------------------------------------------------------

/// One tensor of a safetensors file. Offsets are relative to the start of the data section.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  /// Product of the shape (1 for a scalar). For tensors of a SafetensorsFile it always fits:
  /// the reader checked it against the byte length. Computed unsigned so that a hand-made
  /// TensorInfo with an absurd shape wraps instead of invoking undefined behaviour.
  std::int64_t numel() const {
    std::uint64_t count = 1;
    for (const std::int64_t dim : shape) count *= static_cast<std::uint64_t>(dim);
    return static_cast<std::int64_t>(count);
  }
  std::uint64_t byte_size() const { return end - begin; }
};

/// "[2, 12]", "[]" for a scalar.
inline std::string shape_to_string(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

/// Element types read() returns and SafetensorsWriter::add() accepts.
template <class T>
concept SafetensorsElement =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, std::int64_t>;

namespace detail {

template <class T>
std::string_view element_type_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float";
  } else if constexpr (std::is_same_v<T, double>) {
    return "double";
  } else {
    return "int64";
  }
}

/// Reads one little-endian value from possibly unaligned memory.
template <class V>
V load_unaligned(const std::uint8_t* source) {
  V value;
  std::memcpy(&value, source, sizeof(V));
  return value;
}

/// Converts `count` stored elements of `dtype` starting at `source` to T.
/// The caller has checked that the bytes exist and that the conversion is allowed.
template <SafetensorsElement T>
std::vector<T> decode_elements(Dtype dtype, const std::uint8_t* source, std::size_t count) {
  std::vector<T> out(count);
  const std::size_t stride = dtype_size(dtype);
  const auto convert_each = [&](auto&& load_one) {
    for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<T>(load_one(source + i * stride));
  };
  switch (dtype) {
    case Dtype::F64:
      if constexpr (std::is_same_v<T, double>) {
        if (count != 0) std::memcpy(out.data(), source, count * sizeof(double));
      } else {
        convert_each([](const std::uint8_t* p) { return load_unaligned<double>(p); });
      }
      break;
    case Dtype::F32:
      if constexpr (std::is_same_v<T, float>) {
        if (count != 0) std::memcpy(out.data(), source, count * sizeof(float));
      } else {
        convert_each([](const std::uint8_t* p) { return load_unaligned<float>(p); });
      }
      break;
    case Dtype::F16:
      convert_each([](const std::uint8_t* p) {
        return f16_bits_to_float(load_unaligned<std::uint16_t>(p));
      });
      break;
    case Dtype::BF16:
      convert_each([](const std::uint8_t* p) {
        return bf16_bits_to_float(load_unaligned<std::uint16_t>(p));
      });
      break;
    case Dtype::I64:
      if constexpr (std::is_same_v<T, std::int64_t>) {
        if (count != 0) std::memcpy(out.data(), source, count * sizeof(std::int64_t));
      } else {
        convert_each([](const std::uint8_t* p) { return load_unaligned<std::int64_t>(p); });
      }
      break;
    case Dtype::I32:
      convert_each([](const std::uint8_t* p) { return load_unaligned<std::int32_t>(p); });
      break;
  }
  return out;
}

template <class V>
void store_unaligned(std::uint8_t* target, V value) {
  std::memcpy(target, &value, sizeof(V));
}

/// Header validation, kept apart from SafetensorsFile so its helpers can share the file name.
class HeaderValidator {
 public:
  HeaderValidator(const std::string& display_name, std::uint64_t data_size)
      : file_(printable(display_name)), data_size_(data_size) {}

  [[noreturn]] void fail(const std::string& message) const {
    throw FileError(file_ + ": " + message);
  }
  [[noreturn]] void fail_tensor(const std::string& tensor, const std::string& message) const {
    fail("tensor '" + printable(tensor) + "' " + message);
  }

  std::map<std::string, std::string> parse_metadata(const nlohmann::json& value) const {
    if (!value.is_object()) {
      fail("'__metadata__' expected an object of strings, found " + describe_json(value));
    }
    std::map<std::string, std::string> metadata;
    for (const auto& [key, entry] : value.items()) {
      if (!entry.is_string()) {
        fail("'__metadata__' entry '" + printable(key) + "' expected a string, found " +
             describe_json(entry));
      }
      metadata.emplace(key, entry.get<std::string>());
    }
    return metadata;
  }

  TensorInfo parse_tensor(const std::string& name, const nlohmann::json& entry) const {
    if (!entry.is_object()) {
      fail_tensor(name, "expected an object with dtype, shape and data_offsets, found " +
                            describe_json(entry));
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field))
        fail_tensor(name, std::string("is missing field '") + field + "'");
    }
    for (const auto& [field, unused] : entry.items()) {
      if (field != "dtype" && field != "shape" && field != "data_offsets") {
        fail_tensor(name, "has unexpected field '" + printable(field) +
                              "' (expected only dtype, shape, data_offsets)");
      }
    }

    TensorInfo info;
    info.name = name;

    const nlohmann::json& dtype_value = entry["dtype"];
    if (!dtype_value.is_string()) {
      fail_tensor(name, "field 'dtype' expected a string, found " + describe_json(dtype_value));
    }
    const auto& dtype_text = dtype_value.get_ref<const std::string&>();
    const std::optional<Dtype> dtype = parse_dtype(dtype_text);
    if (!dtype) {
      fail_tensor(name, "has unsupported dtype '" + printable(dtype_text, 40) +
                            "', expected one of F64, F32, F16, BF16, I64, I32");
    }
    info.dtype = *dtype;

    const nlohmann::json& shape_value = entry["shape"];
    if (!shape_value.is_array()) {
      fail_tensor(name, "field 'shape' expected an array of non-negative integers, found " +
                            describe_json(shape_value));
    }
    info.shape.reserve(shape_value.size());
    for (std::size_t i = 0; i < shape_value.size(); ++i) {
      const std::uint64_t dim = non_negative_integer(name, "shape", i, shape_value[i]);
      if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        fail_tensor(name, "shape[" + std::to_string(i) + "] = " + std::to_string(dim) +
                              " does not fit in int64");
      }
      info.shape.push_back(static_cast<std::int64_t>(dim));
    }

    const nlohmann::json& offsets_value = entry["data_offsets"];
    if (!offsets_value.is_array() || offsets_value.size() != 2) {
      fail_tensor(name,
                  "field 'data_offsets' expected an array of 2 non-negative integers, "
                  "found " +
                      describe_json(offsets_value) +
                      (offsets_value.is_array()
                           ? " of " + std::to_string(offsets_value.size()) + " elements"
                           : std::string()));
    }
    info.begin = non_negative_integer(name, "data_offsets", 0, offsets_value[0]);
    info.end = non_negative_integer(name, "data_offsets", 1, offsets_value[1]);
    if (info.begin > info.end) {
      fail_tensor(name, "has data_offsets [" + std::to_string(info.begin) + ", " +
                            std::to_string(info.end) + "]: begin is after end");
    }
    if (info.end > data_size_) {
      fail_tensor(name, "has data_offsets [" + std::to_string(info.begin) + ", " +
                            std::to_string(info.end) + "] past the end of the data section (" +
                            std::to_string(data_size_) + " bytes)");
    }

    // element size * dims, refusing to wrap around: a wrapped product could match the byte
    // length by accident and let a huge shape through. Every running product must fit (as in
    // the reference library), even when a later 0 would bring the total back down; that also
    // keeps every prefix product below 2^63, so numel() is exact.
    std::uint64_t expected_bytes = dtype_size(info.dtype);
    bool overflow = false;
    for (const std::int64_t dim : info.shape) {
      const auto factor = static_cast<std::uint64_t>(dim);
      if (factor != 0 && expected_bytes > std::numeric_limits<std::uint64_t>::max() / factor) {
        overflow = true;
        break;
      }
      expected_bytes *= factor;
    }
    if (overflow) {
      fail_tensor(name, "has shape " + shape_to_string(info.shape) + " whose size in " +
                            std::string(dtype_name(info.dtype)) + " overflows 64 bits");
    }
    if (expected_bytes != info.end - info.begin) {
      fail_tensor(name, "has shape " + shape_to_string(info.shape) + " and dtype " +
                            std::string(dtype_name(info.dtype)) + ", expected " +
                            std::to_string(expected_bytes) + " bytes, found data_offsets [" +
                            std::to_string(info.begin) + ", " + std::to_string(info.end) +
                            "] spanning " + std::to_string(info.end - info.begin) + " bytes");
    }
    return info;
  }

  /// The tensors must tile the data section exactly: no overlap (two names for the same bytes is
  /// a way to smuggle data) and no holes (bytes no tensor accounts for), as the reference
  /// library requires.
  void check_coverage(const std::vector<TensorInfo>& tensors) const {
    std::vector<const TensorInfo*> by_offset;
    by_offset.reserve(tensors.size());
    for (const TensorInfo& info : tensors) by_offset.push_back(&info);
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
    });
    std::uint64_t covered_to = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo* info : by_offset) {
      if (info->begin < covered_to) {
        fail("tensors '" + printable(previous->name) + "' (bytes " + range(*previous) + ") and '" +
             printable(info->name) + "' (bytes " + range(*info) + ") overlap");
      }
      if (info->begin > covered_to) {
        fail("hole in the data section: bytes [" + std::to_string(covered_to) + ", " +
             std::to_string(info->begin) + ") before tensor '" + printable(info->name) +
             "' belong to no tensor" +
             (previous ? " (previous tensor '" + printable(previous->name) + "' ends at " +
                             std::to_string(previous->end) + ")"
                       : std::string()));
      }
      covered_to = info->end;
      previous = info;
    }
    if (covered_to != data_size_) {
      fail("data section has " + std::to_string(data_size_) + " bytes but the tensors cover " +
           std::to_string(covered_to) + " (bytes [" + std::to_string(covered_to) + ", " +
           std::to_string(data_size_) + ") belong to no tensor)");
    }
  }

 private:
  static std::string range(const TensorInfo& info) {
    // Appended, not `"[" + std::string`: GCC 12 at -O3 reports a false -Wrestrict in the
    // inlined insert-at-front of that form (GCC bug 105329).
    std::string out = "[";
    out += std::to_string(info.begin);
    out += ", ";
    out += std::to_string(info.end);
    out += ')';
    return out;
  }

  std::uint64_t non_negative_integer(const std::string& name, const char* field, std::size_t index,
                                     const nlohmann::json& value) const {
    // nlohmann stores every non-negative integer literal as number_unsigned; negative ones,
    // fractions, exponents and integers beyond 2^64 arrive as other types.
    if (!value.is_number_unsigned()) {
      fail_tensor(name, std::string("field '") + field + "[" + std::to_string(index) +
                            "]' expected a non-negative integer, found " + describe_json(value));
    }
    return value.get<std::uint64_t>();
  }

  std::string file_;
  std::uint64_t data_size_;
};

}  // namespace detail

/// A validated safetensors file held in memory.
/// tensors() is sorted by name (the JSON header is parsed into a sorted map, and sorted names are
/// what the Python library's keys() gives as well).
class SafetensorsFile {
 public:
  /// Reads the whole file once and validates it. Throws FileError. Only a regular file is
  /// read (a FIFO or a device is refused before any read, io::read_regular_file), and the one
  /// allocation is the size the file system reports, so it is bounded by what is on disk.
  static SafetensorsFile open(const std::filesystem::path& path) {
    const std::string name = path.string();
    std::vector<std::uint8_t> bytes = read_regular_file(
        path, static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()),
        "safetensors file");
    return from_bytes(std::move(bytes), name);
  }

  /// Maps the file read-only instead of reading it: validating the header touches only its
  /// first pages, so listing a 2 GiB file costs kilobytes of memory and I/O (`peft inspect`).
  /// Tensor data is read from the mapping on demand. The same checks as open(); a file that is
  /// truncated by someone else while mapped would fault, so loaders keep using open().
  static SafetensorsFile map(const std::filesystem::path& path) {
    const std::string name = path.string();
    OpenedFile opened = open_regular_file(
        path, static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()),
        "safetensors file");
    if (opened.size < 8) return open(path);  // too short to map usefully; open() reports it
    void* address = ::mmap(nullptr, static_cast<std::size_t>(opened.size), PROT_READ, MAP_PRIVATE,
                           opened.fd.get(), 0);
    if (address == MAP_FAILED)
      throw FileError(printable(name) + ": cannot map the file: " + detail::errno_text(errno));
    const auto length = static_cast<std::size_t>(opened.size);
    SafetensorsFile file;
    file.name_ = name;
    file.mapping_ = std::shared_ptr<const std::uint8_t>(
        static_cast<const std::uint8_t*>(address),
        [length](const std::uint8_t* p) { ::munmap(const_cast<std::uint8_t*>(p), length); });
    file.mapped_size_ = length;
    file.parse();
    return file;
  }

  /// Validates bytes already in memory; display_name is used in every message.
  static SafetensorsFile from_bytes(std::vector<std::uint8_t> bytes, std::string display_name) {
    SafetensorsFile file;
    file.name_ = std::move(display_name);
    file.owned_ = std::move(bytes);
    file.parse();
    return file;
  }

  const std::string& name() const { return name_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(std::string_view tensor) const { return find(tensor) != nullptr; }

  /// Throws FileError "<file>: no tensor '<name>'".
  const TensorInfo& info(std::string_view tensor) const {
    const TensorInfo* found = find(tensor);
    if (found == nullptr) {
      throw FileError(printable(name_) + ": no tensor '" + printable(tensor) + "'");
    }
    return *found;
  }

  /// The tensor's stored bytes, unconverted (little-endian elements of info(tensor).dtype).
  std::span<const std::uint8_t> raw_bytes(std::string_view tensor) const {
    const TensorInfo& found = info(tensor);
    return {data() + data_start_ + found.begin, static_cast<std::size_t>(found.byte_size())};
  }

  /// The tensor's elements converted to T, row-major. Float dtypes convert to float/double
  /// (F64 -> float rounds to nearest); I64 and I32 read only as int64. Reading across the kinds
  /// throws FileError: a float dtype as int64 would truncate, and integer data where a weight is
  /// expected means the file holds something else than the tensor asked for.
  template <SafetensorsElement T>
  std::vector<T> read(std::string_view tensor) const {
    const TensorInfo& found = info(tensor);
    if (std::is_same_v<T, std::int64_t> == is_floating_dtype(found.dtype)) {
      throw FileError(printable(name_) + ": tensor '" + printable(found.name) + "' has dtype " +
                      std::string(dtype_name(found.dtype)) + ", cannot be read as " +
                      std::string(detail::element_type_name<T>()) +
                      (std::is_same_v<T, std::int64_t> ? " (expected I64 or I32)"
                                                       : " (expected F64, F32, F16 or BF16)"));
    }
    return detail::decode_elements<T>(found.dtype, data() + data_start_ + found.begin,
                                      static_cast<std::size_t>(found.numel()));
  }

  /// As read(tensor, expected_shape), and every value must be finite: a NaN or an infinity in a
  /// weight (or one that F64 -> float rounding makes infinite) would turn every output into
  /// NaN, which nothing downstream may pass off as a result. FileError names the tensor, the
  /// first bad element and how many there are.
  template <SafetensorsElement T>
  std::vector<T> read_finite(std::string_view tensor,
                             const std::vector<std::int64_t>& expected_shape) const {
    std::vector<T> values = read<T>(tensor, expected_shape);
    if constexpr (!std::is_same_v<T, std::int64_t>) {
      std::size_t bad = 0, first = 0;
      for (std::size_t i = 0; i < values.size(); ++i) {
        if (!std::isfinite(values[i])) {
          if (bad == 0) first = i;
          ++bad;
        }
      }
      if (bad != 0) {
        const T value = values[first];
        throw FileError(printable(name_) + ": tensor '" + printable(tensor) +
                        "' holds non-finite values (" + std::to_string(bad) + " of " +
                        std::to_string(values.size()) + ", first at element " +
                        std::to_string(first) + ": " +
                        (std::isnan(value) ? "nan"
                         : value > 0       ? "inf"
                                           : "-inf") +
                        "), expected finite numbers");
      }
    }
    return values;
  }

  /// As read(tensor), after checking the shape:
  /// "<file>: tensor '<name>' has shape [a, b], expected [c, d]".
  template <SafetensorsElement T>
  std::vector<T> read(std::string_view tensor,
                      const std::vector<std::int64_t>& expected_shape) const {
    const TensorInfo& found = info(tensor);
    if (found.shape != expected_shape) {
      throw FileError(printable(name_) + ": tensor '" + printable(found.name) + "' has shape " +
                      shape_to_string(found.shape) + ", expected " +
                      shape_to_string(expected_shape));
    }
    return read<T>(tensor);
  }

 private:
  SafetensorsFile() = default;

  const TensorInfo* find(std::string_view tensor) const {
    const auto it = std::lower_bound(
        tensors_.begin(), tensors_.end(), tensor,
        [](const TensorInfo& info, std::string_view key) { return info.name < key; });
    if (it == tensors_.end() || it->name != tensor) return nullptr;
    return &*it;
  }

  /// The file's bytes: the mapping, or the vector read by open() / given to from_bytes().
  const std::uint8_t* data() const { return mapping_ ? mapping_.get() : owned_.data(); }
  std::size_t size() const { return mapping_ ? mapped_size_ : owned_.size(); }

  void parse() {
    const std::string file = printable(name_);
    const std::uint64_t file_size = size();
    if (file_size < 8) {
      throw FileError(file + ": file is " + std::to_string(file_size) +
                      " bytes, expected at least 8 (the header length)");
    }
    const auto header_size = detail::load_unaligned<std::uint64_t>(data());
    if (header_size > kMaxSafetensorsHeaderBytes) {
      throw FileError(file + ": header length " + std::to_string(header_size) +
                      " exceeds the limit of " + std::to_string(kMaxSafetensorsHeaderBytes) +
                      " bytes");
    }
    if (header_size > file_size - 8) {
      throw FileError(file + ": header length " + std::to_string(header_size) +
                      " is larger than the " + std::to_string(file_size - 8) +
                      " bytes that follow it (file truncated or not safetensors)");
    }
    data_start_ = 8 + header_size;
    const std::uint64_t data_size = file_size - data_start_;

    const std::string_view header_text(reinterpret_cast<const char*>(data() + 8),
                                       static_cast<std::size_t>(header_size));
    const nlohmann::json header = detail::parse_json_strict(header_text, name_);
    if (!header.is_object()) {
      throw FileError(file + ": header expected a JSON object, found " + describe_json(header));
    }

    const detail::HeaderValidator validator(name_, data_size);
    tensors_.clear();
    tensors_.reserve(header.size());
    // nlohmann::json objects iterate in key order, so tensors_ comes out sorted by name.
    for (const auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        metadata_ = validator.parse_metadata(entry);
      } else {
        tensors_.push_back(validator.parse_tensor(key, entry));
      }
    }
    validator.check_coverage(tensors_);
  }

  std::string name_;
  std::vector<std::uint8_t> owned_;
  std::shared_ptr<const std::uint8_t> mapping_;  // set by map(); shared, so copies stay valid
  std::size_t mapped_size_ = 0;
  std::uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file in memory. Header keys are sorted by name; the data is laid out
/// as the Python writer lays it out (widest dtype first, then by name), contiguous.
/// Misuse (duplicate or reserved name, negative dimension, float data stored as I64 or I32, int64
/// data beyond I32 stored as I32) throws
/// ConfigError; a data size that does not match the shape throws ShapeError.
class SafetensorsWriter {
 public:
  /// Converts `data` to `stored` (F16/BF16 round to nearest even) and records it under `name`.
  /// int64 data may be stored as I64, I32 or any float dtype; float/double data only as a float
  /// dtype.
  template <SafetensorsElement T>
  void add(std::string name, std::vector<std::int64_t> shape, std::span<const T> data,
           Dtype stored = Dtype::F32) {
    const std::uint64_t count = check_new_tensor(name, shape, data.size());
    if (!std::is_same_v<T, std::int64_t> && !is_floating_dtype(stored)) {
      throw ConfigError("safetensors writer: tensor '" + printable(name) + "' holds " +
                        std::string(detail::element_type_name<T>()) +
                        " data, which cannot be stored as " + std::string(dtype_name(stored)));
    }
    if constexpr (std::is_same_v<T, std::int64_t>) {  // float data never reaches I32 (above)
      if (stored == Dtype::I32)
        for (const T value : data)
          if (value < std::numeric_limits<std::int32_t>::min() ||
              value > std::numeric_limits<std::int32_t>::max())
            throw ConfigError("safetensors writer: tensor '" + printable(name) + "' holds " +
                              std::to_string(value) + ", beyond I32's range");
    }
    PendingTensor pending{stored, std::move(shape), {}};
    pending.bytes.resize(static_cast<std::size_t>(count * dtype_size(stored)));
    std::uint8_t* out = pending.bytes.data();
    for (std::size_t i = 0; i < data.size(); ++i) {
      const T value = data[i];
      switch (stored) {
        case Dtype::F64:
          detail::store_unaligned(out + 8 * i, static_cast<double>(value));
          break;
        case Dtype::F32:
          detail::store_unaligned(out + 4 * i, static_cast<float>(value));
          break;
        case Dtype::F16:
          detail::store_unaligned(out + 2 * i, f16_bits_from(static_cast<double>(value)));
          break;
        case Dtype::BF16:
          detail::store_unaligned(out + 2 * i, bf16_bits_from(static_cast<double>(value)));
          break;
        case Dtype::I64:
          detail::store_unaligned(out + 8 * i, static_cast<std::int64_t>(value));
          break;
        case Dtype::I32:
          detail::store_unaligned(out + 4 * i, static_cast<std::int32_t>(value));
          break;
      }
    }
    tensors_.emplace(std::move(name), std::move(pending));
  }

  /// Convenience for std::vector data (a vector does not deduce T through std::span).
  template <SafetensorsElement T>
  void add(std::string name, std::vector<std::int64_t> shape, const std::vector<T>& data,
           Dtype stored = Dtype::F32) {
    add<T>(std::move(name), std::move(shape), std::span<const T>(data), stored);
  }

  /// Records already-encoded little-endian bytes of `dtype` (e.g. to copy a tensor unchanged).
  void add_raw(std::string name, Dtype dtype, std::vector<std::int64_t> shape,
               std::span<const std::uint8_t> bytes) {
    const std::size_t element_size = dtype_size(dtype);
    if (bytes.size() % element_size != 0) {
      throw ShapeError("safetensors writer: tensor '" + printable(name) + "' has " +
                       std::to_string(bytes.size()) + " bytes, not a multiple of " +
                       std::to_string(element_size) + " (" + std::string(dtype_name(dtype)) + ")");
    }
    check_new_tensor(name, shape, bytes.size() / element_size);
    tensors_.emplace(std::move(name),
                     PendingTensor{dtype, std::move(shape), {bytes.begin(), bytes.end()}});
  }

  /// Adds a "__metadata__" entry. The Python writer stores {"format": "pt"}; transformers and
  /// peft expect it, so set it when writing files for them.
  void set_metadata(std::string key, std::string value) {
    check_utf8("metadata key", key);
    check_utf8("metadata value", value);
    metadata_[std::move(key)] = std::move(value);
  }

  std::vector<std::uint8_t> to_bytes() const {
    nlohmann::json header = nlohmann::json::object();  // std::map underneath: keys sorted
    if (!metadata_.empty()) {
      nlohmann::json metadata = nlohmann::json::object();
      for (const auto& [key, value] : metadata_) metadata[key] = value;
      header["__metadata__"] = std::move(metadata);
    }
    // Data order is the Python writer's: widest element first (I64, F64, F32, I32, BF16, F16), then
    // by name. Every tensor's byte size is a multiple of its element size, so each tensor starts
    // aligned to its element size (the data section itself starts 8-aligned), which readers
    // that map the file and view it in place need.
    std::vector<const std::pair<const std::string, PendingTensor>*> data_order;
    data_order.reserve(tensors_.size());
    for (const auto& entry : tensors_) data_order.push_back(&entry);
    std::stable_sort(data_order.begin(), data_order.end(), [](const auto* a, const auto* b) {
      return alignment_rank(a->second.dtype) < alignment_rank(b->second.dtype);
    });
    std::uint64_t offset = 0;
    for (const auto* entry : data_order) {
      const PendingTensor& tensor = entry->second;
      const std::uint64_t end = offset + tensor.bytes.size();
      header[entry->first] = {{"dtype", std::string(dtype_name(tensor.dtype))},
                              {"shape", tensor.shape},
                              {"data_offsets", {offset, end}}};
      offset = end;
    }
    std::string header_text = header.dump();
    // Pad with spaces so the data section starts 8-byte aligned, as the Python writer does.
    header_text.append((8 - header_text.size() % 8) % 8, ' ');

    std::vector<std::uint8_t> bytes(8 + header_text.size() + static_cast<std::size_t>(offset));
    detail::store_unaligned(bytes.data(), static_cast<std::uint64_t>(header_text.size()));
    std::memcpy(bytes.data() + 8, header_text.data(), header_text.size());
    std::size_t position = 8 + header_text.size();
    for (const auto* entry : data_order) {
      const PendingTensor& tensor = entry->second;
      if (!tensor.bytes.empty()) {
        std::memcpy(bytes.data() + position, tensor.bytes.data(), tensor.bytes.size());
      }
      position += tensor.bytes.size();
    }
    return bytes;
  }

  /// Writes the file with io::write_file_atomically (exclusive temporary beside `path`, fsync,
  /// rename, folder fsync): a reader never sees a half-written file and a failed write leaves any
  /// previous file intact. Throws FileError.
  void write(const std::filesystem::path& path) const { write_file_atomically(path, to_bytes()); }

 private:
  struct PendingTensor {
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };

  static int alignment_rank(Dtype dtype) {
    switch (dtype) {  // the Rust writer's order: dtypes by its enum, descending
      case Dtype::I64:
        return 0;
      case Dtype::F64:
        return 1;
      case Dtype::F32:
        return 2;
      case Dtype::I32:
        return 3;
      case Dtype::BF16:
        return 4;
      case Dtype::F16:
        return 5;
    }
    return 6;
  }

  static void check_utf8(std::string_view what, const std::string& text) {
    // nlohmann::json::dump throws on invalid UTF-8; finding out at add() time names the culprit.
    try {
      (void)nlohmann::json(text).dump();
    } catch (const nlohmann::json::exception&) {
      throw ConfigError("safetensors writer: " + std::string(what) + " '" + printable(text) +
                        "' is not valid UTF-8");
    }
  }

  /// Validates name and shape of a tensor about to be added; returns its element count.
  std::uint64_t check_new_tensor(const std::string& name, const std::vector<std::int64_t>& shape,
                                 std::size_t element_count) const {
    if (name == "__metadata__") {
      throw ConfigError("safetensors writer: '__metadata__' is reserved, not a tensor name");
    }
    check_utf8("tensor name", name);
    if (tensors_.count(name) != 0) {
      throw ConfigError("safetensors writer: duplicate tensor name '" + printable(name) + "'");
    }
    std::uint64_t count = 1;
    for (const std::int64_t dim : shape) {
      if (dim < 0) {
        throw ConfigError("safetensors writer: tensor '" + printable(name) + "' has shape " +
                          shape_to_string(shape) + " with a negative dimension");
      }
      const auto factor = static_cast<std::uint64_t>(dim);
      if (factor != 0 && count > std::numeric_limits<std::uint64_t>::max() / factor) {
        throw ShapeError("safetensors writer: tensor '" + printable(name) + "' has shape " +
                         shape_to_string(shape) + " whose element count overflows");
      }
      count *= factor;
    }
    if (count != element_count) {
      throw ShapeError("safetensors writer: tensor '" + printable(name) + "' has shape " +
                       shape_to_string(shape) + " (" + std::to_string(count) + " elements) but " +
                       std::to_string(element_count) + " values were given");
    }
    return count;
  }

  std::map<std::string, PendingTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace peft::io
