#pragma once
// Reverse-mode automatic differentiation with no global state.
//
// A `Var` is a shared handle to a value tensor and, only when the value requires a gradient,
// its gradient buffer. A `Tape` is an explicit object the caller owns: every op that produces
// a value depending on a gradient-requiring input records one backward closure on the tape.
// `Tape::backward` seeds d(loss)/d(loss) = 1 and runs the closures newest first; each closure
// accumulates (+=) into the gradients of those inputs that require one, and is destroyed right
// after it ran, releasing the activations it captured.
//
// Frozen tensors (requires_grad == false) never get a gradient buffer, and ops skip the products
// that would compute one: a frozen weight costs no dW and no memory (Stan Math's rule that only
// variables get adjoints; PyTorch's grad_input_mask).
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/tensor.hpp"

namespace peft {

template <class T>
class Var {
 public:
  Var() = default;
  /// A value that requires a gradient iff `requires_grad`.
  explicit Var(Tensor<T> value, bool requires_grad = false)
      : node_(std::make_shared<Node>(Node{std::move(value), Tensor<T>{}, requires_grad})) {}

  bool defined() const { return node_ != nullptr; }
  explicit operator bool() const { return defined(); }

  Tensor<T>& value() { return node_->value; }
  const Tensor<T>& value() const { return node_->value; }
  const Shape& shape() const { return node_->value.shape(); }

  bool requires_grad() const { return node_ && node_->requires_grad; }
  /// Freezing drops any gradient buffer; unfreezing starts from a zero gradient.
  void set_requires_grad(bool flag) {
    node_->requires_grad = flag;
    if (!flag) node_->grad = Tensor<T>{};
  }

  /// True once a gradient buffer exists (only ever for gradient-requiring values).
  bool has_grad() const { return node_ && !node_->grad.empty(); }
  /// The gradient, allocated as zeros on first use. Only valid for gradient-requiring values.
  /// A Var is a handle: a const handle still reaches the (shared) gradient buffer.
  Tensor<T>& grad() const {
    if (!node_->requires_grad) throw Error("grad() of a tensor that does not require a gradient");
    if (node_->grad.empty() || node_->grad.shape() != node_->value.shape())
      node_->grad = Tensor<T>::zeros(node_->value.shape());
    return node_->grad;
  }
  void zero_grad() {
    if (has_grad()) node_->grad.set_zero();
  }
  void release_grad() { node_->grad = Tensor<T>{}; }

  bool same_as(const Var& other) const { return node_ == other.node_; }
  /// True when no other handle shares this node: nothing else can read the value any more, so
  /// a backward closure holding the last handle may reuse the value's storage.
  bool sole_handle() const { return node_ && node_.use_count() == 1; }

 private:
  struct Node {
    Tensor<T> value;
    Tensor<T> grad;
    bool requires_grad;
  };
  std::shared_ptr<Node> node_;
};

/// Records backward closures of the ops run since the last `backward` or `clear`.
template <class T>
class Tape {
 public:
  /// When disabled (inference), ops record nothing even for gradient-requiring inputs.
  explicit Tape(bool enabled = true) : enabled_(enabled) {}
  Tape(const Tape&) = delete;
  Tape& operator=(const Tape&) = delete;

  bool enabled() const { return enabled_; }
  /// True when an op over these inputs must produce a gradient-requiring output.
  template <class... Vars>
  bool needs_grad(const Vars&... inputs) const {
    return enabled_ && (inputs.requires_grad() || ...);
  }

  /// Adds an op's backward closure; `backward` runs the closures newest first, once each, and
  /// destroys each after it ran. The op-writing contract is in peft/core/op.hpp.
  void record(std::function<void()> backward_fn) { closures_.push_back(std::move(backward_fn)); }
  std::size_t size() const { return closures_.size(); }

  /// Seeds d(output)/d(output) = `seed` (1 for a scalar loss) and back-propagates.
  /// Gradients accumulate into existing buffers until the caller zeroes them.
  void backward(Var<T>& output, T seed = T(1)) {
    if (!output.requires_grad())
      throw Error("backward() from a value that does not require a gradient");
    output.grad().fill(seed);
    run_closures();
  }
  /// Back-propagates d(L)/d(output) = `seed` for an output of any shape.
  void backward(Var<T>& output, const Tensor<T>& seed) {
    if (!output.requires_grad())
      throw Error("backward() from a value that does not require a gradient");
    require_shape(seed, output.shape(), "backward seed");
    output.grad().vector() = seed.vector();
    run_closures();
  }
  void clear() { closures_.clear(); }

 private:
  void run_closures() {
    while (!closures_.empty()) {
      std::function<void()> fn = std::move(closures_.back());
      closures_.pop_back();
      fn();  // destroyed here: the activations it captured are released as backward proceeds
    }
  }
  std::vector<std::function<void()>> closures_;
  bool enabled_;
};

/// A named trainable or frozen tensor of a model or an adapter.
template <class T>
struct NamedParameter {
  std::string name;
  Var<T> var;
};

}  // namespace peft
