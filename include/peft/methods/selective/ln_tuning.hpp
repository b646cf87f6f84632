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

struct LnTuningConfig : TabledConfigIo<LnTuningConfig> {
  static constexpr std::string_view peft_type = "LN_TUNING";
  bool scales = true;  ///< the norms' weights (γ)
  bool biases = true;  ///< LayerNorm's shifts (β); RMSNorm has none
  bool include_final_norm = true;

  static auto fields() {
    using C = LnTuningConfig;
    return config_fields(field("scales", &C::scales), field("biases", &C::biases),
                         field("include_final_norm", &C::include_final_norm));
  }
  void validate(const std::string& source) const {
    if (!scales && !biases)
      throw ConfigError(source + ": fields 'scales' and 'biases': neither selected");
  }
};

struct LNTuning {
  using family = family::Selective;
  static constexpr std::string_view name = "ln_tuning", title = "LN tuning";
  static constexpr std::string_view paper =
      "Zhao et al., 2024, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM "
      "Finetuning";
  static constexpr std::string_view reference = "LN_TUNING";  ///< peft_type in HF peft
  using Config = LnTuningConfig;

  static ParameterCount count_parameters(const ModelConfig& model, const std::vector<LinearShape>&,
                                         const Config& config) {
    const std::int64_t norms = 2 * model.num_layers + (config.include_final_norm ? 1 : 0);
    std::int64_t n = 0;
    if (config.scales) n += norms * model.hidden_size;
    if (config.biases && detail::norms_have_bias(model)) n += norms * model.hidden_size;
    if (n == 0) throw_nothing();
    return {n, 0};
  }
  [[noreturn]] static void throw_nothing() {
    throw ConfigError("LN tuning: this model's norms have no shift and scales are off");
  }
  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, Config::peft_type); }

  /// The norms are trained in place: no projection hook, nothing to merge.
  template <class T>
  class State : public detail::SelectiveState<LNTuning, T> {
   public:
    using detail::SelectiveState<LNTuning, T>::SelectiveState;

    void attach(AttachContext<T>& ctx) {
      this->diffs_.reset(ctx.linears.size());
      const std::vector<NamedParameter<T>> norms = detail::norm_tensors(ctx);
      // The final norm is the last listed (Decoder::base_parameters visits it after the blocks).
      const std::string final_prefix =
          norms.empty() ? "" : norms.back().name.substr(0, norms.back().name.rfind('.'));
      const Config& c = this->config_;
      for (const NamedParameter<T>& p : norms) {
        const std::string::size_type dot = p.name.rfind('.');
        const std::string module = p.name.substr(0, dot), field = p.name.substr(dot + 1);
        if (!c.include_final_norm && module == final_prefix) continue;
        if ((field == "weight" && c.scales) || (field == "bias" && c.biases))
          this->diffs_.train_in_place(p);
      }
      if (this->diffs_.trained_entries() == 0) throw_nothing();
    }

    /// The norms back at their original values (the adapter removed).
    void restore_base() {
      for (const detail::InPlaceTensor<T>& t : this->diffs_.in_place()) {
        Var<T> v = t.var;
        v.value() = t.original;
      }
    }
  };
};

}  // namespace peft
