// The tape's contract: frozen tensors get no gradient buffer and no dW product; gradients
// accumulate until zeroed; closures are released after backward.
#include <doctest/doctest.h>

#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_autograd {

namespace {
using peft::Shape;
using peft::Tape;
using peft::Tensor;
using peft::Var;
using peft::testing::random_tensor;
}  // namespace

TEST_CASE("a frozen weight gets no gradient buffer; its input still gets one") {
  Var<double> x(random_tensor({4, 3}, 1), true);
  Var<double> w(random_tensor({5, 3}, 2), false);  // frozen
  Var<double> b(random_tensor({5}, 3), true);
  Tape<double> tape;
  Var<double> y = peft::ops::linear(tape, x, w, b, peft::ops::WeightLayout::OutIn);
  Var<double> loss = peft::ops::sum(tape, y);
  tape.backward(loss);
  CHECK_FALSE(w.has_grad());
  CHECK_THROWS_AS(w.grad(), peft::Error);
  CHECK(x.has_grad());
  CHECK(b.has_grad());
  CHECK(tape.size() == 0);  // closures consumed
}

TEST_CASE("a frozen weight costs no dW product: the backward never reads the input for it") {
  // With x frozen too and only the bias trainable, the backward needs neither x nor W: poison
  // both after the forward; a dW or dx product would read them and turn the gradient into NaN.
  Var<double> x(random_tensor({4, 3}, 4), false);
  Var<double> w(random_tensor({5, 3}, 5), false);
  Var<double> b(random_tensor({5}, 6), true);
  Tape<double> tape;
  Var<double> y = peft::ops::linear(tape, x, w, b, peft::ops::WeightLayout::OutIn);
  Var<double> loss = peft::ops::sum(tape, y);
  x.value().fill(std::numeric_limits<double>::quiet_NaN());
  w.value().fill(std::numeric_limits<double>::quiet_NaN());
  tape.backward(loss);
  for (std::int64_t i = 0; i < 5; ++i) CHECK(b.grad()[i] == doctest::Approx(4.0));
  CHECK_FALSE(w.has_grad());
  CHECK_FALSE(x.has_grad());
}

TEST_CASE("an op over frozen inputs records nothing") {
  Var<double> a(random_tensor({2, 2}, 7), false);
  Var<double> c(random_tensor({2, 2}, 8), false);
  Tape<double> tape;
  Var<double> y = peft::ops::matmul(tape, a, c);
  CHECK_FALSE(y.requires_grad());
  CHECK(tape.size() == 0);
}

TEST_CASE("a disabled tape records nothing even for trainable inputs") {
  Var<double> a(random_tensor({2, 2}, 9), true);
  Tape<double> tape(false);
  Var<double> y = peft::ops::gelu_tanh(tape, a);
  CHECK_FALSE(y.requires_grad());
  CHECK(tape.size() == 0);
}

TEST_CASE("gradients accumulate across backward passes until zeroed") {
  Var<double> a(random_tensor({3}, 10), true);
  for (int pass = 1; pass <= 3; ++pass) {
    Tape<double> tape;
    Var<double> loss = peft::ops::sum(tape, peft::ops::scale(tape, a, 2.0));
    tape.backward(loss);
    CHECK(a.grad()[0] == doctest::Approx(2.0 * pass));
  }
  a.zero_grad();
  CHECK(a.grad()[1] == 0.0);
}

TEST_CASE("freezing drops the gradient buffer") {
  Var<float> a(Tensor<float>(Shape{2}, 1.0f), true);
  a.grad().fill(3.0f);
  a.set_requires_grad(false);
  CHECK_FALSE(a.has_grad());
}

TEST_CASE("shape errors name both shapes") {
  Var<double> a(random_tensor({2, 3}, 11), true);
  Var<double> b(random_tensor({4, 5}, 12), true);
  Tape<double> tape;
  CHECK_THROWS_WITH_AS(peft::ops::matmul(tape, a, b), doctest::Contains("[2, 3]"),
                       peft::ShapeError);
  CHECK_THROWS_AS(peft::ops::add(tape, a, b), peft::ShapeError);
  CHECK_THROWS_AS(peft::ops::embedding(tape, a, {7}), peft::ShapeError);
  CHECK_THROWS_AS(peft::ops::cross_entropy(tape, a, {0, 9}), peft::ShapeError);
}

TEST_CASE("tensor basics") {
  Tensor<float> t(Shape{2, 3}, 1.5f);
  CHECK(t.numel() == 6);
  CHECK(t.rows() == 2);
  CHECK(t.cols() == 3);
  t.reshape({3, 2});
  CHECK(t.shape() == Shape{3, 2});
  CHECK_THROWS_AS(t.reshape({4, 2}), peft::ShapeError);
  CHECK_THROWS_AS(Tensor<float>(Shape{2}, std::vector<float>{1, 2, 3}), peft::ShapeError);
  Tensor<double> d = t.cast<double>();
  CHECK(d[5] == 1.5);
}

TEST_CASE("cross-entropy: mean over counted tokens, NaN when none is counted") {
  Var<double> logits(Tensor<double>(Shape{2, 2}, std::vector<double>{0, 0, 0, std::log(3.0)}),
                     false);
  Tape<double> tape;
  Var<double> loss = peft::ops::cross_entropy(tape, logits, {0, 1});
  // row 0: log 2; row 1: −log(3/4)
  CHECK(loss.value()[0] == doctest::Approx((std::log(2.0) - std::log(0.75)) / 2));
  Var<double> none = peft::ops::cross_entropy(tape, logits, {-100, -100});
  CHECK(std::isnan(none.value()[0]));
}

}  // namespace test_autograd
