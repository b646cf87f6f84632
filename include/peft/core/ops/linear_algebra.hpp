#pragma once
// Matrix products: matmul (transposes, batched) and the fused linear layer. Every product goes
// through detail::gemm (threaded by blocks of the output).
#include <utility>

#include "peft/core/ops/common.hpp"
#include "peft/core/ops/gemm.hpp"

namespace peft::ops {

/// Layout of a linear layer's weight as stored in its checkpoint.
enum class WeightLayout {
  OutIn,  ///< [out, in], y = x Wᵀ (torch.nn.Linear, LLaMA)
  InOut,  ///< [in, out], y = x W (GPT-2's Conv1D, fan_in_fan_out)
};

/// C = op(A) op(B). A [M, K] (or [K, M] with trans_a), B [K, N] (or [N, K] with trans_b).
/// Batched: A [batch, M, K] with B [batch, K, N] (per-batch products), or A [..., K] with a 2-D B
/// (the leading dimensions of A are flattened into rows; no trans_a).
template <class T>
Var<T> matmul(Tape<T>& tape, const Var<T>& a, const Var<T>& b, bool trans_a = false,
              bool trans_b = false) {
  const Tensor<T>& av = a.value();
  const Tensor<T>& bv = b.value();
  const bool batched = av.rank() == 3 && bv.rank() == 3;
  detail::check(bv.rank() == 2 || batched, "matmul",
                "unsupported ranks " + shape_string(av.shape()) + " x " + shape_string(bv.shape()));
  detail::check(!trans_a || av.rank() == 2 || batched, "matmul",
                "trans_a needs a 2-D or batched A");
  const std::int64_t batch = batched ? av.dim(0) : 1;
  if (batched) detail::check(bv.dim(0) == batch, "matmul", "batch sizes differ");
  const std::int64_t a_rows = batched ? av.dim(1) : av.rows(), a_cols = av.cols();
  const std::int64_t b_rows = bv.dim(bv.rank() - 2), b_cols = bv.cols();
  const std::int64_t m = trans_a ? a_cols : a_rows, k = trans_a ? a_rows : a_cols;
  const std::int64_t kb = trans_b ? b_cols : b_rows, n = trans_b ? b_rows : b_cols;
  detail::check(k == kb, "matmul",
                "inner dimensions differ: " + shape_string(av.shape()) + (trans_a ? "ᵀ" : "") +
                    " x " + shape_string(bv.shape()) + (trans_b ? "ᵀ" : ""));
  Shape out_shape;
  if (batched)
    out_shape = {batch, m, n};
  else if (trans_a)
    out_shape = {m, n};
  else {
    out_shape = av.shape();
    out_shape.back() = n;
  }
  Tensor<T> out(out_shape);
  for (std::int64_t i = 0; i < batch; ++i)
    detail::gemm(av.data() + i * a_rows * a_cols, a_cols, trans_a,
                 bv.data() + (batched ? i * b_rows * b_cols : 0), b_cols, trans_b,
                 out.data() + i * m * n, n, m, n, k, T(1), true);  // out is zero
  Var<T> result = detail::make_output(tape, std::move(out), a, b);
  if (result.requires_grad()) {
    tape.record([a, b, result, trans_a, trans_b, batch, batched, a_rows, a_cols, b_rows, b_cols, m,
                 n, k]() mutable {
      const Tensor<T>& g = result.grad();
      for (std::int64_t i = 0; i < batch; ++i) {
        const T* gm = g.data() + i * m * n;  // [m, n]
        const T* am = a.value().data() + i * a_rows * a_cols;
        const T* bm = b.value().data() + (batched ? i * b_rows * b_cols : 0);
        if (a.requires_grad()) {
          T* ga = a.grad().data() + i * a_rows * a_cols;
          // d op(A) = G op(B)ᵀ; for trans_a the gradient of A is its transpose: op(B) Gᵀ.
          if (!trans_a)
            detail::gemm(gm, n, false, bm, b_cols, !trans_b, ga, a_cols, m, k, n, T(1), true);
          else
            detail::gemm(bm, b_cols, trans_b, gm, n, true, ga, a_cols, k, m, n, T(1), true);
        }
        if (b.requires_grad()) {
          T* gb = b.grad().data() + (batched ? i * b_rows * b_cols : 0);
          // d op(B) = op(A)ᵀ G; for trans_b the gradient of B is Gᵀ op(A).
          if (!trans_b)
            detail::gemm(am, a_cols, !trans_a, gm, n, false, gb, b_cols, k, n, m, T(1), true);
          else
            detail::gemm(gm, n, true, am, a_cols, trans_a, gb, b_cols, n, k, m, T(1), true);
        }
      }
    });
  }
  return result;
}

namespace detail {
// y = x Wᵀ + b (out_in) or x W + b: the bias is written first and the product accumulates onto
// it, so the bias costs no extra pass over y. x [N, in], y [N, out], zero on entry (as a new
// Tensor is).
template <class T>
void linear_forward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>* bias, bool out_in,
                    Tensor<T>& y) {
  const std::int64_t rows = x.rows(), in = x.cols(), out = y.cols();
  if (bias) {
    const T* bv = bias->data();
    T* yv = y.data();
    PEFT_PARALLEL_FOR_IF(rows * out >= kParallelMinElements)
    for (std::int64_t r = 0; r < rows; ++r) std::copy_n(bv, out, yv + r * out);
  }
  gemm(x.data(), in, false, w.data(), w.cols(), out_in, y.data(), out, rows, out, in, T(1), true);
}

// The adjoint of linear_forward for output gradient g [N, out]: dx += g W (out_in) or g Wᵀ,
// dW += gᵀ x or xᵀ g, db += Σ_rows g, each only for inputs that require a gradient.
template <class T>
void linear_backward(const Tensor<T>& g, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                     bool out_in) {
  const std::int64_t rows = g.rows(), out = g.cols(), in = x.value().cols();
  const Tensor<T>& w = weight.value();
  if (x.requires_grad())
    gemm(g.data(), out, false, w.data(), w.cols(), !out_in, x.grad().data(), in, rows, in, out,
         T(1), true);
  if (weight.requires_grad()) {
    const T* xv = x.value().data();
    T* gw = weight.grad().data();
    if (out_in)
      gemm(g.data(), out, true, xv, in, false, gw, in, out, in, rows, T(1), true);
    else
      gemm(xv, in, true, g.data(), out, false, gw, out, in, out, rows, T(1), true);
  }
  if (bias && bias.requires_grad()) bias.grad().vector() += g.matrix().colwise().sum().transpose();
}
}  // namespace detail

/// y = x Wᵀ + b (OutIn) or x W + b (InOut). x [..., in], W [out, in] or [in, out], b [out] or
/// undefined. y [..., out]. A frozen W costs no dW product and no gradient buffer.
template <class T>
Var<T> linear(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
              WeightLayout layout) {
  const Tensor<T>& xv = x.value();
  const Tensor<T>& wv = weight.value();
  detail::check(wv.rank() == 2, "linear", "weight must be 2-D, got " + shape_string(wv.shape()));
  const bool out_in = layout == WeightLayout::OutIn;
  const std::int64_t in = out_in ? wv.dim(1) : wv.dim(0);
  const std::int64_t out_features = out_in ? wv.dim(0) : wv.dim(1);
  detail::check(xv.cols() == in, "linear",
                "input " + shape_string(xv.shape()) + " does not fit weight " +
                    shape_string(wv.shape()) + (out_in ? " [out, in]" : " [in, out]"));
  if (bias) detail::check(bias.value().numel() == out_features, "linear", "bias size mismatch");
  Shape out_shape = xv.shape();
  out_shape.back() = out_features;
  Tensor<T> out(out_shape);
  detail::linear_forward(xv, wv, bias ? &bias.value() : nullptr, out_in, out);
  Var<T> result = bias ? detail::make_output(tape, std::move(out), x, weight, bias)
                       : detail::make_output(tape, std::move(out), x, weight);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, result, out_in]() mutable {
      detail::linear_backward(std::as_const(result.grad()), x, weight, bias, out_in);
    });
  }
  return result;
}

}  // namespace peft::ops
