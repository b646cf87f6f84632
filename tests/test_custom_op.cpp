// A custom op written with the public op API only (peft/core/op.hpp, no ops::detail): a matrix
// inverse, its finite-difference gradient check in double, and the Cayley map of orthogonal
// fine-tuning built on it. This file is the code of docs/tutorial-new-method.md, "Writing an op".
#include <doctest/doctest.h>

#include <Eigen/LU>
#include <peft/core/op.hpp>
#include <peft/core/ops.hpp>
#include <peft/testing/gradcheck.hpp>

namespace my_ops {

/// Y = X⁻¹ for a square, invertible X [n, n]; Y [n, n].
/// Backward: dX += −Yᵀ dY Yᵀ (from d(X⁻¹) = −X⁻¹ dX X⁻¹).
template <class T>
peft::Var<T> inverse(peft::Tape<T>& tape, const peft::Var<T>& x) {
  const peft::Tensor<T>& xv = x.value();
  peft::ops::check(xv.rank() == 2 && xv.dim(0) == xv.dim(1), "inverse",
                   "needs a square matrix, got " + peft::shape_string(xv.shape()));
  const Eigen::FullPivLU<peft::RowMatrix<T>> lu(xv.matrix());
  if (!lu.isInvertible()) throw peft::Error("inverse: the matrix is singular");
  peft::Tensor<T> value(xv.shape());
  value.matrix() = lu.inverse();

  peft::Var<T> y = peft::ops::make_output(tape, std::move(value), x);
  if (y.requires_grad()) {
    tape.record([x, y] {
      if (!x.requires_grad()) return;  // only inputs that require a gradient get one
      const auto yt = y.value().matrix().transpose();              // Yᵀ [n, n]
      x.grad().matrix().noalias() -= yt * y.grad().matrix() * yt;  // += −Yᵀ dY Yᵀ
    });
  }
  return y;
}

/// The Cayley map R = (I − S)(I + S)⁻¹ of the skew-symmetric S = A − Aᵀ, A [n, n]: an
/// orthogonal R [n, n] for any A (I + S is always invertible), R = I at A = 0. Composed from
/// library ops and `inverse`, so its backward is theirs.
template <class T>
peft::Var<T> cayley(peft::Tape<T>& tape, const peft::Var<T>& a) {
  namespace ops = peft::ops;
  ops::check(a.value().rank() == 2 && a.value().dim(0) == a.value().dim(1), "cayley",
             "needs a square matrix, got " + peft::shape_string(a.shape()));
  peft::Tensor<T> identity(a.shape());
  identity.matrix().setIdentity();
  const peft::Var<T> eye(std::move(identity));  // frozen: no adjoint, no gradient buffer
  const peft::Var<T> s = ops::add(tape, a, ops::scale(tape, ops::transpose(tape, a, 0, 1), T(-1)));
  const peft::Var<T> i_minus_s = ops::add(tape, eye, ops::scale(tape, s, T(-1)));
  const peft::Var<T> i_plus_s = ops::add(tape, eye, s);
  return ops::matmul(tape, i_minus_s, inverse(tape, i_plus_s));
}

}  // namespace my_ops

namespace {

using peft::Tape;
using peft::Tensor;
using peft::Var;
using Inputs = std::vector<Var<double>>;

// A well-conditioned square matrix: uniform entries in [-1, 1) plus `diagonal` on the diagonal.
Tensor<double> square(std::int64_t n, std::uint64_t seed, double diagonal) {
  Tensor<double> t = peft::testing::random_tensor({n, n}, seed);
  t.matrix().diagonal().array() += diagonal;
  return t;
}

}  // namespace

TEST_CASE("custom op: inverse of a known matrix") {
  Tape<double> tape;
  Tensor<double> x({2, 2});
  x.values() = {4, 7, 2, 6};  // det 10, inverse [[0.6, -0.7], [-0.2, 0.4]]
  const Var<double> y = my_ops::inverse(tape, Var<double>(x));
  const std::vector<double> expected = {0.6, -0.7, -0.2, 0.4};
  for (std::size_t i = 0; i < expected.size(); ++i)
    CHECK(y.value()[static_cast<std::int64_t>(i)] == doctest::Approx(expected[i]).epsilon(1e-14));

  const Tensor<double> a = square(5, 3, 3.0);
  const Var<double> b = my_ops::inverse(tape, Var<double>(a));
  CHECK((a.matrix() * b.value().matrix()).isIdentity(1e-12));
}

TEST_CASE("custom op: inverse refuses a non-square or singular matrix") {
  Tape<double> tape;
  CHECK_THROWS_WITH_AS(my_ops::inverse(tape, Var<double>(Tensor<double>({2, 3}))),
                       "inverse: needs a square matrix, got [2, 3]", peft::ShapeError);
  CHECK_THROWS_AS(my_ops::inverse(tape, Var<double>(Tensor<double>({3, 3}))), peft::Error);
}

TEST_CASE("custom op: a frozen input or a disabled tape records nothing") {
  Tape<double> tape;
  const Var<double> frozen(square(3, 4, 2.0));
  CHECK_FALSE(my_ops::inverse(tape, frozen).requires_grad());
  CHECK(tape.size() == 0);

  Tape<double> inference(false);
  const Var<double> trainable(square(3, 5, 2.0), true);
  CHECK_FALSE(my_ops::inverse(inference, trainable).requires_grad());
  CHECK(inference.size() == 0);

  CHECK(my_ops::inverse(tape, trainable).requires_grad());
  CHECK(tape.size() == 1);
}

TEST_CASE("custom op: inverse gradient matches finite differences (double)") {
  const peft::testing::GradCheckResult r = peft::testing::check_gradients(
      [](Tape<double>& tape, Inputs& x) { return my_ops::inverse(tape, x[0]); },
      {Var<double>(square(4, 6, 3.0), true)});
  INFO(r.message);
  CHECK(r.ok);
}

TEST_CASE("custom op: the Cayley map is orthogonal and its gradient matches (double)") {
  Tape<double> tape;
  const Var<double> a(peft::testing::random_tensor({4, 4}, 7), true);
  const Var<double> r = my_ops::cayley(tape, a);
  CHECK((r.value().matrix().transpose() * r.value().matrix()).isIdentity(1e-12));  // RᵀR = I

  // A gradient through the inverse, the frozen identity and the library ops it is built from.
  const peft::testing::GradCheckResult check = peft::testing::check_gradients(
      [](Tape<double>& t, Inputs& x) { return my_ops::cayley(t, x[0]); },
      {Var<double>(peft::testing::random_tensor({4, 4}, 8), true)});
  INFO(check.message);
  CHECK(check.ok);
}
