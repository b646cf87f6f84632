#pragma once
// Ops of the orthogonal family (OFT, COFT, HRA; methods/reparameterized/oft.hpp, hra.hpp):
//   skew_symmetric     v [n, b(b−1)/2] → Q [n, b, b], Q = S − Sᵀ with S's strict upper triangle
//                      v (row-major order, torch.triu_indices(b, b, 1))
//   cayley             Q [n, b, b] → R = (I − Q)(I + Q)⁻¹ per block (orthogonal for skew Q)
//   cayley_neumann     the reference's truncated series for (I + Q)(I − Q)⁻¹ with K terms:
//                      I + 2 Σ_{k=1}^{K−2} Q^k + Q^{K−1} (K ≥ 4; K = 3 as K = 4, K = 2: I + 2Q)
//                      — note the exact transform's reference direction is the inverse,
//                      (I − Q)(I + Q)⁻¹, and both are kept as the reference has them
//   block_rotate       x [..., nb·b] · blockdiag(R_0 .. R_{nb−1}), R [nb, b, b] or one shared
//                      block R [1, b, b]: every block of b features times its own b × b matrix
//   normalize_columns  U [in, r] → U / ‖U‖ per column
//   gather_features    x[..., index]: a permutation of the features (BOFT's butterflies)
// Each has its finite-difference check in tests/test_orthogonal.cpp.
#include <Eigen/LU>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/op.hpp"
#include "peft/core/ops/elementwise.hpp"
#include "peft/core/ops/linear_algebra.hpp"

namespace peft::ops {

/// The strict upper triangle's size for blocks of b: b (b − 1) / 2.
inline std::int64_t skew_elements(std::int64_t b) { return b * (b - 1) / 2; }

/// Q [n, b, b] from v [n, b(b−1)/2]: Q[k, i, j] = v[k, t(i, j)] for i < j (t: row-major index of
/// the strict upper triangle), Q[k, j, i] = −Q[k, i, j], zero diagonal.
template <class T>
Var<T> skew_symmetric(Tape<T>& tape, const Var<T>& v, std::int64_t b) {
  check(v.value().rank() == 2 && b >= 1 && v.value().dim(1) == skew_elements(b), "skew_symmetric",
        "expected [n, " + std::to_string(skew_elements(b)) + "] for blocks of " +
            std::to_string(b) + ", got " + shape_string(v.shape()));
  const std::int64_t n = v.value().dim(0), m = skew_elements(b);
  Tensor<T> q = Tensor<T>::zeros(Shape{n, b, b});
  for (std::int64_t k = 0; k < n; ++k) {
    std::int64_t t = 0;
    for (std::int64_t i = 0; i < b; ++i)
      for (std::int64_t j = i + 1; j < b; ++j, ++t) {
        const T x = v.value()[k * m + t];
        q[(k * b + i) * b + j] = x;
        q[(k * b + j) * b + i] = -x;
      }
  }
  Var<T> y = make_output(tape, std::move(q), v);
  if (y.requires_grad())
    tape.record([v, y, n, m, b]() mutable {
      const Tensor<T>& g = std::as_const(y.grad());
      Tensor<T>& gv = v.grad();
      for (std::int64_t k = 0; k < n; ++k) {
        std::int64_t t = 0;
        for (std::int64_t i = 0; i < b; ++i)
          for (std::int64_t j = i + 1; j < b; ++j, ++t)
            gv[k * m + t] += g[(k * b + i) * b + j] - g[(k * b + j) * b + i];
      }
    });
  return y;
}

namespace detail {
template <class T>
using BlockMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstBlockMap = Eigen::Map<const RowMatrix<T>>;
}  // namespace detail

/// R = (I − Q)(I + Q)⁻¹ for each block of Q [n, b, b] (the exact Cayley transform; for a skew Q,
/// I + Q is invertible and R orthogonal). Backward: with M = (I + Q)⁻¹, dR = −(I + R) dQ M, so
/// dL/dQ = −(I + R)ᵀ G Mᵀ.
template <class T>
Var<T> cayley(Tape<T>& tape, const Var<T>& q) {
  check(q.value().rank() == 3 && q.value().dim(1) == q.value().dim(2), "cayley",
        "expected square blocks [n, b, b], got " + shape_string(q.shape()));
  const std::int64_t n = q.value().dim(0), b = q.value().dim(1);
  Tensor<T> r(q.shape());
  Tensor<T> inverses(q.shape());  // M per block, kept for the backward
  const RowMatrix<T> eye = RowMatrix<T>::Identity(b, b);
  for (std::int64_t k = 0; k < n; ++k) {
    detail::ConstBlockMap<T> qk(q.value().data() + k * b * b, b, b);
    detail::BlockMap<T> mk(inverses.data() + k * b * b, b, b);
    mk = (eye + qk).partialPivLu().inverse();
    detail::BlockMap<T>(r.data() + k * b * b, b, b).noalias() = (eye - qk) * mk;
  }
  Var<T> y = make_output(tape, std::move(r), q);
  if (y.requires_grad())
    tape.record([q, y, n, b, inverses = std::move(inverses)]() mutable {
      const RowMatrix<T> eye = RowMatrix<T>::Identity(b, b);
      for (std::int64_t k = 0; k < n; ++k) {
        detail::ConstBlockMap<T> g(std::as_const(y.grad()).data() + k * b * b, b, b);
        detail::ConstBlockMap<T> rk(std::as_const(y.value()).data() + k * b * b, b, b);
        detail::ConstBlockMap<T> mk(inverses.data() + k * b * b, b, b);
        detail::BlockMap<T>(q.grad().data() + k * b * b, b, b).noalias() -=
            (eye + rk).transpose() * g * mk.transpose();
      }
    });
  return y;
}

/// The reference's Cayley–Neumann series with `terms` terms (peft's OFT, use_cayley_neumann),
/// as its loop computes it: R = I; + 2Q (terms > 1); + 2Q², then + 2Q^k for 3 <= k < terms − 1,
/// then + Q^{max(terms − 1, 3)} (terms > 2). Built from batched products, so its gradient is
/// theirs.
template <class T>
Var<T> cayley_neumann(Tape<T>& tape, const Var<T>& q, int terms) {
  check(q.value().rank() == 3 && q.value().dim(1) == q.value().dim(2), "cayley_neumann",
        "expected square blocks [n, b, b], got " + shape_string(q.shape()));
  check(terms >= 1, "cayley_neumann", "expected at least 1 term, got " + std::to_string(terms));
  const std::int64_t n = q.value().dim(0), b = q.value().dim(1);
  Tensor<T> eye = Tensor<T>::zeros(q.shape());
  for (std::int64_t k = 0; k < n; ++k)
    for (std::int64_t i = 0; i < b; ++i) eye[(k * b + i) * b + i] = T(1);
  Var<T> r(std::move(eye));
  if (terms == 1) return r;
  r = add(tape, r, scale(tape, q, T(2)));
  if (terms == 2) return r;
  Var<T> power = matmul(tape, q, q);  // Q²
  r = add(tape, r, scale(tape, power, T(2)));
  for (int k = 3; k < terms - 1; ++k) {
    power = matmul(tape, power, q);
    r = add(tape, r, scale(tape, power, T(2)));
  }
  power = matmul(tape, power, q);
  return add(tape, r, power);
}

/// y = x · blockdiag(R): x [..., nb·b] in blocks of b features, y[..., j, :] = x[..., j, :] R_j.
/// R [nb, b, b], or [1, b, b] shared by every block (OFT's block_share). Backward: dx_j = g_j R_jᵀ,
/// dR_j = x_jᵀ g_j (summed over the blocks that share R).
template <class T>
Var<T> block_rotate(Tape<T>& tape, const Var<T>& x, const Var<T>& r) {
  check(r.value().rank() == 3 && r.value().dim(1) == r.value().dim(2), "block_rotate",
        "expected blocks [nb, b, b], got " + shape_string(r.shape()));
  const std::int64_t b = r.value().dim(1), in = x.value().cols();
  check(b > 0 && in % b == 0, "block_rotate",
        "input width " + std::to_string(in) + " is not a multiple of the block size " +
            std::to_string(b));
  const std::int64_t nb = in / b, rows = x.value().rows();
  const bool shared = r.value().dim(0) == 1;
  check(shared || r.value().dim(0) == nb, "block_rotate",
        std::to_string(nb) + " blocks of the input, " + std::to_string(r.value().dim(0)) +
            " rotations");
  using Strided = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
  Tensor<T> out(x.shape());
  for (std::int64_t j = 0; j < nb; ++j) {
    detail::ConstBlockMap<T> rj(r.value().data() + (shared ? 0 : j) * b * b, b, b);
    Strided xj(x.value().data() + j * b, rows, b, Eigen::OuterStride<>(in));
    StridedOut(out.data() + j * b, rows, b, Eigen::OuterStride<>(in)).noalias() = xj * rj;
  }
  Var<T> y = make_output(tape, std::move(out), x, r);
  if (y.requires_grad())
    tape.record([x, r, y, b, nb, rows, in, shared]() mutable {
      const Tensor<T>& g = std::as_const(y.grad());
      for (std::int64_t j = 0; j < nb; ++j) {
        const std::int64_t block = shared ? 0 : j;
        Strided gj(g.data() + j * b, rows, b, Eigen::OuterStride<>(in));
        if (x.requires_grad()) {
          detail::ConstBlockMap<T> rj(std::as_const(r.value()).data() + block * b * b, b, b);
          StridedOut(x.grad().data() + j * b, rows, b, Eigen::OuterStride<>(in)).noalias() +=
              gj * rj.transpose();
        }
        if (r.requires_grad()) {
          Strided xj(std::as_const(x.value()).data() + j * b, rows, b, Eigen::OuterStride<>(in));
          detail::BlockMap<T>(r.grad().data() + block * b * b, b, b).noalias() +=
              xj.transpose() * gj;
        }
      }
    });
  return y;
}

/// U / ‖U‖ per column, U [in, r]. Backward per column u = v/‖v‖: dv = (g − u (uᵀ g)) / ‖v‖.
template <class T>
Var<T> normalize_columns(Tape<T>& tape, const Var<T>& u) {
  check(u.value().rank() == 2, "normalize_columns",
        "expected a matrix [in, r], got " + shape_string(u.shape()));
  ConstMatrixMap<T> um = u.value().matrix();
  const Eigen::Array<T, 1, Eigen::Dynamic> norms = um.colwise().norm().array();
  check((norms > T(0)).all(), "normalize_columns", "a column of zeros has no direction");
  Tensor<T> out(u.shape());
  out.matrix() = um.array().rowwise() / norms;
  Var<T> y = make_output(tape, std::move(out), u);
  if (y.requires_grad())
    tape.record([u, y, norms]() mutable {
      ConstMatrixMap<T> g = std::as_const(y.grad()).matrix();
      ConstMatrixMap<T> n = std::as_const(y.value()).matrix();
      const Eigen::Array<T, 1, Eigen::Dynamic> along = (n.array() * g.array()).colwise().sum();
      u.grad().matrix().array() += (g.array() - n.array().rowwise() * along).rowwise() / norms;
    });
  return y;
}

}  // namespace peft::ops

namespace peft::ops {

/// y[..., i] = x[..., index[i]]: a permutation (or any selection) of the features, [..., in] →
/// [..., index.size()]. Backward: dx[..., index[i]] += dy[..., i]. BOFT's butterfly permutations.
template <class T>
Var<T> gather_features(Tape<T>& tape, const Var<T>& x, std::vector<std::int64_t> index) {
  const std::int64_t in = x.value().cols(), rows = x.value().rows();
  for (std::int64_t i : index)
    check(i >= 0 && i < in, "gather_features",
          "index " + std::to_string(i) + " outside [0, " + std::to_string(in) + ")");
  const auto n = static_cast<std::int64_t>(index.size());
  Shape shape = x.shape();
  shape.back() = n;
  Tensor<T> y(shape);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < n; ++i)
      y[r * n + i] = x.value()[r * in + index[static_cast<std::size_t>(i)]];
  Var<T> out = make_output(tape, std::move(y), x);
  if (out.requires_grad())
    tape.record([x, out, rows, in, n, index = std::move(index)]() mutable {
      const Tensor<T>& g = std::as_const(out.grad());
      Tensor<T>& gx = x.grad();
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t i = 0; i < n; ++i)
          gx[r * in + index[static_cast<std::size_t>(i)]] += g[r * n + i];
    });
  return out;
}

}  // namespace peft::ops
