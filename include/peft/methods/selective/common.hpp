#pragma once
// What the selective methods share: the budget, picking entries across the targeted weights,
// the per-module sparse diffs applied in the linear hook, base tensors trained in place (norms),
// and the sparse-diff adapter file.
//
// FILE LAYOUT (docs/methods/selective.md): adapter_config.json with the method's peft_type, and
// adapter_model.safetensors holding, per adapted module <m> (its module path),
//   base_model.model.<m>.sparse_delta.indices   I64 [k]      o·in + i into Δ [out, in]
//   base_model.model.<m>.sparse_delta.values    F32 [k]
//   base_model.model.<m>.delta_rows.indices     I64 [r]      output features
//   base_model.model.<m>.delta_rows.values      F32 [r, in]
//   base_model.model.<m>.delta_columns.indices  I64 [c]      input features
//   base_model.model.<m>.delta_columns.values   F32 [out, c]
//   base_model.model.<m>.bias_delta.indices     I64 [kb]
//   base_model.model.<m>.bias_delta.values      F32 [kb]
// and, for tensors trained in place (norm scales and biases), their trained values under
//   base_model.model.<tensor name in model.safetensors>                     F32 [d]
// Δ is always indexed as [out, in] (torch.nn.Linear's orientation), also for GPT-2's Conv1D
// weights stored [in, out]. Every tensor's size grows with the budget, never with the model.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/core/ops/sparse.hpp"
#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/adapter_config.hpp"
#include "peft/methods/config_fields.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

/// How many entries a method trains: exactly `count`, or when `count` is 0, `density` of the
/// targeted entries (rounded to the nearest integer).
struct SelectionBudget {
  std::int64_t count = 0;
  double density = 0.005;

  std::int64_t resolve(std::int64_t total, std::string_view method) const {
    const std::string m(method);
    if (total <= 0) throw ConfigError(m + ": the targeted modules hold no weights");
    const std::int64_t k =
        count > 0 ? count : static_cast<std::int64_t>(std::llround(density * double(total)));
    if (k <= 0)
      throw ConfigError(m + ": density " + std::to_string(density) + " of " +
                        std::to_string(total) + " targeted weights rounds to 0 entries");
    if (k > total)
      throw ConfigError(m + ": budget of " + std::to_string(k) + " entries exceeds the " +
                        std::to_string(total) + " targeted weights");
    return k;
  }
};

// ---- config fields the selective configs share (config_fields.hpp's protocol) ----------------

namespace detail {

/// The target rules, with the config's default (all-linear) where target_modules is absent.
template <class C>
struct DefaultTargetsField {
  TargetRules C::*member;
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    if (!json_field(j, "target_modules").is_null()) c.*member = TargetRules::from_json(j, source);
  }
  void write(const C& c, nlohmann::json& j, const ModelConfig&) const { (c.*member).to_json(j); }
};

/// A key that must hold its one value (FishMask's selection "fisher"): null is refused too.
struct RequiredField : FixedField {
  template <class C>
  void read(C& c, const nlohmann::json& j, const std::string& source) const {
    const nlohmann::json& v = json_field(j, std::string(key).c_str());
    if (v.is_null()) config_detail::fail(source, key, value.dump(), v);
    FixedField::read(c, j, source);
  }
};

}  // namespace detail

/// num_parameters and density.
template <class C>
auto budget_fields(SelectionBudget C::*member) {
  return nested_fields(
      member, config_fields(field("num_parameters", &SelectionBudget::count, check::non_negative),
                            float_field("density", &SelectionBudget::density, check::fraction)));
}
template <class C>
detail::DefaultTargetsField<C> default_targets_field(TargetRules C::*member) {
  return {member};
}
inline detail::RequiredField required(std::string_view key, nlohmann::json value) {
  return {{key, std::move(value), ""}};
}

/// from_json / to_json of a selective config from its field table (config_fields.hpp).
template <class C>
using TabledConfigIo = ConfigIo<C>;

namespace detail {

/// "all-linear": the default target of the selective methods (every projection but the head).
inline TargetRules all_linear_targets() {
  TargetRules t;
  t.target_modules.all_linear = true;
  return t;
}

/// The modules P selects (by ModuleSite: the same choice from nn::Linear at attach and from
/// LinearShape when counting), and the entries of their weights: attach and count_parameters
/// both go through these, so that they cannot disagree.
template <class T>
ModuleSite site_of(const nn::Linear<T>* m) {
  return ModuleSite::of(*m);
}
inline ModuleSite site_of(const LinearShape& l) { return ModuleSite::of(l); }

template <class P, class M>
std::int64_t selected_weight_count(const typename P::Config& c, const std::vector<M>& modules) {
  std::int64_t total = 0;
  for (const M& m : modules)
    if (const ModuleSite s = site_of(m); method_selects<P>(c, s))
      total += s.in_features * s.out_features;
  return total;
}
/// The budget k of a masking method on these modules.
template <class P, class M>
std::int64_t selected_budget(const typename P::Config& c, const std::vector<M>& modules) {
  return c.budget.resolve(selected_weight_count<P>(c, modules), method_title<P>());
}
/// Copies of the modules P selects (they share the model's weight tensors, handles, and stay
/// valid when the model moves, unlike pointers to its modules); none is an error.
template <class P, class T>
std::vector<nn::Linear<T>> selected_modules(const typename P::Config& c,
                                            const std::vector<nn::Linear<T>*>& linears) {
  std::vector<nn::Linear<T>> out;
  for (const nn::Linear<T>* lin : linears)
    if (method_selects<P>(c, ModuleSite::of(*lin))) out.push_back(*lin);
  if (out.empty()) throw_no_target(method_title<P>(), c.targets, linears);
  return out;
}

/// W[o, i] of a weight in either storage layout.
template <class T>
T weight_at(const nn::Linear<T>& lin, std::int64_t o, std::int64_t i) {
  const Tensor<T>& w = lin.dense_weight("a selective method").value();
  return lin.layout == ops::WeightLayout::OutIn ? w[o * lin.in_features + i]
                                                : w[i * lin.out_features + o];
}
template <class T>
T& weight_ref(nn::Linear<T>& lin, std::int64_t o, std::int64_t i) {
  (void)lin.dense_weight("a selective method");
  Tensor<T>& w = lin.weight.value();
  return lin.layout == ops::WeightLayout::OutIn ? w[o * lin.in_features + i]
                                                : w[i * lin.out_features + o];
}

/// k of `total` ids uniformly without replacement, ascending (selection sampling: O(total)
/// time, O(k) memory).
inline std::vector<std::int64_t> sample_ids(std::int64_t total, std::int64_t k,
                                            std::mt19937_64& rng) {
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(k));
  // Knuth's algorithm S: keep id t with probability (still needed) / (still left).
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (std::int64_t t = 0; t < total && std::int64_t(out.size()) < k; ++t)
    if (double(total - t) * u(rng) < double(k - std::int64_t(out.size()))) out.push_back(t);
  return out;
}

/// The ids of the k largest scores, ascending; ties go to the lower id (deterministic).
inline std::vector<std::int64_t> top_k_ids(const std::vector<double>& scores, std::int64_t k) {
  std::vector<std::int64_t> ids(scores.size());
  std::iota(ids.begin(), ids.end(), std::int64_t{0});
  auto better = [&](std::int64_t a, std::int64_t b) {
    const double sa = scores[static_cast<std::size_t>(a)], sb = scores[static_cast<std::size_t>(b)];
    return sa > sb || (sa == sb && a < b);
  };
  std::nth_element(ids.begin(), ids.begin() + k, ids.end(), better);
  ids.resize(static_cast<std::size_t>(k));
  std::sort(ids.begin(), ids.end());
  return ids;
}

/// A linear layer's part of the diff: scattered entries, whole lines, bias entries.
template <class T>
struct ModuleDiff {
  std::string module;
  std::int64_t in = 0, out = 0;
  ops::WeightDelta<T> delta;
  bool merged = false;

  std::int64_t entries() const {
    return (delta.entries ? delta.entries->size() : 0) +
           (delta.lines ? delta.line_values.value().numel() : 0) +
           (delta.bias_entries ? static_cast<std::int64_t>(delta.bias_entries->size()) : 0);
  }
};

/// A base tensor trained where it is (the decoder has no hook at the norms): its handle, shared
/// with the model, and its original values (for unmerge and for the diff).
template <class T>
struct InPlaceTensor {
  std::string name;  ///< as in model.safetensors
  Var<T> var;
  Tensor<T> original;
};

/// The diffs of a selective method, by linear site, and the tensors it trains in place.
/// Implements the policy hooks (linear, parameters, merge, unmerge) and the adapter file.
template <class T>
class SelectiveDiffs {
 public:
  void reset(std::size_t sites) {
    diffs_.assign(sites, std::nullopt);
    for (InPlaceTensor<T>& t : in_place_) {
      t.var.value() = t.original;
      t.var.set_requires_grad(false);
    }
    in_place_.clear();
  }

  ModuleDiff<T>& module(const nn::Linear<T>& lin) {
    auto& slot = diffs_.at(static_cast<std::size_t>(lin.site));
    if (!slot) slot = ModuleDiff<T>{lin.name, lin.in_features, lin.out_features, {}, false};
    return *slot;
  }
  const ModuleDiff<T>* find(int site) const {
    if (site < 0 || static_cast<std::size_t>(site) >= diffs_.size()) return nullptr;
    const auto& slot = diffs_[static_cast<std::size_t>(site)];
    return slot ? &*slot : nullptr;
  }

  /// Trains the entries (o·in + i, ascending) of `lin`'s weight; values start at `values` or 0.
  void set_entries(const nn::Linear<T>& lin, const std::vector<std::int64_t>& flat,
                   std::vector<T> values = {}) {
    auto pattern = std::make_shared<ops::SparsePattern>();
    pattern->out.reserve(flat.size());
    pattern->in.reserve(flat.size());
    for (std::int64_t f : flat) {
      if (f < 0 || f >= lin.in_features * lin.out_features)
        throw FileError(lin.name + ": entry index " + std::to_string(f) + " outside the weight [" +
                        std::to_string(lin.out_features) + ", " + std::to_string(lin.in_features) +
                        "]");
      pattern->out.push_back(static_cast<std::int32_t>(f / lin.in_features));
      pattern->in.push_back(static_cast<std::int32_t>(f % lin.in_features));
    }
    const auto k = static_cast<std::int64_t>(flat.size());
    if (values.empty()) values.assign(flat.size(), T(0));
    ModuleDiff<T>& m = module(lin);
    m.delta.entries = std::move(pattern);
    m.delta.entry_values = Var<T>(Tensor<T>(Shape{k}, std::move(values)), true);
  }

  /// Trains whole rows or columns of `lin`'s weight (ascending line indices).
  void set_lines(const nn::Linear<T>& lin, ops::LineAxis axis, std::vector<std::int32_t> lines,
                 std::optional<Tensor<T>> values = std::nullopt) {
    const auto r = static_cast<std::int64_t>(lines.size());
    const Shape shape =
        axis == ops::LineAxis::Rows ? Shape{r, lin.in_features} : Shape{lin.out_features, r};
    const std::int64_t extent = axis == ops::LineAxis::Rows ? lin.out_features : lin.in_features;
    for (std::int32_t l : lines)
      if (l < 0 || l >= extent)
        throw FileError(lin.name + ": line " + std::to_string(l) + " outside [0, " +
                        std::to_string(extent) + ")");
    ModuleDiff<T>& m = module(lin);
    m.delta.lines =
        std::make_shared<ops::LineSelection>(ops::LineSelection{axis, std::move(lines)});
    m.delta.line_values = Var<T>(values ? std::move(*values) : Tensor<T>(shape), true);
    require_shape(m.delta.line_values.value(), shape, lin.name + " line values");
  }

  /// Trains the listed entries of `lin`'s bias.
  void set_bias_entries(const nn::Linear<T>& lin, std::vector<std::int32_t> entries,
                        std::vector<T> values = {}) {
    if (!lin.bias) throw ConfigError(lin.name + " has no bias");
    for (std::int32_t e : entries)
      if (e < 0 || e >= lin.out_features)
        throw FileError(lin.name + ": bias entry " + std::to_string(e) + " outside [0, " +
                        std::to_string(lin.out_features) + ")");
    const auto k = static_cast<std::int64_t>(entries.size());
    if (values.empty()) values.assign(entries.size(), T(0));
    ModuleDiff<T>& m = module(lin);
    m.delta.bias_entries = std::make_shared<const std::vector<std::int32_t>>(std::move(entries));
    m.delta.bias_values = Var<T>(Tensor<T>(Shape{k}, std::move(values)), true);
  }

  /// Trains a base tensor where it is.
  void train_in_place(const NamedParameter<T>& p) {
    in_place_.push_back({p.name, p.var, p.var.value()});
    in_place_.back().var.set_requires_grad(true);
  }

  /// The module's product with its diff, by ops::delta_linear: a replacement of the product,
  /// since the op folds Δ into W (its dense route multiplies by W + Δ) and δb into b, so that
  /// no separate "added part" gives the same sums.
  void adapt(Projection<T>& p) const {
    const ModuleDiff<T>* m = find(p.module().site);
    if (!m || m->merged) return;
    replace_with_delta(p, m->delta);
  }
  static void replace_with_delta(Projection<T>& p, ops::WeightDelta<T> delta) {
    p.replace_product(
        [delta = std::move(delta)](Tape<T>& tape, const nn::Linear<T>& lin, const Var<T>& x) {
          return ops::delta_linear(tape, x, lin.dense_weight("a selective method"), lin.bias,
                                   lin.layout, delta);
        });
  }

  /// The trainable tensors, keyed as in the adapter file (the index tensors are not T tensors
  /// and are written by write_tensors).
  std::vector<NamedParameter<T>> parameters() const {
    std::vector<NamedParameter<T>> out;
    for (const auto& slot : diffs_) {
      if (!slot) continue;
      const std::string key = "base_model.model." + slot->module;
      if (slot->delta.entries)
        out.push_back({key + ".sparse_delta.values", slot->delta.entry_values});
      if (slot->delta.lines)
        out.push_back({key + line_key(*slot) + ".values", slot->delta.line_values});
      if (slot->delta.bias_entries)
        out.push_back({key + ".bias_delta.values", slot->delta.bias_values});
    }
    for (const InPlaceTensor<T>& t : in_place_)
      out.push_back({"base_model.model." + t.name, t.var});
    return out;
  }

  /// Trained scalars: k exactly.
  std::int64_t trained_entries() const {
    std::int64_t n = 0;
    for (const auto& slot : diffs_)
      if (slot) n += slot->entries();
    for (const InPlaceTensor<T>& t : in_place_) n += t.var.value().numel();
    return n;
  }

  /// W += Δ, b += δb (−= on unmerge); merged modules run the base product alone. Tensors
  /// trained in place are always merged.
  void merge(const std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
  void unmerge(const std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }

  void write_tensors(io::SafetensorsWriter& writer) const {
    for (const auto& slot : diffs_) {
      if (!slot) continue;
      const std::string key = "base_model.model." + slot->module;
      const ops::WeightDelta<T>& d = slot->delta;
      if (d.entries) {
        std::vector<std::int64_t> flat(static_cast<std::size_t>(d.entries->size()));
        for (std::size_t j = 0; j < flat.size(); ++j)
          flat[j] = std::int64_t(d.entries->out[j]) * slot->in + d.entries->in[j];
        writer.add<std::int64_t>(key + ".sparse_delta.indices", {d.entries->size()}, flat,
                                 io::Dtype::I64);
        add_values(writer, key + ".sparse_delta.values", d.entry_values);
      }
      if (d.lines) {
        const std::vector<std::int64_t> lines(d.lines->lines.begin(), d.lines->lines.end());
        writer.add<std::int64_t>(key + line_key(*slot) + ".indices",
                                 {static_cast<std::int64_t>(lines.size())}, lines, io::Dtype::I64);
        add_values(writer, key + line_key(*slot) + ".values", d.line_values);
      }
      if (d.bias_entries) {
        const std::vector<std::int64_t> e(d.bias_entries->begin(), d.bias_entries->end());
        writer.add<std::int64_t>(key + ".bias_delta.indices", {static_cast<std::int64_t>(e.size())},
                                 e, io::Dtype::I64);
        add_values(writer, key + ".bias_delta.values", d.bias_values);
      }
    }
    for (const InPlaceTensor<T>& t : in_place_)
      add_values(writer, "base_model.model." + t.name, t.var);
  }

  /// Replaces every diff by the file's (whatever this method had selected): a sparse adapter is
  /// what its file says. Tensors trained in place take the file's values. A tensor in the file
  /// that belongs to no module of the model is an error.
  void read_tensors(const io::SafetensorsFile& file, const std::vector<nn::Linear<T>*>& linears) {
    std::set<std::string> claimed;
    auto take = [&](const std::string& name) {
      claimed.insert(name);
      return name;
    };
    for (auto& slot : diffs_) slot.reset();
    for (nn::Linear<T>* lin : linears) {
      const std::string key = "base_model.model." + lin->name;
      if (file.contains(key + ".sparse_delta.indices")) {
        const std::vector<std::int64_t> flat =
            file.read<std::int64_t>(take(key + ".sparse_delta.indices"));
        const auto k = static_cast<std::int64_t>(flat.size());
        set_entries(*lin, flat,
                    file.template read_finite<T>(take(key + ".sparse_delta.values"), {k}));
      }
      for (const auto axis : {ops::LineAxis::Rows, ops::LineAxis::Columns}) {
        const std::string base =
            key + (axis == ops::LineAxis::Rows ? ".delta_rows" : ".delta_columns");
        if (!file.contains(base + ".indices")) continue;
        const std::vector<std::int64_t> l64 = file.read<std::int64_t>(take(base + ".indices"));
        const auto r = static_cast<std::int64_t>(l64.size());
        const Shape shape =
            axis == ops::LineAxis::Rows ? Shape{r, lin->in_features} : Shape{lin->out_features, r};
        set_lines(*lin, axis, std::vector<std::int32_t>(l64.begin(), l64.end()),
                  Tensor<T>(shape, file.template read_finite<T>(take(base + ".values"), shape)));
      }
      if (file.contains(key + ".bias_delta.indices")) {
        const std::vector<std::int64_t> e =
            file.read<std::int64_t>(take(key + ".bias_delta.indices"));
        const auto k = static_cast<std::int64_t>(e.size());
        set_bias_entries(*lin, std::vector<std::int32_t>(e.begin(), e.end()),
                         file.template read_finite<T>(take(key + ".bias_delta.values"), {k}));
      }
    }
    for (InPlaceTensor<T>& t : in_place_) {
      const std::string name = "base_model.model." + t.name;
      if (!file.contains(name))
        throw FileError(file.name() + ": missing tensor '" + name + "' (expected shape " +
                        shape_string(t.var.shape()) + ")");
      t.var.value() =
          Tensor<T>(t.var.shape(), file.template read_finite<T>(take(name), t.var.shape()));
    }
    for (const io::TensorInfo& info : file.tensors())
      if (!claimed.count(info.name))
        throw FileError(file.name() + ": tensor '" + info.name +
                        "' belongs to no module of this model (different target modules, or a "
                        "values tensor without its indices?)");
  }

  std::size_t modules() const {
    return static_cast<std::size_t>(
        std::count_if(diffs_.begin(), diffs_.end(), [](const auto& s) { return s.has_value(); }));
  }
  const std::vector<InPlaceTensor<T>>& in_place() const { return in_place_; }

 private:
  static std::string line_key(const ModuleDiff<T>& m) {
    return m.delta.lines->axis == ops::LineAxis::Rows ? ".delta_rows" : ".delta_columns";
  }
  static void add_values(io::SafetensorsWriter& writer, const std::string& name, const Var<T>& v) {
    writer.add<T>(name, v.shape(), std::span<const T>(v.value().values()), io::Dtype::F32);
  }

  void fold(const std::vector<nn::Linear<T>*>& modules, bool merge) {
    const T sign = merge ? T(1) : T(-1);
    for (nn::Linear<T>* lin : modules) {
      if (lin->site < 0 || static_cast<std::size_t>(lin->site) >= diffs_.size()) continue;
      auto& slot = diffs_[static_cast<std::size_t>(lin->site)];
      if (!slot || slot->merged == merge) continue;
      const ops::WeightDelta<T>& d = slot->delta;
      if (d.entries) {
        const T* v = d.entry_values.value().data();
        for (std::int64_t j = 0; j < d.entries->size(); ++j)
          weight_ref(*lin, d.entries->out[std::size_t(j)], d.entries->in[std::size_t(j)]) +=
              sign * v[j];
      }
      if (d.lines) {
        const Tensor<T>& v = d.line_values.value();
        const std::vector<std::int32_t>& L = d.lines->lines;
        const auto r = static_cast<std::int64_t>(L.size());
        if (d.lines->axis == ops::LineAxis::Rows) {
          for (std::int64_t l = 0; l < r; ++l)
            for (std::int64_t i = 0; i < lin->in_features; ++i)
              weight_ref(*lin, L[std::size_t(l)], i) += sign * v[l * lin->in_features + i];
        } else {
          for (std::int64_t o = 0; o < lin->out_features; ++o)
            for (std::int64_t l = 0; l < r; ++l)
              weight_ref(*lin, o, L[std::size_t(l)]) += sign * v[o * r + l];
        }
      }
      if (d.bias_entries) {
        const T* v = d.bias_values.value().data();
        for (std::size_t j = 0; j < d.bias_entries->size(); ++j)
          lin->bias.value()[(*d.bias_entries)[j]] += sign * v[j];
      }
      slot->merged = merge;
    }
  }

  std::vector<std::optional<ModuleDiff<T>>> diffs_;  // by linear site
  std::vector<InPlaceTensor<T>> in_place_;
};

/// Splits global entry ids (ascending; the targets' [out, in] entries concatenated in order) into
/// each target's sparse entries. A target that receives no id gets no diff.
template <class T>
void assign_entries(SelectiveDiffs<T>& diffs, const std::vector<nn::Linear<T>>& targets,
                    const std::vector<std::int64_t>& ids) {
  std::size_t next = 0;
  std::int64_t offset = 0;
  for (const nn::Linear<T>& lin : targets) {
    const std::int64_t size = lin.in_features * lin.out_features;
    std::vector<std::int64_t> flat;
    while (next < ids.size() && ids[next] < offset + size) flat.push_back(ids[next++] - offset);
    if (!flat.empty()) diffs.set_entries(lin, flat);
    offset += size;
  }
}

/// What every selective State shares: the config, the diffs and the adapter-file protocols
/// (WritesOwnTensors, ReadsOwnTensors), and for the masking methods the selected modules.
template <class P, class T>
class SelectiveState {
 public:
  using Config = typename P::Config;
  explicit SelectiveState(const Config& config) : config_(config) {}
  const Config& config() const { return config_; }

  std::vector<NamedParameter<T>> parameters() const { return diffs_.parameters(); }
  void write_tensors(io::SafetensorsWriter& w) const { diffs_.write_tensors(w); }
  void read_tensors(const io::SafetensorsFile& f, const std::vector<nn::Linear<T>*>& linears) {
    diffs_.read_tensors(f, linears);
  }
  std::int64_t trained_entries() const { return diffs_.trained_entries(); }
  const SelectiveDiffs<T>& diffs() const { return diffs_; }

 protected:
  /// Keeps copies of the modules P selects (selected_modules), the entries of their weights
  /// (selected_weight_count, as count_parameters counts them) and the model's site count.
  void select_modules(const std::vector<nn::Linear<T>*>& linears) {
    targets_ = selected_modules<P>(config_, linears);
    total_ = selected_weight_count<P>(config_, linears);
    sites_ = linears.size();
  }

  Config config_;
  SelectiveDiffs<T> diffs_;
  std::vector<nn::Linear<T>> targets_;
  std::int64_t total_ = 0;
  std::size_t sites_ = 0;
};

/// A selective State whose diff lives on the projections: it contributes to their products
/// (HasProjectionHook) and merges into the weights (Mergeable).
template <class P, class T>
class ProjectionDiffState : public SelectiveState<P, T> {
 public:
  using SelectiveState<P, T>::SelectiveState;
  void adapt(Projection<T>& p) const { this->diffs_.adapt(p); }
  bool adapts(const nn::Linear<T>& m) const { return this->diffs_.find(m.site) != nullptr; }
  /// W += Δ, b += δb (−= on unmerge); a merged module runs the base product alone.
  void merge(const std::vector<nn::Linear<T>*>& m) { this->diffs_.merge(m); }
  void unmerge(const std::vector<nn::Linear<T>*>& m) { this->diffs_.unmerge(m); }
};

/// The norm tensors among a model's base tensors: 1-D tensors that are not a linear's bias.
template <class T>
std::vector<NamedParameter<T>> norm_tensors(const AttachContext<T>& ctx) {
  std::set<std::string> linear_biases;
  for (nn::Linear<T>* lin : ctx.linears) linear_biases.insert(lin->name + ".bias");
  std::vector<NamedParameter<T>> out;
  for (const NamedParameter<T>& p : ctx.base_parameters)
    if (p.var.value().rank() == 1 && !linear_biases.count(p.name)) out.push_back(p);
  return out;
}

/// Norm tensors of a model config, from shapes alone: (2 L + 1) norms of d, each a scale and,
/// for LayerNorm (GPT-2), a shift.
inline std::int64_t norm_scale_count(const ModelConfig& model) {
  return (2 * model.num_layers + 1) * model.hidden_size;
}
inline bool norms_have_bias(const ModelConfig& model) { return model.model_type == "gpt2"; }

}  // namespace detail

/// Writes a selective adapter: dir/adapter_config.json (the method's peft_type) and
/// dir/adapter_model.safetensors in the sparse-diff layout above.
template <class Model>
void save_selective_adapter(const std::filesystem::path& dir, Model& model) {
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  model.adapter().write_tensors(writer);
  const std::vector<std::uint8_t> tensors = writer.to_bytes();
  const std::string config_text = model.adapter().config().to_json(model.config()).dump(2) + "\n";
  // Config and tensors replace the folder as one unit (io/atomic_file.hpp).
  io::replace_directory_atomically(dir, [&](const std::filesystem::path& fresh) {
    io::write_file_atomically(fresh / "adapter_model.safetensors", tensors);
    io::write_file_atomically(fresh / "adapter_config.json", config_text);
  });
}

/// Loads the diff of dir/adapter_model.safetensors into a model built with the method's config
/// (read from dir/adapter_config.json by the caller, Config::from_json).
template <class Model>
void load_selective_adapter(const std::filesystem::path& dir, Model& model) {
  model.adapter().read_tensors(io::SafetensorsFile::open(dir / "adapter_model.safetensors"),
                               model.linear_modules());
}

}  // namespace peft
