#pragma once
// Matrix products: matmul (transposes, batched) and the fused linear layer.
#include "peft/core/ops/common.hpp"

namespace peft::ops {

/// Layout of a linear layer's weight as stored in its checkpoint.
enum class WeightLayout {
  OutIn,  ///< [out, in], y = x Wᵀ (torch.nn.Linear, LLaMA)
  InOut,  ///< [in, out], y = x W (GPT-2's Conv1D, fan_in_fan_out)
};

namespace detail {
// C (+)= op(A) op(B) for row-major maps, choosing the transposes at run time.
template <class T, class MA, class MB, class MC>
void gemm_accumulate(const MA& a, bool trans_a, const MB& b, bool trans_b, MC& c) {
  if (!trans_a && !trans_b) c.noalias() += a * b;
  else if (!trans_a && trans_b) c.noalias() += a * b.transpose();
  else if (trans_a && !trans_b) c.noalias() += a.transpose() * b;
  else c.noalias() += a.transpose() * b.transpose();
}
}  // namespace detail

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
  detail::check(!trans_a || av.rank() == 2 || batched, "matmul", "trans_a needs a 2-D or batched A");
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
  if (batched) out_shape = {batch, m, n};
  else if (trans_a) out_shape = {m, n};
  else {
    out_shape = av.shape();
    out_shape.back() = n;
  }
  Tensor<T> out(out_shape);
  for (std::int64_t i = 0; i < batch; ++i) {
    ConstMatrixMap<T> am(av.data() + i * a_rows * a_cols, a_rows, a_cols);
    ConstMatrixMap<T> bm(bv.data() + (batched ? i * b_rows * b_cols : 0), b_rows, b_cols);
    MatrixMap<T> cm(out.data() + i * m * n, m, n);
    detail::gemm_accumulate<T>(am, trans_a, bm, trans_b, cm);
  }
  Var<T> result = detail::make_output(tape, std::move(out), a, b);
  if (result.requires_grad()) {
    tape.record([a, b, result, trans_a, trans_b, batch, batched, a_rows, a_cols, b_rows, b_cols, m,
                 n]() mutable {
      const Tensor<T>& g = result.grad();
      for (std::int64_t i = 0; i < batch; ++i) {
        ConstMatrixMap<T> gm(g.data() + i * m * n, m, n);
        ConstMatrixMap<T> am(a.value().data() + i * a_rows * a_cols, a_rows, a_cols);
        ConstMatrixMap<T> bm(b.value().data() + (batched ? i * b_rows * b_cols : 0), b_rows, b_cols);
        if (a.requires_grad()) {
          MatrixMap<T> ga(a.grad().data() + i * a_rows * a_cols, a_rows, a_cols);
          // d op(A) = G op(B)ᵀ; for trans_a the gradient of A is its transpose: op(B) Gᵀ.
          if (!trans_a) detail::gemm_accumulate<T>(gm, false, bm, !trans_b, ga);
          else detail::gemm_accumulate<T>(bm, trans_b, gm, true, ga);
        }
        if (b.requires_grad()) {
          MatrixMap<T> gb(b.grad().data() + (batched ? i * b_rows * b_cols : 0), b_rows, b_cols);
          // d op(B) = op(A)ᵀ G; for trans_b the gradient of B is Gᵀ op(A).
          if (!trans_b) detail::gemm_accumulate<T>(am, !trans_a, gm, false, gb);
          else detail::gemm_accumulate<T>(gm, true, am, trans_a, gb);
        }
      }
    });
  }
  return result;
}

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
  {
    MatrixMap<T> y = out.matrix();
    ConstMatrixMap<T> xm = xv.matrix();
    ConstMatrixMap<T> wm = wv.matrix();
    if (out_in) y.noalias() = xm * wm.transpose();
    else y.noalias() = xm * wm;
    if (bias) y.rowwise() += bias.value().vector().transpose();
  }
  Var<T> result = bias ? detail::make_output(tape, std::move(out), x, weight, bias)
                       : detail::make_output(tape, std::move(out), x, weight);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, result, out_in]() mutable {
      ConstMatrixMap<T> g = std::as_const(result.grad()).matrix();
      if (x.requires_grad()) {
        MatrixMap<T> gx = x.grad().matrix();
        ConstMatrixMap<T> wm = std::as_const(weight.value()).matrix();
        if (out_in) gx.noalias() += g * wm;
        else gx.noalias() += g * wm.transpose();
      }
      if (weight.requires_grad()) {
        MatrixMap<T> gw = weight.grad().matrix();
        ConstMatrixMap<T> xm = std::as_const(x.value()).matrix();
        if (out_in) gw.noalias() += g.transpose() * xm;
        else gw.noalias() += xm.transpose() * g;
      }
      if (bias && bias.requires_grad()) bias.grad().vector() += g.colwise().sum().transpose();
    });
  }
  return result;
}

}  // namespace peft::ops
