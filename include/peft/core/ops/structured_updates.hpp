#pragma once
// block_circular (C3A) and topk_mix (VB-LoRA): ops of the newer reparameterized methods.
// block_circular: the product with a block-circulant matrix through the FFT (C3A,
// methods/reparameterized/c3a.hpp). x [..., n·b], w [m, n, b] (m·n kernels of b), y [..., m·b]:
//   y_i[k] = Σ_j Σ_t x_j[t] w_ij[(t − k) mod b]
// (block (i, j) of the [m·b, n·b] matrix is circulant: C_ij[k, t] = w_ij[(t − k) mod b]). In the
// frequency domain a circular correlation is a product, Y_i = Σ_j X_j ⊙ conj(W_ij), so a row
// costs n + m transforms of b and m·n·b complex products instead of m·n·b² (Eigen's FFT, any b).
// Backward: dx_j = ifft(Σ_i G_i ⊙ W_ij) (a convolution), dw_ij = ifft(Σ_rows conj(G_i) ⊙ X_j).
// Finite-difference check in tests/test_orthogonal.cpp.
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <numeric>
#include <string>
#include <unsupported/Eigen/FFT>
#include <vector>

#include "peft/core/op.hpp"

namespace peft::ops {

template <class T>
Var<T> block_circular(Tape<T>& tape, const Var<T>& x, const Var<T>& w) {
  check(w.value().rank() == 3, "block_circular",
        "expected kernels [m, n, b], got " + shape_string(w.shape()));
  const std::int64_t m = w.value().dim(0), n = w.value().dim(1), b = w.value().dim(2);
  check(x.value().cols() == n * b, "block_circular",
        "input width " + std::to_string(x.value().cols()) + ", kernels for " + std::to_string(n) +
            " blocks of " + std::to_string(b));
  using Complex = std::complex<T>;
  using Spectrum = std::vector<Complex>;
  const std::int64_t rows = x.value().rows();
  Eigen::FFT<T> fft;
  // Every kernel's spectrum, W_ij.
  std::vector<Spectrum> kernels(static_cast<std::size_t>(m * n));
  std::vector<T> buffer(static_cast<std::size_t>(b));
  auto transform = [&](const T* data, Spectrum& out) {
    buffer.assign(data, data + b);
    fft.fwd(out, buffer);
  };
  for (std::int64_t ij = 0; ij < m * n; ++ij)
    transform(w.value().data() + ij * b, kernels[static_cast<std::size_t>(ij)]);

  Shape out_shape = x.shape();
  out_shape.back() = m * b;
  Tensor<T> y(out_shape);
  std::vector<Spectrum> blocks(static_cast<std::size_t>(n));
  Spectrum sum(static_cast<std::size_t>(b));
  std::vector<T> real(static_cast<std::size_t>(b));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < n; ++j)
      transform(x.value().data() + (r * n + j) * b, blocks[static_cast<std::size_t>(j)]);
    for (std::int64_t i = 0; i < m; ++i) {
      std::fill(sum.begin(), sum.end(), Complex(0));
      for (std::int64_t j = 0; j < n; ++j) {
        const Spectrum& xj = blocks[static_cast<std::size_t>(j)];
        const Spectrum& wij = kernels[static_cast<std::size_t>(i * n + j)];
        for (std::int64_t f = 0; f < b; ++f) sum[f] += xj[f] * std::conj(wij[f]);
      }
      fft.inv(real, sum);
      std::copy(real.begin(), real.end(), y.data() + (r * m + i) * b);
    }
  }
  Var<T> out = make_output(tape, std::move(y), x, w);
  if (out.requires_grad())
    tape.record([x, w, out, m, n, b, rows, kernels = std::move(kernels)]() mutable {
      Eigen::FFT<T> fft;
      const Tensor<T>& g = std::as_const(out.grad());
      std::vector<T> buffer(static_cast<std::size_t>(b)), real(static_cast<std::size_t>(b));
      auto transform = [&](const T* data, Spectrum& spectrum) {
        buffer.assign(data, data + b);
        fft.fwd(spectrum, buffer);
      };
      std::vector<Spectrum> grads(static_cast<std::size_t>(m)), blocks(static_cast<std::size_t>(n));
      std::vector<Spectrum> dw(w.requires_grad() ? static_cast<std::size_t>(m * n) : 0,
                               Spectrum(static_cast<std::size_t>(b)));
      Spectrum sum(static_cast<std::size_t>(b));
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t i = 0; i < m; ++i)
          transform(g.data() + (r * m + i) * b, grads[static_cast<std::size_t>(i)]);
        if (x.requires_grad())
          for (std::int64_t j = 0; j < n; ++j) {
            std::fill(sum.begin(), sum.end(), Complex(0));
            for (std::int64_t i = 0; i < m; ++i) {
              const Spectrum& gi = grads[static_cast<std::size_t>(i)];
              const Spectrum& wij = kernels[static_cast<std::size_t>(i * n + j)];
              for (std::int64_t f = 0; f < b; ++f) sum[f] += gi[f] * wij[f];
            }
            fft.inv(real, sum);
            T* dx = x.grad().data() + (r * n + j) * b;
            for (std::int64_t t = 0; t < b; ++t) dx[t] += real[static_cast<std::size_t>(t)];
          }
        if (w.requires_grad()) {
          for (std::int64_t j = 0; j < n; ++j)
            transform(std::as_const(x.value()).data() + (r * n + j) * b,
                      blocks[static_cast<std::size_t>(j)]);
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
              Spectrum& acc = dw[static_cast<std::size_t>(i * n + j)];
              const Spectrum& gi = grads[static_cast<std::size_t>(i)];
              const Spectrum& xj = blocks[static_cast<std::size_t>(j)];
              for (std::int64_t f = 0; f < b; ++f) acc[f] += std::conj(gi[f]) * xj[f];
            }
        }
      }
      if (w.requires_grad())
        for (std::int64_t ij = 0; ij < m * n; ++ij) {
          fft.inv(real, dw[static_cast<std::size_t>(ij)]);
          T* dk = w.grad().data() + ij * b;
          for (std::int64_t t = 0; t < b; ++t) dk[t] += real[static_cast<std::size_t>(t)];
        }
    });
  return out;
}

}  // namespace peft::ops

namespace peft::ops {

/// VB-LoRA's composition of sub-vectors from a bank: for each row of logits [..., nv], the k
/// largest logits' softmax weights times their bank rows, summed: y [..., L] with bank [nv, L].
/// Ties go to the lower index (torch.topk's order on the CPU is not specified; the reference's
/// logits are random, where ties do not occur). The choice of the k entries is a constant of the
/// backward, as in the reference: d logits (the k chosen) = softmax backward of (bank rows · g),
/// d bank[idx] += w · g.
template <class T>
Var<T> topk_mix(Tape<T>& tape, const Var<T>& logits, const Var<T>& bank, std::int64_t k) {
  check(bank.value().rank() == 2 && logits.value().cols() == bank.value().dim(0), "topk_mix",
        "logits " + shape_string(logits.shape()) + " for a bank " + shape_string(bank.shape()));
  const std::int64_t nv = bank.value().dim(0), len = bank.value().dim(1);
  check(k >= 1 && k <= nv, "topk_mix",
        "top-k of " + std::to_string(k) + " from " + std::to_string(nv) + " vectors");
  const std::int64_t rows = logits.value().rows();
  std::vector<std::int64_t> chosen(static_cast<std::size_t>(rows * k));
  std::vector<T> weights(static_cast<std::size_t>(rows * k));
  Shape shape = logits.shape();
  shape.back() = len;
  Tensor<T> y = Tensor<T>::zeros(shape);
  std::vector<std::int64_t> order(static_cast<std::size_t>(nv));
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* l = logits.value().data() + r * nv;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(
        order.begin(), order.begin() + k, order.end(),
        [l](std::int64_t a, std::int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    const T top = l[order[0]];
    T total = 0;
    for (std::int64_t i = 0; i < k; ++i)
      total += std::exp(l[order[static_cast<std::size_t>(i)]] - top);
    for (std::int64_t i = 0; i < k; ++i) {
      const std::int64_t v = order[static_cast<std::size_t>(i)];
      const T w = std::exp(l[v] - top) / total;
      chosen[static_cast<std::size_t>(r * k + i)] = v;
      weights[static_cast<std::size_t>(r * k + i)] = w;
      for (std::int64_t c = 0; c < len; ++c) y[r * len + c] += w * bank.value()[v * len + c];
    }
  }
  Var<T> out = make_output(tape, std::move(y), logits, bank);
  if (out.requires_grad())
    tape.record([logits, bank, out, rows, k, nv, len, chosen = std::move(chosen),
                 weights = std::move(weights)]() mutable {
      const Tensor<T>& g = std::as_const(out.grad());
      const Tensor<T>& values = std::as_const(bank.value());
      std::vector<T> dot(static_cast<std::size_t>(k));
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* gr = g.data() + r * len;
        T mean = 0;  // Σ w_i (g · bank_i)
        for (std::int64_t i = 0; i < k; ++i) {
          const std::int64_t v = chosen[static_cast<std::size_t>(r * k + i)];
          T d = 0;
          for (std::int64_t c = 0; c < len; ++c) d += gr[c] * values[v * len + c];
          dot[static_cast<std::size_t>(i)] = d;
          mean += weights[static_cast<std::size_t>(r * k + i)] * d;
        }
        for (std::int64_t i = 0; i < k; ++i) {
          const std::int64_t v = chosen[static_cast<std::size_t>(r * k + i)];
          const T w = weights[static_cast<std::size_t>(r * k + i)];
          if (logits.requires_grad())
            logits.grad()[r * nv + v] += w * (dot[static_cast<std::size_t>(i)] - mean);
          if (bank.requires_grad())
            for (std::int64_t c = 0; c < len; ++c) bank.grad()[v * len + c] += w * gr[c];
        }
      }
    });
  return out;
}

}  // namespace peft::ops
