#pragma once
// VB-LoRA (Li et al., "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks",
// 2024): every LoRA factor of every adapted module is assembled from one trainable bank of
// sub-vectors shared by the whole model,
//   A [r, in]  = rows of mix(logits_A [r, in/L, nv]),  B [out, r] from mix(logits_B [out/L, r,
//   nv]), mix(l) = Σ_{i ∈ top-k(l)} softmax(l_topk)_i · bank_i,  bank [nv, L],
// y = x Wᵀ + b + (x Aᵀ) Bᵀ (no scale). L = vector_length must divide in and out. Init: the bank
// U(±init_vector_bank_bound), the logits N(0, init_logits_std²): the update starts non-zero (as
// the reference). Keys: `vblora_logits_A`, `vblora_logits_B` per module and
// `base_model.vblora_vector_bank` once. Mergeable: W += B A. Not built: save_only_topk_weights
// (the reference's inference-only file of top-k weights and indices; refused).
// docs/methods/reparameterized.md#vb-lora; tests/test_orthogonal.cpp; golden llama_vblora,
// gpt2_vblora.
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/core/ops/structured_updates.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"

namespace peft {

struct VbLoraConfig : ConfigIo<VbLoraConfig> {
  static constexpr std::string_view peft_type = "VBLORA";
  int r = 4;
  int num_vectors = 256;
  int vector_length = 256;
  int topk = 2;
  double vblora_dropout = 0.0;
  double init_vector_bank_bound = 0.02;
  double init_logits_std = 0.1;
  bool save_only_topk_weights = false;
  TargetRules targets;

  static auto fields() {
    using C = VbLoraConfig;
    return config_fields(
        field("r", &C::r, check::dimension),
        field("num_vectors", &C::num_vectors, check::dimension),
        field("vector_length", &C::vector_length, check::dimension),
        field("topk", &C::topk, check::dimension),
        float_field("vblora_dropout", &C::vblora_dropout, check::probability),
        float_field("init_vector_bank_bound", &C::init_vector_bank_bound, check::scale),
        float_field("init_logits_std", &C::init_logits_std, check::scale),
        field("save_only_topk_weights", &C::save_only_topk_weights), targets_field(&C::targets),
        fan_in_fan_out(), fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    if (topk > num_vectors)
      throw ConfigError(source + ": topk (" + std::to_string(topk) + ") exceeds num_vectors (" +
                        std::to_string(num_vectors) + ")");
    if (save_only_topk_weights)
      throw ConfigError(source +
                        ": save_only_topk_weights files (top-k weights and indices, "
                        "inference only) are not supported; save the logits");
  }
};

struct VBLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "vblora", title = "VB-LoRA";
  static constexpr std::string_view paper =
      "Li et al., 2024, VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks";
  static constexpr std::string_view reference = "VBLORA";  ///< peft_type in HF peft
  using Config = VbLoraConfig;
  static constexpr const char* bank_key = "base_model.vblora_vector_bank";

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t len = c.vector_length;
    if (m.in_features % len != 0 || m.out_features % len != 0)
      throw ConfigError("VB-LoRA: vector_length " + std::to_string(len) + " does not divide " +
                        std::string(m.name) + "'s [" + std::to_string(m.out_features) + ", " +
                        std::to_string(m.in_features) + "]");
    return {{"vblora_logits_A", {c.r, m.in_features / len, c.num_vectors}},
            {"vblora_logits_B", {m.out_features / len, c.r, c.num_vectors}}};
  }
  /// The modules' logits and the bank, counted once.
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>& l,
                                         const Config& c) {
    ParameterCount count = count_site_tensors<VBLoRA>(l, c);
    count.trainable += std::int64_t(c.num_vectors) * c.vector_length;
    return count;
  }

  template <class T>
  class State {
   public:
    using Sites = SiteTable<T>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      bank_ = Var<T>(Tensor<T>(Shape{config_.num_vectors, config_.vector_length}), true);
      std::uniform_real_distribution<double> u(-config_.init_vector_bank_bound,
                                               config_.init_vector_bank_bound);
      for (std::int64_t i = 0; i < bank_.value().numel(); ++i)
        bank_.value()[i] = static_cast<T>(u(ctx.rng));
      sites_.template attach<VBLoRA>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>&) {
        detail::normal_fill(s[0].value(), ctx.rng, config_.init_logits_std);
        detail::normal_fill(s[1].value(), ctx.rng, config_.init_logits_std);
      });
    }

    /// A low-rank term (A, B assembled from the bank on the tape), fused into the base product.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      Tape<T>& tape = p.tape();
      const auto [a, b] = factors(tape, *s, p.module());
      p.add_low_rank(a, b, T(1), config_.vblora_dropout);
    }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    std::vector<NamedParameter<T>> parameters() const {
      std::vector<NamedParameter<T>> out = sites_.parameters();
      if (sites_.size() > 0) out.push_back({bank_key, bank_});
      return out;
    }

    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta()); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta()); }
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta()); }

   private:
    /// A [r, in] and B [out, r] from the bank.
    std::pair<Var<T>, Var<T>> factors(Tape<T>& tape, const Slot& s, const nn::Linear<T>& m) const {
      const std::int64_t k = config_.topk, r = config_.r;
      const Var<T> a = ops::reshape(tape, ops::topk_mix(tape, s[0], bank_, k),
                                    Shape{r, m.in_features});  // [r, in/L, L] → [r, in]
      const Var<T> b =
          ops::reshape(tape, ops::transpose(tape, ops::topk_mix(tape, s[1], bank_, k), 1, 2),
                       Shape{m.out_features, r});  // [out/L, r, L] → [out/L, L, r] → [out, r]
      return {a, b};
    }
    auto delta() const {
      return [this](const Slot& s, const nn::Linear<T>& m) {
        Tape<T> tape(false);
        const auto [a, b] = factors(tape, s, m);
        return RowMatrix<T>(b.value().matrix() * a.value().matrix());
      };
    }

    Config config_;
    Sites sites_;
    Var<T> bank_;
  };
};

}  // namespace peft
