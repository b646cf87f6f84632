#pragma once
// Fused ops of the reparameterized PEFT methods (DoRA, VeRA, LoKr, LoHa, AdaLoRA). Each adds a
// structured weight update to a base linear product without building the full-size update:
//   dora_linear       y = m/n ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b, n a constant in backward
//   vera_linear       y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (x Âᵀ)) B̂ᵀ), Â, B̂ blocks of shared A, B
//   kronecker_linear  y = x Wᵀ + b + s x (w1 ⊗ w2)ᵀ, through (w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ)
//   row_kron          the face-splitting product (a row-wise Kronecker product), LoHa's factors
//   orthogonality_penalty  ‖P Pᵀ − I‖_F or ‖Pᵀ P − I‖_F, AdaLoRA's regulariser
#include <cmath>
#include <utility>

#include "peft/core/ops/linear_algebra.hpp"

namespace peft::ops {

namespace detail {
// y (+)= x Wᵀ (OutIn) or x W (InOut), for x [N, in].
template <class T, class Y>
void base_product(const Tensor<T>& x, const Tensor<T>& weight, WeightLayout layout, Y&& y) {
  ConstMatrixMap<T> xm = x.matrix();
  ConstMatrixMap<T> wm = weight.matrix();
  if (layout == WeightLayout::OutIn)
    y.noalias() += xm * wm.transpose();
  else
    y.noalias() += xm * wm;
}

// The base product's backward for an output gradient g [N, out]: dx += g W, dW += gᵀ x (in the
// weight's layout), db += Σ_rows g, each only where a gradient is required.
template <class T, class G>
void base_backward(const G& g, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                   WeightLayout layout) {
  if (x.requires_grad()) {
    MatrixMap<T> gx = x.grad().matrix();
    ConstMatrixMap<T> wm = std::as_const(weight.value()).matrix();
    if (layout == WeightLayout::OutIn)
      gx.noalias() += g * wm;
    else
      gx.noalias() += g * wm.transpose();
  }
  if (weight.requires_grad()) {
    MatrixMap<T> gw = weight.grad().matrix();
    ConstMatrixMap<T> xm = std::as_const(x.value()).matrix();
    if (layout == WeightLayout::OutIn)
      gw.noalias() += g.transpose() * xm;
    else
      gw.noalias() += xm.transpose() * g;
  }
  if (bias && bias.requires_grad()) bias.grad().vector() += g.colwise().sum().transpose();
}

// A leading block of a row-major matrix, viewed in place.
template <class T>
using StridedMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
StridedMap<T> leading_block(const Tensor<T>& m, std::int64_t rows, std::int64_t cols) {
  return StridedMap<T>(m.data(), rows, cols, Eigen::OuterStride<>(m.cols()));
}

template <class T>
using RowArray = Eigen::Array<T, 1, Eigen::Dynamic>;

template <class T>
std::int64_t out_features_of(const Tensor<T>& weight, WeightLayout layout) {
  return layout == WeightLayout::OutIn ? weight.dim(0) : weight.dim(1);
}
template <class T>
std::int64_t in_features_of(const Tensor<T>& weight, WeightLayout layout) {
  return layout == WeightLayout::OutIn ? weight.dim(1) : weight.dim(0);
}

template <class T>
Tensor<T> linear_output(const Tensor<T>& x, const Tensor<T>& weight, WeightLayout layout,
                        const std::string& op) {
  check(
      weight.rank() == 2 && x.cols() == in_features_of(weight, layout), op,
      "input " + shape_string(x.shape()) + " does not fit weight " + shape_string(weight.shape()));
  Shape shape = x.shape();
  shape.back() = out_features_of(weight, layout);
  return Tensor<T>(shape);
}
}  // namespace detail

/// DoRA: y = c ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b with c = m / n per output feature. `norm` [out] is
/// the row norm ‖W + s B A‖ computed by the caller and treated as a constant (the reference
/// detaches it), so backward reaches m, A, B and x but not through n. The bias is not rescaled.
/// Keeps h = x Aᵀ [N, r] and the unscaled product L [N, out] for backward.
template <class T>
Var<T> dora_linear(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                   WeightLayout layout, const Var<T>& a, const Var<T>& b, const Var<T>& magnitude,
                   const Tensor<T>& norm, T s) {
  Tensor<T> out = detail::linear_output(x.value(), weight.value(), layout, "dora_linear");
  const std::int64_t out_features = out.cols();
  detail::check(a.value().rank() == 2 && a.value().dim(1) == x.value().cols() &&
                    b.value().rank() == 2 && b.value().dim(0) == out_features &&
                    b.value().dim(1) == a.value().dim(0) &&
                    magnitude.value().numel() == out_features && norm.numel() == out_features,
                "dora_linear",
                "A " + shape_string(a.shape()) + ", B " + shape_string(b.shape()) + ", m " +
                    shape_string(magnitude.shape()) + " do not fit input " +
                    shape_string(x.shape()) + " and weight " + shape_string(weight.shape()));
  RowMatrix<T> h = x.value().matrix() * a.value().matrix().transpose();  // [N, r]
  MatrixMap<T> y = out.matrix();
  detail::base_product(x.value(), weight.value(), layout, y);
  y.noalias() += (s * h) * b.value().matrix().transpose();
  const detail::RowArray<T> norm_row = norm.vector().transpose().array();
  const detail::RowArray<T> c = magnitude.value().vector().transpose().array() / norm_row;
  const bool needs_grad = bias ? tape.needs_grad(x, weight, bias, a, b, magnitude)
                               : tape.needs_grad(x, weight, a, b, magnitude);
  RowMatrix<T> unscaled;  // L, kept only when backward needs it for dm
  if (needs_grad && magnitude.requires_grad()) unscaled = y;
  y.array().rowwise() *= c;
  if (bias) y.rowwise() += bias.value().vector().transpose();
  Var<T> result(std::move(out), needs_grad);
  if (needs_grad) {
    tape.record([x, weight, bias, a, b, magnitude, result, layout, s, c, norm_row, h = std::move(h),
                 unscaled = std::move(unscaled)]() mutable {
      ConstMatrixMap<T> g = std::as_const(result.grad()).matrix();
      if (bias && bias.requires_grad()) bias.grad().vector() += g.colwise().sum().transpose();
      if (magnitude.requires_grad())
        magnitude.grad().vector() +=
            ((g.array() * unscaled.array()).colwise().sum() / norm_row).matrix().transpose();
      const RowMatrix<T> gl = (g.array().rowwise() * c).matrix();  // dL [N, out]
      detail::base_backward<T>(gl, x, weight, Var<T>{}, layout);
      const RowMatrix<T> gh = s * (gl * std::as_const(b.value()).matrix());  // [N, r]
      if (b.requires_grad()) b.grad().matrix().noalias() += s * (gl.transpose() * h);
      if (a.requires_grad())
        a.grad().matrix().noalias() += gh.transpose() * std::as_const(x.value()).matrix();
      if (x.requires_grad()) x.grad().matrix().noalias() += gh * std::as_const(a.value()).matrix();
    });
  }
  return result;
}

/// VeRA: y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (x Âᵀ)) B̂ᵀ) with Â = shared_a[:, :in] and
/// B̂ = shared_b[:out, :] (the shared matrices are sized for the largest adapted layer and
/// frozen: they get no gradient). Keeps h = x Âᵀ [N, r] for backward.
template <class T>
Var<T> vera_linear(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                   WeightLayout layout, const Var<T>& shared_a, const Var<T>& shared_b,
                   const Var<T>& lambda_d, const Var<T>& lambda_b) {
  Tensor<T> out = detail::linear_output(x.value(), weight.value(), layout, "vera_linear");
  const std::int64_t in = x.value().cols(), out_features = out.cols();
  const std::int64_t r = lambda_d.value().numel();
  detail::check(shared_a.value().rank() == 2 && shared_a.value().dim(0) == r &&
                    shared_a.value().dim(1) >= in && shared_b.value().rank() == 2 &&
                    shared_b.value().dim(1) == r && shared_b.value().dim(0) >= out_features &&
                    lambda_b.value().numel() == out_features,
                "vera_linear",
                "shared A " + shape_string(shared_a.shape()) + ", B " +
                    shape_string(shared_b.shape()) + ", λ_d " + shape_string(lambda_d.shape()) +
                    ", λ_b " + shape_string(lambda_b.shape()) + " do not fit a [" +
                    std::to_string(out_features) + ", " + std::to_string(in) + "] layer");
  MatrixMap<T> y = out.matrix();
  detail::base_product(x.value(), weight.value(), layout, y);
  if (bias) y.rowwise() += bias.value().vector().transpose();
  const detail::StridedMap<T> a_block = detail::leading_block(shared_a.value(), r, in);  // [r, in]
  const detail::StridedMap<T> b_block =
      detail::leading_block(shared_b.value(), out_features, r);  // [out, r]
  RowMatrix<T> h = x.value().matrix() * a_block.transpose();     // [N, r]
  const RowMatrix<T> hd =
      (h.array().rowwise() * lambda_d.value().vector().transpose().array()).matrix();
  RowMatrix<T> z = hd * b_block.transpose();  // [N, out]
  y.array() += z.array().rowwise() * lambda_b.value().vector().transpose().array();
  const bool needs_grad = bias ? tape.needs_grad(x, weight, bias, lambda_d, lambda_b)
                               : tape.needs_grad(x, weight, lambda_d, lambda_b);
  Var<T> result(std::move(out), needs_grad);
  if (needs_grad) {
    tape.record([x, weight, bias, layout, shared_a, shared_b, lambda_d, lambda_b, result, in,
                 out_features, h = std::move(h)]() mutable {
      ConstMatrixMap<T> g = std::as_const(result.grad()).matrix();
      detail::base_backward<T>(g, x, weight, bias, layout);
      const std::int64_t r = lambda_d.value().numel();
      const detail::StridedMap<T> a_block =
          detail::leading_block(std::as_const(shared_a.value()), r, in);
      const detail::StridedMap<T> b_block =
          detail::leading_block(std::as_const(shared_b.value()), out_features, r);
      const detail::RowArray<T> ld = lambda_d.value().vector().transpose().array();
      if (lambda_b.requires_grad()) {
        const RowMatrix<T> z = (h.array().rowwise() * ld).matrix() * b_block.transpose();
        lambda_b.grad().vector() += (g.array() * z.array()).colwise().sum().matrix().transpose();
      }
      const RowMatrix<T> gz =
          (g.array().rowwise() * lambda_b.value().vector().transpose().array()).matrix();
      const RowMatrix<T> ghd = gz * b_block;  // [N, r]
      if (lambda_d.requires_grad())
        lambda_d.grad().vector() += (ghd.array() * h.array()).colwise().sum().matrix().transpose();
      if (x.requires_grad())
        x.grad().matrix().noalias() += (ghd.array().rowwise() * ld).matrix() * a_block;
    });
  }
  return result;
}

/// LoKr: y = x Wᵀ + b + s x (w1 ⊗ w2)ᵀ, w1 [ol, im], w2 [ok, in_n], out = ol·ok, in = im·in_n.
/// Each input row viewed as X [im, in_n] maps to w1 (X w2ᵀ) [ol, ok]: the [out, in] Kronecker
/// product is never formed. Backward recomputes X w2ᵀ instead of keeping it.
template <class T>
Var<T> kronecker_linear(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                        WeightLayout layout, const Var<T>& w1, const Var<T>& w2, T s) {
  Tensor<T> out = detail::linear_output(x.value(), weight.value(), layout, "kronecker_linear");
  const std::int64_t ol = w1.value().dim(0), im = w1.value().dim(1);
  const std::int64_t ok = w2.value().dim(0), in_n = w2.value().dim(1);
  const std::int64_t n = x.value().rows();
  detail::check(w1.value().rank() == 2 && w2.value().rank() == 2 && im * in_n == x.value().cols() &&
                    ol * ok == out.cols(),
                "kronecker_linear",
                "w1 " + shape_string(w1.shape()) + " ⊗ w2 " + shape_string(w2.shape()) +
                    " does not fit input " + shape_string(x.shape()) + " and weight " +
                    shape_string(weight.shape()));
  MatrixMap<T> y = out.matrix();
  detail::base_product(x.value(), weight.value(), layout, y);
  if (bias) y.rowwise() += bias.value().vector().transpose();
  {
    ConstMatrixMap<T> xr(x.value().data(), n * im, in_n);
    const RowMatrix<T> z = xr * w2.value().matrix().transpose();  // [N·im, ok]
    ConstMatrixMap<T> w1m = w1.value().matrix();
    for (std::int64_t row = 0; row < n; ++row) {
      MatrixMap<T> yn(out.data() + row * ol * ok, ol, ok);
      yn.noalias() += s * (w1m * z.middleRows(row * im, im));
    }
  }
  const bool needs_grad =
      bias ? tape.needs_grad(x, weight, bias, w1, w2) : tape.needs_grad(x, weight, w1, w2);
  Var<T> result(std::move(out), needs_grad);
  if (needs_grad) {
    tape.record([x, weight, bias, layout, w1, w2, result, s, n, ol, im, ok, in_n]() mutable {
      ConstMatrixMap<T> g = std::as_const(result.grad()).matrix();
      detail::base_backward<T>(g, x, weight, bias, layout);
      ConstMatrixMap<T> xr(std::as_const(x.value()).data(), n * im, in_n);
      ConstMatrixMap<T> w1m = std::as_const(w1.value()).matrix();
      ConstMatrixMap<T> w2m = std::as_const(w2.value()).matrix();
      const T* gd = std::as_const(result.grad()).data();
      RowMatrix<T> dz(n * im, ok);  // d(X w2ᵀ), scaled by s
      RowMatrix<T> z;
      if (w1.requires_grad()) z = xr * w2m.transpose();
      for (std::int64_t row = 0; row < n; ++row) {
        ConstMatrixMap<T> gn(gd + row * ol * ok, ol, ok);
        dz.middleRows(row * im, im).noalias() = s * (w1m.transpose() * gn);
        if (w1.requires_grad())
          w1.grad().matrix().noalias() += s * (gn * z.middleRows(row * im, im).transpose());
      }
      if (w2.requires_grad()) w2.grad().matrix().noalias() += dz.transpose() * xr;
      if (x.requires_grad()) {
        MatrixMap<T> gx(x.grad().data(), n * im, in_n);
        gx.noalias() += dz * w2m;
      }
    });
  }
  return result;
}

/// Face-splitting product: out[i, j·q + k] = a[i, j] · b[i, k]; a [n, p], b [n, q] → [n, p·q].
/// LoHa's (w1a w1b) ⊙ (w2a w2b) equals row_kron(w1a, w2a) · row_kron(w1bᵀ, w2bᵀ)ᵀ, a rank-r²
/// product that needs no [out, in] matrix.
template <class T>
Var<T> row_kron(Tape<T>& tape, const Var<T>& a, const Var<T>& b) {
  detail::check(
      a.value().rank() == 2 && b.value().rank() == 2 && a.value().dim(0) == b.value().dim(0),
      "row_kron",
      "rows of " + shape_string(a.shape()) + " and " + shape_string(b.shape()) + " differ");
  const std::int64_t n = a.value().dim(0), p = a.value().dim(1), q = b.value().dim(1);
  Tensor<T> out(Shape{n, p * q});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < p; ++j)
      for (std::int64_t k = 0; k < q; ++k)
        out[i * p * q + j * q + k] = a.value()[i * p + j] * b.value()[i * q + k];
  Var<T> result = detail::make_output(tape, std::move(out), a, b);
  if (result.requires_grad()) {
    tape.record([a, b, result, n, p, q]() mutable {
      const Tensor<T>& g = std::as_const(result.grad());
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < p; ++j)
          for (std::int64_t k = 0; k < q; ++k) {
            const T gi = g[i * p * q + j * q + k];
            if (a.requires_grad()) a.grad()[i * p + j] += gi * b.value()[i * q + k];
            if (b.requires_grad()) b.grad()[i * q + k] += gi * a.value()[i * p + j];
          }
    });
  }
  return result;
}

/// ‖P Pᵀ − I‖_F (`gram_of_rows`, P [r, in]: AdaLoRA's A) or ‖Pᵀ P − I‖_F (P [out, r]: its B),
/// as a [1] tensor. The Frobenius norm, not its square; its gradient is 0 where the norm is 0.
template <class T>
Var<T> orthogonality_penalty(Tape<T>& tape, const Var<T>& p, bool gram_of_rows) {
  detail::check(p.value().rank() == 2, "orthogonality_penalty",
                "expected a matrix, got " + shape_string(p.shape()));
  ConstMatrixMap<T> pm = p.value().matrix();
  RowMatrix<T> m =
      gram_of_rows ? RowMatrix<T>(pm * pm.transpose()) : RowMatrix<T>(pm.transpose() * pm);
  m.diagonal().array() -= T(1);
  const T norm = m.norm();
  Var<T> result = detail::make_output(tape, Tensor<T>(Shape{1}, norm), p);
  if (result.requires_grad()) {
    tape.record([p, result, gram_of_rows, norm, m = std::move(m)]() mutable {
      if (norm == T(0)) return;
      const T k = T(2) * result.grad()[0] / norm;  // d‖M‖/dM = M/‖M‖, M symmetric
      ConstMatrixMap<T> pv = std::as_const(p.value()).matrix();
      if (gram_of_rows)
        p.grad().matrix().noalias() += k * (m * pv);
      else
        p.grad().matrix().noalias() += k * (pv * m);
    });
  }
  return result;
}

}  // namespace peft::ops
