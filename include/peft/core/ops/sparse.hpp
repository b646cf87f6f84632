#pragma once
// Sparse and structured updates of a frozen linear layer, for the selective methods:
//   y = x (W + Δ)ᵀ + (b + δb)
// where Δ [out, in] is k scattered entries, or whole rows / columns of W, and δb some entries of
// the bias. Only Δ's entries and δb are trainable tensors; W and b stay frozen and get no
// gradient. Also the hard-concrete gate and L0 penalty of diff pruning.
//
// Why the scattered entries are applied sparsely: the alternative is a dense scratch copy
// W + scatter(Δ) and one product with it, but then backward needs the full dW = gᵀx (a product as
// costly as the forward) to read k entries out of it, and every module keeps an in·out scratch
// copy alive until backward. Applied sparsely, forward adds N·k scattered products onto the base
// output and backward reads exactly the k entries (N·k), with no copy of W. Measured on
// [512, 768] × [3072, 768], forward + backward, 2 shared cores
// (benchmarks/selective/fishmask_vs_lora.cpp op): sparse 363 ms vs dense 415 ms at 0.5%, even
// at 2% (448 vs 420 ms), sparse 728 vs 425 ms at 5%. So the op switches to the dense route from
// kDenseDeltaDensity = 2% up (diff pruning's L0 phase, which gates every entry, always takes it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "peft/core/ops/common.hpp"
#include "peft/core/ops/gemm.hpp"
#include "peft/core/ops/linear_algebra.hpp"

namespace peft::ops {

/// k entries of a weight delta Δ [out, in] (whatever the weight's storage layout):
/// Δ[out[j], in[j]] = values[j]. No entry appears twice.
struct SparsePattern {
  std::vector<std::int32_t> out, in;
  std::int64_t size() const { return static_cast<std::int64_t>(out.size()); }
};

/// Whole rows (output features) or columns (input features) of Δ [out, in], trained as one dense
/// block: [lines, in] for rows, [out, lines] for columns.
enum class LineAxis { Rows, Columns };
struct LineSelection {
  LineAxis axis = LineAxis::Rows;
  std::vector<std::int32_t> lines;  ///< distinct, ascending
};

/// What a selective method adds to one linear layer; each part is optional (null pointer).
/// The patterns are shared with the policy that owns them, so a recorded backward closure keeps
/// them alive.
template <class T>
struct WeightDelta {
  std::shared_ptr<const SparsePattern> entries;
  Var<T> entry_values;  ///< [k]
  std::shared_ptr<const LineSelection> lines;
  Var<T> line_values;  ///< [r, in] (rows) or [out, r] (columns)
  std::shared_ptr<const std::vector<std::int32_t>> bias_entries;
  Var<T> bias_values;  ///< [kb]
};

/// Above this fraction of in·out, scattered entries are applied through a dense copy of W.
inline constexpr double kDenseDeltaDensity = 0.02;

namespace detail {

// The scattered entries' own backward: dv_j += Σ_n g[n, o_j] x[n, i_j], dx[n, i_j] += v_j g[n,
// o_j]. Rows are split over threads; each thread sums its rows' contributions to dv in its own
// buffer (k values), then the buffers are added: no two threads write one element.
template <class T>
void sparse_entries_backward(const SparsePattern& p, const Tensor<T>& g, const Tensor<T>& x,
                             const Var<T>& values, Tensor<T>* dx) {
  const std::int64_t rows = g.rows(), out = g.cols(), in = x.cols(), k = p.size();
  const std::int32_t* po = p.out.data();
  const std::int32_t* pi = p.in.data();
  if (dx) {
    const T* v = values.value().data();
    T* dxv = dx->data();
    PEFT_PARALLEL_FOR
    for (std::int64_t n = 0; n < rows; ++n) {
      const T* gr = g.data() + n * out;
      T* dxr = dxv + n * in;
      for (std::int64_t j = 0; j < k; ++j) dxr[pi[j]] += v[j] * gr[po[j]];
    }
  }
  if (!values.requires_grad()) return;
  T* dv = values.grad().data();
  const int threads = rows * k >= (1 << 16) ? max_threads() : 1;
  std::vector<AlignedVector<T>> partial(static_cast<std::size_t>(threads));
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
#if defined(_OPENMP)
    const std::int64_t id = omp_get_thread_num(), p_count = omp_get_num_threads();
#else
    const std::int64_t id = 0, p_count = 1;
#endif
    AlignedVector<T>& acc = partial[static_cast<std::size_t>(id)];
    acc.assign(static_cast<std::size_t>(k), T(0));
    for (std::int64_t n = rows * id / p_count; n < rows * (id + 1) / p_count; ++n) {
      const T* gr = g.data() + n * out;
      const T* xr = x.data() + n * in;
      for (std::int64_t j = 0; j < k; ++j)
        acc[static_cast<std::size_t>(j)] += gr[po[j]] * xr[pi[j]];
    }
  }
  for (const AlignedVector<T>& acc : partial)
    for (std::int64_t j = 0; j < k; ++j) dv[j] += acc[static_cast<std::size_t>(j)];
}

}  // namespace detail

/// y = x (W + Δ)ᵀ + (b + δb), Δ and δb as described by `delta` (W in `layout`; x [..., in],
/// y [..., out]). Gradients reach x, the delta's trainable values, and W / b only if they
/// themselves require one (they do not, under a selective method). Cost beyond the base
/// product: N·k for k scattered entries, one [N, r] × [r, in] product for r rows or columns.
/// Scattered entries at a density of `dense_density` or more go through a dense copy of W.
template <class T>
Var<T> delta_linear(Tape<T>& tape, const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                    WeightLayout layout, const WeightDelta<T>& delta,
                    double dense_density = kDenseDeltaDensity) {
  const Tensor<T>& xv = x.value();
  const Tensor<T>& wv = weight.value();
  const bool out_in = layout == WeightLayout::OutIn;
  detail::check(wv.rank() == 2 && (out_in ? wv.dim(1) : wv.dim(0)) == xv.cols(), "delta_linear",
                "input " + shape_string(xv.shape()) + " does not fit weight " +
                    shape_string(wv.shape()) + (out_in ? " [out, in]" : " [in, out]"));
  const std::int64_t in = xv.cols(), out = out_in ? wv.dim(0) : wv.dim(1), n = xv.rows();
  const SparsePattern* entries = delta.entries.get();
  const LineSelection* lines = delta.lines.get();
  const std::vector<std::int32_t>* bias_entries = delta.bias_entries.get();
  if (entries)
    detail::check(delta.entry_values.value().numel() == entries->size(), "delta_linear",
                  "entry values " + shape_string(delta.entry_values.shape()) + " for " +
                      std::to_string(entries->size()) + " entries");
  std::int64_t r = 0;
  if (lines) {
    r = static_cast<std::int64_t>(lines->lines.size());
    const Shape expected = lines->axis == LineAxis::Rows ? Shape{r, in} : Shape{out, r};
    detail::check(delta.line_values.shape() == expected, "delta_linear",
                  "line values " + shape_string(delta.line_values.shape()) + ", expected " +
                      shape_string(expected));
  }
  if (bias_entries)
    detail::check(bias && delta.bias_values.value().numel() ==
                              static_cast<std::int64_t>(bias_entries->size()),
                  "delta_linear", "bias entries without a bias, or values of the wrong size");

  // The effective bias: a copy of b with δb added (out values, negligible).
  Tensor<T> bias_eff;
  if (bias_entries) {
    bias_eff = bias.value();
    const T* bv = delta.bias_values.value().data();
    for (std::size_t j = 0; j < bias_entries->size(); ++j) bias_eff[(*bias_entries)[j]] += bv[j];
  }
  const Tensor<T>* bias_ptr = bias_entries ? &bias_eff : (bias ? &bias.value() : nullptr);

  const bool dense_entries =
      entries && double(entries->size()) >= dense_density * double(in) * double(out);
  Shape out_shape = xv.shape();
  out_shape.back() = out;
  Tensor<T> y(out_shape);
  // Dense route: W + scatter(Δ) in a scratch copy (kept for backward's dx).
  Tensor<T> scratch;
  if (dense_entries) {
    scratch = wv;
    const T* v = delta.entry_values.value().data();
    for (std::int64_t j = 0; j < entries->size(); ++j) {
      const std::int64_t o = entries->out[static_cast<std::size_t>(j)];
      const std::int64_t i = entries->in[static_cast<std::size_t>(j)];
      scratch[out_in ? o * in + i : i * out + o] += v[j];
    }
    detail::linear_forward(xv, scratch, bias_ptr, out_in, y);
  } else {
    detail::linear_forward(xv, wv, bias_ptr, out_in, y);
    if (entries) {
      const std::int32_t* po = entries->out.data();
      const std::int32_t* pi = entries->in.data();
      const T* v = delta.entry_values.value().data();
      const std::int64_t k = entries->size();
      T* yv = y.data();
      PEFT_PARALLEL_FOR
      for (std::int64_t row = 0; row < n; ++row) {
        T* yr = yv + row * out;
        const T* xr = xv.data() + row * in;
        for (std::int64_t j = 0; j < k; ++j) yr[po[j]] += v[j] * xr[pi[j]];
      }
    }
  }
  // Lines: rows r add Z = x Dᵀ [N, r] into y's columns `lines`; columns add x[:, lines] Dᵀ.
  Tensor<T> gathered;  // x[:, lines] [N, r] (columns), kept for backward
  if (lines) {
    const T* d = delta.line_values.value().data();
    const std::vector<std::int32_t>& L = lines->lines;
    if (lines->axis == LineAxis::Rows) {
      Tensor<T> z(Shape{n, r});
      detail::gemm(xv.data(), in, false, d, in, true, z.data(), r, n, r, in);
      T* yv = y.data();
      PEFT_PARALLEL_FOR
      for (std::int64_t row = 0; row < n; ++row)
        for (std::int64_t l = 0; l < r; ++l) yv[row * out + L[l]] += z[row * r + l];
    } else {
      gathered = Tensor<T>(Shape{n, r});
      for (std::int64_t row = 0; row < n; ++row)
        for (std::int64_t l = 0; l < r; ++l) gathered[row * r + l] = xv[row * in + L[l]];
      detail::gemm(gathered.data(), r, false, d, r, true, y.data(), out, n, out, r, T(1), true);
    }
  }

  const bool needs =
      tape.needs_grad(x, weight, delta.entry_values, delta.line_values, delta.bias_values) ||
      (bias && tape.needs_grad(bias));
  Var<T> result(std::move(y), needs);
  if (!needs) return result;
  tape.record([x, weight, bias, delta, result, out_in, in, out, n, r, dense_entries,
               scratch = std::move(scratch), gathered = std::move(gathered)]() mutable {
    const Tensor<T>& g = std::as_const(result.grad());  // [N, out]
    // dx through W (or W + Δ on the dense route); dW, db only when the base is trainable.
    if (dense_entries) {
      if (x.requires_grad())
        detail::gemm(g.data(), out, false, scratch.data(), scratch.cols(), !out_in, x.grad().data(),
                     in, n, in, out, T(1), true);
      if (weight.requires_grad()) {  // a trainable base (full fine-tuning alongside)
        const T* xs = x.value().data();
        if (out_in)
          detail::gemm(g.data(), out, true, xs, in, false, weight.grad().data(), in, out, in, n,
                       T(1), true);
        else
          detail::gemm(xs, in, true, g.data(), out, false, weight.grad().data(), out, in, out, n,
                       T(1), true);
      }
      if (bias && bias.requires_grad())
        bias.grad().vector() += g.matrix().colwise().sum().transpose();
      const Var<T>& v = delta.entry_values;
      if (v.requires_grad()) {
        // dΔ = gᵀ x [out, in], a full product, read at the k entries.
        Tensor<T> dw(Shape{out, in});
        detail::gemm(g.data(), out, true, x.value().data(), in, false, dw.data(), in, out, in, n);
        T* dv = v.grad().data();
        for (std::int64_t j = 0; j < delta.entries->size(); ++j)
          dv[j] += dw[std::int64_t(delta.entries->out[std::size_t(j)]) * in +
                      delta.entries->in[std::size_t(j)]];
      }
    } else {
      detail::linear_backward(g, x, weight, bias, out_in);
      if (delta.entries)
        detail::sparse_entries_backward(*delta.entries, g, x.value(), delta.entry_values,
                                        x.requires_grad() ? &x.grad() : nullptr);
    }
    if (delta.bias_entries && delta.bias_values.requires_grad()) {
      T* db = delta.bias_values.grad().data();
      const std::vector<std::int32_t>& be = *delta.bias_entries;
      for (std::int64_t row = 0; row < n; ++row)
        for (std::size_t j = 0; j < be.size(); ++j) db[j] += g[row * out + be[j]];
    }
    if (delta.lines) {
      const std::vector<std::int32_t>& L = delta.lines->lines;
      const Var<T>& d = delta.line_values;
      if (delta.lines->axis == LineAxis::Rows) {
        // Only the r selected rows of dW are computed: dD = g[:, L]ᵀ x [r, in].
        Tensor<T> gl(Shape{n, r});
        for (std::int64_t row = 0; row < n; ++row)
          for (std::int64_t l = 0; l < r; ++l) gl[row * r + l] = g[row * out + L[l]];
        if (d.requires_grad())
          detail::gemm(gl.data(), r, true, x.value().data(), in, false, d.grad().data(), in, r, in,
                       n, T(1), true);
        if (x.requires_grad())  // dx += g[:, L] D
          detail::gemm(gl.data(), r, false, d.value().data(), in, false, x.grad().data(), in, n, in,
                       r, T(1), true);
      } else {
        if (d.requires_grad())  // dD = gᵀ x[:, L] [out, r]
          detail::gemm(g.data(), out, true, gathered.data(), r, false, d.grad().data(), r, out, r,
                       n, T(1), true);
        if (x.requires_grad()) {  // dx[:, L] += g D
          Tensor<T> gx(Shape{n, r});
          detail::gemm(g.data(), out, false, d.value().data(), r, false, gx.data(), r, n, r, out);
          T* dx = x.grad().data();
          for (std::int64_t row = 0; row < n; ++row)
            for (std::int64_t l = 0; l < r; ++l) dx[row * in + L[l]] += gx[row * r + l];
        }
      }
    }
  });
  return result;
}

/// Hard-concrete gate (Louizos et al., 2018), per entry:
///   s = σ((log u − log(1 − u) + log α) / β), z = min(1, max(0, s (ζ − γ) + γ))
/// with noise u ∈ (0, 1) [same shape as log α]; an empty `noise` gives the deterministic test-time
/// gate z = min(1, max(0, σ(log α) (ζ − γ) + γ)). Gradient reaches log α where 0 < z < 1.
template <class T>
Var<T> hard_concrete_gate(Tape<T>& tape, const Var<T>& log_alpha, const Tensor<T>& noise, T beta,
                          T gamma, T zeta) {
  const std::int64_t k = log_alpha.value().numel();
  const bool sampled = !noise.empty();
  if (sampled) require_shape(noise, log_alpha.shape(), "hard_concrete_gate noise");
  Tensor<T> z(log_alpha.shape());
  Tensor<T> s(log_alpha.shape());  // σ(·), kept for backward
  const T* a = log_alpha.value().data();
  for (std::int64_t j = 0; j < k; ++j) {
    const T pre = sampled ? (std::log(noise[j]) - std::log1p(-noise[j]) + a[j]) / beta : a[j];
    s[j] = T(1) / (T(1) + std::exp(-pre));
    z[j] = std::min(T(1), std::max(T(0), s[j] * (zeta - gamma) + gamma));
  }
  Var<T> result = detail::make_output(tape, std::move(z), log_alpha);
  if (result.requires_grad()) {
    tape.record([log_alpha, result, s = std::move(s), sampled, beta, gamma, zeta, k]() mutable {
      const Tensor<T>& g = std::as_const(result.grad());
      const Tensor<T>& z = result.value();
      T* da = log_alpha.grad().data();
      const T chain = (zeta - gamma) / (sampled ? beta : T(1));
      for (std::int64_t j = 0; j < k; ++j)
        if (z[j] > T(0) && z[j] < T(1)) da[j] += g[j] * chain * s[j] * (T(1) - s[j]);
    });
  }
  return result;
}

/// The L0 penalty of diff pruning toward a target density ρ: λ (E[‖z‖₀] / n − ρ)², with
/// E[‖z‖₀] = Σ σ(log α − β log(−γ / ζ)), the probability that each gate is non-zero. [1].
/// Penalising the distance to ρ (rather than ‖z‖₀ itself) lets the gates settle at the budget.
template <class T>
Var<T> l0_penalty(Tape<T>& tape, const std::vector<Var<T>>& log_alphas, T beta, T gamma, T zeta,
                  T target_density, T lambda) {
  const T shift = beta * std::log(-gamma / zeta);
  double open = 0, count = 0;
  for (const Var<T>& a : log_alphas)
    for (std::int64_t j = 0; j < a.value().numel(); ++j) {
      open += 1.0 / (1.0 + std::exp(-double(a.value()[j] - shift)));
      count += 1;
    }
  const double density = count > 0 ? open / count : 0.0;
  const double diff = density - double(target_density);
  Tensor<T> value(Shape{1}, static_cast<T>(double(lambda) * diff * diff));
  bool any = false;
  for (const Var<T>& a : log_alphas) any = any || tape.needs_grad(a);
  Var<T> result(std::move(value), any);
  if (any) {
    tape.record([log_alphas, result, shift, diff, count, lambda]() mutable {
      const double coef = double(result.grad()[0]) * double(lambda) * 2 * diff / count;
      for (Var<T> a : log_alphas) {  // a handle: the gradient buffer is shared
        if (!a.requires_grad()) continue;
        T* da = a.grad().data();
        for (std::int64_t j = 0; j < a.value().numel(); ++j) {
          const double s = 1.0 / (1.0 + std::exp(-double(a.value()[j] - shift)));
          da[j] += static_cast<T>(coef * s * (1 - s));
        }
      }
    });
  }
  return result;
}

}  // namespace peft::ops
