#pragma once
// SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", 2024): train k = r·(out + in) entries of
// each adapted weight — LoRA r's count, at no rank limit — on a fixed random mask:
//   y = x (W + Δ)ᵀ + b,   Δ[o_j, i_j] = v_j,   v = shira_weight [k]
// (scaling 1, as the reference trains). The mask is the reference's: the first k of
// torch.randperm(out·in) with a CPU generator seeded random_seed (null: torch's default seed
// 67280421310721, which this library writes out), sorted, as (p / in, p mod in) — reproduced
// bit for bit (FourierFT::torch_randperm). The entries are held as `shira_indices` [2, k] (rows;
// columns), a frozen tensor of the adapter file as the reference saves it (I32 there, read here
// by io::load_adapter_tensors; written F32 here, which the reference reads back as it does on
// Windows): the forward uses the loaded indices, so a file from another mask loads as it is. Not counted as parameters (as the
// reference counts). init_weights: v = 0 (the base model exactly); false: N(0, 1). Only the
// random mask (mask_type "random"); nn.Linear only in the reference (no GPT-2 golden case; this
// library adapts Conv1D weights too, Δ indexed [out, in]). Mergeable: W += Δ.
// docs/methods/selective.md#shira; tests/test_sparse_and_random.cpp; golden llama_shira.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "peft/core/ops/sparse.hpp"
#include "peft/methods/reparameterized/fourierft.hpp"
#include "peft/methods/selective/common.hpp"
#include "peft/methods/site_state.hpp"

namespace peft {

struct ShiraConfig : ConfigIo<ShiraConfig> {
  static constexpr std::string_view peft_type = "SHIRA";
  static constexpr std::int64_t torch_default_seed = 67280421310721;
  int r = 32;
  std::int64_t random_seed = torch_default_seed;
  bool init_weights = true;  ///< v = 0; false: N(0, 1)
  TargetRules targets;

  /// target_modules alone (the reference's SHiRA has no exclude or layer rules).
  struct TargetsOnly {
    void read(ShiraConfig& c, const nlohmann::json& j, const std::string& source) const {
      nlohmann::json only = nlohmann::json::object();
      only["target_modules"] = detail::json_field(j, "target_modules");
      c.targets = TargetRules::from_json(only, source);
    }
    void write(const ShiraConfig& c, nlohmann::json& j, const ModelConfig&) const {
      j["target_modules"] = c.targets.target_modules.to_json();
    }
  };
  static auto fields() {
    using C = ShiraConfig;
    return config_fields(field("r", &C::r, check::dimension), fixed("mask_type", "random"),
                         field("random_seed", &C::random_seed),
                         field("init_weights", &C::init_weights), TargetsOnly{}, fan_in_fan_out(),
                         fixed("modules_to_save", nullptr));
  }
  void validate(const std::string& source) const {
    if (targets.target_modules.empty()) throw ConfigError(source + ": target_modules is empty");
  }
};

struct SHiRA {
  using family = family::Selective;
  static constexpr std::string_view name = "shira", title = "SHiRA";
  static constexpr std::string_view paper = "Bhardwaj et al., 2024, Sparse High Rank Adapters";
  static constexpr std::string_view reference = "SHIRA";  ///< peft_type in HF peft
  using Config = ShiraConfig;
  template <class T>
  using State = SiteState<SHiRA, T>;
  template <class T>
  using Slot = SiteSlot<T>;

  static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
    const std::int64_t k = std::int64_t(c.r) * (m.in_features + m.out_features);
    if (k > m.in_features * m.out_features)
      throw ConfigError("SHiRA: r " + std::to_string(c.r) + " asks " + std::to_string(k) +
                        " entries of " + std::string(m.name) + ", which has " +
                        std::to_string(m.in_features * m.out_features));
    return {{"shira_weight", {k}}, {"shira_indices", {2, k}, false}};
  }
  /// The trained entries only (the indices are no parameters, as the reference counts).
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>& l,
                                         const Config& c) {
    return {count_site_tensors<SHiRA>(l, c).trainable, 0};
  }

  template <class T>
  static void initialise(const Config& c, Slot<T>& s, const nn::Linear<T>& m,
                         std::mt19937_64& rng) {
    const std::int64_t k = s[0].value().numel(), in = m.in_features;
    std::vector<std::int64_t> picks =
        FourierFT::torch_randperm(in * m.out_features, c.random_seed, k);
    std::sort(picks.begin(), picks.end());
    for (std::int64_t j = 0; j < k; ++j) {
      s[1].value()[j] = static_cast<T>(picks[std::size_t(j)] / in);
      s[1].value()[k + j] = static_cast<T>(picks[std::size_t(j)] % in);
    }
    if (!c.init_weights) detail::normal_fill(s[0].value(), rng, 1.0);
  }

  /// x (W + Δ)ᵀ + b by ops::delta_linear, Δ's entries read from the (loaded) indices.
  template <class T>
  static void contribute(const Config&, Projection<T>& p, const Slot<T>& s) {
    ops::WeightDelta<T> delta;
    delta.entries = pattern(s, p.module());
    delta.entry_values = s[0];
    detail::SelectiveDiffs<T>::replace_with_delta(p, std::move(delta));
  }
  template <class T>
  static RowMatrix<T> delta_weight(const Slot<T>& s, const nn::Linear<T>& m) {
    const auto e = pattern(s, m);
    RowMatrix<T> d = RowMatrix<T>::Zero(m.out_features, m.in_features);
    for (std::int64_t j = 0; j < e->size(); ++j)
      d(e->out[std::size_t(j)], e->in[std::size_t(j)]) += s[0].value()[j];
    return d;
  }

 private:
  template <class T>
  static std::shared_ptr<const ops::SparsePattern> pattern(const Slot<T>& s,
                                                           const nn::Linear<T>& m) {
    auto e = std::make_shared<ops::SparsePattern>();
    const Tensor<T>& idx = s[1].value();
    const std::int64_t k = idx.dim(1);
    for (std::int64_t j = 0; j < k; ++j) {
      const T o = idx[j], i = idx[k + j];
      if (o != std::floor(o) || i != std::floor(i) || o < 0 || i < 0 || o >= T(m.out_features) ||
          i >= T(m.in_features))
        throw FileError(m.name + ": shira_indices entry " + std::to_string(j) + " (" +
                        std::to_string(double(o)) + ", " + std::to_string(double(i)) +
                        ") is no entry of the weight [" + std::to_string(m.out_features) + ", " +
                        std::to_string(m.in_features) + "]");
      e->out.push_back(static_cast<std::int32_t>(o)), e->in.push_back(static_cast<std::int32_t>(i));
    }
    return e;
  }
};

}  // namespace peft
