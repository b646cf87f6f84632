#pragma once
// Elementwise ops: add and mul (same shape, or a vector broadcast over the last dimension),
// scale, GELU (tanh form), SiLU, tanh, sigmoid.
#include <algorithm>
#include <cmath>

#include "peft/core/ops/common.hpp"

namespace peft::ops {

namespace detail {
// b either has a's shape (returns 0), or its shape without leading 1s is a suffix of a's shape
// and b repeats over a's leading dimensions (returns the repeated block's size, b.numel()).
template <class T>
std::int64_t broadcast_block(const Tensor<T>& a, const Tensor<T>& b, const std::string& op) {
  if (a.shape() == b.shape()) return 0;
  Shape core = b.shape();
  while (!core.empty() && core.front() == 1) core.erase(core.begin());
  bool suffix = core.size() <= a.shape().size();
  for (std::size_t i = 0; suffix && i < core.size(); ++i)
    suffix = core[core.size() - 1 - i] == a.shape()[a.shape().size() - 1 - i];
  check(suffix && b.numel() > 0, op,
        "cannot broadcast " + shape_string(b.shape()) + " over " + shape_string(a.shape()));
  return b.numel();
}
// a viewed as [a.numel() / block, block] rows.
template <class T>
MatrixMap<T> as_rows(Tensor<T>& a, std::int64_t block) {
  return MatrixMap<T>(a.data(), a.numel() / block, block);
}
template <class T>
ConstMatrixMap<T> as_rows(const Tensor<T>& a, std::int64_t block) {
  return ConstMatrixMap<T>(a.data(), a.numel() / block, block);
}
}  // namespace detail

/// a + b; b has a's shape, or a trailing part of it repeated over a's leading dimensions
/// (a bias [d] over [N, d]; positions [1, T, d] over [B, T, d]).
template <class T>
Var<T> add(Tape<T>& tape, const Var<T>& a, const Var<T>& b) {
  const std::int64_t block = detail::broadcast_block(a.value(), b.value(), "add");
  Tensor<T> out = a.value();
  if (block)
    detail::as_rows(out, block).rowwise() += b.value().vector().transpose();
  else
    out.vector() += b.value().vector();
  Var<T> result = detail::make_output(tape, std::move(out), a, b);
  if (result.requires_grad()) {
    tape.record([a, b, result, block]() mutable {
      const Tensor<T>& g = result.grad();
      if (a.requires_grad()) a.grad().vector() += g.vector();
      if (b.requires_grad()) {
        if (block)
          b.grad().vector() += detail::as_rows(g, block).colwise().sum().transpose();
        else
          b.grad().vector() += g.vector();
      }
    });
  }
  return result;
}

/// a ⊙ b, with add's broadcasting rule for b.
template <class T>
Var<T> mul(Tape<T>& tape, const Var<T>& a, const Var<T>& b) {
  const std::int64_t block = detail::broadcast_block(a.value(), b.value(), "mul");
  Tensor<T> out = a.value();
  if (block)
    detail::as_rows(out, block).array().rowwise() *= b.value().vector().transpose().array();
  else
    out.vector().array() *= b.value().vector().array();
  Var<T> result = detail::make_output(tape, std::move(out), a, b);
  if (result.requires_grad()) {
    tape.record([a, b, result, block]() mutable {
      const Tensor<T>& g = result.grad();
      if (a.requires_grad()) {
        if (block)
          detail::as_rows(a.grad(), block).array() +=
              detail::as_rows(g, block).array().rowwise() * b.value().vector().transpose().array();
        else
          a.grad().vector().array() += g.vector().array() * b.value().vector().array();
      }
      if (b.requires_grad()) {
        if (block)
          b.grad().vector() +=
              (detail::as_rows(g, block).array() * detail::as_rows(a.value(), block).array())
                  .colwise()
                  .sum()
                  .matrix()
                  .transpose();
        else
          b.grad().vector().array() += g.vector().array() * a.value().vector().array();
      }
    });
  }
  return result;
}

/// s · a for a constant s.
template <class T>
Var<T> scale(Tape<T>& tape, const Var<T>& a, T s) {
  Tensor<T> out = a.value();
  out.vector() *= s;
  Var<T> result = detail::make_output(tape, std::move(out), a);
  if (result.requires_grad())
    tape.record([a, result, s]() mutable { a.grad().vector() += s * result.grad().vector(); });
  return result;
}

namespace detail {
// y = f(x) elementwise; backward g * f'(x, y). Value and derivative given as one functor pair.
template <class T, class Forward, class Derivative>
Var<T> unary(Tape<T>& tape, const Var<T>& a, Forward f, Derivative df) {
  Tensor<T> out(a.value().shape());
  const T* x = a.value().data();
  T* y = out.data();
  const std::int64_t n = out.numel();
  for (std::int64_t i = 0; i < n; ++i) y[i] = f(x[i]);
  Var<T> result = make_output(tape, std::move(out), a);
  if (result.requires_grad()) {
    tape.record([a, result, df, n]() mutable {
      const T* xs = a.value().data();
      const T* ys = result.value().data();
      const T* g = result.grad().data();
      T* gx = a.grad().data();
      for (std::int64_t i = 0; i < n; ++i) gx[i] += g[i] * df(xs[i], ys[i]);
    });
  }
  return result;
}
}  // namespace detail

namespace detail {
// Runs body(begin, count) over [0, n) in blocks of `block` elements, blocks spread over the
// threads.
template <class Body>
void parallel_blocks(std::int64_t n, Body body, std::int64_t block = 1 << 14) {
  const std::int64_t blocks = (n + block - 1) / block;
  PEFT_PARALLEL_FOR_IF(n >= kParallelMinElements / 2)
  for (std::int64_t i = 0; i < blocks; ++i) body(i * block, std::min(block, n - i * block));
}
}  // namespace detail

/// GELU, tanh approximation (GPT-2's "gelu_new"):
/// 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))). Vectorised (Eigen's tanh) and threaded.
template <class T>
Var<T> gelu_tanh(Tape<T>& tape, const Var<T>& a) {
  using Array = Eigen::Array<T, Eigen::Dynamic, 1>;
  using ArrayMap = Eigen::Map<Array>;
  using ConstArrayMap = Eigen::Map<const Array>;
  static constexpr T k = T(0.7978845608028654);  // √(2/π)
  static constexpr T c = T(0.044715);
  Tensor<T> out(a.value().shape());
  const std::int64_t n = out.numel();
  {
    const T* xs = a.value().data();
    T* ys = out.data();
    detail::parallel_blocks(n, [&](std::int64_t begin, std::int64_t count) {
      const ConstArrayMap x(xs + begin, count);
      ArrayMap(ys + begin, count) = T(0.5) * x * (T(1) + (k * (x + c * x.cube())).tanh());
    });
  }
  Var<T> result = detail::make_output(tape, std::move(out), a);
  if (result.requires_grad()) {
    tape.record([a, result, n]() mutable {
      const T* xs = a.value().data();
      const T* gs = result.grad().data();
      T* gx = a.grad().data();
      detail::parallel_blocks(n, [&](std::int64_t begin, std::int64_t count) {
        const ConstArrayMap x(xs + begin, count);
        const ConstArrayMap g(gs + begin, count);
        const Array t = (k * (x + c * x.cube())).tanh();
        ArrayMap(gx + begin, count) +=
            g * (T(0.5) * (T(1) + t) +
                 T(0.5) * x * (T(1) - t.square()) * k * (T(1) + T(3) * c * x.square()));
      });
    });
  }
  return result;
}

/// SiLU: x σ(x).
template <class T>
Var<T> silu(Tape<T>& tape, const Var<T>& a) {
  return detail::unary(
      tape, a, [](T x) { return x / (T(1) + std::exp(-x)); },
      [](T x, T) {
        const T s = T(1) / (T(1) + std::exp(-x));
        return s * (T(1) + x * (T(1) - s));
      });
}

template <class T>
Var<T> tanh(Tape<T>& tape, const Var<T>& a) {
  return detail::unary(
      tape, a, [](T x) { return std::tanh(x); }, [](T, T y) { return T(1) - y * y; });
}

template <class T>
Var<T> sigmoid(Tape<T>& tape, const Var<T>& a) {
  return detail::unary(
      tape, a, [](T x) { return T(1) / (T(1) + std::exp(-x)); },
      [](T, T y) { return y * (T(1) - y); });
}

template <class T>
Var<T> relu(Tape<T>& tape, const Var<T>& a) {
  return detail::unary(
      tape, a, [](T x) { return x > T(0) ? x : T(0); },
      [](T x, T) { return x > T(0) ? T(1) : T(0); });
}

/// Sum of all elements, as a [1] tensor.
template <class T>
Var<T> sum(Tape<T>& tape, const Var<T>& a) {
  Tensor<T> out({1}, a.value().vector().sum());
  Var<T> result = detail::make_output(tape, std::move(out), a);
  if (result.requires_grad())
    tape.record([a, result]() mutable { a.grad().vector().array() += result.grad()[0]; });
  return result;
}

}  // namespace peft::ops
