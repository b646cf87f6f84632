#pragma once
// Rows of a batch picked out and put back: what a mixed-adapter batch needs (each row of the
// batch names its own adapter, nn/projection.hpp's grouped product). A "row" is one index of the
// first axis with everything below it: for x [B, T, d] a row is a sequence [T, d].
#include <vector>

#include "peft/core/ops/common.hpp"
#include "peft/core/tensor.hpp"

namespace peft::ops {

namespace detail {
/// Elements per row of `s` (the product of every extent but the first).
inline std::int64_t row_elements(const Shape& s) {
  std::int64_t n = 1;
  for (std::size_t i = 1; i < s.size(); ++i) n *= s[i];
  return n;
}
inline void check_row_indices(const char* op, const std::vector<std::int64_t>& rows,
                              std::int64_t extent, const Shape& s) {
  for (std::int64_t r : rows)
    check(r >= 0 && r < extent, op,
          "row " + std::to_string(r) + " outside the first axis of " + shape_string(s));
}
}  // namespace detail

/// x[rows[0]], x[rows[1]], ... along the first axis: x [B, ...] → [rows.size(), ...]. A row may
/// be picked more than once. Backward adds each output row's adjoint into its row of x.
template <class T>
Var<T> gather_rows(Tape<T>& tape, const Var<T>& x, const std::vector<std::int64_t>& rows) {
  const Shape& xs = x.shape();
  detail::check(!xs.empty(), "gather_rows", "x has no first axis");
  detail::check_row_indices("gather_rows", rows, xs[0], xs);
  const std::int64_t n = detail::row_elements(xs);
  Shape os = xs;
  os[0] = static_cast<std::int64_t>(rows.size());
  Tensor<T> out(os);
  for (std::size_t i = 0; i < rows.size(); ++i)
    std::copy_n(x.value().data() + rows[i] * n, n, out.data() + static_cast<std::int64_t>(i) * n);
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad()) {
    tape.record([x, result, rows, n]() mutable {
      const T* g = result.grad().data();
      T* gx = x.grad().data();
      for (std::size_t i = 0; i < rows.size(); ++i)
        for (std::int64_t j = 0; j < n; ++j) gx[rows[i] * n + j] += g[static_cast<std::int64_t>(i) * n + j];
    });
  }
  return result;
}

/// y with rows added at given indices, from several parts at once: out = y; then for each part
/// k, out[rows[k][i]] += parts[k][i]. y [B, ...]; parts[k] [rows[k].size(), ...] (the same
/// extents below the first axis). The inverse of gather_rows for a delta: each group's term,
/// computed on its gathered rows, lands on those rows of the whole batch — all groups in one
/// pass over y (one copy of it, whatever the number of groups). Backward: y's adjoint is out's;
/// row i of part k's is out's row rows[k][i].
template <class T>
Var<T> index_add_rows(Tape<T>& tape, const Var<T>& y,
                      const std::vector<std::vector<std::int64_t>>& rows,
                      const std::vector<Var<T>>& parts) {
  const Shape& ys = y.shape();
  detail::check(!ys.empty(), "index_add_rows", "y has no first axis");
  detail::check(rows.size() == parts.size(), "index_add_rows",
                std::to_string(rows.size()) + " index lists for " + std::to_string(parts.size()) +
                    " parts");
  for (std::size_t k = 0; k < parts.size(); ++k) {
    const Shape& ds = parts[k].shape();
    detail::check(ds.size() == ys.size(), "index_add_rows",
                  "y " + shape_string(ys) + " and a part " + shape_string(ds) + " differ in rank");
    detail::check(ds[0] == static_cast<std::int64_t>(rows[k].size()), "index_add_rows",
                  "part " + shape_string(ds) + " has not one row per index (" +
                      std::to_string(rows[k].size()) + ")");
    for (std::size_t i = 1; i < ys.size(); ++i)
      detail::check(ys[i] == ds[i], "index_add_rows",
                    "rows of y " + shape_string(ys) + " and a part " + shape_string(ds) + " differ");
    detail::check_row_indices("index_add_rows", rows[k], ys[0], ys);
  }
  const std::int64_t n = detail::row_elements(ys);
  Tensor<T> out = y.value();
  for (std::size_t k = 0; k < parts.size(); ++k)
    for (std::size_t i = 0; i < rows[k].size(); ++i) {
      const T* src = parts[k].value().data() + static_cast<std::int64_t>(i) * n;
      T* dst = out.data() + rows[k][i] * n;
      for (std::int64_t j = 0; j < n; ++j) dst[j] += src[j];
    }
  bool needs_grad = tape.needs_grad(y);  // make_output's rule over a list of inputs
  for (const Var<T>& part : parts) needs_grad = needs_grad || tape.needs_grad(part);
  Var<T> result(std::move(out), needs_grad);
  if (result.requires_grad()) {
    tape.record([y, parts, result, rows, n]() mutable {
      const T* g = result.grad().data();
      if (y.requires_grad()) {
        T* gy = y.grad().data();
        for (std::int64_t j = 0; j < result.value().numel(); ++j) gy[j] += g[j];
      }
      for (std::size_t k = 0; k < parts.size(); ++k) {
        if (!parts[k].requires_grad()) continue;
        T* gd = parts[k].grad().data();
        for (std::size_t i = 0; i < rows[k].size(); ++i)
          for (std::int64_t j = 0; j < n; ++j)
            gd[static_cast<std::int64_t>(i) * n + j] += g[rows[k][i] * n + j];
      }
    });
  }
  return result;
}

/// One group of a grouped low-rank product: the rows (indices of the first axis) and their
/// term s · (x Aᵀ) Bᵀ, A [r, in], B [out, r].
template <class T>
struct LowRankGroup {
  std::vector<std::int64_t> rows;
  Var<T> a, b;
  T scale = T(1);
};

/// y plus each group's low-rank term on its rows: out = y; out[rows] += s · (x[rows] Aᵀ) Bᵀ for
/// every group — a mixed-adapter batch's LoRA terms in one op (the CPU counterpart of Punica's
/// BGMV), with no [B, ..., out] temporary per group. y [B, ..., out], x [B, ..., in] (the same
/// extents between). Each group's rows are gathered into one block, so a group costs two
/// products whatever its row count. Backward: y's adjoint is out's; per group, with
/// H = s · X Aᵀ and G the out-adjoint's rows: dB += Gᵀ H, dA += s · (G B)ᵀ X, dx[rows] += s · G B A.
template <class T>
Var<T> grouped_low_rank_add(Tape<T>& tape, const Var<T>& y, const Var<T>& x,
                            const std::vector<LowRankGroup<T>>& groups) {
  const Shape &ys = y.shape(), &xs = x.shape();
  detail::check(!ys.empty() && ys.size() == xs.size() && ys[0] == xs[0], "grouped_low_rank_add",
                "y " + shape_string(ys) + " and x " + shape_string(xs) + " differ in their rows");
  for (std::size_t i = 1; i + 1 < ys.size(); ++i)
    detail::check(ys[i] == xs[i], "grouped_low_rank_add",
                  "y " + shape_string(ys) + " and x " + shape_string(xs) + " differ");
  const std::int64_t in = xs.back(), out_features = ys.back();
  const std::int64_t per_row = detail::row_elements(xs) / in;  // positions per row
  for (const LowRankGroup<T>& g : groups) {
    const Shape &as = g.a.shape(), &bs = g.b.shape();
    detail::check(as.size() == 2 && bs.size() == 2 && as[1] == in && bs[0] == out_features &&
                      bs[1] == as[0],
                  "grouped_low_rank_add",
                  "A " + shape_string(as) + " and B " + shape_string(bs) + " do not map " +
                      std::to_string(in) + " to " + std::to_string(out_features) + " features");
    detail::check_row_indices("grouped_low_rank_add", g.rows, ys[0], ys);
  }
  // X: the group's rows of x as one [rows · per_row, in] block.
  const auto gathered = [per_row](const Tensor<T>& t, const std::vector<std::int64_t>& rows,
                                  std::int64_t width) {
    RowMatrix<T> m(static_cast<std::int64_t>(rows.size()) * per_row, width);
    const std::int64_t n = per_row * width;
    for (std::size_t i = 0; i < rows.size(); ++i)
      std::copy_n(t.data() + rows[i] * n, n, m.data() + static_cast<std::int64_t>(i) * n);
    return m;
  };
  const auto scatter_add = [per_row](T* dst, const RowMatrix<T>& m,
                                     const std::vector<std::int64_t>& rows) {
    const std::int64_t n = per_row * m.cols();
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const T* src = m.data() + static_cast<std::int64_t>(i) * n;
      T* d = dst + rows[i] * n;
      for (std::int64_t j = 0; j < n; ++j) d[j] += src[j];
    }
  };
  Tensor<T> out = y.value();
  for (const LowRankGroup<T>& g : groups) {
    const RowMatrix<T> h = g.scale * (gathered(x.value(), g.rows, in) * g.a.value().matrix().transpose());
    scatter_add(out.data(), RowMatrix<T>(h * g.b.value().matrix().transpose()), g.rows);
  }
  bool needs_grad = tape.needs_grad(y, x);  // make_output's rule over a list of inputs
  for (const LowRankGroup<T>& g : groups) needs_grad = needs_grad || tape.needs_grad(g.a, g.b);
  Var<T> result(std::move(out), needs_grad);
  if (result.requires_grad()) {
    tape.record([y, x, groups = std::vector<LowRankGroup<T>>(groups), result, in, out_features,
                 gathered, scatter_add]() mutable {
      const Tensor<T>& go = result.grad();
      if (y.requires_grad()) y.grad().vector() += go.vector();
      for (LowRankGroup<T>& g : groups) {
        const RowMatrix<T> X = gathered(x.value(), g.rows, in);
        const RowMatrix<T> G = gathered(go, g.rows, out_features);
        const auto A = g.a.value().matrix();
        const auto B = g.b.value().matrix();
        if (g.b.requires_grad())
          g.b.grad().matrix().noalias() += G.transpose() * (g.scale * (X * A.transpose()));
        const RowMatrix<T> dh = g.scale * (G * B);  // [N, r]
        if (g.a.requires_grad()) g.a.grad().matrix().noalias() += dh.transpose() * X;
        if (x.requires_grad()) scatter_add(x.grad().data(), RowMatrix<T>(dh * A), g.rows);
      }
    });
  }
  return result;
}

}  // namespace peft::ops
