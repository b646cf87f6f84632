#pragma once
// The LoRA linear: y = base(x) + s·(x Aᵀ) Bᵀ in one op, without full-size temporaries.
#include "peft/core/ops/linear_algebra.hpp"

namespace peft::ops {

/// y = x Wᵀ + b + s·(x Aᵀ) Bᵀ (W in `layout`; A [r, in], B [out, r]). The low-rank path adds
/// into the output buffer of the base product; backward keeps only h = x Aᵀ [N, r].
template <class T>
Var<T> lora_linear(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                   WeightLayout layout, const Var<T>& a, const Var<T>& b, T s) {
  const std::int64_t r = a.value().dim(0);
  detail::check(a.value().rank() == 2 && b.value().rank() == 2 && b.value().dim(1) == r &&
                    a.value().dim(1) == x.value().cols(),
                "lora_linear",
                "A " + shape_string(a.shape()) + " and B " + shape_string(b.shape()) +
                    " do not fit input " + shape_string(x.shape()));
  Tape<T> inner(false);  // the base product, without recording: this op records one closure
  Var<T> base = linear(inner, x, weight, bias, layout);
  detail::check(base.value().cols() == b.value().dim(0), "lora_linear",
                "B " + shape_string(b.shape()) + " does not fit the output " +
                    shape_string(base.shape()));
  Tensor<T> out = std::move(base.value());
  RowMatrix<T> h = x.value().matrix() * a.value().matrix().transpose();  // [N, r]
  out.matrix().noalias() += (s * h) * b.value().matrix().transpose();
  Var<T> result = bias ? detail::make_output(tape, std::move(out), x, weight, bias, a, b)
                       : detail::make_output(tape, std::move(out), x, weight, a, b);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, a, b, result, layout, s, h = std::move(h)]() mutable {
      ConstMatrixMap<T> g = std::as_const(result.grad()).matrix();
      ConstMatrixMap<T> bm = std::as_const(b.value()).matrix();
      ConstMatrixMap<T> am = std::as_const(a.value()).matrix();
      ConstMatrixMap<T> xm = std::as_const(x.value()).matrix();
      const RowMatrix<T> gh = s * (g * bm);  // [N, r]
      if (b.requires_grad()) b.grad().matrix().noalias() += s * (g.transpose() * h);
      if (a.requires_grad()) a.grad().matrix().noalias() += gh.transpose() * xm;
      if (x.requires_grad()) {
        MatrixMap<T> gx = x.grad().matrix();
        ConstMatrixMap<T> wm = std::as_const(weight.value()).matrix();
        if (layout == WeightLayout::OutIn) gx.noalias() += g * wm;
        else gx.noalias() += g * wm.transpose();
        gx.noalias() += gh * am;
      }
      if (weight.requires_grad()) {
        MatrixMap<T> gw = weight.grad().matrix();
        if (layout == WeightLayout::OutIn) gw.noalias() += g.transpose() * xm;
        else gw.noalias() += xm.transpose() * g;
      }
      if (bias && bias.requires_grad()) bias.grad().vector() += g.colwise().sum().transpose();
    });
  }
  return result;
}

}  // namespace peft::ops
