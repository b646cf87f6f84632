#pragma once
// Cross-entropy over logits rows, with an ignore index; and the output head fused with it.
#include <cmath>
#include <limits>
#include <utility>

#include "peft/core/ops/common.hpp"
#include "peft/core/ops/linear_algebra.hpp"

namespace peft::ops {

inline constexpr std::int64_t kIgnoreIndex = -100;

namespace detail {
// Per-row log-sum-exp of logits [n, vocab] for the counted rows (the rest stay 0), and the
// mean loss over them (NaN when none is counted). Rows run in parallel; the total is summed
// in row order afterwards, so the loss does not depend on the thread count.
template <class T>
T cross_entropy_rows(const T* logits, std::int64_t n, std::int64_t vocab,
                     const std::vector<std::int64_t>& targets, AlignedVector<T>& lse,
                     std::int64_t& counted) {
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int64_t y = targets[static_cast<std::size_t>(r)];
    if (y != kIgnoreIndex && (y < 0 || y >= vocab))
      throw ShapeError("cross_entropy: target " + std::to_string(y) + " outside [0, " +
                       std::to_string(vocab) + ")");
  }
  lse.assign(static_cast<std::size_t>(n), T(0));
  AlignedVector<T> row_loss(static_cast<std::size_t>(n), T(0));
  PEFT_PARALLEL_FOR
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int64_t y = targets[static_cast<std::size_t>(r)];
    if (y == kIgnoreIndex) continue;
    const Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>> row(logits + r * vocab, vocab);
    const T mx = row.maxCoeff();
    const T l = std::log((row - mx).exp().sum()) + mx;
    lse[static_cast<std::size_t>(r)] = l;
    row_loss[static_cast<std::size_t>(r)] = l - row[y];
  }
  T total = 0;
  counted = 0;
  for (std::int64_t r = 0; r < n; ++r)
    if (targets[static_cast<std::size_t>(r)] != kIgnoreIndex) {
      total += row_loss[static_cast<std::size_t>(r)];
      ++counted;
    }
  return counted ? total / T(counted) : std::numeric_limits<T>::quiet_NaN();
}

// d(scale · Σ_counted loss_r)/d logits for softmax rows exp(z − lse): out = scale·(p − onehot)
// on counted rows, 0 on the others; `accumulate` adds instead. out may alias logits.
template <class T>
void cross_entropy_grad(const T* logits, std::int64_t n, std::int64_t vocab,
                        const std::vector<std::int64_t>& targets, const AlignedVector<T>& lse,
                        T scale, T* out, bool accumulate) {
  using RowArray = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRowArray = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  PEFT_PARALLEL_FOR
  for (std::int64_t r = 0; r < n; ++r) {
    const std::int64_t y = targets[static_cast<std::size_t>(r)];
    RowArray o(out + r * vocab, vocab);
    if (y == kIgnoreIndex) {
      if (!accumulate) o.setZero();
      continue;
    }
    const ConstRowArray z(logits + r * vocab, vocab);
    const T l = lse[static_cast<std::size_t>(r)];
    if (accumulate)
      o += scale * (z - l).exp();
    else
      o = scale * (z - l).exp();
    o[y] -= scale;
  }
}
}  // namespace detail

/// Mean over counted rows of −log softmax(logits[n])[target[n]]; rows whose target is −100 are
/// not counted (torch's semantics: NaN when none is). logits [N, V] (leading dimensions are
/// flattened into rows), targets [N]. Out [1]. Backward keeps only each row's log-sum-exp.
template <class T>
Var<T> cross_entropy(Tape<T>& tape, const Var<T>& logits,
                     const std::vector<std::int64_t>& targets) {
  const std::int64_t n = logits.value().rows(), vocab = logits.value().cols();
  detail::check(
      static_cast<std::int64_t>(targets.size()) == n, "cross_entropy",
      "targets size " + std::to_string(targets.size()) + " != logits rows " + std::to_string(n));
  AlignedVector<T> lse;
  std::int64_t counted = 0;
  const T mean = detail::cross_entropy_rows(logits.value().data(), n, vocab, targets, lse, counted);
  Var<T> result = detail::make_output(tape, Tensor<T>({1}, mean), logits);
  if (result.requires_grad() && counted) {
    tape.record([logits, result, targets, lse = std::move(lse), n, vocab, counted]() mutable {
      const T g = result.grad()[0] / T(counted);
      detail::cross_entropy_grad(logits.value().data(), n, vocab, targets, lse, g,
                                 logits.grad().data(), true);
    });
  }
  return result;
}

template <class T>
struct LogitsAndLoss {
  Var<T> logits;  ///< [..., V]
  Var<T> loss;    ///< [1]
};

namespace detail {
/// The fused head + loss of linear_cross_entropy for any head product: `logits` holds the
/// head's values [N, V] (no closure recorded for them), `grad` whether the head's inputs need a
/// gradient, and `head_backward(g)` adds the head's input adjoints for logits adjoint g [N, V].
template <class T, class HeadBackward>
LogitsAndLoss<T> head_cross_entropy(Tape<T>& tape, Tensor<T> logits, bool grad,
                                    const std::vector<std::int64_t>& targets, const char* op,
                                    HeadBackward head_backward) {
  LogitsAndLoss<T> out;
  const std::int64_t n = logits.rows(), vocab = logits.cols();
  check(static_cast<std::int64_t>(targets.size()) == n, op,
        "targets size " + std::to_string(targets.size()) + " != logits rows " + std::to_string(n));
  AlignedVector<T> lse;
  std::int64_t counted = 0;
  const T mean = cross_entropy_rows(logits.data(), n, vocab, targets, lse, counted);
  out.logits = Var<T>(std::move(logits), grad);
  out.loss = Var<T>(Tensor<T>({1}, mean), grad);
  if (grad) {
    tape.record([head_backward = std::move(head_backward), logits = out.logits, loss = out.loss,
                 targets, lse = std::move(lse), n, vocab, counted]() mutable {
      const bool from_loss = loss.has_grad() && counted > 0;
      if (!from_loss && !logits.has_grad()) return;
      Tensor<T> g = logits.sole_handle() ? std::move(logits.value()) : logits.value();
      if (from_loss)
        cross_entropy_grad(g.data(), n, vocab, targets, lse, loss.grad()[0] / T(counted), g.data(),
                           false);
      else
        g.set_zero();
      if (logits.has_grad()) g.vector() += std::as_const(logits).grad().vector();
      logits = Var<T>{};  // the logits' own gradient buffer, if any, is not needed any more
      head_backward(std::as_const(g));
    });
  }
  return out;
}
}  // namespace detail

/// The output head and its loss as one op: logits = linear(x, W, b, layout) and
/// loss = cross_entropy(logits, targets), with the values and gradients of those two ops.
/// The logits are the only vocabulary-sized buffer: when the caller has dropped its handle to
/// them by the time backward runs, the backward turns that buffer into d(loss)/d(logits) in
/// place (otherwise it works on a copy). Gradients that other ops send to the logits are added.
template <class T>
LogitsAndLoss<T> linear_cross_entropy(Tape<T>& tape, const Var<T>& x, const Var<T>& weight,
                                      const Var<T>& bias, WeightLayout layout,
                                      const std::vector<std::int64_t>& targets) {
  Tensor<T> logits;
  {
    Tape<T> no_record(false);  // the head's values only: this op records its own closure
    logits = std::move(linear(no_record, x, weight, bias, layout).value());
  }
  const bool grad = bias ? tape.needs_grad(x, weight, bias) : tape.needs_grad(x, weight);
  return detail::head_cross_entropy(
      tape, std::move(logits), grad, targets, "linear_cross_entropy",
      [x, weight, bias, out_in = layout == WeightLayout::OutIn](const Tensor<T>& g) {
        detail::linear_backward(g, x, weight, bias, out_in);
      });
}

}  // namespace peft::ops
