#pragma once
// Shared plumbing of the ops: output construction and shape checks.
//
// Every op is a forward/backward pair: the forward computes the value; when the tape says an
// input needs a gradient, the op records one closure that accumulates (+=) into exactly those
// inputs' gradients. Shapes are given in comments as [rows, cols] or [B, T, ...].
#include <string>

#include "peft/core/autograd.hpp"

// OpenMP loop parallelism where the build enables it; a plain loop otherwise.
#if defined(_OPENMP)
#define PEFT_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
// The same, only when `condition` holds: a team costs a barrier, which on cores shared with
// other work can cost milliseconds when one thread is descheduled, so light loops stay serial.
#define PEFT_PRAGMA(text) _Pragma(#text)
#define PEFT_PARALLEL_FOR_IF(condition) PEFT_PRAGMA(omp parallel for schedule(static) if(condition))
#else
#define PEFT_PARALLEL_FOR
#define PEFT_PARALLEL_FOR_IF(condition)
#endif

namespace peft::ops::detail {
// Elements below which an elementwise or per-row loop runs on one thread (about 0.2 ms of
// memory traffic on one core).
inline constexpr std::int64_t kParallelMinElements = std::int64_t(1) << 21;
}  // namespace peft::ops::detail

namespace peft::ops::detail {

template <class T, class... Inputs>
Var<T> make_output(const Tape<T>& tape, Tensor<T> value, const Inputs&... inputs) {
  return Var<T>(std::move(value), tape.needs_grad(inputs...));
}

inline void check(bool condition, const std::string& op, const std::string& message) {
  if (!condition) throw ShapeError(op + ": " + message);
}

}  // namespace peft::ops::detail
