#pragma once
// AdapterFusion (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for
// Transfer Learning", §3.2; AdapterHub's BertFusion, src/adapters/methods/modeling.py): N >= 2
// trained bottleneck adapters, frozen, all read the same input x at the sites the project's
// adapters use (PfeifferAdapter: the MLP output; SerialAdapter: the attention output and the
// MLP output, additive/bottleneck_adapter.hpp), a_n = U_n σ(D_n x + b_Dn) + b_Un, and a trained
// attention over them per token t:
//   q = Q x_t + b_Q,  k_n = K a_n + b_K,  v_n = V a_n,  s = softmax_n(q·k_n / T),
//   out_t = Σ_n s_n v_n + x_t                              (in place of x + adapter(x)).
// AdapterHub's "dynamic" defaults, which the fields below default to: query, key (both with
// bias), value (no bias, as BertFusion) on; value_initialized: V = I + 10⁻⁶ off the diagonal;
// Q, K ~ N(0, 0.02²), biases 0 (BERT's init); value_before_softmax (V a_n, then the mix: equal to
// V applied to the mix, as Σ s_n = 1); residual_before off (on: a_n ← a_n + x for keys and values
// alike, as BertFusion's in-place add to the one tensor it passes as both, and no residual
// after); temperature off (T = 1; AdapterHub's annealed T = 50 → 1 is not supported);
// regularization on: extra_loss 0.01 Σ ‖I − V‖²_F (get_fusion_regularization_loss);
// query_before_ln off (these pre-LN blocks have no layer norm between the sub-layer and the
// adapter, so the query is x either way); no dropout (GPT-2 and LLaMA configs have no
// attention_probs_dropout_prob, AdapterHub's fallback is 0).
// Does not start at the base model: it starts at a mix of the adapters (with V = I and equal
// adapters exactly the single adapter).
// Files (no reference; AdapterHub-like names): adapter_model.safetensors holds only the fusion,
// "base_model.model.<block>.<site>.adapter_fusion_layer.{query,key}.{weight,bias}" and
// ".value.weight", <site> mlp_adapter / attention_adapter; adapter_config.json: peft_type
// "ADAPTER_FUSION", adapter_peft_type (PFEIFFER_ADAPTER / SERIAL_ADAPTER), the fields above and
// "adapters": per adapter {"folder", "config", "seed"}: a saved adapter folder (written absolute,
// read relative to the config's folder), whose tensors are loaded at attach, or none and the
// adapter drawn from `seed` (torch's Linear init for D and U: tests, the study); the adapters'
// configs are recorded, so counts need no folder. Loading a fusion folder loads its adapters.
// docs/methods/hybrid.md#adapterfusion; tests/test_adapter_fusion.cpp.
#include <cmath>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "peft/io/adapter_file.hpp"
#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/hybrid/compose.hpp"

namespace peft {

template <detail::AdapterPlacement Placement>
struct AdapterFusionConfig {
  static constexpr std::string_view peft_type = "ADAPTER_FUSION";
  using AdapterConfig = BottleneckAdapterConfig<Placement>;
  struct Member {
    std::string folder;  ///< a saved adapter folder; empty: drawn from `seed` with `config`
    AdapterConfig config;
    std::int64_t seed = 0;
  };
  std::vector<Member> adapters;
  bool query = true, key = true, value = true, value_initialized = true;
  bool value_before_softmax = true, residual_before = false, regularization = true;

  /// A member for a saved adapter folder, its config read from there.
  static Member from_folder(const std::filesystem::path& dir) {
    const auto path = dir / "adapter_config.json";
    return {dir.string(), config_from_json<AdapterConfig>(io::load_json(path), path.string()), 0};
  }
  struct AdaptersField {
    void read(AdapterFusionConfig& c, const nlohmann::json& j, const std::string& src) const {
      const nlohmann::json& list = detail::json_field(j, "adapters");
      if (!list.is_array()) config_detail::fail(src, "adapters", "a list of adapters", list);
      for (std::size_t i = 0; i < list.size(); ++i) {
        const std::string at = src + ": adapters[" + std::to_string(i) + "]";
        only_known(list[i], {"folder", "config", "seed"}, at);
        const std::string folder = detail::json_or<std::string>(list[i], "folder", "", at);
        const nlohmann::json& seed = detail::json_field(list[i], "seed");
        const nlohmann::json& config = detail::json_field(list[i], "config");
        if (folder.empty() && config.is_null())
          throw ConfigError(at + ": expected a 'folder' or a 'config', found neither");
        const auto dir = std::filesystem::path(src).parent_path() / folder;  // absolute stays
        Member m = config.is_null() ? from_folder(dir) : Member{};
        if (!config.is_null())
          m = {folder.empty() ? "" : dir.string(),
               config_from_json<AdapterConfig>(config, at + ".config"), 0};
        if (!seed.is_null()) m.seed = config_detail::read_value<std::int64_t>(seed, at, "seed");
        c.adapters.push_back(m);
      }
    }
    void write(const AdapterFusionConfig& c, nlohmann::json& j, const ModelConfig& model) const {
      nlohmann::json list = nlohmann::json::array();
      for (const Member& m : c.adapters)
        list.push_back(
            {{"folder", m.folder.empty()
                            ? nlohmann::json(nullptr)
                            : nlohmann::json(
                                  std::filesystem::absolute(m.folder).lexically_normal().string())},
             {"config", config_to_json(m.config, model)},
             {"seed", m.seed}});
      j["adapters"] = list;
    }
  };
  static auto fields() {
    using C = AdapterFusionConfig;
    return config_fields(
        fixed("adapter_peft_type", std::string(AdapterConfig::peft_type),
              "this policy fuses that kind of adapter"),
        AdaptersField{}, field("query", &C::query), field("key", &C::key),
        field("value", &C::value), field("value_initialized", &C::value_initialized),
        field("value_before_softmax", &C::value_before_softmax),
        field("residual_before", &C::residual_before), field("regularization", &C::regularization),
        fixed("temperature", false, "the annealed temperature is not supported"),
        fixed("query_before_ln", false, "no layer norm sits before these adapters"));
  }
  static void only_known(const nlohmann::json& j, std::set<std::string> known,
                         const std::string& source) {
    if (!j.is_object()) throw ConfigError(source + ": expected a JSON object, found " + j.dump());
    for (const auto& [k, v] : j.items())
      if (!known.count(k)) throw ConfigError(source + ": unknown field '" + k + "'");
  }
  static AdapterFusionConfig from_json(const nlohmann::json& j, const std::string& source) {
    only_known(j,
               {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                "auto_mapping", "peft_version", "adapter_peft_type", "adapters", "query", "key",
                "value", "value_initialized", "value_before_softmax", "residual_before",
                "regularization", "temperature", "query_before_ln"},
               source);
    return read_config<AdapterFusionConfig>(j, source);
  }
  nlohmann::json to_json(const ModelConfig& model) const { return write_config(*this, model); }
  void validate(const std::string& source) const {
    if (adapters.size() < 2)
      throw ConfigError(source +
                        ": field 'adapters': expected at least 2 adapters to fuse, found " +
                        std::to_string(adapters.size()));
    for (std::size_t i = 1; i < adapters.size(); ++i)
      if (std::set<int>(adapters[i].config.layers_to_transform.begin(),
                        adapters[i].config.layers_to_transform.end()) !=
          std::set<int>(adapters[0].config.layers_to_transform.begin(),
                        adapters[0].config.layers_to_transform.end()))
        throw ConfigError(source + ": adapters[" + std::to_string(i) +
                          "]: layers_to_transform differs from adapters[0]'s (the fused adapters "
                          "must sit in the same blocks)");
  }
};

template <detail::AdapterPlacement Placement>
struct BasicAdapterFusion {
  using family = family::Hybrid;
  using Adapter = BottleneckAdapter<Placement>;
  using Config = AdapterFusionConfig<Placement>;
  static constexpr bool serial = Adapter::serial;
  static constexpr std::string_view name = serial ? "serial_adapter_fusion" : "adapter_fusion";
  static constexpr std::string_view title = serial ? "AdapterFusion (serial)" : "AdapterFusion";
  static constexpr std::string_view paper =
      "Pfeiffer et al., 2021, AdapterFusion: Non-Destructive Task Composition for Transfer "
      "Learning";
  static constexpr std::string_view reference = "";  ///< AdapterHub's, not HF peft's

  static bool accepts(const nlohmann::json& j) {
    return is_peft_type(j, Config::peft_type) &&
           detail::string_or(j, "adapter_peft_type", "") == Config::AdapterConfig::peft_type;
  }
  /// Trainable: per fusion site Q, b_Q, K, b_K (d² + d each), V (d²); frozen: the adapters.
  static ParameterCount count_parameters(const ModelConfig& m, const std::vector<LinearShape>& l,
                                         const Config& c) {
    const std::int64_t d = m.hidden_size;
    ParameterCount count;
    for (const auto& member : c.adapters)
      count.frozen += Adapter::count_parameters(m, l, member.config).trainable;
    for (int layer = 0; layer < static_cast<int>(m.num_layers); ++layer)
      if (!c.adapters.empty() && c.adapters[0].config.adapts_layer(layer))
        count.trainable += (serial ? 2 : 1) * ((c.query + c.key) * (d * d + d) + c.value * d * d);
    return count;
  }

  template <class T>
  class State : public detail::ConfiguredState<Config> {
    struct Site {  // one fusion site of one block: the N adapters and the fusion
      std::string path;
      std::vector<std::pair<detail::DenseLayer<T>, detail::DenseLayer<T>>> adapters;  // D, U
      Var<T> query, query_bias, key, key_bias, value;
    };

   public:
    explicit State(const Config& c) : detail::ConfiguredState<Config>(c) {
      c.validate(std::string(name));
    }

    void attach(AttachContext<T>& ctx) {
      const ModelConfig& m = ctx.config;
      const std::int64_t d = m.hidden_size;
      ones_ = Var<T>(Tensor<T>(Shape{1, d}, T(1)));
      minus_identity_ = Var<T>(Tensor<T>(Shape{d, d}));
      for (std::int64_t i = 0; i < d; ++i) minus_identity_.value()[i * d + i] = T(-1);
      sites_.assign(2 * static_cast<std::size_t>(m.num_layers), std::nullopt);
      for (int layer = 0; layer < static_cast<int>(m.num_layers); ++layer)
        for (int s = serial ? 0 : 1; s < 2 && config_.adapters[0].config.adapts_layer(layer); ++s)
          sites_[2 * layer + s] = make_site(
              ctx, (m.model_type == "gpt2" ? "transformer.h." : "model.layers.") +
                       std::to_string(layer) + (s == 0 ? ".attention_adapter" : ".mlp_adapter"));
      for (std::size_t n = 0; n < config_.adapters.size(); ++n)
        if (const auto& member = config_.adapters[n]; !member.folder.empty())
          io::load_adapter_tensors(adapter_parameters(n),
                                   io::SafetensorsFile::open(std::filesystem::path(member.folder) /
                                                             "adapter_model.safetensors"));
        else {
          std::mt19937_64 rng(static_cast<std::uint64_t>(member.seed));
          double bound = 0;  // torch.nn.Linear's: 1/√in for a weight [out, in] and its bias
          for (auto& p : adapter_parameters(n)) {
            if (p.var.shape().size() == 2) bound = 1.0 / std::sqrt(double(p.var.shape()[1]));
            detail::fill_uniform(p.var.value(), rng, bound);
          }
        }
    }

    Var<T> after_attention(Tape<T>& tape, int layer, const Var<T>& o) requires(serial) {
      return fuse(tape, sites_[2 * layer], o);
    }
    Var<T> after_mlp(Tape<T>& tape, int layer, const Var<T>&, const Var<T>& out) {
      return fuse(tape, sites_[2 * layer + 1], out);
    }
    /// 0.01 Σ ‖V − I‖²_F over the fusion sites (AdapterHub's value regularisation).
    Var<T> extra_loss(Tape<T>& tape) {
      Var<T> total(Tensor<T>(Shape{1}));
      for (const auto& s : sites_)
        if (s && config_.value && config_.regularization) {
          const Var<T> e = ops::add(tape, s->value, minus_identity_);
          total = ops::add(tape, total,
                           ops::scale(tape, ops::sum(tape, ops::mul(tape, e, e)), T(0.01)));
        }
      return total;
    }

    /// The fusion's tensors (what adapter_model.safetensors holds).
    std::vector<NamedParameter<T>> parameters() {
      std::vector<NamedParameter<T>> out;
      for (const auto& s : sites_)
        if (s)
          for (const auto& [key, var] : {std::pair{".query.weight", s->query},
                                         {".query.bias", s->query_bias},
                                         {".key.weight", s->key},
                                         {".key.bias", s->key_bias},
                                         {".value.weight", s->value}})
            if (var.defined())
              out.push_back({"base_model.model." + s->path + ".adapter_fusion_layer" + key, var});
      return out;
    }
    /// Adapter n's frozen tensors, keyed as its own adapter_model.safetensors keys them.
    std::vector<NamedParameter<T>> adapter_parameters(std::size_t n) const {
      std::vector<NamedParameter<T>> out;
      for (const auto& s : sites_)
        if (s) {
          s->adapters[n].first.name_parameters("base_model.model." + s->path + ".down", out);
          s->adapters[n].second.name_parameters("base_model.model." + s->path + ".up", out);
        }
      return out;
    }

   private:
    Site make_site(AttachContext<T>& ctx, std::string path) const {
      const std::int64_t d = ctx.config.hidden_size;
      Site s{std::move(path), {}, {}, {}, {}, {}, {}};
      for (const auto& member : config_.adapters) {
        const std::int64_t w = member.config.width(ctx.config);
        s.adapters.emplace_back(detail::DenseLayer<T>(d, w, ctx.rng, true),
                                detail::DenseLayer<T>(w, d, ctx.rng, true));
        for (auto* v : {&s.adapters.back().first.weight, &s.adapters.back().first.bias,
                        &s.adapters.back().second.weight, &s.adapters.back().second.bias})
          v->set_requires_grad(false);
      }
      auto matrix = [&](bool on, bool identity) {
        if (!on) return Var<T>{};
        Var<T> w(Tensor<T>(Shape{d, d}), true);
        if (identity)
          for (std::int64_t i = 0; i < d * d; ++i) w.value()[i] = T(i % (d + 1) == 0 ? 1.0 : 1e-6);
        else
          detail::fill_normal(w.value(), ctx.rng, 0.02);
        return w;
      };
      auto bias = [&](bool on) { return on ? Var<T>(Tensor<T>(Shape{d}), true) : Var<T>{}; };
      s.query = matrix(config_.query, false);
      s.query_bias = bias(config_.query);
      s.key = matrix(config_.key, false);
      s.key_bias = bias(config_.key);
      s.value = matrix(config_.value, config_.value_initialized);
      return s;
    }

    Var<T> fuse(Tape<T>& tape, const std::optional<Site>& s, const Var<T>& x) const {
      if (!s) return x;
      const Var<T> q = s->query.defined()
                           ? ops::linear(tape, x, s->query, s->query_bias, ops::WeightLayout::OutIn)
                           : x;
      const bool value_first = config_.value && config_.value_before_softmax;
      std::vector<Var<T>> scores, values;
      for (std::size_t n = 0; n < s->adapters.size(); ++n) {
        Var<T> a = s->adapters[n].second.forward(
            tape, detail::activate(tape, s->adapters[n].first.forward(tape, x),
                                   config_.adapters[n].config.activation));
        if (config_.residual_before) a = ops::add(tape, a, x);
        const Var<T> k = s->key.defined()
                             ? ops::linear(tape, a, s->key, s->key_bias, ops::WeightLayout::OutIn)
                             : a;
        scores.push_back(
            ops::linear(tape, ops::mul(tape, q, k), ones_, Var<T>{}, ops::WeightLayout::OutIn));
        values.push_back(
            value_first ? ops::linear(tape, a, s->value, Var<T>{}, ops::WeightLayout::OutIn) : a);
      }
      const std::size_t last = x.value().rank() - 1;
      const Var<T> p = ops::softmax(tape, ops::concat(tape, scores, last));  // [..., N]
      Var<T> out;
      for (std::size_t n = 0; n < values.size(); ++n) {
        const Var<T> term =
            detail::scale_rows(tape, values[n], ops::slice(tape, p, last, std::int64_t(n), 1));
        out = n == 0 ? term : ops::add(tape, out, term);
      }
      if (config_.value && !config_.value_before_softmax)
        out = ops::linear(tape, out, s->value, Var<T>{}, ops::WeightLayout::OutIn);
      return config_.residual_before ? out : ops::add(tape, out, x);
    }

    using detail::ConfiguredState<Config>::config_;
    std::vector<std::optional<Site>> sites_;  // by 2·layer + (0 attention, 1 MLP)
    Var<T> ones_, minus_identity_;            // frozen constants: [1, d] of ones, −I [d, d]
  };
};

/// The paper's AdapterFusion: Pfeiffer adapters (after the MLP).
using AdapterFusion = BasicAdapterFusion<detail::AdapterPlacement::Pfeiffer>;
/// The same over serial (Houlsby) adapters: a fusion after attention and after the MLP.
using SerialAdapterFusion = BasicAdapterFusion<detail::AdapterPlacement::Serial>;

}  // namespace peft
