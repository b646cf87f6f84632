#pragma once
// LoRA (Hu et al., 2021): y = W x + s · B A x, A [r, in], B [out, r], s = α / r, or α / √r with
// rsLoRA (Kalajdzievski, 2023). Trains A and B; W stays frozen. Mergeable: W += s B A.
// Initialisations: Kaiming-uniform A and zero B (default), gaussian A, or PiSSA (Meng et al.,
// 2024): A and B from the top-r singular triplets of W, the base keeping W − s B A.
#include <Eigen/SVD>
#include <cmath>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

struct LoraConfig {
  enum class Init { Default, Gaussian, Zeros, Pissa };

  int r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  double lora_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  TargetRules targets;
  std::map<std::string, int> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  /// Default: Kaiming-uniform A, zero B; Gaussian: A ~ N(0, 1/r), zero B; Pissa: principal
  /// singular vectors of W (the base weight keeps the residual).
  Init init = Init::Default;

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
    if (detail::json_or<bool>(j, "use_dora", false, source))
      throw ConfigError(source + ": use_dora is true: load it with the DoRA policy");
    return parse(j, source);
  }

  /// The fields LoRA and DoRA share (use_dora is checked by the caller).
  static LoraConfig parse(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "LORA", source);
    LoraConfig c;
    c.r = detail::json_or<int>(j, "r", 8, source);
    c.lora_alpha = detail::json_or<double>(j, "lora_alpha", 8.0, source);
    c.use_rslora = detail::json_or<bool>(j, "use_rslora", false, source);
    c.lora_dropout = detail::json_or<double>(j, "lora_dropout", 0.0, source);
    c.targets = TargetRules::from_json(j, source);
    c.rank_pattern = detail::json_or<std::map<std::string, int>>(j, "rank_pattern", {}, source);
    c.alpha_pattern =
        detail::json_or<std::map<std::string, double>>(j, "alpha_pattern", {}, source);
    const nlohmann::json& init = detail::json_field(j, "init_lora_weights");
    if (init.is_boolean())
      c.init = init.get<bool>() ? Init::Default : Init::Zeros;
    else if (init.is_string() && init.get<std::string>() == "gaussian")
      c.init = Init::Gaussian;
    else if (init.is_string() && init.get<std::string>() == "pissa")
      c.init = Init::Pissa;
    else if (!init.is_null())
      throw ConfigError(source + ": init_lora_weights " + init.dump() +
                        " unsupported (true, false, \"gaussian\", \"pissa\")");
    if (detail::json_or<bool>(j, "lora_bias", false, source))
      throw ConfigError(source + ": lora_bias is not supported");
    if (!detail::json_field(j, "layer_replication").is_null())
      throw ConfigError(source + ": layer_replication is not supported");
    const std::string bias = detail::json_or<std::string>(j, "bias", "none", source);
    if (bias != "none") throw ConfigError(source + ": bias '" + bias + "' unsupported (none)");
    if (!detail::json_field(j, "modules_to_save").is_null())
      throw ConfigError(source + ": modules_to_save is not supported");
    if (c.r <= 0) throw ConfigError(source + ": r must be positive");
    if (c.targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    return c;
  }

  /// The reference's adapter_config.json for this config on `model`, with every field the
  /// reference (peft 0.21) writes (GPT-2's [in, out] weights are written as fan_in_fan_out).
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = detail::adapter_config_header("LORA");
    for (const char* unset :
         {"alora_invocation_tokens", "arrow_config", "corda_config", "eva_config", "kasa_config",
          "layer_replication", "lora_ga_config", "megatron_config", "modules_to_save",
          "monteclora_config", "target_parameters", "trainable_token_indices", "use_bdlora",
          "velora_config"})
      j[unset] = nullptr;
    j["ensure_weight_tying"] = false;
    j["loftq_config"] = nlohmann::json::object();
    j["megatron_core"] = "megatron.core";
    j["qalora_group_size"] = 16;
    j["use_qalora"] = false;
    j["r"] = r;
    j["lora_alpha"] = detail::json_number(lora_alpha);
    j["use_rslora"] = use_rslora;
    j["use_dora"] = false;
    j["lora_dropout"] = lora_dropout;
    j["fan_in_fan_out"] = model.model_type == "gpt2";
    j["bias"] = "none";
    j["lora_bias"] = false;
    j["init_lora_weights"] = init == Init::Gaussian ? nlohmann::json("gaussian")
                             : init == Init::Pissa  ? nlohmann::json("pissa")
                                                    : nlohmann::json(init == Init::Default);
    j["rank_pattern"] = rank_pattern;
    nlohmann::json alphas = nlohmann::json::object();
    for (const auto& [key, alpha] : alpha_pattern) alphas[key] = detail::json_number(alpha);
    j["alpha_pattern"] = alphas;
    targets.to_json(j);
    return j;
  }
};

struct LoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lora";
  using Config = LoraConfig;

  /// Parameters added to a model, from shapes alone (no allocation).
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
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
      if (attached_ == 0) detail::throw_no_target("LoRA", config_.targets, ctx.linears);
      if (config_.init == Config::Init::Pissa) initialise_pissa(ctx.linears);
    }

    /// PiSSA: for each adapted W [out, in] = U S Vᵀ, A = diag(√(S_r/s)) V_rᵀ and
    /// B = U_r diag(√(S_r/s)), and W −= s B A, so the model's output is unchanged. Runs at
    /// attach on the weights present then; a model whose base weights are loaded afterwards
    /// (Decoder::load) calls it again once they are in place.
    void on_base_weights_loaded(std::vector<nn::Linear<T>*>& modules) {
      if (config_.init == Config::Init::Pissa) initialise_pissa(modules);
    }
    void initialise_pissa(const std::vector<nn::Linear<T>*>& modules) {
      for (nn::Linear<T>* lin : modules) {
        auto& m = adapters_[static_cast<std::size_t>(lin->site)];
        if (!m || m->merged) continue;
        const RowMatrix<double> w = lin->weight_out_in().template cast<double>();
        Eigen::BDCSVD<RowMatrix<double>> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
        const Eigen::Index r = m->a.value().dim(0);
        if (r > svd.singularValues().size())
          throw ConfigError("PiSSA: rank " + std::to_string(r) + " exceeds the rank of " +
                            lin->name);
        const Eigen::VectorXd root = (svd.singularValues().head(r) / double(m->scale)).cwiseSqrt();
        const RowMatrix<double> a = root.asDiagonal() * svd.matrixV().leftCols(r).transpose();
        const RowMatrix<double> b = svd.matrixU().leftCols(r) * root.asDiagonal();
        m->a.value().matrix() = a.cast<T>();
        m->b.value().matrix() = b.cast<T>();
        const RowMatrix<T> delta = -m->scale * (m->b.value().matrix() * m->a.value().matrix());
        lin->add_to_weight(delta);
      }
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      return ops::lora_linear(tape, x, module.weight, module.bias, module.layout, m->a, m->b,
                              m->scale);
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
    /// Merges for good and drops the adapter: the model is the base model again, with the
    /// update folded in (parameters() is empty afterwards).
    void unload(std::vector<nn::Linear<T>*>& modules) {
      fold(modules, true);
      for (auto& m : adapters_) m.reset();
      attached_ = 0;
    }

    std::size_t attached_modules() const { return attached_; }
    const ModuleAdapter* find(int site) const {
      if (site < 0 || static_cast<std::size_t>(site) >= adapters_.size()) return nullptr;
      const auto& m = adapters_[static_cast<std::size_t>(site)];
      return m ? &*m : nullptr;
    }

   private:
    void initialise(ModuleAdapter& m, std::mt19937_64& rng, int r, std::int64_t) {
      // B = 0, so the adapted model starts exactly at the base model.
      if (config_.init == Config::Init::Default)
        detail::kaiming_uniform(m.a.value(), rng);
      else if (config_.init == Config::Init::Gaussian) {
        std::normal_distribution<double> n(0.0, 1.0 / r);
        for (std::int64_t i = 0; i < m.a.value().numel(); ++i)
          m.a.value()[i] = static_cast<T>(n(rng));
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
