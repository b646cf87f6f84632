#pragma once
// 16-byte loads of float or bf16 elements: the widest single access a thread can issue, so a
// warp reads 512 contiguous bytes per instruction in the memory-bound kernels.
#include <cstdint>

#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda::detail {

template <class T>
inline constexpr int kVectorWidth = 16 / sizeof(T);  // 4 floats or 8 bf16

// Loads kVectorWidth<T> elements at p (16-byte aligned) and returns them as floats.
template <class T>
__device__ inline void load_vector(const T* p, float (&out)[kVectorWidth<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  if constexpr (sizeof(T) == 4) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 is the upper half of a float: shifting the bits up converts exactly.
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
    }
  }
}

// Whether rows of `cols` elements starting at `base` can be read with load_vector.
template <class T>
inline bool vector_aligned(const T* base, std::int64_t cols) {
  return cols % kVectorWidth<T> == 0 && reinterpret_cast<std::uintptr_t>(base) % 16 == 0;
}

}  // namespace peft::cuda::detail
