#pragma once
// Ops over a frozen weight in bf16 or NF4 (core/frozen_weight.hpp): the projection, the token
// embedding lookup, and the tied head fused with its loss. W never gets a gradient; x (and a
// bias that requires one) do. The weight is held by shared_ptr so that a closure keeps it alive.
#include <memory>
#include <utility>
#include <vector>

#include "peft/core/frozen_weight.hpp"
#include "peft/core/ops/common.hpp"
#include "peft/core/ops/loss.hpp"

namespace peft::ops {

using FrozenWeightPtr = std::shared_ptr<const FrozenWeight>;

namespace detail {
// y = x Wᵀ + b for a frozen W: the bias rows first, the product accumulated onto them.
template <class T>
Tensor<T> frozen_linear_values(const Tensor<T>& x, const FrozenWeight& w, const Var<T>& bias,
                               const char* op) {
  check(x.cols() == w.cols(), op,
        "input " + shape_string(x.shape()) + " does not fit frozen weight '" + w.name() + "' [" +
            std::to_string(w.rows()) + ", " + std::to_string(w.cols()) + "] [out, in]");
  if (bias) check(bias.value().numel() == w.rows(), op, "bias size mismatch");
  Shape out_shape = x.shape();
  out_shape.back() = w.rows();
  Tensor<T> y(out_shape);
  const std::int64_t rows = x.rows(), out = w.rows();
  if (bias)
    for (std::int64_t r = 0; r < rows; ++r)
      std::copy_n(bias.value().data(), out, y.data() + r * out);
  w.forward(x.data(), x.cols(), rows, y.data(), out, bias.defined());
  return y;
}

// dx += g W, db += Σ_rows g, each only when it requires a gradient.
template <class T>
void frozen_linear_backward(const Tensor<T>& g, const Var<T>& x, const FrozenWeight& w,
                            const Var<T>& bias) {
  if (x.requires_grad()) w.backward(g.data(), g.cols(), g.rows(), x.grad().data(), w.cols(), true);
  if (bias && bias.requires_grad()) bias.grad().vector() += g.matrix().colwise().sum().transpose();
}
}  // namespace detail

/// y = x Wᵀ + b for a frozen W [out, in] in bf16 or NF4. x [..., in], b [out] or undefined,
/// y [..., out]. Backward: dx = dy W (and db), never dW.
template <class T>
Var<T> frozen_linear(Tape<T>& tape, const Var<T>& x, const FrozenWeightPtr& weight,
                     const Var<T>& bias) {
  check(weight != nullptr, "frozen_linear", "no weight");
  Tensor<T> y = detail::frozen_linear_values(x.value(), *weight, bias, "frozen_linear");
  Var<T> result =
      bias ? make_output(tape, std::move(y), x, bias) : make_output(tape, std::move(y), x);
  if (result.requires_grad())
    tape.record([x, weight, bias, result] {
      detail::frozen_linear_backward(std::as_const(result.grad()), x, *weight, bias);
    });
  return result;
}

/// y = x Wᵀ + b + s·(x Aᵀ) Bᵀ for a frozen W [out, in] in bf16 or NF4 (A [r, in], B [out, r]):
/// lora_linear (low_rank.hpp) on a frozen base. The low-rank term is added into the frozen
/// product's output buffer, so the op holds one [..., out] tensor; backward keeps only
/// hᵀ = A xᵀ [r, N] and adds the frozen product's dx and the low-rank path's into one buffer.
template <class T>
Var<T> frozen_lora_linear(Tape<T>& tape, const Var<T>& x, const FrozenWeightPtr& weight,
                          const Var<T>& bias, const Var<T>& a, const Var<T>& b, T s) {
  check(weight != nullptr, "frozen_lora_linear", "no weight");
  const std::int64_t r = a.value().dim(0), in = x.value().cols(), out = weight->rows();
  const std::int64_t n = x.value().rows();
  check(a.value().rank() == 2 && b.value().rank() == 2 && b.value().dim(1) == r &&
            a.value().dim(1) == in && b.value().dim(0) == out,
        "frozen_lora_linear",
        "A " + shape_string(a.shape()) + " and B " + shape_string(b.shape()) +
            " do not fit input " + shape_string(x.shape()) + " and frozen weight [" +
            std::to_string(out) + ", " + std::to_string(weight->cols()) + "]");
  Tensor<T> y = detail::frozen_linear_values(x.value(), *weight, bias, "frozen_lora_linear");
  Tensor<T> h_t(Shape{r, n});  // A xᵀ, kept for backward
  detail::gemm(a.value().data(), in, false, x.value().data(), in, true, h_t.data(), n, r, n, in);
  detail::gemm(h_t.data(), n, true, b.value().data(), r, true, y.data(), out, n, out, r, s, true);
  Var<T> result = bias ? make_output(tape, std::move(y), x, bias, a, b)
                       : make_output(tape, std::move(y), x, a, b);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, a, b, result, s, h_t = std::move(h_t), n, in, r, out] {
      const Tensor<T>& g = std::as_const(result.grad());  // [N, out]
      const bool need_a = a.requires_grad(), need_x = x.requires_grad();
      AlignedVector<T> gh(need_a || need_x ? static_cast<std::size_t>(n * r) : 0);  // s g B
      if (!gh.empty())
        detail::gemm(g.data(), out, false, b.value().data(), r, false, gh.data(), r, n, r, out, s);
      if (b.requires_grad())  // dB += s gᵀ h
        detail::gemm(g.data(), out, true, h_t.data(), n, true, b.grad().data(), r, out, r, n, s,
                     true);
      if (need_a)  // dA += ghᵀ x
        detail::gemm(gh.data(), r, true, x.value().data(), in, false, a.grad().data(), in, r, in, n,
                     T(1), true);
      if (need_x) {  // dx += g W + gh A
        weight->backward(g.data(), out, n, x.grad().data(), in, true);
        detail::gemm(gh.data(), r, false, a.value().data(), in, false, x.grad().data(), in, n, in,
                     r, T(1), true);
      }
      if (bias && bias.requires_grad())
        bias.grad().vector() += g.matrix().colwise().sum().transpose();
    });
  }
  return result;
}

/// Rows `ids` of a frozen table W [vocab, d], as T: [ids.size(), d]. No gradient.
template <class T>
Var<T> frozen_embedding(const FrozenWeightPtr& table, const std::vector<std::int64_t>& ids) {
  check(table != nullptr, "frozen_embedding", "no table");
  const std::int64_t vocab = table->rows(), d = table->cols();
  Tensor<T> out({static_cast<std::int64_t>(ids.size()), d});
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      throw ShapeError("embedding: token id " + std::to_string(ids[i]) + " outside [0, " +
                       std::to_string(vocab) + ")");
    table->rows_as(ids[i], ids[i] + 1, out.data() + static_cast<std::int64_t>(i) * d);
  }
  return Var<T>(std::move(out), false);
}

/// linear_cross_entropy (loss.hpp) with a frozen head W [V, d] in bf16 or NF4.
template <class T>
LogitsAndLoss<T> frozen_linear_cross_entropy(Tape<T>& tape, const Var<T>& x,
                                             const FrozenWeightPtr& weight,
                                             const std::vector<std::int64_t>& targets) {
  check(weight != nullptr, "frozen_linear_cross_entropy", "no weight");
  Tensor<T> logits =
      detail::frozen_linear_values(x.value(), *weight, Var<T>{}, "frozen_linear_cross_entropy");
  return detail::head_cross_entropy(
      tape, std::move(logits), tape.needs_grad(x), targets, "frozen_linear_cross_entropy",
      [x, weight](const Tensor<T>& g) { detail::frozen_linear_backward(g, x, *weight, Var<T>{}); });
}

}  // namespace peft::ops
