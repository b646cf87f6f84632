#pragma once
// Cross-entropy over logits rows, with an ignore index.
#include <cmath>
#include <limits>

#include "peft/core/ops/common.hpp"

namespace peft::ops {

inline constexpr std::int64_t kIgnoreIndex = -100;

/// Mean over counted rows of −log softmax(logits[n])[target[n]]; rows whose target is −100 are
/// not counted (torch's semantics: NaN when none is). logits [N, V], targets [N]. Out [1].
/// The backward recomputes the softmax row by row instead of keeping a logits-sized buffer.
template <class T>
Var<T> cross_entropy(Tape<T>& tape, const Var<T>& logits, const std::vector<std::int64_t>& targets) {
  const std::int64_t n = logits.value().rows(), vocab = logits.value().cols();
  detail::check(static_cast<std::int64_t>(targets.size()) == n, "cross_entropy",
                "targets size " + std::to_string(targets.size()) + " != logits rows " +
                    std::to_string(n));
  T total = 0;
  std::int64_t counted = 0;
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int64_t y = targets[static_cast<std::size_t>(r)];
    if (y == kIgnoreIndex) continue;
    if (y < 0 || y >= vocab)
      throw ShapeError("cross_entropy: target " + std::to_string(y) + " outside [0, " +
                       std::to_string(vocab) + ")");
    const T* row = logits.value().data() + r * vocab;
    T mx = row[0];
    for (std::int64_t i = 1; i < vocab; ++i) mx = std::max(mx, row[i]);
    T z = 0;
    for (std::int64_t i = 0; i < vocab; ++i) z += std::exp(row[i] - mx);
    total += std::log(z) + mx - row[y];
    ++counted;
  }
  const T mean = counted ? total / T(counted) : std::numeric_limits<T>::quiet_NaN();
  Var<T> result = detail::make_output(tape, Tensor<T>({1}, mean), logits);
  if (result.requires_grad() && counted) {
    tape.record([logits, result, targets, n, vocab, counted]() mutable {
      const T g = result.grad()[0] / T(counted);
      T* gl = logits.grad().data();
      PEFT_PARALLEL_FOR
      for (std::int64_t r = 0; r < n; ++r) {
        const std::int64_t y = targets[static_cast<std::size_t>(r)];
        if (y == kIgnoreIndex) continue;
        const T* row = logits.value().data() + r * vocab;
        T mx = row[0];
        for (std::int64_t i = 1; i < vocab; ++i) mx = std::max(mx, row[i]);
        T z = 0;
        for (std::int64_t i = 0; i < vocab; ++i) z += std::exp(row[i] - mx);
        T* gr = gl + r * vocab;
        for (std::int64_t i = 0; i < vocab; ++i) gr[i] += g * std::exp(row[i] - mx) / z;
        gr[y] -= g;
      }
    });
  }
  return result;
}

}  // namespace peft::ops
