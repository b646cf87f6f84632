#pragma once
// LN tuning (Qi et al., 2022, "Parameter-Efficient Tuning on Layer Normalization"): train only
// the norms' scales and (LayerNorm) shifts, every norm of the model including the final one.
// The decoder calls no policy at its norms, so they are trained in place: the model's own norm
// tensors become trainable, their original values are kept, and the adapter file holds the
// trained tensors under their model.safetensors names. The method is always "merged".
// peft_type "LN_TUNING".
#include <string>
#include <vector>

#include "peft/methods/selective/common.hpp"

namespace peft {

struct LnTuningConfig {
  bool scales = true;  ///< the norms' weights (γ)
  bool biases = true;  ///< LayerNorm's shifts (β); RMSNorm has none
  bool include_final_norm = true;

  static LnTuningConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "LN_TUNING", source);
    LnTuningConfig c;
    c.scales = detail::json_or<bool>(j, "scales", true, source);
    c.biases = detail::json_or<bool>(j, "biases", true, source);
    c.include_final_norm = detail::json_or<bool>(j, "include_final_norm", true, source);
    if (!c.scales && !c.biases) throw ConfigError(source + ": neither scales nor biases selected");
    return c;
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("LN_TUNING");
    j["scales"] = scales;
    j["biases"] = biases;
    j["include_final_norm"] = include_final_norm;
    return j;
  }
};

struct LNTuning {
  using family = family::Selective;
  static constexpr std::string_view name = "ln_tuning";
  using Config = LnTuningConfig;

  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    const std::int64_t norms = 2 * model.num_layers + (config.include_final_norm ? 1 : 0);
    std::int64_t n = 0;
    if (config.scales) n += norms * model.hidden_size;
    if (config.biases && detail::norms_have_bias(model)) n += norms * model.hidden_size;
    if (n == 0) throw ConfigError("LN tuning: this model's norms have no shift and scales are off");
    return {n, 0};
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "LN_TUNING";
  }

  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      diffs_.reset(ctx.linears.size());
      const std::vector<NamedParameter<T>> norms = detail::norm_tensors(ctx);
      // The final norm is the last listed (Decoder::base_parameters visits it after the blocks).
      const std::string final_prefix =
          norms.empty() ? "" : norms.back().name.substr(0, norms.back().name.rfind('.'));
      for (const NamedParameter<T>& p : norms) {
        const std::string::size_type dot = p.name.rfind('.');
        const std::string module = p.name.substr(0, dot), field = p.name.substr(dot + 1);
        if (!config_.include_final_norm && module == final_prefix) continue;
        if ((field == "weight" && config_.scales) || (field == "bias" && config_.biases))
          diffs_.train_in_place(p);
      }
      if (diffs_.trained_entries() == 0)
        throw ConfigError("LN tuning: this model's norms have no shift and scales are off");
    }

    std::vector<NamedParameter<T>> parameters() { return diffs_.parameters(); }
    void write_tensors(io::SafetensorsWriter& w) const { diffs_.write_tensors(w); }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      diffs_.read_tensors(f, linears);
    }
    std::int64_t trained_entries() const { return diffs_.trained_entries(); }
    /// The norms back at their original values (the adapter removed).
    void restore_base() {
      for (const detail::InPlaceTensor<T>& t : diffs_.in_place()) {
        Var<T> v = t.var;
        v.value() = t.original;
      }
    }

   private:
    Config config_;
    detail::SelectiveDiffs<T> diffs_;
  };
};

}  // namespace peft
