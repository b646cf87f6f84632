#pragma once
// The op-writing API: how to add a differentiable operation to the library or to your own code.
// Every op in include/peft/core/ops/ is written with it; docs/tutorial-new-method.md ("Writing an
// op") and tests/test_custom_op.cpp write a matrix inverse with it, end to end.
//
// WHAT AN OP IS
//   A function template over the scalar type T (float or double) with the tape first:
//     template <class T>
//     Var<T> my_op(Tape<T>& tape, const Var<T>& x, ... /* more Vars, then plain arguments */);
//   It does four things, in this order:
//     1. check:   ops::check(condition, "my_op", message) for every shape it relies on;
//     2. forward: compute the output value as a new Tensor<T> from the inputs' values();
//     3. wrap:    Var<T> y = ops::make_output(tape, std::move(value), x, ...every Var input);
//     4. record:  if (y.requires_grad()) tape.record([x, ..., y] { backward });
//   The backward closure reads the output's adjoint y.grad() (dL/dy, the shape of y) and adds
//   dL/dinput into input.grad() for each input that requires one.
//
// REQUIRES (of the op's writer)
//   - Capture Vars by value, never by reference: a Var is a shared handle, so a copy keeps the
//     value (the activation) alive until the closure has run; capturing the output y in its own
//     closure is the norm and makes no cycle (the tape, not the Var, owns the closure).
//   - Backward ACCUMULATES: input.grad() += ..., never =. An input used by several ops, or twice
//     by one op, sums the adjoints of every use; the caller zeroes gradients between steps.
//   - Only inputs with requires_grad() get an adjoint: test `x.requires_grad()` before each
//     input's product, and skip the product otherwise. grad() of a frozen input throws; a frozen
//     weight costs no product and no gradient buffer (Stan Math's rule: only variables get
//     adjoints).
//   - Record only when make_output said the output requires a gradient, and record after the
//     forward: the closure must not be needed for the value. One closure per op is the
//     convention (an op that calls other ops may let those record their own instead).
//   - Neither the forward nor the backward modifies an input's value(): closures recorded
//     earlier still read it.
//   - Shapes in comments, as [rows, cols] or [B, T, d], for every input, output and adjoint.
//   - A gradient check in double precision (peft/testing/gradcheck.hpp) for every new op.
//
// ENSURES (what the library gives the op)
//   - make_output(tape, value, inputs...): a Var holding `value` that requires a gradient iff
//     the tape is recording (Tape(true), the default) and at least one input requires one. On a
//     disabled tape (inference) nothing requires a gradient, so nothing is recorded.
//   - check(condition, op, message): nothing when the condition holds; else throws ShapeError
//     with the message "op: message".
//   - tape.record(closure): Tape::backward seeds the loss' adjoint and runs the closures newest
//     first, each exactly once, so every consumer of y has added to y.grad() before y's own
//     closure runs. y.grad() exists then (zeros if no consumer used y). Each closure is destroyed
//     right after it ran, releasing what it captured.
#include <string>

#include "peft/core/autograd.hpp"
#include "peft/core/error.hpp"

namespace peft::ops {

/// The output of an op over `inputs` (each a Var<T>): `value`, requiring a gradient iff the
/// tape is recording and any input requires one. Pass every Var input the value depends on.
template <class T, class... Inputs>
Var<T> make_output(const Tape<T>& tape, Tensor<T> value, const Inputs&... inputs) {
  return Var<T>(std::move(value), tape.needs_grad(inputs...));
}

/// Throws ShapeError("<op>: <message>") unless `condition` holds.
inline void check(bool condition, const std::string& op, const std::string& message) {
  if (!condition) throw ShapeError(op + ": " + message);
}

}  // namespace peft::ops
