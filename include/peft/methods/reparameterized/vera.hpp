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
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct VeraConfig {
  int r = 256;
  TargetRules targets;
  std::int64_t projection_prng_key = 0;
  bool save_projection = true;
  double vera_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  double d_initial = 0.1;
  bool init_weights = true;  ///< λ_b = 0, λ_d = d_initial; else λ_b = 1, λ_d ~ N(0, 1)

  static VeraConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "VERA", source);
    VeraConfig c;
    c.r = detail::json_or<int>(j, "r", 256, source);
    c.targets = TargetRules::from_json(j, source);
    c.projection_prng_key = detail::json_or<std::int64_t>(j, "projection_prng_key", 0, source);
    c.save_projection = detail::json_or<bool>(j, "save_projection", true, source);
    c.vera_dropout = detail::json_or<double>(j, "vera_dropout", 0.0, source);
    c.d_initial = detail::json_or<double>(j, "d_initial", 0.1, source);
    c.init_weights = detail::json_or<bool>(j, "init_weights", true, source);
    const std::string bias = detail::json_or<std::string>(j, "bias", "none", source);
    if (bias != "none") throw ConfigError(source + ": bias '" + bias + "' unsupported (none)");
    if (!detail::json_field(j, "modules_to_save").is_null())
      throw ConfigError(source + ": modules_to_save is not supported");
    if (c.r <= 0) throw ConfigError(source + ": r must be positive");
    if (c.targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    return c;
  }

  /// The fields the reference (peft 0.21) writes for VeRA (it has no exclude_modules).
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = detail::adapter_config_header("VERA");
    j["r"] = r;
    j["projection_prng_key"] = projection_prng_key;
    j["save_projection"] = save_projection;
    j["vera_dropout"] = vera_dropout;
    j["d_initial"] = d_initial;
    j["init_weights"] = init_weights;
    j["fan_in_fan_out"] = model.model_type == "gpt2";
    j["bias"] = "none";
    j["modules_to_save"] = nullptr;
    targets.to_json(j);
    j.erase("exclude_modules");
    return j;
  }
};

struct VeRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "vera";
  using Config = VeraConfig;

  /// r + out per adapted module; the shared vera_A / vera_B are buffers, not parameters.
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.targets.selects(l.name, l.layer < 0)) count.trainable += config.r + l.out_features;
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "VERA";
  }

  static constexpr const char* shared_a_key = "base_model.vera_A";
  static constexpr const char* shared_b_key = "base_model.vera_B";

  template <class T>
  class State {
   public:
    struct ModuleAdapter {
      std::string module;
      Var<T> lambda_d;  ///< [r]
      Var<T> lambda_b;  ///< [out]
      bool merged = false;
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      adapters_.reset(ctx.linears.size());
      std::int64_t max_in = 0, max_out = 0;
      const int r = config_.r;
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!config_.targets.selects(lin->name, lin->layer < 0)) continue;
        max_in = std::max(max_in, lin->in_features);
        max_out = std::max(max_out, lin->out_features);
        ModuleAdapter m{lin->name, Var<T>(Tensor<T>(Shape{r}), true),
                        Var<T>(Tensor<T>(Shape{lin->out_features}), true)};
        if (config_.init_weights) {
          m.lambda_d.value().fill(static_cast<T>(config_.d_initial));
        } else {
          m.lambda_b.value().fill(T(1));
          detail::normal_fill(m.lambda_d.value(), ctx.rng, 1.0);
        }
        adapters_.put(lin->site, std::move(m));
      }
      if (adapters_.size() == 0) detail::throw_no_target("VeRA", config_.targets, ctx.linears);
      // The shared projections come from their own generator seeded with projection_prng_key,
      // so an adapter saved without them (save_projection false) rebuilds the same ones here.
      // The draws follow the reference's distribution (Kaiming-uniform, gain √2, fan_in = the
      // second extent), not torch's generator: files for the reference keep save_projection.
      std::mt19937_64 rng(static_cast<std::uint64_t>(config_.projection_prng_key));
      shared_a_ = Var<T>(Tensor<T>(Shape{r, max_in}));
      shared_b_ = Var<T>(Tensor<T>(Shape{max_out, r}));
      for (Var<T>* shared : {&shared_a_, &shared_b_}) {
        const double bound = std::sqrt(6.0 / static_cast<double>(shared->value().cols()));
        std::uniform_real_distribution<double> u(-bound, bound);
        for (std::int64_t i = 0; i < shared->value().numel(); ++i)
          shared->value()[i] = static_cast<T>(u(rng));
      }
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return adapters_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = adapters_.find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      return ops::vera_linear(tape, x, module.weight, module.bias, module.layout, shared_a_,
                              shared_b_, m->lambda_d, m->lambda_b);
    }

    /// λ_d and λ_b of every module, then the shared (frozen) projections when they are saved.
    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        out.push_back({"base_model.model." + m.module + ".vera_lambda_b", m.lambda_b});
        out.push_back({"base_model.model." + m.module + ".vera_lambda_d", m.lambda_d});
      });
      if (config_.save_projection && adapters_.size() > 0) {
        out.push_back({shared_a_key, shared_a_});
        out.push_back({shared_b_key, shared_b_});
      }
      return out;
    }

    /// W += (λ_b ⊙ B̂)(λ_d ⊙ Â); unmerge subtracts the same product.
    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }
    void unload(std::vector<nn::Linear<T>*>& modules) {
      fold(modules, true);
      adapters_.clear();
    }

    std::size_t attached_modules() const { return adapters_.size(); }
    const Var<T>& shared_a() const { return shared_a_; }
    const Var<T>& shared_b() const { return shared_b_; }

    /// ΔW [out, in] of one adapted module.
    RowMatrix<T> delta_weight(const nn::Linear<T>& lin) const {
      const ModuleAdapter* m = adapters_.find(lin.site);
      if (!m) throw Error("VeRA: " + lin.name + " has no adapter");
      const RowMatrix<T> b = m->lambda_b.value().vector().asDiagonal() *
                             shared_b_.value().matrix().topRows(lin.out_features);
      const RowMatrix<T> a = m->lambda_d.value().vector().asDiagonal() *
                             shared_a_.value().matrix().leftCols(lin.in_features);
      return b * a;
    }

   private:
    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || m->merged == merge) continue;
        RowMatrix<T> delta = delta_weight(*lin);
        if (!merge) delta = -delta;
        lin->add_to_weight(delta);
        m->merged = merge;
      }
    }

    Config config_;
    detail::SiteTable<ModuleAdapter> adapters_;
    Var<T> shared_a_, shared_b_;  // frozen
  };
};

}  // namespace peft
