#pragma once
// VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every adapted
// layer, and two trainable scaling vectors per layer:
//   y = base(x) + λ_b ⊙ ((λ_d ⊙ (x Âᵀ)) B̂ᵀ),  Â = vera_A[:, :in], B̂ = vera_B[:out, :]
// vera_A [r, max_in] and vera_B [max_out, r] are sized for the largest adapted layer (as the
// reference sizes them) and stored in the adapter file as `base_model.vera_A` / `vera_B` when
// save_projection is true. They are buffers, not parameters: they are never trained and not
// counted. λ_b starts at 0, so the model starts at the base model.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"

namespace peft {

struct VeraConfig : ConfigIo<VeraConfig> {
  static constexpr std::string_view peft_type = "VERA";
  int r = 256;
  TargetRules targets;
  std::int64_t projection_prng_key = 0;
  bool save_projection = true;
  double vera_dropout = 0.0;  ///< the update's input dropout in training mode
  double d_initial = 0.1;
  bool init_weights = true;  ///< λ_b = 0, λ_d = d_initial; else λ_b = 1, λ_d ~ N(0, 1)

  /// The fields the reference (peft 0.21) writes for VeRA (it has no exclude_modules).
  static auto fields() {
    using C = VeraConfig;
    return config_fields(field("r", &C::r, check::dimension),
                         detail::reparameterized::TargetsWithoutExclude<C>{{&C::targets}},
                         field("projection_prng_key", &C::projection_prng_key),
                         field("save_projection", &C::save_projection),
                         float_field("vera_dropout", &C::vera_dropout, check::probability),
                         float_field("d_initial", &C::d_initial, check::scale),
                         field("init_weights", &C::init_weights), fan_in_fan_out(),
                         fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct VeRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "vera", title = "VeRA";
  static constexpr std::string_view paper =
      "Kopiczko et al., 2024, VeRA: Vector-based Random Matrix Adaptation";
  static constexpr std::string_view reference = "VERA";  ///< peft_type in HF peft
  using Config = VeraConfig;

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "VERA"); }
  /// λ_b [out] and λ_d [r] per module (r + out); the shared vera_A / vera_B are the method's
  /// own buffers, outside the table: not parameters, not counted.
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    return {{"vera_lambda_b", {m.out_features}}, {"vera_lambda_d", {c.r}}};
  }

  static constexpr const char* shared_a_key = "base_model.vera_A";
  static constexpr const char* shared_b_key = "base_model.vera_B";

  template <class T>
  class State {
   public:
    using Sites = SiteTable<T>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      std::int64_t max_in = 0, max_out = 0;
      sites_.template attach<VeRA>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>& m) {
        max_in = std::max(max_in, m.in_features);
        max_out = std::max(max_out, m.out_features);
        if (config_.init_weights) {
          s[1].value().fill(static_cast<T>(config_.d_initial));
        } else {
          s[0].value().fill(T(1));
          detail::normal_fill(s[1].value(), ctx.rng, 1.0);
        }
      });
      // The shared projections come from their own generator seeded with projection_prng_key,
      // so an adapter saved without them (save_projection false) rebuilds the same ones here.
      // The draws follow the reference's distribution (Kaiming-uniform, gain √2, fan_in = the
      // second extent), not torch's generator: files for the reference keep save_projection.
      std::mt19937_64 rng(static_cast<std::uint64_t>(config_.projection_prng_key));
      shared_a_ = Var<T>(Tensor<T>(Shape{config_.r, max_in}));
      shared_b_ = Var<T>(Tensor<T>(Shape{max_out, config_.r}));
      for (Var<T>* shared : {&shared_a_, &shared_b_}) {
        const double bound = std::sqrt(6.0 / static_cast<double>(shared->value().cols()));
        std::uniform_real_distribution<double> u(-bound, bound);
        for (std::int64_t i = 0; i < shared->value().numel(); ++i)
          shared->value()[i] = static_cast<T>(u(rng));
      }
    }

    /// A replacement by the fused vera_linear (x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (x Âᵀ)) B̂ᵀ) in one
    /// op), so that the numerics stay those of the op.
    /// In training mode with vera_dropout, the update is a delta of its own on the dropped
    /// input (the reference: λ_b ⊙ B̂(λ_d ⊙ Â dropout(x))), the base product on x.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      if (p.dropout_generator() && config_.vera_dropout > 0) {
        const std::int64_t in = p.module().in_features, out = p.module().out_features;
        return p.add_delta(
            [this, s, in, out](Tape<T>& t, const Var<T>& x) {
              const Var<T> a = leading(t, shared_a_, 1, in), b = leading(t, shared_b_, 0, out);
              const Var<T> h = ops::linear(t, x, a, Var<T>{}, ops::WeightLayout::OutIn);
              const Var<T> hd = ops::mul(t, h, Projection<T>::flat(t, (*s)[1], config_.r));
              const Var<T> z = ops::linear(t, hd, b, Var<T>{}, ops::WeightLayout::OutIn);
              return ops::mul(t, z, Projection<T>::flat(t, (*s)[0], out));
            },
            config_.vera_dropout);
      }
      p.replace_product([this, s](Tape<T>& tape, const nn::Linear<T>& m, const Var<T>& x) {
        return ops::vera_linear(tape, x, m.dense_weight("VeRA"), m.bias, m.layout, shared_a_,
                                shared_b_, (*s)[1], (*s)[0]);
      });
    }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// The leading `size` entries of a shared matrix along `axis` (Â = A[:, :in], B̂ = B[:out]).
    static Var<T> leading(Tape<T>& t, const Var<T>& shared, std::size_t axis, std::int64_t size) {
      const std::int64_t whole = shared.value().dim(axis);
      return size == whole ? shared : ops::split(t, shared, {size, whole - size}, axis)[0];
    }

    /// λ_b and λ_d of every module, then the shared (frozen) projections when they are saved.
    std::vector<NamedParameter<T>> parameters() const {
      std::vector<NamedParameter<T>> out = sites_.parameters();
      if (config_.save_projection && sites_.size() > 0) {
        out.push_back({shared_a_key, shared_a_});
        out.push_back({shared_b_key, shared_b_});
      }
      return out;
    }

    /// W += (λ_b ⊙ B̂)(λ_d ⊙ Â); unmerge subtracts the same product.
    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta()); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta()); }
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta()); }

    const Var<T>& shared_a() const { return shared_a_; }
    const Var<T>& shared_b() const { return shared_b_; }

    /// ΔW [out, in] of one adapted module.
    RowMatrix<T> delta_weight(const Slot& s, const nn::Linear<T>& lin) const {
      const RowMatrix<T> b =
          s[0].value().vector().asDiagonal() * shared_b_.value().matrix().topRows(lin.out_features);
      const RowMatrix<T> a =
          s[1].value().vector().asDiagonal() * shared_a_.value().matrix().leftCols(lin.in_features);
      return b * a;
    }

   private:
    auto delta() const {
      return [this](const Slot& s, const nn::Linear<T>& lin) { return delta_weight(s, lin); };
    }

    Config config_;
    Sites sites_;
    Var<T> shared_a_, shared_b_;  // frozen
  };
};

}  // namespace peft
