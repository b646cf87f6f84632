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
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct DyLoraConfig {
  int r = 8;  ///< the largest rank
  double lora_alpha = 8;
  double lora_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  TargetRules targets;
  int eval_rank = 0;  ///< the rank used until set_rank / sample_rank; 0 means r
  std::uint64_t rank_sampling_seed = 0;

  static DyLoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "DYLORA", source);
    DyLoraConfig c;
    c.r = detail::json_or<int>(j, "r", 8, source);
    c.lora_alpha = detail::json_or<double>(j, "lora_alpha", 8.0, source);
    c.lora_dropout = detail::json_or<double>(j, "lora_dropout", 0.0, source);
    c.targets = TargetRules::from_json(j, source);
    c.eval_rank = detail::json_or<int>(j, "eval_rank", 0, source);
    c.rank_sampling_seed = detail::json_or<std::uint64_t>(j, "rank_sampling_seed", 0, source);
    const std::string bias = detail::json_or<std::string>(j, "bias", "none", source);
    if (bias != "none") throw ConfigError(source + ": bias '" + bias + "' unsupported (none)");
    if (c.r <= 0) throw ConfigError(source + ": r must be positive");
    if (c.eval_rank < 0 || c.eval_rank > c.r)
      throw ConfigError(source + ": eval_rank must lie in [0, r] (0: r)");
    if (c.targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    return c;
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = detail::adapter_config_header("DYLORA");
    j["r"] = r;
    j["lora_alpha"] = detail::json_number(lora_alpha);
    j["lora_dropout"] = lora_dropout;
    j["eval_rank"] = eval_rank;
    j["rank_sampling_seed"] = rank_sampling_seed;
    j["fan_in_fan_out"] = model.model_type == "gpt2";
    j["bias"] = "none";
    j["modules_to_save"] = nullptr;
    targets.to_json(j);
    return j;
  }
};

struct DyLoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "dylora";
  using Config = DyLoraConfig;

  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.targets.selects(l.name, l.layer < 0))
        count.trainable += std::int64_t(config.r) * (l.in_features + l.out_features);
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "DYLORA";
  }

  template <class T>
  class State {
   public:
    struct ModuleAdapter {
      std::string module;
      Var<T> a;  ///< [r, in]
      Var<T> b;  ///< [out, r]
      bool merged = false;
      int merged_rank = 0;
    };

    explicit State(const Config& config)
        : config_(config),
          rank_(config.eval_rank > 0 ? config.eval_rank : config.r),
          rng_(config.rank_sampling_seed) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      adapters_.reset(ctx.linears.size());
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!config_.targets.selects(lin->name, lin->layer < 0)) continue;
        ModuleAdapter m{lin->name, Var<T>(Tensor<T>(Shape{config_.r, lin->in_features}), true),
                        Var<T>(Tensor<T>(Shape{lin->out_features, config_.r}), true)};
        detail::kaiming_uniform(m.a.value(), ctx.rng);
        adapters_.put(lin->site, std::move(m));
      }
      if (adapters_.size() == 0) detail::throw_no_target("DyLoRA", config_.targets, ctx.linears);
    }

    /// Draws the rank of the next training step, b ~ U{1..r}, from the seeded generator, and
    /// uses it until the next call or set_rank. Call it once per step, before the forward.
    int sample_rank() {
      std::uniform_int_distribution<int> pick(1, config_.r);
      rank_ = pick(rng_);
      return rank_;
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

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return adapters_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = adapters_.find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      if (rank_ == config_.r)
        return ops::lora_linear(tape, x, module.weight, module.bias, module.layout, m->a, m->b,
                                scale());
      const std::int64_t rest = config_.r - rank_;
      Var<T> a = ops::split(tape, m->a, {rank_, rest}, 0)[0];  // [b, in]
      Var<T> b = ops::split(tape, m->b, {rank_, rest}, 1)[0];  // [out, b]
      return ops::lora_linear(tape, x, module.weight, module.bias, module.layout, a, b, scale());
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        out.push_back({"base_model.model." + m.module + ".lora_A.weight", m.a});
        out.push_back({"base_model.model." + m.module + ".lora_B.weight", m.b});
      });
      return out;
    }

    /// W += (α/b) B[:, :b] A[:b] at the current rank b (unmerge uses the rank of the merge).
    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }
    void unload(std::vector<nn::Linear<T>*>& modules) {
      fold(modules, true);
      adapters_.clear();
    }
    std::size_t attached_modules() const { return adapters_.size(); }

   private:
    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || m->merged == merge) continue;
        const int b = merge ? rank_ : m->merged_rank;
        const T s = static_cast<T>(config_.lora_alpha / b);
        RowMatrix<T> delta =
            s * (m->b.value().matrix().leftCols(b) * m->a.value().matrix().topRows(b));
        if (!merge) delta = -delta;
        lin->add_to_weight(delta);
        m->merged = merge;
        m->merged_rank = b;
      }
    }

    Config config_;
    int rank_;
    std::mt19937_64 rng_;
    detail::SiteTable<ModuleAdapter> adapters_;
  };
};

}  // namespace peft
