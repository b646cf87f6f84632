#pragma once
// FishMask (Sung et al., 2021, "Training Neural Networks with Fixed Sparse Masks"): train the k
// entries of the targeted weights with the largest empirical Fisher information
//   F_i = (1 / N) Σ_batches (∂L/∂θ_i)²,
// the squared gradient of the training loss accumulated over N batches, as a sparse diff
// (W' = W + scatter(δ), δ [k]). Selection needs data, so it is a step of its own:
//   Decoder<Arch, FishMask> model(config, fishmask_config);
//   model.adapter().calibrate(model, batches);   // N backward passes, then the top k
//   AdamW<float> optimizer(model.trainable_parameters(), options);   // k values only
// Until calibrated (or loaded) the model is the base model and nothing trains. Saved as
// peft_type "SPARSE_MASK" with selection "fisher".
#include <string>
#include <vector>

#include "peft/methods/selective/common.hpp"

namespace peft {

struct FishMaskConfig : TabledConfigIo<FishMaskConfig> {
  static constexpr std::string_view peft_type = "SPARSE_MASK";
  SelectionBudget budget;
  TargetRules targets = detail::all_linear_targets();

  static auto fields() {
    using C = FishMaskConfig;
    return config_fields(required("selection", "fisher"), budget_fields(&C::budget),
                         default_targets_field(&C::targets));
  }
};

struct FishMask {
  using family = family::Selective;
  static constexpr std::string_view name = "fishmask", title = "FishMask";
  static constexpr std::string_view paper =
      "Sung et al., 2021, Training Neural Networks with Fixed Sparse Masks";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = FishMaskConfig;

  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return {detail::selected_budget<FishMask>(config, linears), 0};
  }
  static bool accepts(const nlohmann::json& j) {
    return is_peft_type(j, Config::peft_type) && detail::string_or(j, "selection", "") == "fisher";
  }

  template <class T>
  class State : public detail::ProjectionDiffState<FishMask, T> {
    using Base = detail::ProjectionDiffState<FishMask, T>;
    using Base::config_, Base::diffs_, Base::sites_, Base::targets_, Base::total_;

   public:
    using Base::Base;

    void attach(AttachContext<T>& ctx) {
      this->select_modules(ctx.linears);
      diffs_.reset(sites_);
      budget_ = config_.budget.resolve(total_, title);
    }

    /// Runs forward and backward on each batch with the targeted weights temporarily trainable,
    /// accumulates the squared gradients, and trains the top `budget` entries from then on
    /// (values from 0: any earlier selection and its values are dropped). The weights are
    /// frozen again afterwards, and their gradient buffers released. Returns F for inspection
    /// (the targets' [out, in] entries concatenated, averaged over the batches).
    template <class Model, class Batches>
    std::vector<double> calibrate(Model& model, const Batches& batches) {
      if (std::size(batches) == 0)
        throw ConfigError("FishMask: calibrate needs at least one batch");
      diffs_.reset(sites_);  // the base model: the gradients are the base weights' own
      std::vector<double> fisher(static_cast<std::size_t>(total_), 0.0);
      for (nn::Linear<T>& lin : targets_) (void)lin.dense_weight("FishMask's calibration");
      for (nn::Linear<T>& lin : targets_) lin.weight.set_requires_grad(true);
      try {
        for (const auto& batch : batches) {
          Tape<T> tape;
          auto result = model.forward(tape, batch);
          tape.backward(result.loss);
          std::size_t offset = 0;
          for (nn::Linear<T>& lin : targets_) {
            for (std::int64_t o = 0; o < lin.out_features; ++o)
              for (std::int64_t i = 0; i < lin.in_features; ++i) {
                const std::int64_t s = lin.layout == ops::WeightLayout::OutIn
                                           ? o * lin.in_features + i
                                           : i * lin.out_features + o;
                const double g = double(lin.weight.grad()[s]);
                fisher[offset++] += g * g;
              }
            lin.weight.zero_grad();
          }
        }
      } catch (...) {
        for (nn::Linear<T>& lin : targets_) lin.weight.set_requires_grad(false);
        throw;
      }
      for (nn::Linear<T>& lin : targets_) lin.weight.set_requires_grad(false);
      for (double& f : fisher) f /= double(std::size(batches));
      detail::assign_entries(diffs_, targets_, detail::top_k_ids(fisher, budget_));
      calibrated_ = true;
      return fisher;
    }
    bool calibrated() const { return calibrated_; }
    std::int64_t budget() const { return budget_; }

    void write_tensors(io::SafetensorsWriter& w) const {
      if (!calibrated_) throw ConfigError("FishMask: nothing to save before calibrate() or a load");
      Base::write_tensors(w);
    }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      Base::read_tensors(f, linears);
      calibrated_ = true;
    }

   private:
    std::int64_t budget_ = 0;
    bool calibrated_ = false;
  };
};

}  // namespace peft
