#pragma once
// Structured masks: train whole rows (output features), columns (input features), attention
// heads, or whole layers of the targeted weights, as a dense block per module over the chosen
// lines: W'[L, :] = W[L, :] + D (rows) or W'[:, L] = W[:, L] + D (columns). Only the selected
// rows of dW are computed (ops::delta_linear: dD = g[:, L]ᵀ x), never the full dW.
//   rows / columns: `count` lines per targeted module (or the listed indices), by rule.
//   heads: `count` heads per layer (or the listed heads): their query, key and value rows and
//     their columns of the output projection. With grouped-query attention the unit is a kv
//     group: the query heads sharing one key/value head, with that key/value head.
//   layers: `count` whole layers (or the listed ones): every targeted projection in them.
//     Rule "last" with count k is "train only the last k layers".
// Rules: first, last, listed (`indices`), random (`seed`), score (the L2 norm of the unit's
// weights, largest first). peft_type "STRUCTURED_MASK".
#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "peft/methods/selective/common.hpp"

namespace peft {

struct StructuredMaskConfig : TabledConfigIo<StructuredMaskConfig> {
  enum class Unit { Rows, Columns, Heads, Layers };
  enum class Rule { First, Last, Listed, Random, Score };
  static constexpr std::string_view peft_type = "STRUCTURED_MASK";

  Unit unit = Unit::Rows;
  Rule rule = Rule::Score;
  std::int64_t count = 1;  ///< units per module (rows, columns), per layer (heads), or layers
  std::vector<std::int64_t> indices;  ///< the units, for rule Listed
  TargetRules targets = detail::all_linear_targets();
  std::uint64_t seed = 0;

  std::int64_t units() const { return rule == Rule::Listed ? std::int64_t(indices.size()) : count; }

  static auto fields() {
    using C = StructuredMaskConfig;
    return config_fields(
        choice("unit", &C::unit, std::pair("rows", Unit::Rows), std::pair("columns", Unit::Columns),
               std::pair("heads", Unit::Heads), std::pair("layers", Unit::Layers)),
        choice("rule", &C::rule, std::pair("first", Rule::First), std::pair("last", Rule::Last),
               std::pair("listed", Rule::Listed), std::pair("random", Rule::Random),
               std::pair("score", Rule::Score)),
        field("count", &C::count, check::dimension_or_zero),
        field("indices", &C::indices, check::all_non_negative), field("seed", &C::seed),
        default_targets_field(&C::targets));
  }
  void validate(const std::string& source) const {
    if (units() <= 0)
      throw ConfigError(source + ": field '" + (rule == Rule::Listed ? "indices" : "count") +
                        "': no units selected");
  }
};

namespace detail {

/// What an attention projection is, from its module path (GPT-2 or LLaMA names).
enum class AttentionRole { None, FusedQkv, Query, Key, Value, Output };
inline AttentionRole attention_role(const std::string& path) {
  auto ends = [&](const std::string& s) {
    return path.size() >= s.size() && path.compare(path.size() - s.size(), s.size(), s) == 0;
  };
  if (ends("attn.c_attn")) return AttentionRole::FusedQkv;
  if (ends("attn.c_proj") || ends("self_attn.o_proj")) return AttentionRole::Output;
  if (ends("self_attn.q_proj")) return AttentionRole::Query;
  if (ends("self_attn.k_proj")) return AttentionRole::Key;
  if (ends("self_attn.v_proj")) return AttentionRole::Value;
  return AttentionRole::None;
}

/// The lines of one kv group g of a projection (rows of q/k/v, columns of the output).
inline std::vector<std::int32_t> head_group_lines(AttentionRole role, const ModelConfig& c,
                                                  std::int64_t g) {
  const std::int64_t hd = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const std::int64_t qd = c.num_heads * hd, kv = c.num_kv_heads * hd;
  std::vector<std::int32_t> out;
  auto range = [&](std::int64_t begin, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) out.push_back(static_cast<std::int32_t>(begin + i));
  };
  switch (role) {
    case AttentionRole::Query:
    case AttentionRole::Output:
      range(g * group * hd, group * hd);
      break;
    case AttentionRole::Key:
    case AttentionRole::Value:
      range(g * hd, hd);
      break;
    case AttentionRole::FusedQkv:
      range(g * group * hd, group * hd);
      range(qd + g * hd, hd);
      range(qd + kv + g * hd, hd);
      break;
    case AttentionRole::None:
      break;
  }
  return out;
}

/// The chosen units of `n` by the config's rule; `score(u)` for rule Score. Ascending.
template <class Score>
std::vector<std::int64_t> choose_units(const StructuredMaskConfig& c, std::int64_t n,
                                       const std::string& what, std::mt19937_64& rng, Score score) {
  const std::int64_t k = c.units();
  if (k > n)
    throw ConfigError("structured mask: " + std::to_string(k) + " " + what + " asked for, " +
                      std::to_string(n) + " available");
  using Rule = StructuredMaskConfig::Rule;
  std::vector<std::int64_t> out;
  switch (c.rule) {
    case Rule::First:
      for (std::int64_t u = 0; u < k; ++u) out.push_back(u);
      break;
    case Rule::Last:
      for (std::int64_t u = n - k; u < n; ++u) out.push_back(u);
      break;
    case Rule::Listed: {
      const std::set<std::int64_t> unique(c.indices.begin(), c.indices.end());
      if (unique.size() != c.indices.size())
        throw ConfigError("structured mask: indices repeat a " + what.substr(0, what.size() - 1));
      for (std::int64_t u : unique)
        if (u < 0 || u >= n)
          throw ConfigError("structured mask: index " + std::to_string(u) + " outside the " +
                            std::to_string(n) + " " + what);
      out.assign(unique.begin(), unique.end());
      break;
    }
    case Rule::Random:
      out = sample_ids(n, k, rng);
      break;
    case Rule::Score: {
      std::vector<double> scores(static_cast<std::size_t>(n));
      for (std::int64_t u = 0; u < n; ++u) scores[static_cast<std::size_t>(u)] = score(u);
      out = top_k_ids(scores, k);
      break;
    }
  }
  return out;
}

template <class T>
double line_norm(const nn::Linear<T>& lin, ops::LineAxis axis, std::int64_t line) {
  double s = 0;
  const std::int64_t n = axis == ops::LineAxis::Rows ? lin.in_features : lin.out_features;
  for (std::int64_t j = 0; j < n; ++j) {
    const double w = axis == ops::LineAxis::Rows ? double(weight_at(lin, line, j))
                                                 : double(weight_at(lin, j, line));
    s += w * w;
  }
  return s;
}

}  // namespace detail

struct StructuredMask {
  using family = family::Selective;
  static constexpr std::string_view name = "structured_mask", title = "structured mask";
  static constexpr std::string_view paper =
      "Lagunas et al., 2021, Block Pruning For Faster Transformers (structured rows and columns)";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
  using Config = StructuredMaskConfig;

  static ParameterCount count_parameters(const ModelConfig& model,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    using Unit = Config::Unit;
    ParameterCount count;
    const std::int64_t k = config.units();
    const std::int64_t groups = model.num_kv_heads;
    std::set<int> layers_seen;
    for (const LinearShape& l : linears) {
      if (!method_selects<StructuredMask>(config, ModuleSite::of(l))) continue;
      switch (config.unit) {
        case Unit::Rows:
          count.trainable += k * l.in_features;
          break;
        case Unit::Columns:
          count.trainable += k * l.out_features;
          break;
        case Unit::Heads: {
          const auto role = detail::attention_role(l.name);
          if (role == detail::AttentionRole::None) break;
          const std::int64_t lines =
              static_cast<std::int64_t>(detail::head_group_lines(role, model, 0).size());
          if (k > groups) throw ConfigError("structured mask: more heads than kv groups");
          count.trainable +=
              k * lines * (role == detail::AttentionRole::Output ? l.out_features : l.in_features);
          break;
        }
        case Unit::Layers:
          layers_seen.insert(l.layer);
          break;
      }
    }
    if (config.unit == Unit::Layers) {
      // Every layer has the same projections: k layers of the first layer's targeted size.
      std::int64_t per_layer = 0;
      const int first = layers_seen.empty() ? -1 : *layers_seen.begin();
      for (const LinearShape& l : linears)
        if (l.layer == first && method_selects<StructuredMask>(config, ModuleSite::of(l)))
          per_layer += l.in_features * l.out_features;
      count.trainable = k * per_layer;
    }
    return count;
  }

  static bool accepts(const nlohmann::json& j) { return is_peft_type(j, Config::peft_type); }

  template <class T>
  class State : public detail::ProjectionDiffState<StructuredMask, T> {
    using Base = detail::ProjectionDiffState<StructuredMask, T>;
    using Base::config_, Base::diffs_, Base::sites_, Base::targets_;

   public:
    using Base::Base;

    void attach(AttachContext<T>& ctx) {
      this->select_modules(ctx.linears);
      model_ = ctx.config;
      select();
    }
    /// Scores read the weights: once real weights are loaded, choose again.
    void on_base_weights_loaded(const std::vector<nn::Linear<T>*>& modules) {
      if (config_.rule != Config::Rule::Score) return;
      this->select_modules(modules);
      select();
    }

   private:
    void select() {
      using Unit = Config::Unit;
      diffs_.reset(sites_);
      std::mt19937_64 rng(config_.seed);
      auto to32 = [](const std::vector<std::int64_t>& v) {
        return std::vector<std::int32_t>(v.begin(), v.end());
      };
      switch (config_.unit) {
        case Unit::Rows:
        case Unit::Columns: {
          const ops::LineAxis axis =
              config_.unit == Unit::Rows ? ops::LineAxis::Rows : ops::LineAxis::Columns;
          for (const nn::Linear<T>& lin : targets_) {
            const std::int64_t n = axis == ops::LineAxis::Rows ? lin.out_features : lin.in_features;
            const auto lines = detail::choose_units(
                config_, n, axis == ops::LineAxis::Rows ? "rows" : "columns", rng,
                [&](std::int64_t u) { return detail::line_norm(lin, axis, u); });
            diffs_.set_lines(lin, axis, to32(lines));
          }
          break;
        }
        case Unit::Heads:
          select_heads(rng);
          break;
        case Unit::Layers: {
          const std::int64_t layers = model_.num_layers;
          const auto chosen =
              detail::choose_units(config_, layers, "layers", rng, [&](std::int64_t u) {
                double s = 0;
                for (const nn::Linear<T>& lin : targets_)
                  if (lin.layer == u)
                    s += lin.dense_weight("structured pruning")
                             .value()
                             .vector()
                             .template cast<double>()
                             .squaredNorm();
                return s;
              });
          for (const nn::Linear<T>& lin : targets_) {
            if (!std::binary_search(chosen.begin(), chosen.end(), std::int64_t(lin.layer)))
              continue;
            std::vector<std::int32_t> all(static_cast<std::size_t>(lin.out_features));
            std::iota(all.begin(), all.end(), 0);
            diffs_.set_lines(lin, ops::LineAxis::Rows, std::move(all));
          }
          break;
        }
      }
      if (diffs_.modules() == 0)
        throw ConfigError(
            "structured mask: no targeted module holds a selected unit (heads need "
            "attention projections among target_modules)");
    }

    void select_heads(std::mt19937_64& rng) {
      const std::int64_t groups = model_.num_kv_heads;
      for (std::int64_t layer = 0; layer < model_.num_layers; ++layer) {
        std::vector<const nn::Linear<T>*> attention;
        for (const nn::Linear<T>& lin : targets_)
          if (lin.layer == layer && detail::attention_role(lin.name) != detail::AttentionRole::None)
            attention.push_back(&lin);
        if (attention.empty()) continue;
        auto lines_of = [&](const nn::Linear<T>& lin, std::int64_t g) {
          return detail::head_group_lines(detail::attention_role(lin.name), model_, g);
        };
        auto axis_of = [](const nn::Linear<T>& lin) {
          return detail::attention_role(lin.name) == detail::AttentionRole::Output
                     ? ops::LineAxis::Columns
                     : ops::LineAxis::Rows;
        };
        const auto chosen =
            detail::choose_units(config_, groups, "heads", rng, [&](std::int64_t g) {
              double s = 0;
              for (const nn::Linear<T>* lin : attention)
                for (std::int32_t l : lines_of(*lin, g))
                  s += detail::line_norm(*lin, axis_of(*lin), l);
              return s;
            });
        for (const nn::Linear<T>* lin : attention) {
          std::vector<std::int32_t> lines;
          for (std::int64_t g : chosen)
            for (std::int32_t l : lines_of(*lin, g)) lines.push_back(l);
          std::sort(lines.begin(), lines.end());
          diffs_.set_lines(*lin, axis_of(*lin), std::move(lines));
        }
      }
    }

    ModelConfig model_;
  };
};

}  // namespace peft
