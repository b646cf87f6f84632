#pragma once
// LoRA (Hu et al., 2021): y = W x + s · B A x, A [r, in], B [out, r], s = α / r, or α / √r with
// rsLoRA (Kalajdzievski, 2023). Trains A and B; W stays frozen. Mergeable: W += s B A.
// Initialisations: Kaiming-uniform A and zero B (default), gaussian A, zeros, or PiSSA
// (pissa.hpp: A and B from the top-r singular triplets of W, the base keeping W − s B A).
// docs/methods/reparameterized.md; tests/test_reparameterized.cpp; golden gpt2_lora,
// llama_lora_rslora.
#include <cmath>
#include <map>
#include <string>

#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/methods/reparameterized/pissa.hpp"

namespace peft {

struct LoraConfig {
  enum class Init { Default, Gaussian, Zeros, Pissa };
  static constexpr std::string_view peft_type = "LORA";

  int r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  double lora_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  TargetRules targets;
  std::map<std::string, int> rank_pattern;
  std::map<std::string, double> alpha_pattern;
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

  /// The reference's fields (peft 0.21), shared with DoRA (use_dora true).
  template <class C = LoraConfig>
  static auto lora_fields(bool use_dora) {
    return config_fields(
        field("r", &C::r, check::positive), field("lora_alpha", &C::lora_alpha),
        field("use_rslora", &C::use_rslora),
        field("lora_dropout", &C::lora_dropout, check::probability),
        field("rank_pattern", &C::rank_pattern, check::all_positive),
        field("alpha_pattern", &C::alpha_pattern), targets_field<C>(&C::targets),
        choice("init_lora_weights", &C::init, std::pair(true, Init::Default),
               std::pair(false, Init::Zeros), std::pair("gaussian", Init::Gaussian),
               std::pair("pissa", Init::Pissa)),
        fixed("use_dora", use_dora, use_dora ? "a DoRA config" : "load it with the DoRA policy"),
        fixed("bias", "none"), fixed("lora_bias", false), fixed("layer_replication", nullptr),
        fixed("modules_to_save", nullptr), fan_in_fan_out(),
        constants({{"alora_invocation_tokens", nullptr}, {"arrow_config", nullptr},
                   {"corda_config", nullptr}, {"eva_config", nullptr}, {"kasa_config", nullptr},
                   {"lora_ga_config", nullptr}, {"megatron_config", nullptr},
                   {"monteclora_config", nullptr}, {"target_parameters", nullptr},
                   {"trainable_token_indices", nullptr}, {"use_bdlora", nullptr},
                   {"velora_config", nullptr}, {"ensure_weight_tying", false},
                   {"loftq_config", nlohmann::json::object()}, {"megatron_core", "megatron.core"},
                   {"qalora_group_size", 16}, {"use_qalora", false}}));
  }
  static auto fields() { return lora_fields(false); }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
  static LoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    return read_config<LoraConfig>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const { return write_config(*this, model); }
};

struct LoRA {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lora", title = "LoRA";
  using Config = LoraConfig;

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, "LORA", "use_dora"); }
  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t r = c.rank_for(std::string(m.name));
    return {{"lora_A.weight", {r, m.in_features}}, {"lora_B.weight", {m.out_features, r}}};
  }

  template <class T>
  class State {
   public:
    struct Extra {
      T scale = T(1);
    };
    using Sites = SiteTable<T, Extra>;

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }
    const Sites& sites() const { return sites_; }
    const typename Sites::Slot* find(int site) const { return sites_.find(site); }

    void attach(AttachContext<T>& ctx) {
      sites_.template attach<LoRA>(config_, ctx.linears, [&](auto& slot, const nn::Linear<T>& m) {
        const int r = config_.rank_for(m.name);
        slot.extra.scale = static_cast<T>(config_.scaling(r, config_.alpha_for(m.name)));
        // B = 0, so the adapted model starts exactly at the base model.
        if (config_.init == Config::Init::Default) detail::kaiming_uniform(slot[0].value(), ctx.rng);
        if (config_.init == Config::Init::Gaussian)
          detail::normal_fill(slot[0].value(), ctx.rng, 1.0 / r);
      });
      on_base_weights_loaded(ctx.linears);
    }
    /// PiSSA reads W: it runs at attach and again once real base weights are loaded.
    void on_base_weights_loaded(const std::vector<nn::Linear<T>*>& modules) {
      if (config_.init != Config::Init::Pissa) return;
      for (nn::Linear<T>* lin : modules)
        if (auto* s = sites_.active(*lin))
          detail::pissa_initialise(*lin, (*s)[0].value(), (*s)[1].value(), s->extra.scale);
    }

    void adapt(Projection<T>& p) const {
      if (const auto* s = sites_.active(p.module())) p.add_low_rank((*s)[0], (*s)[1], s->extra.scale);
    }
    std::vector<NamedParameter<T>> parameters() const { return sites_.parameters(); }
    bool adapts(const nn::Linear<T>& m) const { return sites_.adapts(m); }

    /// W += s B A (W −= on unmerge); a merged module runs the base product alone.
    void merge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, true, delta_weight); }
    void unmerge(const std::vector<nn::Linear<T>*>& m) { sites_.fold(m, false, delta_weight); }
    /// Merges for good and drops the adapter (parameters() is empty afterwards).
    void unload(const std::vector<nn::Linear<T>*>& m) { sites_.unload(m, delta_weight); }

    static RowMatrix<T> delta_weight(const typename Sites::Slot& s, const nn::Linear<T>&) {
      return s.extra.scale * (s[1].value().matrix() * s[0].value().matrix());
    }

   private:
    Config config_;
    Sites sites_;
  };
};

}  // namespace peft
