#pragma once
// Storage formats of frozen base weights, and FrozenWeight: a 2-D weight W [out, in] held in
// bf16, fp16 or NF4 instead of as a dense Tensor<T> (docs/quantization.md, docs/performance.md).
//
// BaseFormat is chosen per model (Decoder's constructor and load(), `--base-dtype` of the CLI):
//   fp32  every base weight a dense Tensor<T> (T = float or double), as before; the default;
//   bf16  the projections' weights and the token embedding kept as bf16 bit patterns (a BF16
//         checkpoint's bytes are taken as they are; any other dtype is rounded to nearest even);
//   fp16  the same tensors as IEEE binary16 bit patterns (an F16 checkpoint's bytes taken as
//         they are; any other dtype rounded to nearest even; a finite value beyond fp16's range,
//         |x| > 65504, is a ConfigError rather than an infinity);
//   nf4   the projections' weights in NF4 with double quantization (quant::Nf4Tensor, the
//         reference's bitsandbytes layout); the token embedding and an untied head in bf16, as
//         QLoRA keeps them.
// Norms, biases and GPT-2's position embedding stay dense T in every format: they are small,
// and the methods that train them (LN tuning, BitFit) need them as Vars.
//
// What a FrozenWeight computes (the products of a frozen linear; never dW):
//   forward   y[n, out] (+)= x[n, in] · Wᵀ
//   backward  dx[n, in] (+)= dy[n, out] · W
//   rows      rows [r0, r1) of W, widened or dequantized to T (the read-only view methods see)
// For T = float the products run on the frozen kernels (core/ops/frozen_gemm.hpp: a bf16 W's
// other operand is rounded to bf16 as PyTorch's CPU autocast rounds it; fp16 and NF4 keep it
// fp32, the product an fp32 product of W's stored values).
// For T = double they are exact products of W's stored values (widened to double, block by
// block): the reference a float run is checked against, and what the gradient checks use.
// Neither path ever holds a full-size fp32 or double copy of W.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "peft/core/base_format.hpp"
#include "peft/core/error.hpp"
#include "peft/core/float16.hpp"
#include "peft/core/ops/frozen_gemm.hpp"
#include "peft/core/ops/gemm.hpp"
#include "peft/quant/nf4.hpp"

namespace peft {

/// A frozen weight W [rows, cols] = [out, in], row-major, in bf16, fp16 or NF4. Immutable once
/// built; models share it through std::shared_ptr<const FrozenWeight>.
class FrozenWeight {
 public:
  /// W from fp32 values [rows, cols] (row-major), stored as `format` (bf16, fp16 or nf4).
  /// Non-finite values, and for fp16 finite values beyond its range, are a ConfigError naming
  /// `name` and the element (NF4 quantization checks them; so do bf16 and fp16 here).
  static FrozenWeight from_values(BaseFormat format, std::span<const float> values,
                                  std::int64_t rows, std::int64_t cols, std::string name) {
    FrozenWeight w = empty(format, rows, cols, std::move(name), values.size());
    if (format == BaseFormat::nf4) {
      w.nf4_ = quant::Nf4Tensor::quantize(values, {rows, cols}, w.name_);
      return w;
    }
    w.bits_.resize(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i]))
        throw ConfigError(std::string(base_format_name(format)) + " weight '" + w.name_ +
                          "': element " + std::to_string(i) + " is not finite (" +
                          std::to_string(values[i]) + ")");
      w.bits_[i] =
          format == BaseFormat::bf16 ? ops::bf16::round(values[i]) : w.fp16_bits(values[i], i);
    }
    return w;
  }

  /// W from bf16 bit patterns [rows, cols] (a BF16 checkpoint's bytes): kept as they are, or
  /// NF4-quantized from their exact fp32 values (as the reference quantizes a bf16 weight).
  static FrozenWeight from_bf16(BaseFormat format, std::vector<std::uint16_t> bits,
                                std::int64_t rows, std::int64_t cols, std::string name) {
    FrozenWeight w = empty(format, rows, cols, std::move(name), bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i)
      if ((bits[i] & 0x7F80u) == 0x7F80u)
        throw ConfigError("bf16 weight '" + w.name_ + "': element " + std::to_string(i) +
                          " is not finite");
    if (format == BaseFormat::bf16) {
      w.bits_ = std::move(bits);
    } else if (format == BaseFormat::fp16) {  // each value rounded once, to nearest even
      for (std::size_t i = 0; i < bits.size(); ++i)
        bits[i] = w.fp16_bits(ops::bf16::to_float(bits[i]), i);
      w.bits_ = std::move(bits);
    } else {
      w.nf4_ = quant::Nf4Tensor::quantize_bf16(bits, {rows, cols}, w.name_);
    }
    return w;
  }

  /// W from fp16 bit patterns [rows, cols] (an F16 checkpoint's bytes): kept as they are for
  /// fp16, rounded from their exact values to bf16, or NF4-quantized from them (one fp32 copy of
  /// this tensor while quantizing).
  static FrozenWeight from_fp16(BaseFormat format, std::vector<std::uint16_t> bits,
                                std::int64_t rows, std::int64_t cols, std::string name) {
    FrozenWeight w = empty(format, rows, cols, std::move(name), bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i)
      if ((bits[i] & 0x7C00u) == 0x7C00u)
        throw ConfigError("fp16 weight '" + w.name_ + "': element " + std::to_string(i) +
                          " is not finite");
    if (format == BaseFormat::fp16) {
      w.bits_ = std::move(bits);
    } else if (format == BaseFormat::bf16) {
      for (std::uint16_t& b : bits) b = ops::bf16::round(float16::f16_bits_to_float(b));
      w.bits_ = std::move(bits);
    } else {
      std::vector<float> values(bits.size());
      for (std::size_t i = 0; i < bits.size(); ++i) values[i] = float16::f16_bits_to_float(bits[i]);
      w.nf4_ = quant::Nf4Tensor::quantize(values, {rows, cols}, w.name_);
    }
    return w;
  }

  BaseFormat format() const { return format_; }
  std::int64_t rows() const { return rows_; }  ///< out
  std::int64_t cols() const { return cols_; }  ///< in
  const std::string& name() const { return name_; }
  /// Bytes held (codes and scales for NF4).
  std::size_t bytes() const {
    return format_ == BaseFormat::nf4 ? nf4_->bytes() : bits_.size() * sizeof(std::uint16_t);
  }
  /// The bit patterns of a bf16 or fp16 W (empty for NF4).
  std::span<const std::uint16_t> half_bits() const { return bits_; }
  const quant::Nf4Tensor& nf4() const { return *nf4_; }

  /// Rows [r0, r1) of W as T, row-major into out ((r1 - r0) * cols values).
  template <class T>
  void rows_as(std::int64_t r0, std::int64_t r1, T* out) const {
    if (r0 < 0 || r1 < r0 || r1 > rows_)
      throw ShapeError("frozen weight '" + name_ + "': rows [" + std::to_string(r0) + ", " +
                       std::to_string(r1) + ") outside [0, " + std::to_string(rows_) + ")");
    const std::int64_t n = (r1 - r0) * cols_;
    if (format_ == BaseFormat::bf16) {
      const std::uint16_t* src = bits_.data() + r0 * cols_;
      for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(ops::bf16::to_float(src[i]));
    } else if (format_ == BaseFormat::fp16) {
      const std::uint16_t* src = bits_.data() + r0 * cols_;
      for (std::int64_t i = 0; i < n; ++i)
        out[i] = static_cast<T>(float16::f16_bits_to_float(src[i]));
    } else if constexpr (std::is_same_v<T, float>) {
      nf4_->dequantize(r0 * cols_, r1 * cols_, out);
    } else {
      std::vector<float> buffer(static_cast<std::size_t>(n));
      nf4_->dequantize(r0 * cols_, r1 * cols_, buffer.data());
      std::copy(buffer.begin(), buffer.end(), out);
    }
  }

  /// y[n, rows] (+)= x[n, cols] · Wᵀ; x and y with row strides ldx, ldy.
  template <class T>
  void forward(const T* x, std::int64_t ldx, std::int64_t n, T* y, std::int64_t ldy,
               bool accumulate) const {
    if constexpr (std::is_same_v<T, float>) {
      if (format_ == BaseFormat::bf16)
        ops::frozen_forward(x, ldx, n, bf16_matrix(), y, ldy, accumulate);
      else if (format_ == BaseFormat::fp16)
        ops::frozen_forward(x, ldx, n, fp16_matrix(), y, ldy, accumulate);
      else
        ops::frozen_forward(x, ldx, n, *nf4_, y, ldy, accumulate);
    } else {
      // Exact: W's rows widened block by block; y[:, r0:r1] = x · W[r0:r1]ᵀ.
      for_row_blocks<T>([&](std::int64_t r0, std::int64_t r1, const T* w) {
        ops::detail::gemm(x, ldx, false, w, cols_, true, y + r0, ldy, n, r1 - r0, cols_, T(1),
                          accumulate);
      });
    }
  }

  /// dx[n, cols] (+)= dy[n, rows] · W; row strides lddy, lddx.
  template <class T>
  void backward(const T* dy, std::int64_t lddy, std::int64_t n, T* dx, std::int64_t lddx,
                bool accumulate) const {
    if constexpr (std::is_same_v<T, float>) {
      if (format_ == BaseFormat::bf16)
        ops::frozen_backward(dy, lddy, n, bf16_matrix(), dx, lddx, accumulate);
      else if (format_ == BaseFormat::fp16)
        ops::frozen_backward(dy, lddy, n, fp16_matrix(), dx, lddx, accumulate);
      else
        ops::frozen_backward(dy, lddy, n, *nf4_, dx, lddx, accumulate);
    } else {
      bool first = true;
      for_row_blocks<T>([&](std::int64_t r0, std::int64_t r1, const T* w) {
        ops::detail::gemm(dy + r0, lddy, false, w, cols_, false, dx, lddx, n, cols_, r1 - r0, T(1),
                          accumulate || !first);
        first = false;
      });
      if (first && !accumulate)
        for (std::int64_t i = 0; i < n; ++i) std::fill_n(dx + i * lddx, cols_, T(0));
    }
  }

 private:
  FrozenWeight() = default;

  static FrozenWeight empty(BaseFormat format, std::int64_t rows, std::int64_t cols,
                            std::string name, std::size_t count) {
    if (format == BaseFormat::fp32)
      throw ConfigError("frozen weight '" + name +
                        "': fp32 weights are dense tensors, not a FrozenWeight");
    if (rows < 0 || cols < 0 ||
        static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(cols) !=
            static_cast<std::uint64_t>(count))
      throw ShapeError("frozen weight '" + name + "': " + std::to_string(count) +
                       " values for shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                       "]");
    FrozenWeight w;
    w.format_ = format;
    w.rows_ = rows;
    w.cols_ = cols;
    w.name_ = std::move(name);
    return w;
  }

  ops::Bf16Matrix bf16_matrix() const { return {bits_.data(), rows_, cols_, cols_, name_}; }
  ops::Fp16Matrix fp16_matrix() const { return {bits_.data(), rows_, cols_, cols_, name_}; }

  // fp16 bits of a finite value, rounded to nearest even; one beyond fp16's range is an error
  // (an infinity would poison every product it enters).
  std::uint16_t fp16_bits(float value, std::size_t element) const {
    const std::uint16_t bits = float16::f16_bits_from(value);
    if ((bits & 0x7C00u) == 0x7C00u)
      throw ConfigError("fp16 weight '" + name_ + "': element " + std::to_string(element) + " = " +
                        std::to_string(value) +
                        " is outside fp16's range (|x| <= 65504); expected a value fp16 holds "
                        "(store this weight as bf16 or fp32)");
    return bits;
  }

  // body(r0, r1, rows r0..r1 of W as T) over blocks of about 1 MiB of W.
  template <class T, class Body>
  void for_row_blocks(Body&& body) const {
    const std::int64_t block =
        std::max<std::int64_t>(1, (std::int64_t(1) << 17) / std::max<std::int64_t>(1, cols_));
    std::vector<T> buffer(static_cast<std::size_t>(std::min(block, rows_) * cols_));
    for (std::int64_t r0 = 0; r0 < rows_; r0 += block) {
      const std::int64_t r1 = std::min(rows_, r0 + block);
      rows_as<T>(r0, r1, buffer.data());
      body(r0, r1, buffer.data());
    }
  }

  BaseFormat format_ = BaseFormat::bf16;
  std::int64_t rows_ = 0, cols_ = 0;
  std::string name_;
  std::vector<std::uint16_t> bits_;  // bf16 or fp16 bit patterns
  std::optional<quant::Nf4Tensor> nf4_;
};

}  // namespace peft
