#pragma once
// Shared by the CUDA tests: device detection (a machine without a GPU skips every case and says
// so once), random never-zero inputs, bf16 rounding on the host, and the error measure.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "peft/backend/cuda/check.cuh"
#include "peft/backend/cuda/memory.cuh"

namespace peft_cuda_test {

using peft::cuda::bf16;
using peft::cuda::DeviceBuffer;

/// Whether a CUDA device is usable. The first call on a machine without one prints the skip
/// notice. Evaluated while the test cases register (doctest::skip decorators).
inline bool has_device() {
  static const bool present = [] {
    const bool found = peft::cuda::device_count() > 0;
    if (!found) std::printf("no CUDA device: skipped (peft_cuda_tests needs a GPU)\n");
    return found;
  }();
  return present;
}

/// A CUDA case: skipped where no GPU exists.
#define PEFT_CUDA_CASE(name) TEST_CASE(name* doctest::skip(!peft_cuda_test::has_device()))

/// A fresh seed per case (random_device), reported so that a failure can be replayed.
inline std::uint32_t fresh_seed() {
  std::random_device device;
  const std::uint32_t seed = device();
  MESSAGE("seed " << seed);
  return seed;
}

/// Values in ±[lo, hi], sign random: never zero, so unwritten outputs and ignored terms show.
inline std::vector<float> random_values(std::mt19937& rng, std::int64_t n, float lo = 0.1f,
                                        float hi = 1.f) {
  std::uniform_real_distribution<float> magnitude(lo, hi);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = negative(rng) ? -magnitude(rng) : magnitude(rng);
  return v;
}

inline std::vector<bf16> to_bf16(const std::vector<float>& v) {
  std::vector<bf16> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16_rn(v[i]);
  return out;
}
inline std::vector<float> to_float(const std::vector<bf16>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
  return out;
}
/// v rounded to bf16 and back: what the device sees of a bf16 input.
inline std::vector<float> round_bf16(const std::vector<float>& v) { return to_float(to_bf16(v)); }

template <class T>
DeviceBuffer<T> device_copy(const std::vector<T>& host) {
  DeviceBuffer<T> buffer(static_cast<std::int64_t>(host.size()));
  buffer.upload(host);
  return buffer;
}

/// ‖got − ref‖ / ‖ref‖; +inf when got holds a NaN or an infinity (an unwritten, poisoned
/// element) or the sizes differ.
template <class G>
double relative_error(const std::vector<G>& got, const std::vector<double>& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
    diff += (g - ref[i]) * (g - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-300);
}
inline double relative_error(const std::vector<bf16>& got, const std::vector<double>& ref) {
  return relative_error(to_float(got), ref);
}

/// Waits for the device and surfaces any asynchronous kernel fault as a test failure.
inline void sync() { PEFT_CUDA_CHECK(cudaDeviceSynchronize()); }

}  // namespace peft_cuda_test
