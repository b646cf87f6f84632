#pragma once
// Weighted merging of LoRA adapters into a new LoRA adapter: the reference's
// LoraModel.add_weighted_adapter (peft 0.21), its eleven combination types and their exact
// semantics, on adapter folders. No base model is needed: a LoRA adapter's tensors carry every
// shape, and the merge never reads W.
//
//   linear, ties, dare_linear, dare_ties, magnitude_prune   combine the factors: A' = f(A_i)
//       with weights sign(w_i s_i) √|w_i s_i|, B' = f(B_i) with weights √|w_i s_i| (the sign on A
//       only, so that a negative weight negates); every adapter's rank must be the same.
//   cat        A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1, B_2, ...]: rank Σ r_i, exact.
//   svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
//       ΔW = f(s_i B_i A_i) with weights w_i, then the top-`svd_rank` singular triplets:
//       B' = U_k S_k, A' = V_kᵀ (optionally clamped at the `svd_clamp` quantile of their entries).
// f is the weighted sum, or first a pruning (magnitude: TIES, magnitude_prune; random: DARE)
// and, for the *ties* types, TIES's sign election and disjoint mean.
//
// The merged config is the first adapter's with r = lora_alpha = the new rank and the union of
// the target modules, as the reference writes it. docs/methods/weighted-merge.md;
// tests/test_weighted_merge.cpp; `peft merge` (cli/merge.cpp); reference cases
// tests/data/weighted_merge (scripts/make_merge_cases.py).
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/tensor.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/printable.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/reparameterized/lora_config.hpp"

namespace peft::merge {

using Matrix = RowMatrix<double>;

/// The reference's combination_type values.
enum class Combination {
  Linear,
  Cat,
  Svd,
  Ties,
  TiesSvd,
  DareLinear,
  DareTies,
  DareLinearSvd,
  DareTiesSvd,
  MagnitudePrune,
  MagnitudePruneSvd
};

/// How TIES elects a sign per element: the sign of the sum of the (pruned) values, or of the
/// sum of their signs.
enum class MajoritySign { Total, Frequency };

inline constexpr std::pair<Combination, std::string_view> kCombinationNames[] = {
    {Combination::Linear, "linear"},
    {Combination::Cat, "cat"},
    {Combination::Svd, "svd"},
    {Combination::Ties, "ties"},
    {Combination::TiesSvd, "ties_svd"},
    {Combination::DareLinear, "dare_linear"},
    {Combination::DareTies, "dare_ties"},
    {Combination::DareLinearSvd, "dare_linear_svd"},
    {Combination::DareTiesSvd, "dare_ties_svd"},
    {Combination::MagnitudePrune, "magnitude_prune"},
    {Combination::MagnitudePruneSvd, "magnitude_prune_svd"}};

inline std::string_view combination_name(Combination c) {
  for (const auto& [value, name] : kCombinationNames)
    if (value == c) return name;
  return "?";
}

/// "ties" -> Combination::Ties; anything else is a ConfigError listing the valid names.
inline Combination parse_combination(std::string_view text) {
  std::string valid;
  for (const auto& [value, name] : kCombinationNames) {
    if (name == text) return value;
    valid += (valid.empty() ? "" : ", ") + std::string(name);
  }
  throw ConfigError("combination type: expected one of " + valid + ", found '" +
                    io::printable(std::string(text)) + "'");
}

inline MajoritySign parse_majority_sign(std::string_view text) {
  if (text == "total") return MajoritySign::Total;
  if (text == "frequency") return MajoritySign::Frequency;
  throw ConfigError("majority sign method: expected 'total' or 'frequency', found '" +
                    io::printable(std::string(text)) + "'");
}

/// Combinations that take the top singular triplets of the merged ΔW.
inline bool is_svd(Combination c) {
  return c == Combination::Svd || c == Combination::TiesSvd || c == Combination::DareLinearSvd ||
         c == Combination::DareTiesSvd || c == Combination::MagnitudePruneSvd;
}
/// Combinations that prune: they need a density.
inline bool uses_density(Combination c) {
  return c != Combination::Linear && c != Combination::Cat && c != Combination::Svd;
}
inline bool elects_sign(Combination c) {
  return c == Combination::Ties || c == Combination::TiesSvd || c == Combination::DareTies ||
         c == Combination::DareTiesSvd;
}
inline bool drops_at_random(Combination c) {
  return c == Combination::DareLinear || c == Combination::DareTies ||
         c == Combination::DareLinearSvd || c == Combination::DareTiesSvd;
}

// ---------------------------------------------------------------------------------------------
// The task-vector primitives (the reference's peft/utils/merge_utils.py), on a stack of
// same-shaped matrices, one per adapter.

/// Keeps the k = ⌊density · numel⌋ entries of largest magnitude, zeroes the rest; density ≥ 1
/// keeps everything. Equal magnitudes at the cut are kept in index order (torch.topk leaves that
/// choice to its implementation).
inline Matrix magnitude_pruned(const Matrix& t, double density) {
  if (density >= 1) return t;
  const auto n = static_cast<std::size_t>(t.size());
  const auto k = static_cast<std::size_t>(density * static_cast<double>(n));
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return std::abs(t.data()[a]) > std::abs(t.data()[b]);
  });
  Matrix out = Matrix::Zero(t.rows(), t.cols());
  for (std::size_t i = 0; i < k; ++i) out.data()[order[i]] = t.data()[order[i]];
  return out;
}

/// DARE's drop: t ⊙ keep / density (keep holds 0 or 1); density ≥ 1 keeps t unchanged. At
/// density 0 every entry is dropped and the result is zero (the reference divides 0 by 0 there
/// and writes NaN).
inline Matrix randomly_pruned(const Matrix& t, const Matrix& keep, double density) {
  if (density >= 1) return t;
  if (density <= 0) return Matrix::Zero(t.rows(), t.cols());
  return t.cwiseProduct(keep) / density;
}

/// Σ_i w_i t_i.
inline Matrix task_arithmetic(const std::vector<Matrix>& stack, const std::vector<double>& w) {
  Matrix out = Matrix::Zero(stack.front().rows(), stack.front().cols());
  for (std::size_t i = 0; i < stack.size(); ++i) out += w[i] * stack[i];
  return out;
}

/// Per element, whether adapter i's value has the elected sign: the sign of Σ_i t_i (Total) or
/// of Σ_i sign(t_i) (Frequency), + where that sum is 0. A zero value never has it.
inline std::vector<Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
majority_sign_mask(const std::vector<Matrix>& stack, MajoritySign method) {
  Matrix magnitude = Matrix::Zero(stack.front().rows(), stack.front().cols());
  for (const Matrix& t : stack)
    magnitude += method == MajoritySign::Total ? t : Matrix(t.array().sign().matrix());
  const Matrix elected = (magnitude.array() >= 0)
                             .select(Matrix::Ones(magnitude.rows(), magnitude.cols()),
                                     -Matrix::Ones(magnitude.rows(), magnitude.cols()));
  std::vector<Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> masks;
  for (const Matrix& t : stack) masks.push_back(t.array().sign() == elected.array());
  return masks;
}

/// TIES's disjoint mean: per element, the mean of the weighted values whose unweighted value
/// has the elected sign (0 where none has).
inline Matrix disjoint_merge(const std::vector<Matrix>& pruned, const std::vector<double>& w,
                             MajoritySign method) {
  const auto masks = majority_sign_mask(pruned, method);
  Matrix sum = Matrix::Zero(pruned.front().rows(), pruned.front().cols());
  Matrix count = Matrix::Zero(sum.rows(), sum.cols());
  for (std::size_t i = 0; i < pruned.size(); ++i) {
    sum += (masks[i].array()).select(w[i] * pruned[i], Matrix::Zero(sum.rows(), sum.cols()));
    count += masks[i].cast<double>();
  }
  return sum.cwiseQuotient(count.cwiseMax(1.0));
}

// ---------------------------------------------------------------------------------------------
// Adapters and options

/// One LoRA module of an adapter: A [r, in], B [out, r], s = α / r (or α / √r).
struct LoraFactors {
  Matrix A, B;
  double scaling = 1;
};

/// A LoRA adapter as read from its folder: the config as written, and the factors of every
/// adapted module by path ("transformer.h.0.attn.c_attn").
struct LoraAdapter {
  std::string source;  ///< the folder, shown in errors
  nlohmann::json config;
  std::map<std::string, LoraFactors> modules;
  /// The rank the reference allocates for it: r, or the largest of r and rank_pattern's values.
  int r = 0;
};

/// Which DARE entries survive: asked once per (module, factor or "delta", adapter), in the
/// order modules sort; within a module, lora_A's for every adapter in the order given, then
/// lora_B's (or one "delta" per adapter). Returns a matrix of
/// the asked shape holding 1 (keep) or 0 (drop).
struct KeepMaskRequest {
  std::string_view module;
  std::string_view tensor;  ///< "lora_A", "lora_B" or "delta" (the *_svd combinations)
  std::size_t adapter;
  std::int64_t rows, cols;
  double density;
};
using KeepMask = std::function<Matrix(const KeepMaskRequest&)>;

struct WeightedMergeOptions {
  Combination combination = Combination::Svd;  ///< the reference's default
  std::optional<int> svd_rank;                 ///< *_svd: default the largest input rank
  std::optional<double> svd_clamp;             ///< *_svd: clamp at ±this quantile of entries
  std::optional<double> density;               ///< pruning combinations: kept fraction
  MajoritySign majority_sign = MajoritySign::Total;
  std::uint64_t seed = 0;  ///< DARE's Bernoulli(density) draws when keep_mask is empty
  KeepMask keep_mask;      ///< DARE's masks given (tests); empty: drawn from `seed`
};

namespace detail {

inline std::string shape_text(const Matrix& m) {
  std::string text = "[";  // appended: GCC 12 warns falsely about `"[" + std::string` at -O3
  text += std::to_string(m.rows());
  text += ", ";
  text += std::to_string(m.cols());
  return text + "]";
}

inline constexpr std::string_view kKeyPrefix = "base_model.model.";

/// The keep masks of a seeded Bernoulli(density) draw, one uniform per entry in row-major order.
inline KeepMask bernoulli_masks(std::uint64_t seed) {
  auto rng = std::make_shared<std::mt19937_64>(seed);
  return [rng](const KeepMaskRequest& q) {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    Matrix keep(q.rows, q.cols);
    for (std::int64_t i = 0; i < keep.size(); ++i) keep.data()[i] = u(*rng) < q.density ? 1 : 0;
    return keep;
  };
}

/// f(stack) for the combination's pruning and election, with weights `w`.
inline Matrix combine(Combination c, const std::vector<Matrix>& stack, const std::vector<double>& w,
                      const WeightedMergeOptions& o, std::string_view module,
                      std::string_view tensor, const KeepMask& keep) {
  const double density = o.density.value_or(1.0);
  std::vector<Matrix> pruned;
  pruned.reserve(stack.size());
  for (std::size_t i = 0; i < stack.size(); ++i) {
    if (!uses_density(c)) {
      pruned.push_back(stack[i]);
    } else if (drops_at_random(c)) {
      // The mask is asked for whatever the density, so that the draws do not depend on it.
      const Matrix mask =
          keep(KeepMaskRequest{module, tensor, i, stack[i].rows(), stack[i].cols(), density});
      if (mask.rows() != stack[i].rows() || mask.cols() != stack[i].cols())
        throw ShapeError("weighted merge: keep mask for " + std::string(module) + " " +
                         std::string(tensor) + " of adapter " + std::to_string(i) + ": expected " +
                         shape_text(stack[i]) + ", found " + shape_text(mask));
      pruned.push_back(randomly_pruned(stack[i], mask, density));
    } else {
      pruned.push_back(magnitude_pruned(stack[i], density));
    }
  }
  return elects_sign(c) ? disjoint_merge(pruned, w, o.majority_sign) : task_arithmetic(pruned, w);
}

/// torch.quantile(x, q) (linear interpolation between the sorted values).
inline double quantile(std::vector<double> x, double q) {
  std::sort(x.begin(), x.end());
  const double position = q * static_cast<double>(x.size() - 1);
  const auto below = static_cast<std::size_t>(std::floor(position));
  const std::size_t above = std::min(below + 1, x.size() - 1);
  return x[below] + (position - static_cast<double>(below)) * (x[above] - x[below]);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Reading and writing adapter folders

/// Reads a LoRA adapter folder (adapter_config.json + adapter_model.safetensors) strictly: the
/// config must be a LoRA one (not DoRA), every tensor a lora_A / lora_B weight of a module that
/// has both, shapes A [r, in] and B [out, r] with r the module's rank, every value finite.
inline LoraAdapter read_lora_adapter(const std::filesystem::path& dir) {
  LoraAdapter a;
  a.source = io::printable(dir.string());
  const std::filesystem::path config_path = dir / "adapter_config.json";
  a.config = io::load_json(config_path);
  const std::string config_name = io::printable(config_path.string());
  peft::detail::require_peft_type(a.config, "LORA", config_name);
  const LoraConfig config = read_config<LoraConfig>(a.config, config_name);
  a.r = config.r;
  if (const auto it = a.config.find("rank_pattern"); it != a.config.end() && it->is_object())
    for (const auto& [key, rank] : it->items()) a.r = std::max(a.r, rank.get<int>());
  const io::SafetensorsFile file = io::SafetensorsFile::open(dir / "adapter_model.safetensors");
  std::map<std::string, std::pair<const io::TensorInfo*, const io::TensorInfo*>> found;
  for (const io::TensorInfo& info : file.tensors()) {
    const std::string& key = info.name;
    auto suffix = [&](std::string_view s) {
      return key.size() > s.size() + detail::kKeyPrefix.size() && key.ends_with(s) &&
             key.starts_with(detail::kKeyPrefix);
    };
    const bool is_a = suffix(".lora_A.weight"), is_b = suffix(".lora_B.weight");
    if (!is_a && !is_b)
      throw FileError(file.name() + ": tensor '" + io::printable(key) +
                      "': expected a LoRA weight 'base_model.model.<module>.lora_A.weight' or "
                      "'...lora_B.weight' (weighted merging reads LoRA factors only)");
    const std::string module =
        key.substr(detail::kKeyPrefix.size(), key.size() - detail::kKeyPrefix.size() -
                                                  std::string_view(".lora_A.weight").size());
    (is_a ? found[module].first : found[module].second) = &info;
  }
  if (found.empty()) throw FileError(file.name() + ": holds no LoRA tensor");
  for (const auto& [module, pair] : found) {
    const auto [a_info, b_info] = pair;
    if (!a_info || !b_info)
      throw FileError(file.name() + ": module '" + io::printable(module) + "' has " +
                      (a_info ? "lora_A but no lora_B" : "lora_B but no lora_A"));
    const std::int64_t rank = config.rank_for(module);
    if (a_info->shape.size() != 2 || b_info->shape.size() != 2 || a_info->shape[0] != rank ||
        b_info->shape[1] != rank)
      throw FileError(file.name() + ": module '" + io::printable(module) + "': expected lora_A [" +
                      std::to_string(rank) + ", in] and lora_B [out, " + std::to_string(rank) +
                      "] (r " + std::to_string(rank) + " from " + config_name + "), found " +
                      shape_string(a_info->shape) + " and " + shape_string(b_info->shape));
    LoraFactors f;
    const std::vector<double> av = file.read_finite<double>(a_info->name, a_info->shape);
    const std::vector<double> bv = file.read_finite<double>(b_info->name, b_info->shape);
    f.A = Eigen::Map<const Matrix>(av.data(), a_info->shape[0], a_info->shape[1]);
    f.B = Eigen::Map<const Matrix>(bv.data(), b_info->shape[0], b_info->shape[1]);
    f.scaling = config.scaling(static_cast<int>(rank), config.alpha_for(module));
    a.modules.emplace(module, std::move(f));
  }
  return a;
}

/// Writes `a` into `dir` in the reference layout (F32 tensors), both files as one unit
/// (io::replace_directory_atomically).
inline void save_lora_adapter(const std::filesystem::path& dir, const LoraAdapter& a) {
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const auto& [module, f] : a.modules) {
    const std::string key = std::string(detail::kKeyPrefix) + module;
    writer.add<double>(key + ".lora_A.weight", {f.A.rows(), f.A.cols()},
                       std::span<const double>(f.A.data(), static_cast<std::size_t>(f.A.size())),
                       io::Dtype::F32);
    writer.add<double>(key + ".lora_B.weight", {f.B.rows(), f.B.cols()},
                       std::span<const double>(f.B.data(), static_cast<std::size_t>(f.B.size())),
                       io::Dtype::F32);
  }
  const std::vector<std::uint8_t> tensors = writer.to_bytes();
  const std::string config_text = a.config.dump(2) + "\n";
  io::replace_directory_atomically(dir, [&](const std::filesystem::path& fresh) {
    io::write_file_atomically(fresh / "adapter_model.safetensors", tensors);
    io::write_file_atomically(fresh / "adapter_config.json", config_text);
  });
}

// ---------------------------------------------------------------------------------------------
// The merge

/// A checked merge: the combination it runs (linear for one adapter, as the reference), the new
/// rank and the merged adapter's config.
struct MergePlan {
  Combination combination;
  int rank;
  nlohmann::json config;
};

/// Every check of add_weighted_adapter, without arithmetic: each failure is a ConfigError
/// (options, weights, configs) or ShapeError (tensors) naming the adapters concerned. `peft
/// merge` calls it before it creates the output folder.
inline MergePlan plan_weighted_merge(const std::vector<LoraAdapter>& adapters,
                                     const std::vector<double>& weights, WeightedMergeOptions o) {
  const std::string what = "weighted merge";
  if (adapters.empty()) throw ConfigError(what + ": no adapter given");
  if (weights.size() != adapters.size())
    throw ConfigError(what + ": " + std::to_string(adapters.size()) + " adapters but " +
                      std::to_string(weights.size()) + " weights (one weight per adapter)");
  for (std::size_t i = 0; i < weights.size(); ++i)
    if (!std::isfinite(weights[i]))
      throw ConfigError(what + ": weight " + std::to_string(i + 1) + " is not finite");
  // As the reference: one adapter can only be scaled.
  if (adapters.size() == 1) o.combination = Combination::Linear;
  const Combination c = o.combination;
  const std::string name(combination_name(c));
  if (uses_density(c)) {
    if (!o.density)
      throw ConfigError(what + ": combination '" + name + "' needs a density in [0, 1]");
    if (!(*o.density >= 0 && *o.density <= 1))
      throw ConfigError(what + ": density: expected a number in [0, 1], found " +
                        std::to_string(*o.density));
  } else if (o.density) {
    throw ConfigError(what + ": combination '" + name +
                      "' does not prune; density applies to ties, dare_*, magnitude_prune*");
  }
  if (!is_svd(c) && (o.svd_rank || o.svd_clamp))
    throw ConfigError(what + ": svd_rank and svd_clamp apply to the *svd combinations, not '" +
                      name + "'");
  if (o.svd_clamp && !(*o.svd_clamp >= 0 && *o.svd_clamp <= 1))
    throw ConfigError(what + ": svd_clamp: expected a quantile in [0, 1], found " +
                      std::to_string(*o.svd_clamp));
  if (o.svd_rank && *o.svd_rank < 1)
    throw ConfigError(what + ": svd_rank: expected a positive rank, found " +
                      std::to_string(*o.svd_rank));

  // linear and the pruning types combine the factors in the adapters' own coordinates.
  const bool combines_factors = !is_svd(c) && c != Combination::Cat;
  int new_rank = 0;
  if (combines_factors) {
    for (const LoraAdapter& a : adapters)
      if (a.r != adapters.front().r)
        throw ConfigError(what + ": combination '" + name + "' needs adapters of one rank; " +
                          adapters.front().source + " has r " + std::to_string(adapters.front().r) +
                          ", " + a.source + " has r " + std::to_string(a.r) +
                          " (use cat or an *svd combination)");
    new_rank = adapters.front().r;
  } else if (c == Combination::Cat) {
    for (const LoraAdapter& a : adapters) new_rank += a.r;
  } else {
    for (const LoraAdapter& a : adapters) new_rank = std::max(new_rank, a.r);
    if (o.svd_rank) new_rank = *o.svd_rank;
  }

  // Per module: the adapters that have it, one base shape, and pattern-free ranks.
  std::set<std::string> module_names;
  for (const LoraAdapter& a : adapters)
    for (const auto& [module, f] : a.modules) module_names.insert(module);
  for (const std::string& module : module_names) {
    const LoraAdapter* first = nullptr;
    for (const LoraAdapter& a : adapters) {
      const auto it = a.modules.find(module);
      if (it == a.modules.end()) continue;
      const LoraFactors& f = it->second;
      if (!first) {
        first = &a;
      } else {
        const LoraFactors& g = first->modules.at(module);
        if (f.A.cols() != g.A.cols() || f.B.rows() != g.B.rows())
          throw ShapeError(what + ": module '" + module + "' is [out " +
                           std::to_string(g.B.rows()) + ", in " + std::to_string(g.A.cols()) +
                           "] in " + first->source + " but [out " + std::to_string(f.B.rows()) +
                           ", in " + std::to_string(f.A.cols()) + "] in " + a.source +
                           ": adapters of different base models");
        if (combines_factors && f.A.rows() != g.A.rows())
          throw ShapeError(what + ": module '" + module + "' has rank " +
                           std::to_string(g.A.rows()) + " in " + first->source + " but " +
                           std::to_string(f.A.rows()) + " in " + a.source);
      }
    }
    const LoraFactors& g = first->modules.at(module);
    const std::int64_t product_rank = std::min(g.A.cols(), g.B.rows());
    if (is_svd(c) && new_rank > product_rank)
      throw ShapeError(what + ": svd rank " + std::to_string(new_rank) + " is above the rank " +
                       std::to_string(product_rank) + " a [" + std::to_string(g.B.rows()) + ", " +
                       std::to_string(g.A.cols()) + "] product can have (module '" + module + "')");
  }

  // The new config: the first adapter's, r = lora_alpha = new rank, targets united.
  MergePlan plan{c, new_rank, adapters.front().config};
  nlohmann::json& config = plan.config;
  config["r"] = new_rank;
  config["lora_alpha"] = new_rank;
  {
    const nlohmann::json& t0 = adapters.front().config["target_modules"];
    if (t0.is_string()) {
      std::string joined;
      for (const LoraAdapter& a : adapters) {
        const nlohmann::json& t = a.config["target_modules"];
        if (!t.is_string())
          throw ConfigError(what + ": target_modules is a pattern in " + adapters.front().source +
                            " but a list in " + a.source + " (the reference cannot merge them)");
        joined += (joined.empty() ? "(" : "|(") + t.get<std::string>() + ")";
      }
      config["target_modules"] = joined;
    } else {
      std::set<std::string> united;
      for (const LoraAdapter& a : adapters) {
        const nlohmann::json& t = a.config["target_modules"];
        if (!t.is_array())
          throw ConfigError(what + ": target_modules is a list in " + adapters.front().source +
                            " but not in " + a.source + " (the reference cannot merge them)");
        for (const nlohmann::json& m : t) united.insert(m.get<std::string>());
      }
      config["target_modules"] = std::vector<std::string>(united.begin(), united.end());
    }
  }
  // As the reference: the merged adapter has no patterns (its ranks are uniform, s = 1).
  config["rank_pattern"] = nlohmann::json::object();
  config["alpha_pattern"] = nlohmann::json::object();

  return plan;
}

/// The reference's add_weighted_adapter(adapters, weights, combination_type, svd_rank,
/// svd_clamp, density, majority_sign_method) as a new adapter; plan_weighted_merge's checks run
/// first, before any arithmetic.
inline LoraAdapter add_weighted_adapter(const std::vector<LoraAdapter>& adapters,
                                        const std::vector<double>& weights,
                                        WeightedMergeOptions o) {
  MergePlan plan = plan_weighted_merge(adapters, weights, o);
  const Combination c = plan.combination;
  const int new_rank = plan.rank;
  const bool combines_factors = !is_svd(c) && c != Combination::Cat;
  LoraAdapter out;
  out.source = "the merged adapter";
  out.r = new_rank;
  out.config = std::move(plan.config);
  std::set<std::string> module_names;
  for (const LoraAdapter& a : adapters)
    for (const auto& [module, f] : a.modules) module_names.insert(module);
  const KeepMask keep = o.keep_mask ? o.keep_mask : detail::bernoulli_masks(o.seed);
  for (const std::string& module : module_names) {
    std::vector<const LoraFactors*> present;
    std::vector<std::size_t> index;
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const auto it = adapters[i].modules.find(module);
      if (it != adapters[i].modules.end()) {
        present.push_back(&it->second);
        index.push_back(i);
      }
    }
    const std::int64_t in = present.front()->A.cols(), out_features = present.front()->B.rows();
    LoraFactors merged;
    merged.scaling = 1;
    if (c == Combination::Cat) {
      merged.A = Matrix::Zero(new_rank, in);
      merged.B = Matrix::Zero(out_features, new_rank);
      std::int64_t row = 0;
      for (std::size_t k = 0; k < present.size(); ++k) {
        const LoraFactors& f = *present[k];
        const std::int64_t r = f.A.rows();
        merged.A.middleRows(row, r) = weights[index[k]] * f.scaling * f.A;
        merged.B.middleCols(row, r) = f.B;
        row += r;
      }
    } else if (combines_factors) {
      std::vector<Matrix> As, Bs;
      std::vector<double> wa, wb;
      for (std::size_t k = 0; k < present.size(); ++k) {
        As.push_back(present[k]->A);
        Bs.push_back(present[k]->B);
        const double ws = weights[index[k]] * present[k]->scaling;
        wb.push_back(std::sqrt(std::abs(ws)));
        wa.push_back(ws >= 0 ? wb.back() : -wb.back());
      }
      merged.A = detail::combine(c, As, wa, o, module, "lora_A", keep);
      merged.B = detail::combine(c, Bs, wb, o, module, "lora_B", keep);
    } else {
      std::vector<Matrix> deltas;
      std::vector<double> w;
      for (std::size_t k = 0; k < present.size(); ++k) {
        deltas.push_back(present[k]->scaling * (present[k]->B * present[k]->A));
        w.push_back(weights[index[k]]);  // s_i is in the delta already
      }
      const Matrix delta = detail::combine(c, deltas, w, o, module, "delta", keep);
      Eigen::BDCSVD<Eigen::MatrixXd> svd(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
      Matrix U =
          svd.matrixU().leftCols(new_rank) * svd.singularValues().head(new_rank).asDiagonal();
      Matrix Vh = svd.matrixV().leftCols(new_rank).transpose();
      // Each singular pair's sign is the SVD routine's choice (LAPACK's in the reference), and
      // svd_clamp depends on it (the quantile is of signed entries). Ours is fixed: the entry
      // of largest magnitude in each column of U is positive.
      for (int k = 0; k < new_rank; ++k) {
        Eigen::Index at = 0;
        U.col(k).cwiseAbs().maxCoeff(&at);
        if (U(at, k) < 0) {
          U.col(k) *= -1;
          Vh.row(k) *= -1;
        }
      }
      if (o.svd_clamp) {
        std::vector<double> dist(U.data(), U.data() + U.size());
        dist.insert(dist.end(), Vh.data(), Vh.data() + Vh.size());
        const double hi = detail::quantile(std::move(dist), *o.svd_clamp);
        U = U.cwiseMax(-hi).cwiseMin(hi);
        Vh = Vh.cwiseMax(-hi).cwiseMin(hi);
      }
      merged.A = std::move(Vh);
      merged.B = std::move(U);
    }
    out.modules.emplace(module, std::move(merged));
  }
  return out;
}

}  // namespace peft::merge
