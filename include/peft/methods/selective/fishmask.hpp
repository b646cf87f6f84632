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

struct FishMaskConfig {
  SelectionBudget budget;
  TargetRules targets = detail::all_linear_targets();

  static FishMaskConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "SPARSE_MASK", source);
    const std::string selection = detail::json_or<std::string>(j, "selection", "", source);
    if (selection != "fisher")
      throw ConfigError(source + ": selection '" + selection + "', expected 'fisher' for FishMask");
    FishMaskConfig c;
    c.budget = SelectionBudget::from_json(j, source);
    if (!detail::json_field(j, "target_modules").is_null())
      c.targets = TargetRules::from_json(j, source);
    return c;
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("SPARSE_MASK");
    j["selection"] = "fisher";
    budget.to_json(j);
    targets.to_json(j);
    return j;
  }
};

struct FishMask {
  using family = family::Selective;
  static constexpr std::string_view name = "fishmask";
  using Config = FishMaskConfig;

  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return {
        config.budget.resolve(detail::targeted_weight_count(config.targets, linears), "FishMask"),
        0};
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "SPARSE_MASK" &&
           j.value("selection", std::string()) == "fisher";
  }

  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      targets_ =
          detail::copy_modules(detail::targeted_linears(config_.targets, ctx.linears, "FishMask"));
      sites_ = ctx.linears.size();
      diffs_.reset(sites_);
      total_ = 0;
      for (const nn::Linear<T>& lin : targets_) total_ += lin.in_features * lin.out_features;
      budget_ = config_.budget.resolve(total_, "FishMask");
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

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return diffs_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      return diffs_.linear(tape, module, x);
    }
    std::vector<NamedParameter<T>> parameters() { return diffs_.parameters(); }
    void merge(std::vector<nn::Linear<T>*>& modules) { diffs_.merge(modules); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { diffs_.unmerge(modules); }
    void write_tensors(io::SafetensorsWriter& w) const {
      if (!calibrated_) throw ConfigError("FishMask: nothing to save before calibrate() or a load");
      diffs_.write_tensors(w);
    }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      diffs_.read_tensors(f, linears);
      calibrated_ = true;
    }
    std::int64_t trained_entries() const { return diffs_.trained_entries(); }
    const detail::SelectiveDiffs<T>& diffs() const { return diffs_; }

   private:
    Config config_;
    std::vector<nn::Linear<T>> targets_;
    std::size_t sites_ = 0;
    std::int64_t total_ = 0, budget_ = 0;
    bool calibrated_ = false;
    detail::SelectiveDiffs<T> diffs_;
  };
};

}  // namespace peft
