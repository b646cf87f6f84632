#pragma once
// LoKr (Edalati et al., KronA, 2022; as in LyCORIS): the update is a Kronecker product,
//   ΔW = s · w1 ⊗ w2,  w1 [out_l, in_m], w2 [out_k, in_n],  out = out_l·out_k, in = in_m·in_n,
// s = α / r. The split of each dimension follows the reference's `factorization` (the divisor
// pair nearest √dim, or `decompose_factor` when it divides). A factor is itself a rank-r
// product (w1_a w1_b, w2_a w2_b) when r is below half its larger side: always for w2, and for
// w1 only with `decompose_both`. The forward uses (w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ) per input
// row, so ΔW is never formed. w1 (or w1_a) starts at 0, so the model starts at the base model.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/ops.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/common.hpp"
#include "peft/nn/model_shapes.hpp"

namespace peft {

namespace detail {
/// The reference's LoKr split of `dimension` into (m, n), m <= n, m·n = dimension: `factor`
/// itself when it divides; otherwise the walk over divisors from 1 towards √dimension, each
/// step no larger than `factor` (no bound when factor < 0).
inline std::pair<std::int64_t, std::int64_t> lokr_factorization(std::int64_t dimension,
                                                                std::int64_t factor = -1) {
  if (factor > 0 && dimension % factor == 0) {
    std::int64_t m = factor, n = dimension / factor;
    if (m > n) std::swap(m, n);
    return {m, n};
  }
  if (factor < 0) factor = dimension;
  std::int64_t m = 1, n = dimension;
  const std::int64_t length = m + n;
  while (m < n) {
    std::int64_t new_m = m + 1;
    while (dimension % new_m != 0) ++new_m;
    const std::int64_t new_n = dimension / new_m;
    if (new_m + new_n > length || new_m > factor) break;
    m = new_m;
    n = new_n;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// How one module's LoKr factors are shaped.
struct LokrShape {
  std::int64_t out_l, out_k, in_m, in_n;
  bool full_w1, full_w2;  ///< false: the factor is a rank-r product

  static LokrShape of(std::int64_t in, std::int64_t out, std::int64_t r, std::int64_t factor,
                      bool decompose_both) {
    const auto [in_m, in_n] = lokr_factorization(in, factor);
    const auto [out_l, out_k] = lokr_factorization(out, factor);
    LokrShape s{out_l, out_k, in_m, in_n, true, true};
    s.full_w1 = !(decompose_both && 2 * r < std::max(out_l, in_m));
    s.full_w2 = !(2 * r < std::max(out_k, in_n));
    return s;
  }
  std::int64_t parameters(std::int64_t r) const {
    return (full_w1 ? out_l * in_m : r * (out_l + in_m)) +
           (full_w2 ? out_k * in_n : r * (out_k + in_n));
  }
};
}  // namespace detail

struct LokrConfig {
  detail::LycorisOptions options;
  bool decompose_both = false;
  int decompose_factor = -1;
  bool rank_dropout_scale = false;  ///< recorded and written back (rank dropout is not applied)

  static LokrConfig from_json(const nlohmann::json& j, const std::string& source) {
    LokrConfig c{detail::LycorisOptions::parse(j, "LOKR", source)};
    c.decompose_both = detail::json_or<bool>(j, "decompose_both", false, source);
    c.decompose_factor = detail::json_or<int>(j, "decompose_factor", -1, source);
    c.rank_dropout_scale = detail::json_or<bool>(j, "rank_dropout_scale", false, source);
    return c;
  }
  nlohmann::json to_json(const ModelConfig&) const {
    nlohmann::json j = detail::adapter_config_header("LOKR");
    options.write(j);
    j["decompose_both"] = decompose_both;
    j["decompose_factor"] = decompose_factor;
    j["rank_dropout_scale"] = rank_dropout_scale;
    return j;
  }
  detail::LokrShape shape_for(const std::string& module, std::int64_t in, std::int64_t out) const {
    return detail::LokrShape::of(in, out, options.rank_for(module), decompose_factor,
                                 decompose_both);
  }
};

struct LoKr {
  using family = family::Reparameterized;
  static constexpr std::string_view name = "lokr";
  using Config = LokrConfig;

  static ParameterCount count_parameters(const ModelConfig&,
                                         const std::vector<LinearShape>& linears,
                                         const Config& config) {
    ParameterCount count;
    for (const LinearShape& l : linears)
      if (config.options.targets.selects(l.name, l.layer < 0))
        count.trainable += config.shape_for(l.name, l.in_features, l.out_features)
                               .parameters(config.options.rank_for(l.name));
    return count;
  }

  static bool accepts(const nlohmann::json& j) {
    return j.value("peft_type", std::string()) == "LOKR";
  }

  template <class T>
  class State {
   public:
    struct ModuleAdapter {
      std::string module;
      detail::LokrShape shape;
      Var<T> w1, w1_a, w1_b;  ///< w1 [out_l, in_m], or w1_a [out_l, r] and w1_b [r, in_m]
      Var<T> w2, w2_a, w2_b;  ///< w2 [out_k, in_n], or w2_a [out_k, r] and w2_b [r, in_n]
      T scale;
      bool merged = false;
    };

    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      const detail::LycorisOptions& o = config_.options;
      adapters_.reset(ctx.linears.size());
      auto trainable = [](std::int64_t rows, std::int64_t cols) {
        return Var<T>(Tensor<T>(Shape{rows, cols}), true);
      };
      for (nn::Linear<T>* lin : ctx.linears) {
        if (!o.targets.selects(lin->name, lin->layer < 0)) continue;
        const std::int64_t r = o.rank_for(lin->name);
        ModuleAdapter m{lin->name,
                        config_.shape_for(lin->name, lin->in_features, lin->out_features),
                        {},
                        {},
                        {},
                        {},
                        {},
                        {},
                        static_cast<T>(o.scaling_for(lin->name))};
        const detail::LokrShape& s = m.shape;
        // As the reference: w1 (or w1_a) zero, the rest Kaiming-uniform; all random without
        // init_weights.
        if (s.full_w1) {
          m.w1 = trainable(s.out_l, s.in_m);
          if (!o.init_weights) detail::kaiming_uniform(m.w1.value(), ctx.rng);
        } else {
          m.w1_a = trainable(s.out_l, r);
          m.w1_b = trainable(r, s.in_m);
          if (!o.init_weights) detail::kaiming_uniform(m.w1_a.value(), ctx.rng);
          detail::kaiming_uniform(m.w1_b.value(), ctx.rng);
        }
        if (s.full_w2) {
          m.w2 = trainable(s.out_k, s.in_n);
          detail::kaiming_uniform(m.w2.value(), ctx.rng);
        } else {
          m.w2_a = trainable(s.out_k, r);
          m.w2_b = trainable(r, s.in_n);
          detail::kaiming_uniform(m.w2_a.value(), ctx.rng);
          detail::kaiming_uniform(m.w2_b.value(), ctx.rng);
        }
        adapters_.put(lin->site, std::move(m));
      }
      if (adapters_.size() == 0) detail::throw_no_target("LoKr", o.targets, ctx.linears);
    }

    /// Whether this adapter changes `module` (Compose routes each module to one component).
    bool adapts(const nn::Linear<T>& lin) const { return adapters_.find(lin.site) != nullptr; }
    Var<T> linear(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x) {
      const ModuleAdapter* m = adapters_.find(module.site);
      if (!m || m->merged) return module.forward_base(tape, x);
      const Var<T> w1 = m->shape.full_w1 ? m->w1 : ops::matmul(tape, m->w1_a, m->w1_b);
      const Var<T> w2 = m->shape.full_w2 ? m->w2 : ops::matmul(tape, m->w2_a, m->w2_b);
      return ops::kronecker_linear(tape, x, module.weight, module.bias, module.layout, w1, w2,
                                   m->scale);
    }

    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      adapters_.for_each([&](ModuleAdapter& m) {
        const std::string prefix = "base_model.model." + m.module + ".";
        if (m.shape.full_w1)
          out.push_back({prefix + "lokr_w1", m.w1});
        else {
          out.push_back({prefix + "lokr_w1_a", m.w1_a});
          out.push_back({prefix + "lokr_w1_b", m.w1_b});
        }
        if (m.shape.full_w2)
          out.push_back({prefix + "lokr_w2", m.w2});
        else {
          out.push_back({prefix + "lokr_w2_a", m.w2_a});
          out.push_back({prefix + "lokr_w2_b", m.w2_b});
        }
      });
      return out;
    }

    /// ΔW = s w1 ⊗ w2 [out, in].
    RowMatrix<T> delta_weight(int site) const {
      const ModuleAdapter* m = adapters_.find(site);
      if (!m) throw Error("LoKr: no adapter at site " + std::to_string(site));
      const RowMatrix<T> w1 =
          m->shape.full_w1 ? RowMatrix<T>(m->w1.value().matrix())
                           : RowMatrix<T>(m->w1_a.value().matrix() * m->w1_b.value().matrix());
      const RowMatrix<T> w2 =
          m->shape.full_w2 ? RowMatrix<T>(m->w2.value().matrix())
                           : RowMatrix<T>(m->w2_a.value().matrix() * m->w2_b.value().matrix());
      RowMatrix<T> delta(w1.rows() * w2.rows(), w1.cols() * w2.cols());
      for (Eigen::Index i = 0; i < w1.rows(); ++i)
        for (Eigen::Index j = 0; j < w1.cols(); ++j)
          delta.block(i * w2.rows(), j * w2.cols(), w2.rows(), w2.cols()) =
              (m->scale * w1(i, j)) * w2;
      return delta;
    }

    void merge(std::vector<nn::Linear<T>*>& modules) { fold(modules, true); }
    void unmerge(std::vector<nn::Linear<T>*>& modules) { fold(modules, false); }
    void unload(std::vector<nn::Linear<T>*>& modules) {
      fold(modules, true);
      adapters_.clear();
    }
    std::size_t attached_modules() const { return adapters_.size(); }

   private:
    void fold(std::vector<nn::Linear<T>*>& modules, bool merge) {
      for (nn::Linear<T>* lin : modules) {
        ModuleAdapter* m = adapters_.find(lin->site);
        if (!m || m->merged == merge) continue;
        RowMatrix<T> delta = delta_weight(lin->site);
        if (!merge) delta = -delta;
        lin->add_to_weight(delta);
        m->merged = merge;
      }
    }

    Config config_;
    detail::SiteTable<ModuleAdapter> adapters_;
  };
};

}  // namespace peft
