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

struct UnstructuredMaskConfig : TabledConfigIo<UnstructuredMaskConfig> {
  enum class Selection { Random, Magnitude };
  static constexpr std::string_view peft_type = "SPARSE_MASK";

  Selection selection = Selection::Random;
  SelectionBudget budget;
  TargetRules targets = detail::all_linear_targets();
  std::uint64_t seed = 0;  ///< random selection's seed (the same seed picks the same entries)

  /// selection "fisher" is FishMask's (fishmask.hpp).
  static auto fields() {
    using C = UnstructuredMaskConfig;
    return config_fields(choice("selection", &C::selection, std::pair("random", Selection::Random),
                                std::pair("magnitude", Selection::Magnitude)),
                         field("seed", &C::seed), budget_fields(&C::budget),
                         default_targets_field(&C::targets));
  }
};

struct UnstructuredMask {
  using family = family::Selective;
  static constexpr std::string_view name = "unstructured_mask", title = "unstructured mask";
  static constexpr std::string_view paper =
      "Xu et al., 2021, Raise a Child in Large Language Model (random and magnitude masks)";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = UnstructuredMaskConfig;

  /// The budget k, from shapes alone.
  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    return {detail::selected_budget<UnstructuredMask>(config, linears), 0};
  }
  static bool accepts(const nlohmann::json& j) {
    return is_peft_type(j, Config::peft_type) &&
           detail::string_or(j, "selection", "random") != "fisher";
  }

  template <class T>
  class State : public detail::ProjectionDiffState<UnstructuredMask, T> {
    using Base = detail::ProjectionDiffState<UnstructuredMask, T>;
    using Base::config_, Base::diffs_, Base::sites_, Base::targets_;

   public:
    using Base::Base;

    void attach(AttachContext<T>& ctx) {
      this->select_modules(ctx.linears);
      select();
    }
    /// Magnitude picks from the weights: once real weights are loaded, pick again.
    void on_base_weights_loaded(const std::vector<nn::Linear<T>*>& modules) {
      if (config_.selection != Config::Selection::Magnitude) return;
      this->select_modules(modules);
      select();
    }

   private:
    void select() {
      const std::int64_t total = this->total_;
      const std::int64_t k = config_.budget.resolve(total, UnstructuredMask::title);
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
  };
};

}  // namespace peft
