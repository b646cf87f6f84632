#pragma once
// Shape ops: reshape, transpose of two axes, concat and split along an axis, embedding lookup.
#include <numeric>

#include "peft/core/ops/common.hpp"

namespace peft::ops {

/// Same values, new shape with the same element count.
template <class T>
Var<T> reshape(Tape<T>& tape, const Var<T>& x, Shape shape) {
  Tensor<T> out = x.value();
  out.reshape(std::move(shape));
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad())
    tape.record([x, result]() mutable { x.grad().vector() += result.grad().vector(); });
  return result;
}

namespace detail {
// Extents before, at and after `axis`: the tensor viewed as [outer, extent, inner].
inline void split_axis(const Shape& s, std::size_t axis, std::int64_t& outer, std::int64_t& inner) {
  outer = 1;
  inner = 1;
  for (std::size_t i = 0; i < axis; ++i) outer *= s[i];
  for (std::size_t i = axis + 1; i < s.size(); ++i) inner *= s[i];
}

// out[..., i, ..., j, ...] = x[..., j, ..., i, ...] for axes a and b; accumulates when `add`.
template <class T>
void swap_axes_copy(const T* x, const Shape& xs, std::size_t a, std::size_t b, T* out, bool add) {
  // Strides of x; out has xs with a and b swapped. Iterate over out's index space.
  const std::size_t rank = xs.size();
  std::vector<std::int64_t> stride(rank, 1);
  for (std::size_t i = rank - 1; i-- > 0;) stride[i] = stride[i + 1] * xs[i + 1];
  Shape os = xs;
  std::swap(os[a], os[b]);
  std::vector<std::int64_t> in_stride = stride;
  std::swap(in_stride[a], in_stride[b]);  // out's axis i walks x with stride in_stride[i]
  const std::int64_t n = shape_numel(os);
  std::vector<std::int64_t> idx(rank, 0);
  std::int64_t src = 0;
  for (std::int64_t o = 0; o < n; ++o) {
    if (add)
      out[o] += x[src];
    else
      out[o] = x[src];
    for (std::size_t i = rank; i-- > 0;) {
      if (++idx[i] < os[i]) {
        src += in_stride[i];
        break;
      }
      src -= in_stride[i] * (os[i] - 1);
      idx[i] = 0;
    }
  }
}
}  // namespace detail

/// Swaps axes a and b (any rank).
template <class T>
Var<T> transpose(Tape<T>& tape, const Var<T>& x, std::size_t axis_a, std::size_t axis_b) {
  const Shape& xs = x.value().shape();
  detail::check(axis_a < xs.size() && axis_b < xs.size(), "transpose", "axis out of range");
  Shape os = xs;
  std::swap(os[axis_a], os[axis_b]);
  Tensor<T> out(os);
  detail::swap_axes_copy(x.value().data(), xs, axis_a, axis_b, out.data(), false);
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad()) {
    tape.record([x, result, axis_a, axis_b]() mutable {
      // result.grad has x's shape with the axes swapped; its adjoint swaps them back.
      detail::swap_axes_copy(result.grad().data(), result.value().shape(), axis_a, axis_b,
                             x.grad().data(), true);
    });
  }
  return result;
}

/// Concatenation along `axis`; every input has the same extents elsewhere.
template <class T>
Var<T> concat(Tape<T>& tape, const std::vector<Var<T>>& parts, std::size_t axis) {
  detail::check(!parts.empty(), "concat", "no inputs");
  Shape os = parts[0].shape();
  detail::check(axis < os.size(), "concat", "axis out of range");
  os[axis] = 0;
  bool any_grad = false;
  for (const Var<T>& p : parts) {
    Shape ps = p.shape();
    detail::check(ps.size() == os.size(), "concat", "ranks differ");
    for (std::size_t i = 0; i < ps.size(); ++i)
      if (i != axis)
        detail::check(ps[i] == parts[0].shape()[i], "concat",
                      "shapes " + shape_string(ps) + " and " + shape_string(parts[0].shape()) +
                          " differ off the axis");
    os[axis] += ps[axis];
    any_grad = any_grad || tape.needs_grad(p);
  }
  std::int64_t outer, inner;
  detail::split_axis(os, axis, outer, inner);
  Tensor<T> out(os);
  std::int64_t offset = 0;  // along the axis
  for (const Var<T>& p : parts) {
    const std::int64_t len = p.shape()[axis] * inner;
    for (std::int64_t o = 0; o < outer; ++o)
      std::copy_n(p.value().data() + o * len, len, out.data() + o * os[axis] * inner + offset);
    offset += len;
  }
  Var<T> result(std::move(out), any_grad);
  if (any_grad) {
    tape.record([parts, result, outer, inner, axis]() mutable {
      const std::int64_t total = result.shape()[axis] * inner;
      std::int64_t off = 0;
      for (const Var<T>& p : parts) {
        const std::int64_t len = p.shape()[axis] * inner;
        if (p.requires_grad()) {
          T* gp = p.grad().data();
          const T* g = result.grad().data();
          for (std::int64_t o = 0; o < outer; ++o)
            for (std::int64_t i = 0; i < len; ++i) gp[o * len + i] += g[o * total + off + i];
        }
        off += len;
      }
    });
  }
  return result;
}

/// Splits along `axis` into pieces of the given extents (which sum to the axis' extent).
template <class T>
std::vector<Var<T>> split(Tape<T>& tape, const Var<T>& x, const std::vector<std::int64_t>& sizes,
                          std::size_t axis) {
  const Shape& xs = x.shape();
  detail::check(axis < xs.size(), "split", "axis out of range");
  detail::check(std::accumulate(sizes.begin(), sizes.end(), std::int64_t(0)) == xs[axis], "split",
                "sizes do not sum to the extent of axis in " + shape_string(xs));
  std::int64_t outer, inner;
  detail::split_axis(xs, axis, outer, inner);
  const std::int64_t total = xs[axis] * inner;
  std::vector<Var<T>> pieces;
  std::int64_t off = 0;
  for (std::int64_t size : sizes) {
    Shape ps = xs;
    ps[axis] = size;
    Tensor<T> out(ps);
    const std::int64_t len = size * inner;
    for (std::int64_t o = 0; o < outer; ++o)
      std::copy_n(x.value().data() + o * total + off, len, out.data() + o * len);
    Var<T> piece = detail::make_output(tape, std::move(out), x);
    if (piece.requires_grad()) {
      tape.record([x, piece, outer, len, total, off]() mutable {
        const T* g = piece.grad().data();
        T* gx = x.grad().data();
        for (std::int64_t o = 0; o < outer; ++o)
          for (std::int64_t i = 0; i < len; ++i) gx[o * total + off + i] += g[o * len + i];
      });
    }
    pieces.push_back(std::move(piece));
    off += len;
  }
  return pieces;
}

/// Rows of `table` [V, d] at `ids` (each in [0, V)): [ids.size(), d].
template <class T>
Var<T> embedding(Tape<T>& tape, const Var<T>& table, const std::vector<std::int64_t>& ids) {
  const std::int64_t vocab = table.value().dim(0), d = table.value().cols();
  Tensor<T> out({static_cast<std::int64_t>(ids.size()), d});
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      throw ShapeError("embedding: token id " + std::to_string(ids[i]) + " outside [0, " +
                       std::to_string(vocab) + ")");
    std::copy_n(table.value().data() + ids[i] * d, d,
                out.data() + static_cast<std::int64_t>(i) * d);
  }
  Var<T> result = detail::make_output(tape, std::move(out), table);
  if (result.requires_grad()) {
    tape.record([table, result, ids, d]() mutable {
      const T* g = result.grad().data();
      T* gt = table.grad().data();
      for (std::size_t i = 0; i < ids.size(); ++i)
        for (std::int64_t j = 0; j < d; ++j)
          gt[ids[i] * d + j] += g[static_cast<std::int64_t>(i) * d + j];
    });
  }
  return result;
}

}  // namespace peft::ops
