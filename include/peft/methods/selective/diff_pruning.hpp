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

struct DiffPruningConfig {
  SelectionBudget budget;  ///< the exact k kept by prune()
  TargetRules targets = detail::all_linear_targets();
  double target_density = 0;       ///< ρ of the L0 penalty; 0: the budget's density
  double l0_lambda = 1.0;          ///< λ
  double temperature = 2.0 / 3.0;  ///< β
  double stretch_low = -0.1;       ///< γ
  double stretch_high = 1.1;       ///< ζ
  double log_alpha_init = 2.0;     ///< gates start mostly open, so δ learns from the start
  std::uint64_t seed = 0;          ///< the gate noise's seed

  static DiffPruningConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "DIFF_PRUNING", source);
    DiffPruningConfig c;
    c.budget = SelectionBudget::from_json(j, source);
    if (!detail::json_field(j, "target_modules").is_null())
      c.targets = TargetRules::from_json(j, source);
    c.target_density = detail::json_or<double>(j, "target_density", 0.0, source);
    c.l0_lambda = detail::json_or<double>(j, "l0_lambda", 1.0, source);
    c.temperature = detail::json_or<double>(j, "temperature", 2.0 / 3.0, source);
    c.stretch_low = detail::json_or<double>(j, "stretch_low", -0.1, source);
    c.stretch_high = detail::json_or<double>(j, "stretch_high", 1.1, source);
    c.log_alpha_init = detail::json_or<double>(j, "log_alpha_init", 2.0, source);
    c.seed = detail::json_or<std::uint64_t>(j, "seed", 0, source);
    if (!(c.stretch_low < 0 && c.stretch_high > 1))
      throw ConfigError(source +
                        ": the stretch limits must satisfy stretch_low < 0 < 1 < stretch_high");
    if (!(c.temperature > 0)) throw ConfigError(source + ": temperature must be positive");
    return c;
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("DIFF_PRUNING");
    budget.to_json(j);
    targets.to_json(j);
    j["target_density"] = target_density;
    j["l0_lambda"] = l0_lambda;
    j["temperature"] = temperature;
    j["stretch_low"] = stretch_low;
    j["stretch_high"] = stretch_high;
    j["log_alpha_init"] = log_alpha_init;
    j["seed"] = seed;
    return j;
  }
};

struct DiffPruning {
  using family = family::Selective;
  static constexpr std::string_view name = "diff_pruning";
  using Config = DiffPruningConfig;

  /// The budget k kept after prune() (phase 1 trains 2·in·out per targeted module).
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return {config.budget.resolve(detail::targeted_weight_count(config.targets, linears),
                                  "diff pruning"),
            0};
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "DIFF_PRUNING";
  }

  template <class T>
  class State {
   public:
    struct Dense {
      Var<T> delta;                                   ///< [out·in], [out, in] order
      Var<T> log_alpha;                               ///< [out·in]
      std::shared_ptr<const ops::SparsePattern> all;  // every entry, for delta_linear
      Tensor<T> fixed_noise;
    };

    explicit State(const Config& config) : config_(config), rng_(config.seed) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      targets_ = detail::copy_modules(
          detail::targeted_linears(config_.targets, ctx.linears, "diff pruning"));
      sites_ = ctx.linears.size();
      std::int64_t total = 0;
      for (const nn::Linear<T>& lin : targets_) total += lin.in_features * lin.out_features;
      budget_ = config_.budget.resolve(total, "diff pruning");
      density_ =
          config_.target_density > 0 ? config_.target_density : double(budget_) / double(total);
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

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& module) const {
      if (pruned_) return diffs_.find(module.site) != nullptr;
      const auto site = static_cast<std::size_t>(module.site);
      return module.site >= 0 && site < dense_.size() && dense_[site].has_value();
    }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      if (pruned_) return diffs_.linear(tape, module, x);
      const std::size_t site = static_cast<std::size_t>(module.site);
      if (module.site < 0 || site >= dense_.size() || !dense_[site])
        return module.forward_base(tape, x);
      Dense& d = *dense_[site];
      const Tensor<T> noise = noise_fixed_     ? d.fixed_noise
                              : tape.enabled() ? draw_noise(d.log_alpha.value().numel())
                                               : Tensor<T>{};
      Var<T> z = ops::hard_concrete_gate(tape, d.log_alpha, noise, T(config_.temperature),
                                         T(config_.stretch_low), T(config_.stretch_high));
      ops::WeightDelta<T> delta;
      delta.entries = d.all;
      delta.entry_values = ops::mul(tape, d.delta, z);
      return ops::delta_linear(tape, x, module.weight, module.bias, module.layout, delta);
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

    std::vector<NamedParameter<T>> parameters() {
      if (pruned_) return diffs_.parameters();
      std::vector<NamedParameter<T>> out;
      for (const nn::Linear<T>& lin : targets_) {
        const Dense& d = *dense_[static_cast<std::size_t>(lin.site)];
        out.push_back({"base_model.model." + lin.name + ".diff_pruning.delta", d.delta});
        out.push_back({"base_model.model." + lin.name + ".diff_pruning.log_alpha", d.log_alpha});
      }
      return out;
    }
    void merge(std::vector<nn::Linear<T>*>& modules) {
      require_pruned("merge");
      diffs_.merge(modules);
    }
    void unmerge(std::vector<nn::Linear<T>*>& modules) {
      require_pruned("unmerge");
      diffs_.unmerge(modules);
    }
    void write_tensors(io::SafetensorsWriter& w) const {
      require_pruned("save");
      diffs_.write_tensors(w);
    }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      dense_.assign(sites_, std::nullopt);
      pruned_ = true;
      diffs_.read_tensors(f, linears);
    }
    std::int64_t trained_entries() const {
      if (pruned_) return diffs_.trained_entries();
      std::int64_t n = 0;
      for (const auto& d : dense_)
        if (d) n += 2 * d->delta.value().numel();
      return n;
    }

   private:
    void require_pruned(const char* what) const {
      if (!pruned_)
        throw ConfigError(std::string("diff pruning: call prune() to reach the budget before ") +
                          what);
    }
    Tensor<T> draw_noise(std::int64_t n) {
      // u in (0, 1), kept off the ends where log u or log(1 − u) diverge.
      std::uniform_real_distribution<double> u(1e-6, 1.0 - 1e-6);
      Tensor<T> noise(Shape{n});
      for (std::int64_t j = 0; j < n; ++j) noise[j] = static_cast<T>(u(rng_));
      return noise;
    }

    Config config_;
    std::mt19937_64 rng_;
    std::vector<nn::Linear<T>> targets_;
    std::size_t sites_ = 0;
    std::int64_t budget_ = 0;
    double density_ = 0;
    std::vector<std::optional<Dense>> dense_;  // by site, phase 1
    bool pruned_ = false, noise_fixed_ = false;
    detail::SelectiveDiffs<T> diffs_;  // phase 2
  };
};

}  // namespace peft
