#pragma once
// LoRA (Hu et al., 2021): y = W x + s · B A x, A [r, in], B [out, r], s = α / r, or α / √r with
// rsLoRA (Kalajdzievski, 2023). Trains A and B; W stays frozen. Mergeable: W += s B A.
#include <cmath>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct LoraConfig {
  enum class Init { Default, Gaussian, Zeros };

  int r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  double lora_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  TargetRules targets;
  std::map<std::string, int> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  Init init = Init::Default;  ///< Default: Kaiming-uniform A, zero B; Gaussian: A ~ N(0, 1/r)

  /// s = α / r, or α / √r with rsLoRA.
  double scaling(int rank, double alpha) const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
  }
  int rank_for(const std::string& module) const {
    return pattern_lookup(rank_pattern, module).value_or(r);
  }
  double alpha_for(const std::string& module) const {
    return pattern_lookup(alpha_pattern, module).value_or(lora_alpha);
  }

  /// Reads a reference adapter_config.json (peft_type LORA, use_dora false).
  static LoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "LORA", source);
    if (detail::json_or<bool>(j, "use_dora", false, source))
      throw ConfigError(source + ": use_dora is true: load it with the DoRA policy");
    LoraConfig c;
    c.r = detail::json_or<int>(j, "r", 8, source);
    c.lora_alpha = detail::json_or<double>(j, "lora_alpha", 8.0, source);
    c.use_rslora = detail::json_or<bool>(j, "use_rslora", false, source);
    c.lora_dropout = detail::json_or<double>(j, "lora_dropout", 0.0, source);
    c.targets = TargetRules::from_json(j, source);
    c.rank_pattern = detail::json_or<std::map<std::string, int>>(j, "rank_pattern", {}, source);
    c.alpha_pattern = detail::json_or<std::map<std::string, double>>(j, "alpha_pattern", {}, source);
    const nlohmann::json& init = detail::json_field(j, "init_lora_weights");
    if (init.is_boolean()) c.init = init.get<bool>() ? Init::Default : Init::Zeros;
    else if (init.is_string() && init.get<std::string>() == "gaussian") c.init = Init::Gaussian;
    else if (!init.is_null())
      throw ConfigError(source + ": init_lora_weights " + init.dump() +
                        " unsupported (true, false, \"gaussian\")");
    const std::string bias = detail::json_or<std::string>(j, "bias", "none", source);
    if (bias != "none") throw ConfigError(source + ": bias '" + bias + "' unsupported (none)");
    if (!detail::json_field(j, "modules_to_save").is_null())
      throw ConfigError(source + ": modules_to_save is not supported");
    if (c.r <= 0) throw ConfigError(source + ": r must be positive");
    if (c.targets.target_modules.empty())
      throw ConfigError(source + ": target_modules is empty");
    return c;
  }

  /// The reference's adapter_config.json for this config on `model` (GPT-2's [in, out]
  /// weights are written as fan_in_fan_out, as the reference does).
  nlohmann::json to_json(const ModelConfig& model) const {
    const bool fan_in_fan_out = model.model_type == "gpt2";
    nlohmann::json j = detail::adapter_config_header("LORA");
    j["r"] = r;
    j["lora_alpha"] = lora_alpha;
    j["use_rslora"] = use_rslora;
    j["use_dora"] = false;
    j["lora_dropout"] = lora_dropout;
    j["fan_in_fan_out"] = fan_in_fan_out;
    j["bias"] = "none";
    j["lora_bias"] = false;
    j["modules_to_save"] = nullptr;
    j["init_lora_weights"] =
        init == Init::Gaussian ? nlohmann::json("gaussian") : nlohmann::json(init == Init::Default);
    j["rank_pattern"] = rank_pattern;
    j["alpha_pattern"] = alpha_pattern;
    targets.to_json(j);
    return j;
  }
};

struct LoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lora";
  using Config = LoraConfig;

  /// Parameters added to a model, from shapes alone (no allocation).
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.targets.selects(l.name, l.layer < 0))
        count.trainable += config.rank_for(l.name) * (l.in_features + l.out_features);
    return count;
  }

  /// Whether a reference adapter_config.json describes this method.
  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "LORA" &&
           !(j.contains("use_dora") && j["use_dora"].is_boolean() && j["use_dora"].get<bool>());
  }

  template <class T>
  class State {
   public:
    struct ModuleAdapter {
      std::string module;
      Var<T> a;  ///< [r, in]
      Var<T> b;  ///< [out, r]
      T scale;
      bool merged = false;
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      adapters_.assign(ctx.linears.size(), std::nullopt);
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!config_.targets.selects(lin->name, lin->layer < 0)) continue;
        const int r = config_.rank_for(lin->name);
        ModuleAdapter m{lin->name, Var<T>(Tensor<T>(Shape{r, lin->in_features}), true),
                        Var<T>(Tensor<T>(Shape{lin->out_features, r}), true),
                        static_cast<T>(config_.scaling(r, config_.alpha_for(lin->name)))};
        initialise(m, ctx.rng, r, lin->in_features);
        adapters_[static_cast<std::size_t>(lin->site)] = std::move(m);
        ++attached_;
      }
      if (attached_ == 0)
        throw ConfigError("LoRA: target_modules " + config_.targets.target_modules.to_json().dump() +
                          " matched no module of this model (module paths look like '" +
                          (ctx.linears.empty() ? std::string("-") : ctx.linears.front()->name) + "')");
    }

    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      return ops::lora_linear(tape, x, module.weight, module.bias, module.layout, m->a, m->b, m->scale);
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      for (auto& m : adapters_)
        if (m) {
          out.push_back({"base_model.model." + m->module + ".lora_A.weight", m->a});
          out.push_back({"base_model.model." + m->module + ".lora_B.weight", m->b});
        }
      return out;
    }

    /// W += s B A (W −= on unmerge); the forward then uses the base product alone.
    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }

    std::size_t attached_modules() const { return attached_; }
    const ModuleAdapter* find(int site) const {
      if (site < 0 || static_cast<std::size_t>(site) >= adapters_.size()) return nullptr;
      const auto& m = adapters_[static_cast<std::size_t>(site)];
      return m ? &*m : nullptr;
    }

   private:
    void initialise(ModuleAdapter& m, std::mt19937_64& rng, int r, std::int64_t in) {
      // B = 0, so the adapted model starts exactly at the base model.
      if (config_.init == Config::Init::Default) {
        // Kaiming-uniform with a = √5, as torch.nn.Linear: bound = 1/√in.
        std::uniform_real_distribution<double> u(-1.0 / std::sqrt(double(in)), 1.0 / std::sqrt(double(in)));
        for (std::int64_t i = 0; i < m.a.value().numel(); ++i) m.a.value()[i] = static_cast<T>(u(rng));
      } else if (config_.init == Config::Init::Gaussian) {
        std::normal_distribution<double> n(0.0, 1.0 / r);
        for (std::int64_t i = 0; i < m.a.value().numel(); ++i) m.a.value()[i] = static_cast<T>(n(rng));
      }
    }

    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        auto& m = adapters_[static_cast<std::size_t>(lin->site)];
        if (!m || m->merged == merge) continue;
        const RowMatrix<T> delta =
            (merge ? m->scale : -m->scale) * (m->b.value().matrix() * m->a.value().matrix());
        lin->add_to_weight(delta);
        m->merged = merge;
      }
    }

    Config config_;
    std::vector<std::optional<ModuleAdapter>> adapters_;  // by linear site
    std::size_t attached_ = 0;
  };
};

}  // namespace peft
