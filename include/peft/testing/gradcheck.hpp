#pragma once
// A finite-difference gradient checker for any op, layer or PEFT policy, in double precision.
//
// For a function f of some inputs, it draws a fixed random cotangent R of f's output shape,
// back-propagates R through the tape (analytic gradients of L = Σ R ⊙ f), and compares each
// gradient-requiring input's gradient with the central difference (L(x+h) − L(x−h)) / 2h,
// element by element: |analytic − numeric| <= atol + rtol·|numeric|.
#include <cmath>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"

namespace peft::testing {

struct GradCheckOptions {
  double step = 1e-6;  ///< finite-difference step h
  double rtol = 1e-6;
  double atol = 1e-8;
  std::uint64_t seed = 1234;
};

struct GradCheckResult {
  bool ok = true;
  double worst_abs_error = 0;  ///< largest |analytic − numeric| over all elements
  std::string message;         ///< where the worst violation is, when !ok
};

/// The function under test: builds its output from `inputs` on `tape`.
using DoubleFunction = std::function<Var<double>(Tape<double>&, std::vector<Var<double>>&)>;

/// Tensor of uniform values in [lo, hi), from a seed: test inputs that are never all zero.
inline Tensor<double> random_tensor(const Shape& shape, std::uint64_t seed, double lo = -1.0,
                                    double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  Tensor<double> t(shape);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = dist(rng);
  return t;
}

inline GradCheckResult check_gradients(const DoubleFunction& f, std::vector<Var<double>> inputs,
                                       const GradCheckOptions& options = {}) {
  auto scalar_loss = [&](const Tensor<double>& cotangent) {
    Tape<double> tape(false);
    Var<double> out = f(tape, inputs);
    return (out.value().vector().array() * cotangent.vector().array()).sum();
  };
  GradCheckResult result;
  Tensor<double> cotangent;
  {
    Tape<double> tape;
    for (Var<double>& in : inputs) in.zero_grad();
    Var<double> out = f(tape, inputs);
    cotangent = random_tensor(out.shape(), options.seed, 0.5, 1.5);
    if (!out.requires_grad()) {
      result.ok = false;
      result.message = "output does not depend on any gradient-requiring input";
      return result;
    }
    tape.backward(out, cotangent);
  }
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    Var<double>& in = inputs[k];
    if (!in.requires_grad()) continue;
    const Tensor<double> analytic = in.has_grad() ? in.grad() : Tensor<double>::zeros(in.shape());
    for (std::int64_t i = 0; i < in.value().numel(); ++i) {
      const double saved = in.value()[i];
      in.value()[i] = saved + options.step;
      const double plus = scalar_loss(cotangent);
      in.value()[i] = saved - options.step;
      const double minus = scalar_loss(cotangent);
      in.value()[i] = saved;
      const double numeric = (plus - minus) / (2 * options.step);
      const double err = std::abs(analytic[i] - numeric);
      result.worst_abs_error = std::max(result.worst_abs_error, err);
      if (!(err <= options.atol + options.rtol * std::abs(numeric)) && result.ok) {
        result.ok = false;
        std::ostringstream msg;
        msg << "input " << k << " element " << i << ": analytic " << analytic[i] << ", numeric "
            << numeric;
        result.message = msg.str();
      }
    }
  }
  return result;
}

}  // namespace peft::testing
