#pragma once
// LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
// Models Fine-tuning"): LoRA, y = W x + s · B A x, with A frozen at its random initialisation and
// only B trained, so that backward needs the r-wide x Aᵀ and never x for A's gradient. As the
// reference trains it (HF peft's create_lorafa_optimizer and LoraFAOptimizer, peft/optimizers/
// lorafa.py), B's gradient is projected before each AdamW step:
//   g_B ← g_B (A Aᵀ + 10⁻⁸ I)⁺ / s²,
// which makes the step on B the step full fine-tuning would take on W restricted to A's row
// space; the optimizer is AdamW in the Hugging Face form (eps on the raw √v, decay after the
// update; train/optimizer.hpp), which this policy prescribes (PrescribesAdamW).
// Files: a LoRA adapter (peft_type LORA, lora_A and lora_B saved): the reference's LoRA-FA is an
// optimizer over a LoRA adapter, so its files load as LoRA, and this policy is chosen by name
// (`peft train --method lora_fa`) or for the golden case whose case.json names it. Starts at the
// base model (B = 0); mergeable as LoRA.
// docs/methods/reparameterized.md#lora-fa; tests/test_lora_fa.cpp; golden llama_lora_fa.
#include <Eigen/Dense>
#include <string_view>

#include "peft/methods/reparameterized/lora.hpp"
#include "peft/train/optimizer.hpp"

namespace peft {

struct LoraFA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lora_fa", title = "LoRA-FA";
  static constexpr std::string_view paper =
      "Zhang et al., 2023, LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language "
      "Models Fine-tuning";
  static constexpr std::string_view reference = "LORA";  ///< a LoRA adapter, its optimizer
  static constexpr AdamWForm adamw_form = AdamWForm::HuggingFace;
  using Config = LoraConfig;
  template <class T>
  using Extra = LoRA::Extra<T>;
  template <class T>
  using State = SiteState<LoraFA, T>;
  template <class T>
  using Slot = SiteSlot<T, Extra<T>>;

  /// Never chosen for a file: a LoRA-FA adapter is a LoRA adapter (see above).
  static bool accepts(const nlohmann::json&) { return false; }
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    SiteTensors t = LoRA::site_tensors(c, m);
    t[0].trainable = false;  // A
    return t;
  }
  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    LoRA::initialise(c, s, m, rng);
  }
  template <class T>
  static void contribute(const Config& c, Projection<T>& p, const Slot<T>& s) {
    LoRA::contribute(c, p, s);
  }
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>& m) {
    return LoRA::delta_weight(s, m);
  }
  /// g_B ← g_B (A Aᵀ + 10⁻⁸ I)⁺ / s² (the reference's pinv; A Aᵀ is r × r).
  template <class T>
  static void project_gradient(const Config&, const Slot<T>& s) {
    const Var<T>& b = s[1];
    if (!b.has_grad()) return;
    ConstMatrixMap<T> a = s[0].value().matrix();
    RowMatrix<T> gram = a * a.transpose();
    gram.diagonal().array() += T(1e-8);
    const RowMatrix<T> inverse =
        Eigen::CompleteOrthogonalDecomposition<RowMatrix<T>>(gram).pseudoInverse();
    MatrixMap<T> g = b.grad().matrix();
    const RowMatrix<T> projected = (g * inverse) / (s.extra.scale * s.extra.scale);
    g = projected;
  }
};

}  // namespace peft
