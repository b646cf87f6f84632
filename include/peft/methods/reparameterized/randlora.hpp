#pragma once
// RandLoRA (Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
// models", 2025): a full-rank update from n = ⌈min(out, in) / r⌉ random rank-r bases shared by
// the whole model, each scaled by trainable diagonals:
//   ΔW = s · Σ_b B_b Λ_b A Γ_b,   s = randlora_alpha / r,
// with A = randlora_A [r, 1, min_g] and B = randlora_B [max_g, n_g, r] frozen (sized for the
// largest adapted shape) and, per module, Λ = randlora_lambda [r, n], Γ = randlora_gamma
// [n, min(out, in)]. A acts on the smaller side of W (on x when in ≤ out, else on the output).
// As a low-rank term of rank r·n: x Gᵀ (B̂ ⊙ λ)ᵀ with G[(k, b), t] = A[k, t] Γ[b, t] and B̂ the
// bases' first max(out, in) rows flattened to [max, n·r] — paired row (k, b) ↔ column k·n + b,
// as the reference's flatten pairs them; for out < in the two sides swap.
// The bases are the reference's bit for bit: torch.Generator(projection_prng_key), kaiming-
// uniform draws in bfloat16 (the reference's dtype where bf16 is available) divided by their
// std in bfloat16 (sparse / very_sparse: ternary draws from torch.rand, float32) — so a file
// saved without them (save_projection false) loads. Keys: `randlora_lambda`, `randlora_gamma`
// per module; with save_projection the bases under `base_model.randlora_A` / `_B` and, as the
// reference writes them, once more under every module. init_weights: Λ = 0 (the base model
// exactly), Γ = 1 / min(out, in); false: Λ ~ N(0, 1), Γ = 1 / max(out, in). Mergeable: W += ΔW.
// docs/methods/reparameterized.md#randlora; tests/test_sparse_and_random.cpp; golden
// llama_randlora, gpt2_randlora, llama_randlora_sparse.
#include <algorithm>
#include <bit>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"

namespace peft {

struct RandLoraConfig : ConfigIo<RandLoraConfig> {
  static constexpr std::string_view peft_type = "RANDLORA";
  int r = 32;
  TargetRules targets;
  std::int64_t projection_prng_key = 0;
  bool save_projection = true;
  bool sparse = false, very_sparse = false;  ///< ternary bases (1/6 or 1/(2√min) per sign)
  double randlora_dropout = 0.0;
  double randlora_alpha = 640;
  bool init_weights = true;

  static auto fields() {
    using C = RandLoraConfig;
    return config_fields(field("r", &C::r, check::dimension),
                         detail::reparameterized::TargetsWithoutExclude<C>{{&C::targets}},
                         field("projection_prng_key", &C::projection_prng_key),
                         field("save_projection", &C::save_projection), field("sparse", &C::sparse),
                         field("very_sparse", &C::very_sparse),
                         float_field("randlora_dropout", &C::randlora_dropout, check::probability),
                         float_field("randlora_alpha", &C::randlora_alpha, check::scale),
                         field("init_weights", &C::init_weights), fan_in_fan_out(),
                         fixed("bias", "none"), fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
  std::int64_t bases_for(std::int64_t min_dim) const { return (min_dim + r - 1) / r; }
};

/// torch's CPU draws as the reference makes them: mt19937 outputs through ATen's float
/// uniform_real_distribution, rounded to bfloat16 (round to nearest even) for a bf16 tensor,
/// where a draw that rounds up to `to` becomes `from` (matched against torch 2.15 on 10^5 draws).
struct TorchDraws {
  static float bf16(float f) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return std::bit_cast<float>(u);
  }
  /// kaiming_uniform_(t, a=√5, generator) on a bf16 tensor of `n` entries with fan_in `fan`.
  static std::vector<float> kaiming_bf16(std::int64_t n, std::int64_t fan, std::mt19937& g) {
    const double a = std::sqrt(5.0), gain = std::sqrt(2.0 / (1 + a * a));
    const double bound = std::sqrt(3.0) * (gain / std::sqrt(double(fan)));
    const float from = float(-bound), to = float(bound), top = bf16(to), bottom = bf16(from);
    std::vector<float> out(static_cast<std::size_t>(n));
    for (float& v : out) {  // a float draw, one fused multiply-add, then bf16; [from, to)
      v = bf16(std::fma(float(g() & 0xffffffu) * (1.0f / 16777216), to - from, from));
      if (v >= top) v = bottom;
    }
    return out;
  }
  /// torch.rand (float32): (u & (2^24 − 1)) · 2^−24.
  static std::vector<float> rand(std::int64_t n, std::mt19937& g) {
    std::vector<float> out(static_cast<std::size_t>(n));
    for (float& v : out) v = float(g() & 0xffffffu) * (1.0f / 16777216);
    return out;
  }
  /// v / v.std() (unbiased) in bf16 (the reference's dense bases) or float32 (its ternary ones,
  /// whose mean torch takes in float32).
  static void standardise(std::vector<float>& v, bool bf16_tensor) {
    double mean = 0, m2 = 0, n = 0;
    if (!bf16_tensor) {
      float sum = 0;
      for (float x : v) sum += x;  // small integers: exact
      mean = double(sum / float(v.size()));
    } else {
      for (float x : v) mean += x;
      mean /= double(v.size());
    }
    for (float x : v) m2 += (double(x) - mean) * (double(x) - mean), n += 1;
    const float sd = float(std::sqrt(m2 / (n - 1)));
    for (float& x : v) x = bf16_tensor ? bf16(x / bf16(sd)) : x / sd;
  }
};

struct RandLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "randlora", title = "RandLoRA";
  static constexpr std::string_view paper =
      "Albert et al., 2025, RandLoRA: Full-rank parameter-efficient fine-tuning of large models";
  static constexpr std::string_view reference = "RANDLORA";  ///< peft_type in HF peft
  using Config = RandLoraConfig;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t d = std::min(m.in_features, m.out_features), n = c.bases_for(d);
    return {{"randlora_lambda", {c.r, n}}, {"randlora_gamma", {n, d}}};
  }

  template <class T>
  class State {
   public:
    using Sites = SiteTable<T>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      std::int64_t out_g = 0, in_g = 0;
      sites_.template attach<RandLoRA>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>& m) {
        out_g = std::max(out_g, m.out_features), in_g = std::max(in_g, m.in_features);
        const std::int64_t d = s[1].value().dim(1);
        if (!config_.init_weights) detail::normal_fill(s[0].value(), ctx.rng, 1.0);
        s[1].value().fill(T(1) /
                          T(config_.init_weights ? d : std::max(m.in_features, m.out_features)));
      });
      make_bases(std::max(out_g, in_g), std::min(out_g, in_g));
    }

    /// s · (x Gᵀ) (B̂ ⊙ λ)ᵀ, or for out < in s · (x B̂) (Gᵀ ⊙ λ)ᵀ; fused into the base product.
    void adapt(Projection<T>& p) const {
      if (const Slot* s = sites_.active(p.module())) {
        const auto [a, b] = factors(p.tape(), *s, p.module());
        p.add_low_rank(a, b, scale(), config_.randlora_dropout);
      }
    }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    std::vector<NamedParameter<T>> parameters() const {
      std::vector<NamedParameter<T>> out = sites_.parameters();
      if (!config_.save_projection || sites_.size() == 0) return out;
      sites_.for_each([&](const Slot& s) {
        out.push_back({"base_model.model." + s.module + ".randlora_A", bases_a_});
        out.push_back({"base_model.model." + s.module + ".randlora_B", bases_b_});
      });
      out.push_back({"base_model.randlora_A", bases_a_});
      out.push_back({"base_model.randlora_B", bases_b_});
      return out;
    }

    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta()); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta()); }
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta()); }

    const Var<T>& bases_a() const { return bases_a_; }
    const Var<T>& bases_b() const { return bases_b_; }

   private:
    T scale() const { return static_cast<T>(config_.randlora_alpha / config_.r); }

    void make_bases(std::int64_t max_d, std::int64_t min_d) {
      const std::int64_t r = config_.r, n = config_.bases_for(min_d);
      std::mt19937 g(static_cast<std::uint32_t>(config_.projection_prng_key));
      std::vector<float> a, b;
      if (config_.sparse || config_.very_sparse) {
        const double sparsity = config_.very_sparse ? std::sqrt(double(min_d)) : 3.0;
        const float lo = float(1 / (2 * sparsity)), hi = float(1 - 1 / (2 * sparsity));
        a = TorchDraws::rand(r * min_d, g), b = TorchDraws::rand(max_d * n * r, g);
        for (auto* v : {&a, &b})
          for (float& x : *v) x = x < lo ? -1.0f : (x > hi ? 1.0f : 0.0f);
      } else {
        a = TorchDraws::kaiming_bf16(r * min_d, min_d, g);
        b.resize(static_cast<std::size_t>(max_d * n * r));
        for (std::int64_t base = 0; base < n; ++base) {  // one [max_d, 1, r] draw per base
          const std::vector<float> d = TorchDraws::kaiming_bf16(max_d * r, r, g);
          for (std::int64_t i = 0; i < max_d * r; ++i)
            b[std::size_t((i / r) * n * r + base * r + i % r)] = d[std::size_t(i)];
        }
      }
      const bool bf16 = !(config_.sparse || config_.very_sparse);
      TorchDraws::standardise(a, bf16), TorchDraws::standardise(b, bf16);
      bases_a_ = Var<T>(Tensor<T>(Shape{r, 1, min_d}, std::vector<T>(a.begin(), a.end())));
      bases_b_ = Var<T>(Tensor<T>(Shape{max_d, n, r}, std::vector<T>(b.begin(), b.end())));
    }

    /// (A [R, in], B [out, R]) of the module's low-rank term, R = r · n.
    std::pair<Var<T>, Var<T>> factors(Tape<T>& t, const Slot& s, const nn::Linear<T>& m) const {
      const std::int64_t r = config_.r, n = s[0].value().dim(1), d = s[1].value().dim(1);
      const std::int64_t big = std::max(m.in_features, m.out_features), n_g = bases_b_.shape()[1];
      const Tensor<T>& av = bases_a_.value();
      const Tensor<T>& bv = bases_b_.value();
      Tensor<T> rep(Shape{r, n, d}), flat(Shape{big, n * r});  // A per (k, b); B̂ [max, n·r]
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t b = 0; b < n; ++b)
          std::copy_n(av.data() + k * av.dim(2), d, rep.data() + (k * n + b) * d);
      for (std::int64_t i = 0; i < big; ++i)
        std::copy_n(bv.data() + i * n_g * r, n * r, flat.data() + i * n * r);
      const Var<T> g = ops::reshape(t, ops::mul(t, Var<T>(std::move(rep)), s[1]), Shape{r * n, d});
      const Var<T> lambda = ops::reshape(t, s[0], Shape{r * n});
      if (d == m.in_features) return {g, ops::mul(t, Var<T>(std::move(flat)), lambda)};
      const Var<T> flat_t = ops::transpose(t, Var<T>(std::move(flat)), 0, 1);  // [R, in]
      return {flat_t, ops::mul(t, ops::transpose(t, g, 0, 1), lambda)};
    }
    auto delta() const {
      return [this](const Slot& s, const nn::Linear<T>& m) {
        Tape<T> tape(false);
        const auto [a, b] = factors(tape, s, m);
        return RowMatrix<T>(scale() * (b.value().matrix() * a.value().matrix()));
      };
    }

    Config config_;
    Sites sites_;
    Var<T> bases_a_, bases_b_;  // frozen, shared
  };
};

}  // namespace peft
