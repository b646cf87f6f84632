#pragma once
// LayerNorm, RMSNorm and softmax over the last dimension; one pass per row forward and backward.
#include <cmath>
#include <vector>

#include "peft/core/ops/common.hpp"
#include "peft/core/ops/gemm.hpp"

namespace peft::ops {

namespace detail {
// Σ over rows of f(r, i) for every column i, added into out[d]: rows split over the threads,
// each with its own partial sums, summed in thread order at the end.
template <class T, class Term>
void column_sums(std::int64_t rows, std::int64_t d, T* out, Term term) {
  const int threads = max_threads();
  AlignedVector<T> partial(static_cast<std::size_t>(threads * d), T(0));
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
#if defined(_OPENMP)
    const std::int64_t id = omp_get_thread_num(), p = omp_get_num_threads();
#else
    const std::int64_t id = 0, p = 1;
#endif
    T* acc = partial.data() + id * d;
    for (std::int64_t r = rows * id / p; r < rows * (id + 1) / p; ++r)
      for (std::int64_t i = 0; i < d; ++i) acc[i] += term(r, i);
  }
  for (int t = 0; t < threads; ++t)
    for (std::int64_t i = 0; i < d; ++i) out[i] += partial[static_cast<std::size_t>(t * d + i)];
}
}  // namespace detail

/// LayerNorm over the last dimension: (x − μ) / √(σ² + eps) · w + b. x [..., d], w, b [d].
/// b may be undefined (no shift). Each row is read once from memory (the statistics are taken
/// on the row while it is in cache); backward keeps only μ and 1/σ per row and rebuilds x̂ from
/// x, which its gradient needs anyway.
template <class T>
Var<T> layer_norm(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias, T eps) {
  const std::int64_t rows = x.value().rows(), d = x.value().cols();
  detail::check(weight.value().numel() == d, "layer_norm", "weight size != last dimension");
  using RowArray = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRowArray = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  Tensor<T> out(x.value().shape());
  AlignedVector<T> mean(static_cast<std::size_t>(rows)), rstd(static_cast<std::size_t>(rows));
  const ConstRowArray w(weight.value().data(), d);
  const T* b = bias ? bias.value().data() : nullptr;
  const T* xs = x.value().data();
  T* ys = out.data();
  PEFT_PARALLEL_FOR_IF(rows * d >= detail::kParallelMinElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const ConstRowArray xr(xs + r * d, d);
    const T mu = xr.sum() / T(d);
    const T var = (xr - mu).square().sum() / T(d);
    const T rs = T(1) / std::sqrt(var + eps);
    mean[static_cast<std::size_t>(r)] = mu;
    rstd[static_cast<std::size_t>(r)] = rs;
    RowArray yr(ys + r * d, d);
    if (b)
      yr = (xr - mu) * rs * w + ConstRowArray(b, d);
    else
      yr = (xr - mu) * rs * w;
  }
  Var<T> result = bias ? detail::make_output(tape, std::move(out), x, weight, bias)
                       : detail::make_output(tape, std::move(out), x, weight);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, result, mean = std::move(mean), rstd = std::move(rstd), rows,
                 d]() mutable {
      const T* g = result.grad().data();
      const T* xs = x.value().data();
      const ConstRowArray w(weight.value().data(), d);
      auto xhat = [&](std::int64_t r, std::int64_t i) {
        const auto row = static_cast<std::size_t>(r);
        return (xs[r * d + i] - mean[row]) * rstd[row];
      };
      if (weight.requires_grad())
        detail::column_sums<T>(rows, d, weight.grad().data(), [&](std::int64_t r, std::int64_t i) {
          return g[r * d + i] * xhat(r, i);
        });
      if (bias && bias.requires_grad())
        detail::column_sums<T>(rows, d, bias.grad().data(),
                               [&](std::int64_t r, std::int64_t i) { return g[r * d + i]; });
      if (!x.requires_grad()) return;
      T* gx = x.grad().data();
      PEFT_PARALLEL_FOR_IF(rows * d >= detail::kParallelMinElements)
      for (std::int64_t r = 0; r < rows; ++r) {
        const T mu = mean[static_cast<std::size_t>(r)], rs = rstd[static_cast<std::size_t>(r)];
        const ConstRowArray gr(g + r * d, d);
        const ConstRowArray xr(xs + r * d, d);
        // dx = (1/σ) (g w − mean(g w) − x̂ mean(g w x̂)), the statistics taken in cache.
        const T sum_gw = (gr * w).sum();
        const T sum_gw_h = (gr * w * (xr - mu)).sum() * rs;
        RowArray gxr(gx + r * d, d);
        gxr += rs * (gr * w - sum_gw / T(d) - (xr - mu) * (rs * sum_gw_h / T(d)));
      }
    });
  }
  return result;
}

/// RMSNorm over the last dimension: x / √(mean(x²) + eps) · w. x [..., d], w [d].
template <class T>
Var<T> rms_norm(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, T eps) {
  const std::int64_t rows = x.value().rows(), d = x.value().cols();
  detail::check(weight.value().numel() == d, "rms_norm", "weight size != last dimension");
  Tensor<T> out(x.value().shape());
  AlignedVector<T> rstd(static_cast<std::size_t>(rows));
  const T* w = weight.value().data();
  PEFT_PARALLEL_FOR_IF(rows * d >= detail::kParallelMinElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x.value().data() + r * d;
    T ms = 0;
    for (std::int64_t i = 0; i < d; ++i) ms += xr[i] * xr[i];
    const T rs = T(1) / std::sqrt(ms / T(d) + eps);
    rstd[static_cast<std::size_t>(r)] = rs;
    T* yr = out.data() + r * d;
    for (std::int64_t i = 0; i < d; ++i) yr[i] = xr[i] * rs * w[i];
  }
  Var<T> result = detail::make_output(tape, std::move(out), x, weight);
  if (result.requires_grad()) {
    tape.record([x, weight, result, rstd = std::move(rstd), rows, d]() mutable {
      const T* g = result.grad().data();
      const T* w = weight.value().data();
      const T* xs = x.value().data();
      T* gw = weight.requires_grad() ? weight.grad().data() : nullptr;
      T* gx = x.requires_grad() ? x.grad().data() : nullptr;
      for (std::int64_t r = 0; r < rows; ++r) {
        const T rs = rstd[static_cast<std::size_t>(r)];
        const T* gr = g + r * d;
        const T* xr = xs + r * d;
        T dot = 0;
        for (std::int64_t i = 0; i < d; ++i) {
          dot += gr[i] * w[i] * xr[i];
          if (gw) gw[i] += gr[i] * xr[i] * rs;
        }
        if (gx) {
          T* gxr = gx + r * d;
          const T c = dot * rs * rs * rs / T(d);
          for (std::int64_t i = 0; i < d; ++i) gxr[i] += gr[i] * w[i] * rs - xr[i] * c;
        }
      }
    });
  }
  return result;
}

/// Softmax over the last dimension.
template <class T>
Var<T> softmax(Tape<T>& tape, const Var<T>& x) {
  const std::int64_t rows = x.value().rows(), d = x.value().cols();
  Tensor<T> out(x.value().shape());
  PEFT_PARALLEL_FOR_IF(rows * d >= detail::kParallelMinElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x.value().data() + r * d;
    T* yr = out.data() + r * d;
    T mx = xr[0];
    for (std::int64_t i = 1; i < d; ++i) mx = std::max(mx, xr[i]);
    T total = 0;
    for (std::int64_t i = 0; i < d; ++i) total += (yr[i] = std::exp(xr[i] - mx));
    for (std::int64_t i = 0; i < d; ++i) yr[i] /= total;
  }
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad()) {
    tape.record([x, result, rows, d]() mutable {
      const T* y = result.value().data();
      const T* g = result.grad().data();
      T* gx = x.grad().data();
      PEFT_PARALLEL_FOR_IF(rows * d >= detail::kParallelMinElements)
      for (std::int64_t r = 0; r < rows; ++r) {
        T dot = 0;
        for (std::int64_t i = 0; i < d; ++i) dot += g[r * d + i] * y[r * d + i];
        for (std::int64_t i = 0; i < d; ++i) gx[r * d + i] += y[r * d + i] * (g[r * d + i] - dot);
      }
    });
  }
  return result;
}

}  // namespace peft::ops
