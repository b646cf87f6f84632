#pragma once
// Plumbing the reparameterized policies share: initialisers as torch draws them (by
// distribution, not bit for bit), the "matched nothing" error, numbers written as the reference
// writes them, and a per-site adapter table.
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/tensor.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/modules.hpp"

namespace peft::detail {

/// torch.nn.init.kaiming_uniform_(t, a=√5) on a 2-D [rows, fan_in] tensor: U(−1/√fan_in,
/// 1/√fan_in).
template <class T>
void kaiming_uniform(Tensor<T>& t, std::mt19937_64& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(t.cols()));
  std::uniform_real_distribution<double> u(-bound, bound);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(u(rng));
}

/// N(0, std²) entries.
template <class T>
void normal_fill(Tensor<T>& t, std::mt19937_64& rng, double std) {
  std::normal_distribution<double> n(0.0, std);
  for (std::int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(n(rng));
}


template <class T>
[[noreturn]] void throw_no_target(const std::string& method, const TargetRules& rules,
                                  const std::vector<nn::Linear<T>*>& linears) {
  throw ConfigError(method + ": target_modules " + rules.target_modules.to_json().dump() +
                    " matched no module of this model (module paths look like '" +
                    (linears.empty() ? std::string("-") : linears.front()->name) + "')");
}

/// Adapters indexed by linear site; a site without an adapter holds nothing.
template <class Adapter>
class SiteTable {
 public:
  void reset(std::size_t sites) { slots_.assign(sites, std::nullopt); }
  void put(int site, Adapter adapter) {
    slots_.at(static_cast<std::size_t>(site)) = std::move(adapter);
  }
  Adapter* find(int site) {
    if (site < 0 || static_cast<std::size_t>(site) >= slots_.size()) return nullptr;
    auto& slot = slots_[static_cast<std::size_t>(site)];
    return slot ? &*slot : nullptr;
  }
  const Adapter* find(int site) const { return const_cast<SiteTable*>(this)->find(site); }
  std::size_t size() const {
    std::size_t n = 0;
    for (const auto& slot : slots_) n += slot.has_value();
    return n;
  }
  void clear() {
    for (auto& slot : slots_) slot.reset();
  }
  template <class F>
  void for_each(F&& f) {
    for (auto& slot : slots_)
      if (slot) f(*slot);
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& slot : slots_)
      if (slot) f(*slot);
  }

 private:
  std::vector<std::optional<Adapter>> slots_;
};

/// The options LoHa and LoKr share (the reference's LyCORIS-style configs).
struct LycorisOptions {
  int r = 8;
  double alpha = 8;
  double rank_dropout = 0.0;    ///< recorded and written back; dropout is not applied
  double module_dropout = 0.0;  ///< recorded and written back; dropout is not applied
  bool init_weights = true;     ///< false: every factor random (the update starts non-zero)
  TargetRules targets;
  std::map<std::string, int> rank_pattern;
  std::map<std::string, double> alpha_pattern;

  int rank_for(const std::string& module) const {
    return pattern_lookup(rank_pattern, module).value_or(r);
  }
  /// s = α / r, with the module's own α and r from the patterns.
  double scaling_for(const std::string& module) const {
    return pattern_lookup(alpha_pattern, module).value_or(alpha) / rank_for(module);
  }

  static LycorisOptions parse(const nlohmann::json& j, const std::string& peft_type,
                              const std::string& source) {
    require_peft_type(j, peft_type, source);
    LycorisOptions o;
    o.r = json_or<int>(j, "r", 8, source);
    o.alpha = json_or<double>(j, "alpha", 8.0, source);
    o.rank_dropout = json_or<double>(j, "rank_dropout", 0.0, source);
    o.module_dropout = json_or<double>(j, "module_dropout", 0.0, source);
    o.init_weights = json_or<bool>(j, "init_weights", true, source);
    o.targets = TargetRules::from_json(j, source);
    o.rank_pattern = json_or<std::map<std::string, int>>(j, "rank_pattern", {}, source);
    o.alpha_pattern = json_or<std::map<std::string, double>>(j, "alpha_pattern", {}, source);
    if (json_or<bool>(j, "use_effective_conv2d", false, source))
      throw ConfigError(source +
                        ": use_effective_conv2d applies to convolutions, which this "
                        "library's models do not have");
    if (!json_field(j, "modules_to_save").is_null())
      throw ConfigError(source + ": modules_to_save is not supported");
    if (o.r <= 0) throw ConfigError(source + ": r must be positive");
    if (o.targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
    return o;
  }

  void write(nlohmann::json& j) const {
    j["r"] = r;
    j["alpha"] = json_number(alpha);
    j["rank_dropout"] = rank_dropout;
    j["module_dropout"] = module_dropout;
    j["init_weights"] = init_weights;
    j["use_effective_conv2d"] = false;
    j["modules_to_save"] = nullptr;
    j["rank_pattern"] = rank_pattern;
    nlohmann::json alphas = nlohmann::json::object();
    for (const auto& [key, a] : alpha_pattern) alphas[key] = json_number(a);
    j["alpha_pattern"] = alphas;
    targets.to_json(j);
  }
};

}  // namespace peft::detail
