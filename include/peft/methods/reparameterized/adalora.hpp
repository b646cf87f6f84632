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
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

namespace detail::reparameterized {
/// A map written as null when empty (AdaLoRA's rank_pattern, as the reference writes it).
template <class C, class M>
struct NullWhenEmpty : Field<C, M, ::peft::check::None> {
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const {
    const M& v = c.*(this->member);
    j[std::string(this->key)] = v.empty() ? nlohmann::json(nullptr) : nlohmann::json(v);
  }
};
}  // namespace detail::reparameterized

struct AdaLoraConfig : ConfigIo<AdaLoraConfig> {
  static constexpr std::string_view peft_type = "ADALORA";
  int init_r = 12;
  int target_r = 8;
  int r = 8;  ///< written back as the reference writes it; init_r is the rank used
  double lora_alpha = 8;
  double lora_dropout = 0.0;  ///< the low-rank path's input dropout in training mode
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

  /// Every field the reference (peft 0.21) writes for AdaLoRA (its LoRA fields included).
  static auto fields() {
    using C = AdaLoraConfig;
    return config_fields(
        field("init_r", &C::init_r, check::dimension),
        field("target_r", &C::target_r, check::dimension),
        field("r", &C::r, check::dimension_or_zero),
        field("lora_alpha", &C::lora_alpha, check::scale),
        float_field("lora_dropout", &C::lora_dropout, check::probability),
        targets_field(&C::targets), field("tinit", &C::tinit, check::non_negative),
        field("tfinal", &C::tfinal, check::non_negative),
        field("deltaT", &C::deltaT, check::positive), float_field("beta1", &C::beta1),
        float_field("beta2", &C::beta2), float_field("orth_reg_weight", &C::orth_reg_weight),
        field("total_step", &C::total_step, check::positive),
        field("init_lora_weights", &C::init_lora_weights),
        detail::reparameterized::NullWhenEmpty<C, decltype(rank_pattern)>{
            {"rank_pattern", &C::rank_pattern, {}}},
        fixed("bias", "none"), fixed("modules_to_save", nullptr),
        fixed("use_dora", false, "AdaLoRA does not support use_dora"), fan_in_fan_out(),
        constants({{"alora_invocation_tokens", nullptr},
                   {"alpha_pattern", nlohmann::json::object()},
                   {"arrow_config", nullptr},
                   {"corda_config", nullptr},
                   {"eva_config", nullptr},
                   {"kasa_config", nullptr},
                   {"layer_replication", nullptr},
                   {"lora_ga_config", nullptr},
                   {"megatron_config", nullptr},
                   {"monteclora_config", nullptr},
                   {"target_parameters", nullptr},
                   {"trainable_token_indices", nullptr},
                   {"use_bdlora", nullptr},
                   {"velora_config", nullptr},
                   {"ensure_weight_tying", false},
                   {"lora_bias", false},
                   {"use_qalora", false},
                   {"use_rslora", false},
                   {"loftq_config", nlohmann::json::object()},
                   {"megatron_core", "megatron.core"},
                   {"qalora_group_size", 16}}));
  }
  void validate(const std::string& source) const {
    if (target_r > init_r) throw ConfigError(source + ": need 0 < target_r <= init_r");
    if (tinit >= total_step - tfinal)
      throw ConfigError(source + ": tinit must be below total_step - tfinal (no budget phase)");
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct AdaLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "adalora", title = "AdaLoRA";
  static constexpr std::string_view paper =
      "Zhang et al., 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning";
  static constexpr std::string_view reference = "ADALORA";  ///< peft_type in HF peft
  using Config = AdaLoraConfig;

  /// lora_A [r, in], lora_B [out, r], lora_E [r, 1] per module, r = the module's rank.
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t r = c.rank_for(std::string(m.name));
    return {{"lora_A", {r, m.in_features}}, {"lora_B", {m.out_features, r}}, {"lora_E", {r, 1}}};
  }
  /// The site tensors (trainable), and one frozen `ranknum` scalar per module, which the
  /// reference counts into "all params" but does not save.
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count = count_site_tensors<AdaLoRA>(linears, config);
    for (const LinearShape& l : linears)
      count.frozen += method_selects<AdaLoRA>(config, ModuleSite::of(l));
    return count;
  }

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "ADALORA"); }

  template <class T>
  class State {
   public:
    struct Importance {
      Tensor<T> smoothed, uncertainty;  ///< Ī and Ū, the tensor's shape
    };
    struct Extra {
      T scale = T(1);  ///< α / (ranknum + 1e-5)
      Importance ia, ib, ie;
      std::vector<bool> kept;  ///< the last allocation's pattern (empty before one)
    };
    using Sites = SiteTable<T, Extra>;
    using Slot = typename Sites::Slot;  // [0] A [r, in], [1] B [out, r], [2] E [r, 1]

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      sites_.template attach<AdaLoRA>(config_, ctx.linears, [&](Slot& s, const nn::Linear<T>& m) {
        const double r = config_.rank_for(m.name);
        s.extra.scale = static_cast<T>(config_.lora_alpha / (r + 1e-5));
        if (config_.init_lora_weights) {
          detail::normal_fill(s[0].value(), ctx.rng, 0.02);
          detail::normal_fill(s[1].value(), ctx.rng, 0.02);
        }
      });
    }

    /// The low-rank term s (x (A ⊙ E)ᵀ) Bᵀ.
    void adapt(Projection<T>& p) const {
      const Slot* s = sites_.active(p.module());
      if (!s) return;
      Tape<T>& tape = p.tape();
      const std::int64_t r = (*s)[2].value().numel();
      // A ⊙ E scales A's rows: transposed, E broadcasts over the last dimension.
      Var<T> scaled_t = ops::mul(tape, ops::transpose(tape, (*s)[0], 0, 1),
                                 ops::reshape(tape, (*s)[2], Shape{r}));
      p.add_low_rank(ops::transpose(tape, scaled_t, 0, 1), (*s)[1], s->extra.scale,
                     config_.lora_dropout);
    }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// The importance averages Ī, Ū of every A, B, E and the last allocation's pattern, per
    /// module in site order (HasRunningState): what update_and_allocate carries from step to
    /// step. Values as JSON numbers, which round-trip float and double exactly.
    nlohmann::json running_state() const {
      nlohmann::json sites = nlohmann::json::array();
      const auto tensor = [](const Tensor<T>& t) {
        return nlohmann::json(std::vector<double>(t.data(), t.data() + t.numel()));
      };
      sites_.for_each([&](const Slot& s) {
        nlohmann::json site = nlohmann::json::object();
        for (const auto& [key, imp] : {std::pair{"A", &s.extra.ia}, std::pair{"B", &s.extra.ib},
                                       std::pair{"E", &s.extra.ie}})
          site[key] = {{"smoothed", tensor(imp->smoothed)},
                       {"uncertainty", tensor(imp->uncertainty)}};
        site["kept"] = s.extra.kept;
        sites.push_back(std::move(site));
      });
      return {{"sites", sites}};
    }
    void restore_running_state(const nlohmann::json& state) {
      const std::string what = "AdaLoRA: running state";
      const auto sites = state.find("sites");
      if (sites == state.end() || !sites->is_array() || sites->size() != sites_.size())
        throw FileError(what + ": expected one entry per adapted module (" +
                        std::to_string(sites_.size()) + ")");
      std::size_t k = 0;
      sites_.for_each([&](Slot& s) {
        const nlohmann::json& site = (*sites)[k++];
        const auto read = [&](const char* key, std::size_t param, Importance& imp) {
          const auto field = [&](const char* name) {
            if (!site.is_object() || !site.contains(key) || !site[key].is_object() ||
                !site[key].contains(name) || !site[key][name].is_array())
              throw FileError(what + ": module " + std::to_string(k - 1) + ": field '" + key + "." +
                              name + "' expected an array");
            const nlohmann::json& values = site[key][name];
            const std::int64_t n = s[param].value().numel();
            if (!values.empty() && std::int64_t(values.size()) != n)
              throw FileError(what + ": module " + std::to_string(k - 1) + ": field '" + key + "." +
                              name + "' has " + std::to_string(values.size()) +
                              " values, expected " + std::to_string(n) + " (or none)");
            if (values.empty()) return Tensor<T>{};
            Tensor<T> t(s[param].shape());
            for (std::int64_t i = 0; i < n; ++i) {
              if (!values[std::size_t(i)].is_number())
                throw FileError(what + ": module " + std::to_string(k - 1) + ": field '" + key +
                                "." + name + "' holds a value that is not a number");
              t[i] = static_cast<T>(values[std::size_t(i)].get<double>());
            }
            return t;
          };
          imp.smoothed = field("smoothed");
          imp.uncertainty = field("uncertainty");
        };
        read("A", 0, s.extra.ia);
        read("B", 1, s.extra.ib);
        read("E", 2, s.extra.ie);
        const auto kept = site.find("kept");
        if (kept == site.end() || !kept->is_array() ||
            (!kept->empty() && std::int64_t(kept->size()) != s[2].value().numel()))
          throw FileError(what + ": module " + std::to_string(k - 1) +
                          ": field 'kept' expected one boolean per rank component (or none)");
        s.extra.kept.clear();
        for (const nlohmann::json& b : *kept) {
          if (!b.is_boolean())
            throw FileError(what + ": module " + std::to_string(k - 1) +
                            ": 'kept' holds a non-boolean");
          s.extra.kept.push_back(b.get<bool>());
        }
      });
    }

    /// orth_reg_weight · mean over every A and B of ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F.
    Var<T> extra_loss(Tape<T>& tape) {
      Var<T> total(Tensor<T>(Shape{1}));
      int terms = 0;
      sites_.for_each([&](Slot& s) {
        total = ops::add(tape, total, ops::orthogonality_penalty(tape, s[0], true));
        total = ops::add(tape, total, ops::orthogonality_penalty(tape, s[1], false));
        terms += 2;
      });
      if (terms == 0) return total;
      return ops::scale(tape, total, static_cast<T>(config_.orth_reg_weight / terms));
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
      sites_.for_each([&](const Slot& s) { n += s[2].value().numel(); });
      return n;
    }
    std::int64_t target_budget() const {
      return std::int64_t(config_.target_r) * static_cast<std::int64_t>(sites_.size());
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
      sites_.for_each([&](const Slot& s) {
        const std::vector<bool>& kept = s.extra.kept;
        n += kept.empty() ? s[2].value().numel() : std::count(kept.begin(), kept.end(), true);
      });
      return n;
    }
    /// Non-zero singular values over all modules.
    std::int64_t nonzero_singular_values() const {
      std::int64_t n = 0;
      sites_.for_each([&](const Slot& s) {
        for (std::int64_t i = 0; i < s[2].value().numel(); ++i) n += s[2].value()[i] != T(0);
      });
      return n;
    }

    /// The config with the allocation's rank_pattern, and the tensors cut to the kept
    /// triplets: what the reference saves after rank allocation. Loading them gives each
    /// module rank = its kept count (so ranknum, and s, change with it, as in the reference).
    Config allocated_config() const {
      Config c = config_;
      sites_.for_each([&](const Slot& s) {
        if (!s.extra.kept.empty()) c.rank_pattern[s.module + ".lora_E"] = s.extra.kept;
      });
      return c;
    }
    std::vector<NamedParameter<T>> allocated_parameters() const {
      std::vector<NamedParameter<T>> out;
      sites_.for_each([&](const Slot& s) {
        const Tensor<T>&a0 = s[0].value(), &b0 = s[1].value(), &e0 = s[2].value();
        const std::vector<bool>& kept = s.extra.kept;
        std::vector<std::int64_t> rows;
        for (std::int64_t i = 0; i < e0.numel(); ++i)
          if (kept.empty() || kept[static_cast<std::size_t>(i)]) rows.push_back(i);
        const auto k = static_cast<std::int64_t>(rows.size());
        Tensor<T> a(Shape{k, a0.dim(1)}), e(Shape{k, 1}), b(Shape{b0.dim(0), k});
        for (std::int64_t j = 0; j < k; ++j) {
          const std::int64_t row = rows[static_cast<std::size_t>(j)];
          a.matrix().row(j) = a0.matrix().row(row);
          e[j] = e0[row];
          b.matrix().col(j) = b0.matrix().col(row);
        }
        const std::string prefix = "base_model.model." + s.module + ".";
        out.push_back({prefix + "lora_A", Var<T>(std::move(a))});
        out.push_back({prefix + "lora_B", Var<T>(std::move(b))});
        out.push_back({prefix + "lora_E", Var<T>(std::move(e))});
      });
      return out;
    }

    /// W += s B (A ⊙ E).
    static RowMatrix<T> delta_weight(const Slot& s, const nn::Linear<T>&) {
      const RowMatrix<T> scaled_a = s[2].value().vector().asDiagonal() * s[0].value().matrix();
      return s.extra.scale * (s[1].value().matrix() * scaled_a);
    }
    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta_weight); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta_weight); }
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta_weight); }
    std::size_t attached_modules() const { return sites_.size(); }

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
      sites_.for_each([&](Slot& s) {
        update(s[0], s.extra.ia);
        update(s[2], s.extra.ie);
        update(s[1], s.extra.ib);
      });
    }

    void reset_importance() {
      sites_.for_each([&](Slot& s) { s.extra.ia = s.extra.ie = s.extra.ib = Importance{}; });
    }

    // Score of triplet i: s(E_i) + mean_j s(A_ij) + mean_o s(B_oi), s = Ī·Ū.
    static std::vector<T> triplet_scores(const Slot& s) {
      const Extra& m = s.extra;
      const std::int64_t r = s[2].value().numel();
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
      sites_.for_each([&](const Slot& s) {
        per_module.push_back(triplet_scores(s));
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
      sites_.for_each([&](Slot& s) {
        const std::vector<T>& scores = per_module[index++];
        s.extra.kept.assign(scores.size(), true);
        for (std::size_t i = 0; i < scores.size(); ++i)
          if (masks && scores[i] <= threshold) {
            s.extra.kept[i] = false;
            s[2].value()[static_cast<std::int64_t>(i)] = T(0);
          }
      });
    }

    void mask_with_pattern() {
      sites_.for_each([&](Slot& s) {
        for (std::size_t i = 0; i < s.extra.kept.size(); ++i)
          if (!s.extra.kept[i]) s[2].value()[static_cast<std::int64_t>(i)] = T(0);
      });
    }

    Config config_;
    Sites sites_;
  };
};

}  // namespace peft
