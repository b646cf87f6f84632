#pragma once
// AdaLoRA (Zhang et al., 2023): the update in SVD form, ΔW = s · P Λ Q, stored as
//   lora_B [out, r] (P), lora_E [r, 1] (the singular values Λ), lora_A [r, in] (Q),
//   y = base(x) + s (x (A ⊙ E)ᵀ) Bᵀ,  s = α / (ranknum + 1e-5),
// with ranknum = the module's rank (init_r, or the kept rank of a loaded rank_pattern), as the
// reference computes it. The loss gains orth_reg_weight · mean over every A and B of
// ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (the `extra_loss` hook).
//
// Rank allocation: after each backward the trainer calls `update_and_allocate(step)`. It
// smooths the sensitivity I = |w · ∂L/∂w| of every entry (Ī ← β1 Ī + (1 − β1) I) and its
// uncertainty (Ū ← β2 Ū + (1 − β2) |I − Ī|), scores each triplet (E_i, row i of A, column i
// of B) as Ī·Ū of E_i plus the means of Ī·Ū over the row and the column, and every deltaT
// steps keeps the budget's worth of best triplets, zeroing the other E entries. The budget:
// init_r per module up to tinit, then a cubic decrease to target_r per module at
// total_step − tfinal, where the pattern is fixed for the remaining steps.
//
// E starts at 0, so the model starts at the base model.
#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct AdaLoraConfig {
  int init_r = 12;
  int target_r = 8;
  int r = 8;  ///< written back as the reference writes it; init_r is the rank used
  double lora_alpha = 8;
  double lora_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  TargetRules targets;
  int tinit = 0;
  int tfinal = 0;
  int deltaT = 1;
  double beta1 = 0.85;
  double beta2 = 0.85;
  double orth_reg_weight = 0.5;
  int total_step = 0;
  bool init_lora_weights = true;
  /// Kept triplets per module after allocation, keyed "<module path>.lora_E" as the reference
  /// writes it; a loaded adapter with a pattern has rank = the kept count.
  std::map<std::string, std::vector<bool>> rank_pattern;

  /// The module's rank: init_r, or the kept count of its rank_pattern entry.
  int rank_for(const std::string& module) const {
    const auto it = rank_pattern.find(module + ".lora_E");
    if (it == rank_pattern.end()) return init_r;
    return static_cast<int>(std::count(it->second.begin(), it->second.end(), true));
  }

  static AdaLoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "ADALORA", source);
    AdaLoraConfig c;
    c.init_r = detail::json_or<int>(j, "init_r", 12, source);
    c.target_r = detail::json_or<int>(j, "target_r", 8, source);
    c.r = detail::json_or<int>(j, "r", 8, source);
    c.lora_alpha = detail::json_or<double>(j, "lora_alpha", 8.0, source);
    c.lora_dropout = detail::json_or<double>(j, "lora_dropout", 0.0, source);
    c.targets = TargetRules::from_json(j, source);
    c.tinit = detail::json_or<int>(j, "tinit", 0, source);
    c.tfinal = detail::json_or<int>(j, "tfinal", 0, source);
    c.deltaT = detail::json_or<int>(j, "deltaT", 1, source);
    c.beta1 = detail::json_or<double>(j, "beta1", 0.85, source);
    c.beta2 = detail::json_or<double>(j, "beta2", 0.85, source);
    c.orth_reg_weight = detail::json_or<double>(j, "orth_reg_weight", 0.5, source);
    c.total_step = detail::json_or<int>(j, "total_step", 0, source);
    c.init_lora_weights = detail::json_or<bool>(j, "init_lora_weights", true, source);
    c.rank_pattern =
        detail::json_or<std::map<std::string, std::vector<bool>>>(j, "rank_pattern", {}, source);
    const std::string bias = detail::json_or<std::string>(j, "bias", "none", source);
    if (bias != "none") throw ConfigError(source + ": bias '" + bias + "' unsupported (none)");
    if (!detail::json_field(j, "modules_to_save").is_null())
      throw ConfigError(source + ": modules_to_save is not supported");
    if (detail::json_or<bool>(j, "use_dora", false, source))
      throw ConfigError(source + ": AdaLoRA does not support use_dora");
    if (c.init_r <= 0 || c.target_r <= 0 || c.target_r > c.init_r)
      throw ConfigError(source + ": need 0 < target_r <= init_r");
    if (c.total_step <= 0) throw ConfigError(source + ": total_step must be positive");
    if (c.tinit >= c.total_step - c.tfinal)
      throw ConfigError(source + ": tinit must be below total_step - tfinal (no budget phase)");
    if (c.deltaT <= 0) throw ConfigError(source + ": deltaT must be positive");
    if (c.targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    return c;
  }

  /// Every field the reference (peft 0.21) writes for AdaLoRA.
  nlohmann::json to_json(const ModelConfig& model) const {
    LoraConfig shared;
    shared.r = r;
    shared.lora_alpha = lora_alpha;
    shared.lora_dropout = lora_dropout;
    shared.targets = targets;
    shared.init = init_lora_weights ? LoraConfig::Init::Default : LoraConfig::Init::Zeros;
    nlohmann::json j = shared.to_json(model);
    j["peft_type"] = "ADALORA";
    j["init_r"] = init_r;
    j["target_r"] = target_r;
    j["tinit"] = tinit;
    j["tfinal"] = tfinal;
    j["deltaT"] = deltaT;
    j["beta1"] = beta1;
    j["beta2"] = beta2;
    j["orth_reg_weight"] = orth_reg_weight;
    j["total_step"] = total_step;
    j["rank_pattern"] =
        rank_pattern.empty() ? nlohmann::json(nullptr) : nlohmann::json(rank_pattern);
    return j;
  }
};

struct AdaLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "adalora";
  using Config = AdaLoraConfig;

  /// r (in + out) + r per module trainable; the reference also counts each module's frozen
  /// `ranknum` scalar into "all params".
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.targets.selects(l.name, l.layer < 0)) {
        const std::int64_t r = config.rank_for(l.name);
        count.trainable += r * (l.in_features + l.out_features) + r;
        count.frozen += 1;
      }
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "ADALORA";
  }

  template <class T>
  class State {
   public:
    struct Importance {
      Tensor<T> smoothed, uncertainty;  ///< Ī and Ū, the tensor's shape
    };
    struct ModuleAdapter {
      std::string module;
      Var<T> a;  ///< [r, in]
      Var<T> e;  ///< [r, 1]
      Var<T> b;  ///< [out, r]
      T scale;   ///< α / (ranknum + 1e-5)
      bool merged = false;
      Importance ia, ie, ib;
      std::vector<bool> kept;  ///< the last allocation's pattern (empty before one)
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      adapters_.reset(ctx.linears.size());
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!config_.targets.selects(lin->name, lin->layer < 0)) continue;
        const std::int64_t r = config_.rank_for(lin->name);
        ModuleAdapter m{lin->name,
                        Var<T>(Tensor<T>(Shape{r, lin->in_features}), true),
                        Var<T>(Tensor<T>(Shape{r, 1}), true),
                        Var<T>(Tensor<T>(Shape{lin->out_features, r}), true),
                        static_cast<T>(config_.lora_alpha / (static_cast<double>(r) + 1e-5)),
                        false,
                        {},
                        {},
                        {},
                        {}};
        if (config_.init_lora_weights) {
          detail::normal_fill(m.a.value(), ctx.rng, 0.02);
          detail::normal_fill(m.b.value(), ctx.rng, 0.02);
        }
        adapters_.put(lin->site, std::move(m));
      }
      if (adapters_.size() == 0) detail::throw_no_target("AdaLoRA", config_.targets, ctx.linears);
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return adapters_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = adapters_.find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      const std::int64_t r = m->e.value().numel();
      // A ⊙ E scales A's rows: transposed, E broadcasts over the last dimension.
      Var<T> scaled_t =
          ops::mul(tape, ops::transpose(tape, m->a, 0, 1), ops::reshape(tape, m->e, Shape{r}));
      Var<T> scaled = ops::transpose(tape, scaled_t, 0, 1);  // [r, in]
      return ops::lora_linear(tape, x, module.weight, module.bias, module.layout, scaled, m->b,
                              m->scale);
    }

    /// orth_reg_weight · mean over every A and B of ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F.
    Var<T> extra_loss(Tape<T>& tape) {
      Var<T> total(Tensor<T>(Shape{1}));
      int terms = 0;
      adapters_.for_each([&](ModuleAdapter& m) {
        total = ops::add(tape, total, ops::orthogonality_penalty(tape, m.a, true));
        total = ops::add(tape, total, ops::orthogonality_penalty(tape, m.b, false));
        terms += 2;
      });
      if (terms == 0) return total;
      return ops::scale(tape, total, static_cast<T>(config_.orth_reg_weight / terms));
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        const std::string prefix = "base_model.model." + m.module + ".";
        out.push_back({prefix + "lora_A", m.a});
        out.push_back({prefix + "lora_B", m.b});
        out.push_back({prefix + "lora_E", m.e});
      });
      return out;
    }

    /// The budget (kept triplets over all modules) at `step`, and whether `step` masks.
    std::pair<std::int64_t, bool> budget_schedule(int step) const {
      const std::int64_t init = initial_budget(), target = target_budget();
      if (step <= config_.tinit) return {init, false};
      if (step > config_.total_step - config_.tfinal) return {target, true};
      const double progress = 1.0 - double(step - config_.tinit) /
                                        double(config_.total_step - config_.tfinal - config_.tinit);
      // Truncated toward zero, as the reference's int().
      const auto budget = static_cast<std::int64_t>(
          double(init - target) * progress * progress * progress + double(target));
      return {budget, step % config_.deltaT == 0};
    }
    std::int64_t initial_budget() const {
      std::int64_t n = 0;
      adapters_.for_each([&](const ModuleAdapter& m) { n += m.e.value().numel(); });
      return n;
    }
    std::int64_t target_budget() const {
      return std::int64_t(config_.target_r) * static_cast<std::int64_t>(adapters_.size());
    }

    /// The trainer's call after each backward (before or after the optimizer step, as with
    /// the reference: it reads the gradients and writes E). Returns the budget of `step`.
    std::int64_t update_and_allocate(int step) {
      const int final_step = config_.total_step - config_.tfinal;
      if (step < final_step) {
        update_importance();
        const auto [budget, mask] = budget_schedule(step);
        if (mask) mask_to_budget(budget);
        return budget;
      }
      if (step == final_step) {
        mask_to_budget(target_budget());
        reset_importance();
        return target_budget();
      }
      mask_with_pattern();
      return target_budget();
    }

    /// Triplets kept by the last allocation (every triplet before one).
    std::int64_t kept_triplets() const {
      std::int64_t n = 0;
      adapters_.for_each([&](const ModuleAdapter& m) {
        n += m.kept.empty() ? m.e.value().numel() : std::count(m.kept.begin(), m.kept.end(), true);
      });
      return n;
    }
    /// Non-zero singular values over all modules.
    std::int64_t nonzero_singular_values() const {
      std::int64_t n = 0;
      adapters_.for_each([&](const ModuleAdapter& m) {
        for (std::int64_t i = 0; i < m.e.value().numel(); ++i) n += m.e.value()[i] != T(0);
      });
      return n;
    }

    /// The config with the allocation's rank_pattern, and the tensors cut to the kept
    /// triplets: what the reference saves after rank allocation. Loading them gives each
    /// module rank = its kept count (so ranknum, and s, change with it, as in the reference).
    Config allocated_config() const {
      Config c = config_;
      adapters_.for_each([&](const ModuleAdapter& m) {
        if (!m.kept.empty()) c.rank_pattern[m.module + ".lora_E"] = m.kept;
      });
      return c;
    }
    std::vector<NamedParameter<T>> allocated_parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        const std::int64_t r = m.e.value().numel();
        std::vector<std::int64_t> rows;
        for (std::int64_t i = 0; i < r; ++i)
          if (m.kept.empty() || m.kept[static_cast<std::size_t>(i)]) rows.push_back(i);
        const auto k = static_cast<std::int64_t>(rows.size());
        const std::int64_t in = m.a.value().dim(1), outf = m.b.value().dim(0);
        Tensor<T> a(Shape{k, in}), e(Shape{k, 1}), b(Shape{outf, k});
        for (std::int64_t j = 0; j < k; ++j) {
          a.matrix().row(j) = m.a.value().matrix().row(rows[static_cast<std::size_t>(j)]);
          e[j] = m.e.value()[rows[static_cast<std::size_t>(j)]];
          b.matrix().col(j) = m.b.value().matrix().col(rows[static_cast<std::size_t>(j)]);
        }
        const std::string prefix = "base_model.model." + m.module + ".";
        out.push_back({prefix + "lora_A", Var<T>(std::move(a))});
        out.push_back({prefix + "lora_B", Var<T>(std::move(b))});
        out.push_back({prefix + "lora_E", Var<T>(std::move(e))});
      });
      return out;
    }

    /// W += s B (A ⊙ E).
    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }
    void unload(std::vector<nn::Linear<T>*>& modules) {
      fold(modules, true);
      adapters_.clear();
    }
    std::size_t attached_modules() const { return adapters_.size(); }

   private:
    void update_importance() {
      const T b1 = static_cast<T>(config_.beta1), b2 = static_cast<T>(config_.beta2);
      auto update = [&](Var<T>& p, Importance& imp) {
        if (imp.smoothed.empty()) {
          imp.smoothed = Tensor<T>(p.shape());
          imp.uncertainty = Tensor<T>(p.shape());
        }
        if (!p.has_grad()) return;  // no backward yet: nothing to learn from
        const Eigen::Array<T, Eigen::Dynamic, 1> sensitivity =
            (p.value().vector().array() * p.grad().vector().array()).abs();
        imp.smoothed.vector().array() =
            b1 * imp.smoothed.vector().array() + (T(1) - b1) * sensitivity;
        imp.uncertainty.vector().array() =
            b2 * imp.uncertainty.vector().array() +
            (T(1) - b2) * (sensitivity - imp.smoothed.vector().array()).abs();
      };
      adapters_.for_each([&](ModuleAdapter& m) {
        update(m.a, m.ia);
        update(m.e, m.ie);
        update(m.b, m.ib);
      });
    }

    void reset_importance() {
      adapters_.for_each([&](ModuleAdapter& m) { m.ia = m.ie = m.ib = Importance{}; });
    }

    // Score of triplet i: s(E_i) + mean_j s(A_ij) + mean_o s(B_oi), s = Ī·Ū.
    static std::vector<T> triplet_scores(const ModuleAdapter& m) {
      const std::int64_t r = m.e.value().numel();
      std::vector<T> scores(static_cast<std::size_t>(r), T(0));
      if (m.ie.smoothed.empty()) return scores;
      const RowMatrix<T> sa = m.ia.smoothed.matrix().cwiseProduct(m.ia.uncertainty.matrix());
      const RowMatrix<T> sb = m.ib.smoothed.matrix().cwiseProduct(m.ib.uncertainty.matrix());
      for (std::int64_t i = 0; i < r; ++i)
        scores[static_cast<std::size_t>(i)] =
            m.ie.smoothed[i] * m.ie.uncertainty[i] + sa.row(i).mean() + sb.col(i).mean();
      return scores;
    }

    // Keeps the `budget` best triplets over all modules: every score above the
    // (initial − budget)-th smallest survives (ties at the threshold are all masked, as the
    // reference's `<=` does).
    void mask_to_budget(std::int64_t budget) {
      std::vector<T> all;
      std::vector<std::vector<T>> per_module;
      adapters_.for_each([&](ModuleAdapter& m) {
        per_module.push_back(triplet_scores(m));
        all.insert(all.end(), per_module.back().begin(), per_module.back().end());
      });
      const std::int64_t k = initial_budget() - budget;
      const bool masks = k > 0 && k <= static_cast<std::int64_t>(all.size());
      T threshold = T(0);
      if (masks) {
        std::nth_element(all.begin(), all.begin() + (k - 1), all.end());
        threshold = all[static_cast<std::size_t>(k - 1)];
      }
      std::size_t index = 0;
      adapters_.for_each([&](ModuleAdapter& m) {
        const std::vector<T>& scores = per_module[index++];
        m.kept.assign(scores.size(), true);
        for (std::size_t i = 0; i < scores.size(); ++i)
          if (masks && scores[i] <= threshold) {
            m.kept[i] = false;
            m.e.value()[static_cast<std::int64_t>(i)] = T(0);
          }
      });
    }

    void mask_with_pattern() {
      adapters_.for_each([&](ModuleAdapter& m) {
        for (std::size_t i = 0; i < m.kept.size(); ++i)
          if (!m.kept[i]) m.e.value()[static_cast<std::int64_t>(i)] = T(0);
      });
    }

    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || m->merged == merge) continue;
        const RowMatrix<T> scaled_a =
            m->e.value().vector().asDiagonal() * m->a.value().matrix();  // [r, in]
        RowMatrix<T> delta = m->scale * (m->b.value().matrix() * scaled_a);
        if (!merge) delta = -delta;
        lin->add_to_weight(delta);
        m->merged = merge;
      }
    }

    Config config_;
    detail::SiteTable<ModuleAdapter> adapters_;
  };
};

}  // namespace peft
