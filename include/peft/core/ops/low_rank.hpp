#pragma once
// The LoRA linear: y = base(x) + s·(x Aᵀ) Bᵀ in one op, without full-size temporaries.
#include <algorithm>
#include <vector>

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
  const Tensor<T>& xv = x.value();
  const Tensor<T>& wv = weight.value();
  const bool out_in = layout == WeightLayout::OutIn;
  detail::check(wv.rank() == 2 && (out_in ? wv.dim(1) : wv.dim(0)) == xv.cols(), "lora_linear",
                "input " + shape_string(xv.shape()) + " does not fit weight " +
                    shape_string(wv.shape()) + (out_in ? " [out, in]" : " [in, out]"));
  const std::int64_t in = xv.cols(), out_features = out_in ? wv.dim(0) : wv.dim(1);
  const std::int64_t n = xv.rows();
  detail::check(b.value().dim(0) == out_features, "lora_linear",
                "B " + shape_string(b.shape()) + " does not fit the output features " +
                    std::to_string(out_features));
  if (bias)
    detail::check(bias.value().numel() == out_features, "lora_linear", "bias size mismatch");
  Shape out_shape = xv.shape();
  out_shape.back() = out_features;
  Tensor<T> out(out_shape);
  // hᵀ = A xᵀ [r, N], kept for backward. Stored transposed so that its products with the long
  // N side (here and dB below) have the rank as their short m side, which the packed product
  // handles at full width; h [N, r] would make every low-rank product skinny.
  Tensor<T> h_t(Shape{r, n});
  {
    // One parallel region over blocks of rows: every product of the forward is row-local
    // (y_rows = b + x_rows W + s h_rows Bᵀ, h_rows = x_rows Aᵀ), so the threads never wait on
    // each other, and the low-rank path costs no extra barrier. The base and low-rank products
    // are one sum of products: y is written once.
    const T* xs = xv.data();
    const T* ws = wv.data();
    const T* as = a.value().data();
    const T* bs = b.value().data();
    const T* bias_values = bias ? bias.value().data() : nullptr;
    T* ys = out.data();
    T* hts = h_t.data();
    detail::parallel_row_blocks(n, double(n) * double(in) * double(out_features),
                                [&](std::int64_t r0, std::int64_t rows, int) {
                                  if (bias_values)
                                    for (std::int64_t i = r0; i < r0 + rows; ++i)
                                      std::copy_n(bias_values, out_features, ys + i * out_features);
                                  // h_rows = x_rows Aᵀ, then transposed into hᵀ[:, rows] (r x rows
                                  // values: cheap)
                                  AlignedVector<T> h_rows(static_cast<std::size_t>(rows * r));
                                  detail::gemm_serial(xs + r0 * in, in, false, as, in, true,
                                                      h_rows.data(), r, rows, r, in, T(1), false);
                                  for (std::int64_t i = 0; i < rows; ++i)
                                    for (std::int64_t j = 0; j < r; ++j)
                                      hts[j * n + r0 + i] = h_rows[std::size_t(i * r + j)];
                                  // y_rows += x_rows W + s h_rows Bᵀ
                                  detail::gemm_serial_sum<T>(
                                      {{xs + r0 * in, in, false, ws, wv.cols(), out_in, in},
                                       {hts + r0, n, true, bs, r, true, r, s}},
                                      ys + r0 * out_features, out_features, rows, out_features,
                                      T(1), true);
                                });
  }
  Var<T> result = bias ? detail::make_output(tape, std::move(out), x, weight, bias, a, b)
                       : detail::make_output(tape, std::move(out), x, weight, a, b);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, a, b, result, out_in, s, h_t = std::move(h_t), n, in, r,
                 out_features]() mutable {
      const Tensor<T>& g = std::as_const(result.grad());  // [N, out]
      const bool need_a = a.requires_grad(), need_b = b.requires_grad();
      const bool need_x = x.requires_grad();
      const double work = double(n) * double(in) * double(out_features);
      const int threads = detail::row_block_threads(n, work);
      // Per-thread partial sums of dA [r, in] and dBᵀ [r, out] (reductions over rows), added in
      // thread order afterwards; everything else is row-local, as in the forward.
      AlignedVector<T> partial_a(need_a ? std::size_t(threads) * std::size_t(r * in) : 0, T(0));
      AlignedVector<T> partial_bt(need_b ? std::size_t(threads) * std::size_t(r * out_features) : 0,
                                  T(0));
      const T* gs = g.data();
      const T* xs = x.value().data();
      const T* ws = weight.value().data();
      const std::int64_t ldw = weight.value().cols();
      const T* as = a.value().data();
      const T* bs = b.value().data();
      const T* hts = h_t.data();
      T* gx = need_x ? x.grad().data() : nullptr;
      detail::parallel_row_blocks(n, work, [&](std::int64_t r0, std::int64_t rows, int id) {
        // gh = s g_rows B [rows, r]: the gradient reaching h, scaled; and ghᵀ [r, rows], whose
        // product with x has the rank as its short side (dA below).
        AlignedVector<T> gh(need_a || need_x ? static_cast<std::size_t>(r * rows) : 0);
        AlignedVector<T> gh_t(gh.size());
        const T* g_rows = gs + r0 * out_features;
        if (need_a || need_x) {
          detail::gemm_serial(g_rows, out_features, false, bs, r, false, gh.data(), r, rows, r,
                              out_features, s, false);
          for (std::int64_t i = 0; i < rows; ++i)
            for (std::int64_t j = 0; j < r; ++j)
              gh_t[std::size_t(j * rows + i)] = gh[std::size_t(i * r + j)];
        }
        if (need_b)  // dBᵀ += s hᵀ g
          detail::gemm_serial(hts + r0, n, false, g_rows, out_features, false,
                              partial_bt.data() + std::size_t(id) * std::size_t(r * out_features),
                              out_features, r, out_features, rows, s, true);
        if (need_a)  // dA += ghᵀ x
          detail::gemm_serial(gh_t.data(), rows, false, xs + r0 * in, in, false,
                              partial_a.data() + std::size_t(id) * std::size_t(r * in), in, r, in,
                              rows, T(1), true);
        if (need_x)  // dx += g Wᵀ (out_in: g W) + gh A, one pass over dx
          detail::gemm_serial_sum<T>({{g_rows, out_features, false, ws, ldw, !out_in, out_features},
                                      {gh.data(), r, false, as, in, false, r}},
                                     gx + r0 * in, in, rows, in, T(1), true);
      });
      for (int t = 0; t < threads; ++t) {
        if (need_a)
          a.grad().vector() +=
              ConstVectorMap<T>(partial_a.data() + std::size_t(t) * std::size_t(r * in), r * in);
        if (need_b)
          b.grad().matrix() +=
              ConstMatrixMap<T>(partial_bt.data() + std::size_t(t) * std::size_t(r * out_features),
                                r, out_features)
                  .transpose();
      }
      // The base weight's and bias's own gradients (full fine-tuning of a LoRA model only).
      if (weight.requires_grad()) {
        if (out_in)
          detail::gemm(gs, out_features, true, xs, in, false, weight.grad().data(), in,
                       out_features, in, n, T(1), true);
        else
          detail::gemm(xs, in, true, gs, out_features, false, weight.grad().data(), out_features,
                       in, out_features, n, T(1), true);
      }
      if (bias && bias.requires_grad())
        bias.grad().vector() += g.matrix().colwise().sum().transpose();
    });
  }
  return result;
}

}  // namespace peft::ops
