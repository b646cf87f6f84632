#pragma once
// Diff pruning (Guo et al., 2021, "Parameter-Efficient Transfer Learning with Diff Pruning"):
//   W' = W + δ ⊙ z,  z = hard-concrete gate per entry (log α, temperature β, stretch (γ, ζ)),
// trained with an L0 penalty λ (E[‖z‖₀] / n − ρ)² toward a target density ρ (the extra_loss
// hook), then pruned to the exact budget k by magnitude: the k largest |δ ⊙ z| (test-time gate)
// become a sparse diff that may be trained further and is what the file holds.
//   Phase 1 (dense): δ and log α over every targeted entry are trained (2·in·out per module:
//     the relaxation needs every entry to decide which to keep).
//   prune(): phase 2 (sparse): k values, as the other masks. Build a new optimizer after it.
// Training forwards (an enabled tape) sample the gate's noise afresh; inference forwards use the
// deterministic gate. fix_noise() holds one noise draw for both (gradient checks).
// peft_type "DIFF_PRUNING"; only a pruned adapter can be saved.
#include <random>
#include <string>
#include <vector>

#include "peft/methods/selective/common.hpp"

namespace peft {

struct DiffPruningConfig : TabledConfigIo<DiffPruningConfig> {
  static constexpr std::string_view peft_type = "DIFF_PRUNING";
  SelectionBudget budget;  ///< the exact k kept by prune()
  TargetRules targets = detail::all_linear_targets();
  double target_density = 0;       ///< ρ of the L0 penalty; 0: the budget's density
  double l0_lambda = 1.0;          ///< λ
  double temperature = 2.0 / 3.0;  ///< β
  double stretch_low = -0.1;       ///< γ
  double stretch_high = 1.1;       ///< ζ
  double log_alpha_init = 2.0;     ///< gates start mostly open, so δ learns from the start
  std::uint64_t seed = 0;          ///< the gate noise's seed

  static auto fields() {
    using C = DiffPruningConfig;
    auto density = [](double p) {
      return p >= 0 && p <= 1 ? "" : std::string("a density in [0, 1]");
    };
    auto below_0 = [](double v) { return v < 0 ? "" : std::string("a value < 0"); };
    auto above_1 = [](double v) { return v > 1 ? "" : std::string("a value > 1"); };
    return config_fields(budget_fields(&C::budget), default_targets_field(&C::targets),
                         float_field("target_density", &C::target_density, density),
                         float_field("l0_lambda", &C::l0_lambda, check::non_negative),
                         float_field("temperature", &C::temperature, check::positive),
                         float_field("stretch_low", &C::stretch_low, below_0),
                         float_field("stretch_high", &C::stretch_high, above_1),
                         float_field("log_alpha_init", &C::log_alpha_init),
                         field("seed", &C::seed));
  }
};

struct DiffPruning {
  using family = family::Selective;
  static constexpr std::string_view name = "diff_pruning", title = "diff pruning";
  static constexpr std::string_view paper =
      "Guo et al., 2021, Parameter-Efficient Transfer Learning with Diff Pruning";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = DiffPruningConfig;

  /// The budget k kept after prune() (phase 1 trains 2·in·out per targeted module).
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return {detail::selected_budget<DiffPruning>(config, linears), 0};
  }
  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, Config::peft_type); }

  /// Phase 1 replaces the products of the targeted modules by their gated dense diff; phase 2
  /// (after prune(), TrainsInTwoPhases) is the shared sparse diff of ProjectionDiffState.
  template <class T>
  class State : public detail::ProjectionDiffState<DiffPruning, T> {
    using Base = detail::ProjectionDiffState<DiffPruning, T>;
    using Base::config_, Base::diffs_, Base::sites_, Base::targets_, Base::total_;

   public:
    struct Dense {
      Var<T> delta;                                   ///< [out·in], [out, in] order
      Var<T> log_alpha;                               ///< [out·in]
      std::shared_ptr<const ops::SparsePattern> all;  // every entry, for delta_linear
      Tensor<T> fixed_noise;
    };

    explicit State(const Config& config) : Base(config), rng_(config.seed) {}

    void attach(AttachContext<T>& ctx) {
      this->select_modules(ctx.linears);
      budget_ = config_.budget.resolve(total_, title);
      density_ =
          config_.target_density > 0 ? config_.target_density : double(budget_) / double(total_);
      dense_.assign(sites_, std::nullopt);
      for (const nn::Linear<T>& lin : targets_) {
        const std::int64_t n = lin.in_features * lin.out_features;
        auto all = std::make_shared<ops::SparsePattern>();
        for (std::int64_t o = 0; o < lin.out_features; ++o)
          for (std::int64_t i = 0; i < lin.in_features; ++i) {
            all->out.push_back(static_cast<std::int32_t>(o));
            all->in.push_back(static_cast<std::int32_t>(i));
          }
        dense_[static_cast<std::size_t>(lin.site)] =
            Dense{Var<T>(Tensor<T>(Shape{n}), true),
                  Var<T>(Tensor<T>(Shape{n}, static_cast<T>(config_.log_alpha_init)), true),
                  std::move(all), Tensor<T>{}};
      }
      diffs_.reset(sites_);
    }

    bool pruned() const { return pruned_; }
    std::int64_t budget() const { return budget_; }

    /// Holds one draw of the gate noise for every later forward (training or not), or with
    /// `fixed` false, returns to fresh noise per training forward.
    void fix_noise(bool fixed) {
      for (auto& d : dense_)
        if (d) d->fixed_noise = fixed ? draw_noise(d->log_alpha.value().numel()) : Tensor<T>{};
      noise_fixed_ = fixed;
    }

    bool adapts(const nn::Linear<T>& module) const {
      return pruned_ ? Base::adapts(module) : dense_at(module.site) != nullptr;
    }
    /// Phase 1: x (W + δ ⊙ z)ᵀ + b by delta_linear over every entry, z drawn afresh per
    /// training forward (an enabled tape) when the computation runs.
    void adapt(Projection<T>& p) const {
      if (pruned_) return Base::adapt(p);
      const Dense* d = dense_at(p.module().site);
      if (!d) return;
      p.replace_product([this, d](Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
        const Tensor<T> noise = noise_fixed_     ? d->fixed_noise
                                : tape.enabled() ? draw_noise(d->log_alpha.value().numel())
                                                 : Tensor<T>{};
        Var<T> z = ops::hard_concrete_gate(tape, d->log_alpha, noise, T(config_.temperature),
                                           T(config_.stretch_low), T(config_.stretch_high));
        ops::WeightDelta<T> delta;
        delta.entries = d->all;
        delta.entry_values = ops::mul(tape, d->delta, z);
        return ops::delta_linear(tape, x, module.dense_weight("DiffPruning"), module.bias,
                                 module.layout, delta);
      });
    }

    /// λ (E[‖z‖₀] / n − ρ)² before pruning; 0 after.
    Var<T> extra_loss(Tape<T>& tape) {
      if (pruned_) return Var<T>(Tensor<T>(Shape{1}));
      std::vector<Var<T>> alphas;
      for (auto& d : dense_)
        if (d) alphas.push_back(d->log_alpha);
      return ops::l0_penalty(tape, alphas, T(config_.temperature), T(config_.stretch_low),
                             T(config_.stretch_high), T(density_), T(config_.l0_lambda));
    }

    /// The expected fraction of open gates, E[‖z‖₀] / n.
    double expected_density() const {
      const double shift =
          config_.temperature * std::log(-config_.stretch_low / config_.stretch_high);
      double open = 0, n = 0;
      for (const auto& d : dense_)
        if (d)
          for (std::int64_t j = 0; j < d->log_alpha.value().numel(); ++j) {
            open += 1.0 / (1.0 + std::exp(-(double(d->log_alpha.value()[j]) - shift)));
            n += 1;
          }
      return n > 0 ? open / n : 0.0;
    }

    /// Keeps the k largest |δ ⊙ z| (deterministic gate) over all targeted entries as a sparse
    /// diff with those values; drops δ and log α. The model's output changes only by the pruned
    /// entries. Build the optimizer anew afterwards.
    /// The gate-noise generator (HasRunningState: a resumed dense phase draws on).
    nlohmann::json running_state() const {
      return {{"noise_generator", detail::generator_text(rng_)}};
    }
    void restore_running_state(const nlohmann::json& state) {
      detail::read_generator(rng_, state, "noise_generator", "diff pruning");
    }

    void prune() {
      if (pruned_) return;
      std::vector<double> scores;
      std::vector<T> effective;
      for (const nn::Linear<T>& lin : targets_) {
        Dense& d = *dense_[static_cast<std::size_t>(lin.site)];
        Tape<T> off(false);
        const Var<T> z =
            ops::hard_concrete_gate(off, d.log_alpha, Tensor<T>{}, T(config_.temperature),
                                    T(config_.stretch_low), T(config_.stretch_high));
        for (std::int64_t j = 0; j < z.value().numel(); ++j) {
          effective.push_back(d.delta.value()[j] * z.value()[j]);
          scores.push_back(std::abs(double(effective.back())));
        }
      }
      const std::vector<std::int64_t> ids = detail::top_k_ids(scores, budget_);
      diffs_.reset(sites_);
      detail::assign_entries(diffs_, targets_, ids);
      // assign_entries starts the values at 0: give them the pruned diff's values.
      std::size_t next = 0;
      for (NamedParameter<T>& p : diffs_.parameters())
        for (std::int64_t j = 0; j < p.var.value().numel(); ++j)
          p.var.value()[j] = effective[static_cast<std::size_t>(ids[next++])];
      dense_.assign(sites_, std::nullopt);
      pruned_ = true;
    }

    std::vector<NamedParameter<T>> parameters() const {
      if (pruned_) return Base::parameters();
      std::vector<NamedParameter<T>> out;
      for (const nn::Linear<T>& lin : targets_) {
        const Dense& d = *dense_[static_cast<std::size_t>(lin.site)];
        out.push_back({"base_model.model." + lin.name + ".diff_pruning.delta", d.delta});
        out.push_back({"base_model.model." + lin.name + ".diff_pruning.log_alpha", d.log_alpha});
      }
      return out;
    }
    void merge(const std::vector<nn::Linear<T>*>& modules) {
      require_pruned("merge");
      Base::merge(modules);
    }
    void unmerge(const std::vector<nn::Linear<T>*>& modules) {
      require_pruned("unmerge");
      Base::unmerge(modules);
    }
    void write_tensors(io::SafetensorsWriter& w) const {
      require_pruned("save");
      Base::write_tensors(w);
    }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      dense_.assign(sites_, std::nullopt);
      pruned_ = true;
      Base::read_tensors(f, linears);
    }
    std::int64_t trained_entries() const {
      if (pruned_) return Base::trained_entries();
      std::int64_t n = 0;
      for (const auto& d : dense_)
        if (d) n += 2 * d->delta.value().numel();
      return n;
    }

   private:
    const Dense* dense_at(int site) const {
      if (site < 0 || static_cast<std::size_t>(site) >= dense_.size() ||
          !dense_[static_cast<std::size_t>(site)])
        return nullptr;
      return &*dense_[static_cast<std::size_t>(site)];
    }
    void require_pruned(const char* what) const {
      if (!pruned_)
        throw ConfigError(std::string("diff pruning: call prune() to reach the budget before ") +
                          what);
    }
    Tensor<T> draw_noise(std::int64_t n) const {
      // u in (0, 1), kept off the ends where log u or log(1 − u) diverge.
      std::uniform_real_distribution<double> u(1e-6, 1.0 - 1e-6);
      Tensor<T> noise(Shape{n});
      for (std::int64_t j = 0; j < n; ++j) noise[j] = static_cast<T>(u(rng_));
      return noise;
    }

    mutable std::mt19937_64 rng_;  ///< the gate noise (drawn when a training forward runs)
    std::int64_t budget_ = 0;
    double density_ = 0;
    std::vector<std::optional<Dense>> dense_;  // by site, phase 1
    bool pruned_ = false, noise_fixed_ = false;
  };
};

}  // namespace peft
