// Optimizers against hand-computed torch updates.
#include <doctest/doctest.h>

#include <cmath>
#include <peft/peft.hpp>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_optimizer {

namespace {
using peft::NamedParameter;
using peft::Shape;
using peft::Tensor;
using peft::Var;
}  // namespace

TEST_CASE("AdamW follows torch: decoupled decay, bias correction, eps after the sqrt") {
  Var<double> p(Tensor<double>(Shape{2}, std::vector<double>{1.0, -2.0}), true);
  peft::AdamW<double> opt({{"p", p}}, peft::AdamWOptions{.lr = 0.1, .weight_decay = 0.5});
  double w[2] = {1.0, -2.0}, m[2] = {0, 0}, v[2] = {0, 0};
  const double g_seq[3][2] = {{0.5, -1.0}, {0.25, 2.0}, {-0.75, 0.1}};
  for (int t = 1; t <= 3; ++t) {
    p.grad()[0] = g_seq[t - 1][0];
    p.grad()[1] = g_seq[t - 1][1];
    opt.step();
    for (int i = 0; i < 2; ++i) {
      const double g = g_seq[t - 1][i];
      w[i] *= 1 - 0.1 * 0.5;
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.999 * v[i] + 0.001 * g * g;
      const double mhat = m[i] / (1 - std::pow(0.9, t));
      const double denom = std::sqrt(v[i]) / std::sqrt(1 - std::pow(0.999, t)) + 1e-8;
      w[i] -= 0.1 * mhat / denom;
      CHECK(p.value()[i] == doctest::Approx(w[i]).epsilon(1e-14));
    }
  }
  CHECK(opt.state_bytes() == 2 * 2 * sizeof(double));
}

TEST_CASE("optimizers refuse frozen tensors: frozen weights get no optimizer state") {
  Var<float> frozen(Tensor<float>(Shape{3}), false);
  CHECK_THROWS_AS(peft::AdamW<float>({{"w", frozen}}, {}), peft::Error);
  CHECK_THROWS_AS(peft::Sgd<float>({{"w", frozen}}, {}), peft::Error);
}

TEST_CASE("SGD with momentum follows torch") {
  Var<double> p(Tensor<double>(Shape{1}, 1.0), true);
  peft::Sgd<double> opt({{"p", p}},
                        peft::SgdOptions{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.1});
  double w = 1.0, buf = 0.0;
  for (int t = 0; t < 3; ++t) {
    const double g0 = 0.5 - 0.25 * t;
    p.grad()[0] = g0;
    opt.step();
    const double g = g0 + 0.1 * w;
    buf = t == 0 ? g : 0.9 * buf + g;
    w -= 0.1 * buf;
    CHECK(p.value()[0] == doctest::Approx(w).epsilon(1e-14));
  }
}

}  // namespace test_optimizer
