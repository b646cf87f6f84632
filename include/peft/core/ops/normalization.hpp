#pragma once
// LayerNorm, RMSNorm and softmax over the last dimension; one pass per row forward and backward.
#include <cmath>

#include "peft/core/ops/common.hpp"

namespace peft::ops {

/// LayerNorm over the last dimension: (x − μ) / √(σ² + eps) · w + b. x [..., d], w, b [d].
/// b may be undefined (no shift).
template <class T>
Var<T> layer_norm(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias, T eps) {
  const std::int64_t rows = x.value().rows(), d = x.value().cols();
  detail::check(weight.value().numel() == d, "layer_norm", "weight size != last dimension");
  Tensor<T> out(x.value().shape());
  Tensor<T> xhat(x.value().shape());
  std::vector<T> rstd(static_cast<std::size_t>(rows));
  const T* w = weight.value().data();
  const T* b = bias ? bias.value().data() : nullptr;
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x.value().data() + r * d;
    T mean = 0;
    for (std::int64_t i = 0; i < d; ++i) mean += xr[i];
    mean /= T(d);
    T var = 0;
    for (std::int64_t i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= T(d);
    const T rs = T(1) / std::sqrt(var + eps);
    rstd[static_cast<std::size_t>(r)] = rs;
    T* hr = xhat.data() + r * d;
    T* yr = out.data() + r * d;
    for (std::int64_t i = 0; i < d; ++i) {
      hr[i] = (xr[i] - mean) * rs;
      yr[i] = hr[i] * w[i] + (b ? b[i] : T(0));
    }
  }
  Var<T> result = bias ? detail::make_output(tape, std::move(out), x, weight, bias)
                       : detail::make_output(tape, std::move(out), x, weight);
  if (result.requires_grad()) {
    tape.record([x, weight, bias, result, xhat = std::move(xhat), rstd = std::move(rstd), rows,
                 d]() mutable {
      const T* g = result.grad().data();
      const T* w = weight.value().data();
      T* gw = weight.requires_grad() ? weight.grad().data() : nullptr;
      T* gb = bias && bias.requires_grad() ? bias.grad().data() : nullptr;
      T* gx = x.requires_grad() ? x.grad().data() : nullptr;
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* gr = g + r * d;
        const T* hr = xhat.data() + r * d;
        T sum_gw = 0, sum_gw_h = 0;
        for (std::int64_t i = 0; i < d; ++i) {
          const T gwi = gr[i] * w[i];
          sum_gw += gwi;
          sum_gw_h += gwi * hr[i];
          if (gw) gw[i] += gr[i] * hr[i];
          if (gb) gb[i] += gr[i];
        }
        if (gx) {
          const T rs = rstd[static_cast<std::size_t>(r)];
          T* gxr = gx + r * d;
          for (std::int64_t i = 0; i < d; ++i)
            gxr[i] += rs * (gr[i] * w[i] - sum_gw / T(d) - hr[i] * sum_gw_h / T(d));
        }
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
  std::vector<T> rstd(static_cast<std::size_t>(rows));
  const T* w = weight.value().data();
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
