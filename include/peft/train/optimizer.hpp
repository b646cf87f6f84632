#pragma once
// Optimizers over trainable tensors only: frozen tensors are never handed to them, so they get
// no optimizer state (that is what PEFT is for).
#include <cmath>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"

namespace peft {

namespace detail {
template <class T>
std::vector<Var<T>> trainable_only(const std::vector<NamedParameter<T>>& params) {
  std::vector<Var<T>> out;
  for (const NamedParameter<T>& p : params) {
    if (!p.var.requires_grad())
      throw Error("optimizer: tensor '" + p.name + "' is frozen; pass trainable tensors only");
    out.push_back(p.var);
  }
  return out;
}
}  // namespace detail

/// Two published forms of AdamW, which differ where eps and the decay act.
enum class AdamWForm {
  Torch,        ///< torch.optim.AdamW: decay first, eps after the corrected √v
  HuggingFace,  ///< transformers' old AdamW (peft's LoraFAOptimizer): eps on the raw √v, decay
                ///< after
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  AdamWForm form = AdamWForm::Torch;
};

/// AdamW. Torch form (default): decoupled weight decay p ← p·(1 − lr·wd) before the Adam update,
/// bias correction, eps added after the square root of the corrected second moment:
///   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps).
/// Hugging Face form: p ← p − (lr √(1 − β2ᵗ) / (1 − β1ᵗ)) · m / (√v + eps), then p ← p − lr·wd·p
/// (on the updated p).
template <class T>
class AdamW {
 public:
  AdamW(const std::vector<NamedParameter<T>>& params, AdamWOptions options)
      : params_(detail::trainable_only(params)), options_(options) {
    for (const Var<T>& p : params_) {
      m_.push_back(Tensor<T>::zeros(p.shape()));
      v_.push_back(Tensor<T>::zeros(p.shape()));
    }
  }

  void set_lr(double lr) { options_.lr = lr; }
  /// Per-tensor multipliers of the learning rate, in the order of the tensors given to the
  /// constructor (LoRA+: lora_B at a multiple of the rate); empty: 1 for every tensor.
  void set_lr_multipliers(std::vector<double> multipliers) {
    if (!multipliers.empty() && multipliers.size() != params_.size())
      throw Error("optimizer: " + std::to_string(multipliers.size()) +
                  " learning-rate multipliers for " + std::to_string(params_.size()) + " tensors");
    multipliers_ = std::move(multipliers);
  }
  const AdamWOptions& options() const { return options_; }
  std::int64_t step_count() const { return step_; }

  void step() {
    ++step_;
    const double bc1 = 1.0 - std::pow(options_.beta1, double(step_));
    const double bc2 = 1.0 - std::pow(options_.beta2, double(step_));
    const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
    const T b1 = T(options_.beta1), b2 = T(options_.beta2), eps = T(options_.eps);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      Var<T>& p = params_[k];
      if (!p.has_grad()) continue;  // no gradient reached it this step
      const double lr = options_.lr * (multipliers_.empty() ? 1.0 : multipliers_[k]);
      const T decay = static_cast<T>(1.0 - lr * options_.weight_decay);
      T* w = p.value().data();
      const T* g = p.grad().data();
      T* m = m_[k].data();
      T* v = v_[k].data();
      const std::int64_t n = p.value().numel();
      if (options_.form == AdamWForm::HuggingFace) {
        const T step_size = static_cast<T>(lr * std::sqrt(bc2) / bc1);
        for (std::int64_t i = 0; i < n; ++i) {
          m[i] = b1 * m[i] + (T(1) - b1) * g[i];
          v[i] = b2 * v[i] + (T(1) - b2) * g[i] * g[i];
          w[i] -= step_size * m[i] / (std::sqrt(v[i]) + eps);
          w[i] *= decay;
        }
        continue;
      }
      const T step_size = static_cast<T>(lr / bc1);
      for (std::int64_t i = 0; i < n; ++i) {
        w[i] *= decay;
        m[i] = b1 * m[i] + (T(1) - b1) * g[i];
        v[i] = b2 * v[i] + (T(1) - b2) * g[i] * g[i];
        w[i] -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps);
      }
    }
  }

  void zero_grad() {
    for (Var<T>& p : params_) p.zero_grad();
  }

  /// Bytes of optimizer state (two moments per trainable element).
  std::size_t state_bytes() const {
    std::size_t n = 0;
    for (const Tensor<T>& m : m_) n += 2 * sizeof(T) * static_cast<std::size_t>(m.numel());
    return n;
  }
  std::vector<Tensor<T>>& first_moments() { return m_; }
  std::vector<Tensor<T>>& second_moments() { return v_; }
  void set_step_count(std::int64_t step) { step_ = step; }

 private:
  std::vector<Var<T>> params_;
  AdamWOptions options_;
  std::vector<double> multipliers_;
  std::vector<Tensor<T>> m_, v_;
  std::int64_t step_ = 0;
};

struct SgdOptions {
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;  ///< coupled (added to the gradient), as torch.optim.SGD
  bool nesterov = false;
};

/// SGD with momentum, torch's semantics: g ← g + wd·p; b ← μ b + (1 − dampening) g (b = g on
/// the first step); g ← g + μ b with Nesterov, else b; p ← p − lr g.
template <class T>
class Sgd {
 public:
  Sgd(const std::vector<NamedParameter<T>>& params, SgdOptions options)
      : params_(detail::trainable_only(params)), options_(options), buffers_(params_.size()) {}

  void step() {
    const T lr = T(options_.lr), mu = T(options_.momentum), wd = T(options_.weight_decay);
    const T damp = T(options_.dampening);
    for (std::size_t k = 0; k < params_.size(); ++k) {
      Var<T>& p = params_[k];
      if (!p.has_grad()) continue;
      Tensor<T> g = p.grad();
      if (wd != T(0)) g.vector() += wd * p.value().vector();
      if (mu != T(0)) {
        Tensor<T>& b = buffers_[k];
        if (b.empty())
          b = g;
        else
          b.vector() = mu * b.vector() + (T(1) - damp) * g.vector();
        if (options_.nesterov)
          g.vector() += mu * b.vector();
        else
          g = b;
      }
      p.value().vector() -= lr * g.vector();
    }
  }
  void zero_grad() {
    for (Var<T>& p : params_) p.zero_grad();
  }

 private:
  std::vector<Var<T>> params_;
  SgdOptions options_;
  std::vector<Tensor<T>> buffers_;
};

}  // namespace peft
