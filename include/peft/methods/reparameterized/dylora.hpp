#pragma once
// DyLoRA (Valipour et al., 2023): LoRA trained at every rank at once. Each training step
// samples b ~ U{1..r} (nested dropout over the rank) and uses the leading b rank components,
//   y = base(x) + (α / b) (x A[:b]ᵀ) B[:, :b]ᵀ,
// so the trained adapter works at any b <= r without retraining: `set_rank(b)` picks one for
// evaluation. The reference ecosystem has no DyLoRA; its adapter files use LoRA's layout
// (`lora_A.weight` [r, in], `lora_B.weight` [out, r]) with peft_type "DYLORA" and the extra
// fields `eval_rank` and `rank_sampling_seed` (docs/methods/reparameterized.md).
// B starts at 0, so the model starts at the base model at every rank.
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"

namespace peft {

struct DyLoraConfig : ConfigIo<DyLoraConfig> {
  static constexpr std::string_view peft_type = "DYLORA";
  int r = 8;  ///< the largest rank
  double lora_alpha = 8;
  double lora_dropout = 0.0;  ///< the low-rank path's input dropout in training mode
  TargetRules targets;
  int eval_rank = 0;  ///< the rank used until set_rank / sample_rank; 0 means r
  std::uint64_t rank_sampling_seed = 0;

  static auto fields() {
    using C = DyLoraConfig;
    return config_fields(
        field("r", &C::r, check::dimension), field("lora_alpha", &C::lora_alpha, check::scale),
        float_field("lora_dropout", &C::lora_dropout, check::probability),
        field("eval_rank", &C::eval_rank, check::dimension_or_zero),
        field("rank_sampling_seed", &C::rank_sampling_seed), fan_in_fan_out(),
        fixed("bias", "none"), fixed("modules_to_save", nullptr), targets_field(&C::targets));
  }
  void validate(const std::string& source) const {
    if (eval_rank > r) throw ConfigError(source + ": eval_rank must lie in [0, r] (0: r)");
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct DyLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "dylora", title = "DyLoRA";
  static constexpr std::string_view paper =
      "Valipour et al., 2023, DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using "
      "Dynamic Search-Free Low-Rank Adaptation";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = DyLoraConfig;

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "DYLORA"); }
  /// LoRA's layout at the largest rank r.
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    return {{"lora_A.weight", {c.r, m.in_features}}, {"lora_B.weight", {m.out_features, c.r}}};
  }

  template <class T>
  class State {
   public:
    struct Extra {
      int merged_rank = 0;
    };
    using Sites = SiteTable<T, Extra>;
    using Slot = typename Sites::Slot;

    explicit State(const Config& config)
        : config_(config),
          rank_(config.eval_rank > 0 ? config.eval_rank : config.r),
          rng_(config.rank_sampling_seed) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      sites_.template attach<DyLoRA>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>&) {
        detail::kaiming_uniform(s[0].value(), ctx.rng);
      });
    }

    /// Draws the rank of the next training step, b ~ U{1..r}, from the seeded generator, and
    /// uses it until the next call or set_rank. Call it once per step, before the forward.
    int sample_rank() {
      std::uniform_int_distribution<int> pick(1, config_.r);
      rank_ = pick(rng_);
      return rank_;
    }
    /// The rank generator and the current rank (HasRunningState: a resumed run draws on).
    nlohmann::json running_state() const {
      return {{"rank_generator", detail::generator_text(rng_)}, {"rank", rank_}};
    }
    void restore_running_state(const nlohmann::json& state) {
      detail::read_generator(rng_, state, "rank_generator", "DyLoRA");
      const auto rank = state.find("rank");
      if (rank == state.end() || !rank->is_number_integer())
        throw FileError("DyLoRA: running state: field 'rank' expected an integer");
      const std::int64_t b = rank->get<std::int64_t>();
      if (b < 1 || b > config_.r)
        throw FileError("DyLoRA: running state: rank " + std::to_string(b) + " outside [1, " +
                        std::to_string(config_.r) + "]");
      rank_ = static_cast<int>(b);
    }
    /// Uses the leading b rank components (1 <= b <= r), e.g. to evaluate a trained adapter.
    void set_rank(int b) {
      if (b < 1 || b > config_.r)
        throw ConfigError("DyLoRA: rank " + std::to_string(b) + " outside [1, " +
                          std::to_string(config_.r) + "]");
      rank_ = b;
    }
    int rank() const { return rank_; }
    T scale() const { return static_cast<T>(config_.lora_alpha / rank_); }

    /// The low-rank term (α/b) (x A[:b]ᵀ) B[:, :b]ᵀ at the current rank b.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      if (rank_ == config_.r)
        return p.add_low_rank((*s)[0], (*s)[1], scale(), config_.lora_dropout);
      const std::int64_t rest = config_.r - rank_;
      Var<T> a = ops::split(p.tape(), (*s)[0], {rank_, rest}, 0)[0];  // [b, in]
      Var<T> b = ops::split(p.tape(), (*s)[1], {rank_, rest}, 1)[0];  // [out, b]
      p.add_low_rank(a, b, scale(), config_.lora_dropout);
    }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// W += (α/b) B[:, :b] A[:b] at the current rank b (unmerge uses the rank of the merge).
    void merge(const std::vector<nn::Linear<T>*>& m) {
      sites_.fold(m, true, [this](Slot& s, const nn::Linear<T>&) {
        s.extra.merged_rank = rank_;
        return delta_weight(s, rank_);
      });
    }
    void unmerge(const std::vector<nn::Linear<T>*>& m) {
      sites_.fold(m, false, [this](const Slot& s, const nn::Linear<T>&) {
        return delta_weight(s, s.extra.merged_rank);
      });
    }
    void unload(const std::vector<nn::Linear<T>*>& m) {
      merge(m);
      sites_ = Sites{};
    }

    /// ΔW = (α/b) B[:, :b] A[:b] [out, in].
    RowMatrix<T> delta_weight(const Slot& s, int b) const {
      const T scale = static_cast<T>(config_.lora_alpha / b);
      return scale * (s[1].value().matrix().leftCols(b) * s[0].value().matrix().topRows(b));
    }

   private:
    Config config_;
    int rank_;
    std::mt19937_64 rng_;
    Sites sites_;
  };
};

}  // namespace peft
