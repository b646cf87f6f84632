#pragma once
// Unstructured masks: train k entries of the targeted weights, chosen at random or by weight
// magnitude (the largest |W|), as a sparse diff: W' = W + scatter(δ), δ [k]. Everything else
// stays frozen. The optimizer state and the adapter file hold the k values (and the file the k
// indices), nothing dense. peft_type "SPARSE_MASK" (selection "random" or "magnitude";
// FishMask, fishmask.hpp, writes selection "fisher").
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "peft/methods/selective/common.hpp"

namespace peft {

struct UnstructuredMaskConfig {
  enum class Selection { Random, Magnitude };

  Selection selection = Selection::Random;
  SelectionBudget budget;
  TargetRules targets = detail::all_linear_targets();
  std::uint64_t seed = 0;  ///< random selection's seed (the same seed picks the same entries)

  static UnstructuredMaskConfig from_json(const nlohmann::json& j, const std::string& source) {
    detail::require_peft_type(j, "SPARSE_MASK", source);
    UnstructuredMaskConfig c;
    const std::string selection = detail::json_or<std::string>(j, "selection", "random", source);
    if (selection == "random")
      c.selection = Selection::Random;
    else if (selection == "magnitude")
      c.selection = Selection::Magnitude;
    else
      throw ConfigError(source + ": selection '" + selection +
                        "' unsupported here (random, magnitude; \"fisher\" loads as FishMask)");
    c.budget = SelectionBudget::from_json(j, source);
    if (!detail::json_field(j, "target_modules").is_null())
      c.targets = TargetRules::from_json(j, source);
    c.seed = detail::json_or<std::uint64_t>(j, "seed", 0, source);
    return c;
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("SPARSE_MASK");
    j["selection"] = selection == Selection::Random ? "random" : "magnitude";
    j["seed"] = seed;
    budget.to_json(j);
    targets.to_json(j);
    return j;
  }
};

struct UnstructuredMask {
  using family = family::Selective;
  static constexpr std::string_view name = "unstructured_mask";
  using Config = UnstructuredMaskConfig;

  /// The budget k, from shapes alone.
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return {config.budget.resolve(detail::targeted_weight_count(config.targets, linears),
                                  "unstructured mask"),
            0};
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "SPARSE_MASK" &&
           j.value("selection", std::string("random")) != "fisher";
  }

  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      targets_ = detail::copy_modules(
          detail::targeted_linears(config_.targets, ctx.linears, "unstructured mask"));
      sites_ = ctx.linears.size();
      select();
    }
    /// Magnitude picks from the weights: once real weights are loaded, pick again.
    void on_base_weights_loaded() {
      if (config_.selection == Config::Selection::Magnitude) select();
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return diffs_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      return diffs_.linear(tape, module, x);
    }
    std::vector<NamedParameter<T>> parameters() { return diffs_.parameters(); }
    void merge(std::vector<nn::Linear<T>*>& modules) { diffs_.merge(modules); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { diffs_.unmerge(modules); }
    void write_tensors(io::SafetensorsWriter& w) const { diffs_.write_tensors(w); }
    void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
      diffs_.read_tensors(f, linears);
    }
    std::int64_t trained_entries() const { return diffs_.trained_entries(); }
    const detail::SelectiveDiffs<T>& diffs() const { return diffs_; }

   private:
    void select() {
      std::int64_t total = 0;
      for (const nn::Linear<T>& lin : targets_) total += lin.in_features * lin.out_features;
      const std::int64_t k = config_.budget.resolve(total, "unstructured mask");
      std::vector<std::int64_t> ids;
      if (config_.selection == Config::Selection::Random) {
        std::mt19937_64 rng(config_.seed);
        ids = detail::sample_ids(total, k, rng);
      } else {
        std::vector<double> scores;
        scores.reserve(static_cast<std::size_t>(total));
        for (const nn::Linear<T>& lin : targets_)
          for (std::int64_t o = 0; o < lin.out_features; ++o)
            for (std::int64_t i = 0; i < lin.in_features; ++i)
              scores.push_back(std::abs(double(detail::weight_at(lin, o, i))));
        ids = detail::top_k_ids(scores, k);
      }
      diffs_.reset(sites_);
      detail::assign_entries(diffs_, targets_, ids);
    }

    Config config_;
    std::vector<nn::Linear<T>> targets_;
    std::size_t sites_ = 0;
    detail::SelectiveDiffs<T> diffs_;
  };
};

}  // namespace peft
