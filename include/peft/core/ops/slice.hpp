#pragma once
// A contiguous range along one axis: what prefix tuning reads of its key/value table per layer
// without copying the rest.
#include "peft/core/ops/common.hpp"

namespace peft::ops {

/// x[..., begin : begin + count, ...] along `axis`; the other extents unchanged. Backward adds
/// into that range of x's gradient only.
template <class T>
Var<T> slice(Tape<T>& tape, const Var<T>& x, std::size_t axis, std::int64_t begin,
             std::int64_t count) {
  const Shape& xs = x.shape();
  detail::check(axis < xs.size(), "slice", "axis out of range for " + shape_string(xs));
  detail::check(begin >= 0 && count >= 0 && begin + count <= xs[axis], "slice",
                "range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                    ") outside axis " + std::to_string(axis) + " of " + shape_string(xs));
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < axis; ++i) outer *= xs[i];
  for (std::size_t i = axis + 1; i < xs.size(); ++i) inner *= xs[i];
  const std::int64_t stride = xs[axis] * inner, offset = begin * inner, len = count * inner;
  Shape os = xs;
  os[axis] = count;
  Tensor<T> out(os);
  for (std::int64_t o = 0; o < outer; ++o)
    std::copy_n(x.value().data() + o * stride + offset, len, out.data() + o * len);
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad()) {
    tape.record([x, result, outer, stride, offset, len]() mutable {
      const T* g = result.grad().data();
      T* gx = x.grad().data();
      for (std::int64_t o = 0; o < outer; ++o)
        for (std::int64_t i = 0; i < len; ++i) gx[o * stride + offset + i] += g[o * len + i];
    });
  }
  return result;
}

}  // namespace peft::ops
