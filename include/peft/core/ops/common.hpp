#pragma once
// Shared plumbing of the ops: the op-writing API (peft/core/op.hpp, whose comment is the
// contract every op follows) and the loop-parallelism macros.
#include <cstdint>

#include "peft/core/autograd.hpp"
#include "peft/core/op.hpp"

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

// The op-writing API is public (peft/core/op.hpp); the ops' detail:: spellings still name it.
using peft::ops::check;
using peft::ops::make_output;
}  // namespace peft::ops::detail
