#pragma once
// X-LoRA (Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts"): N frozen
// LoRA experts at every module any of them targets, mixed per token by a classifier that reads
// the model's own last hidden state. Two passes per forward:
//   1. the scaling pass, without gradient (the reference's torch.no_grad): the model with every
//      expert at the constant scaling v = scaling_pass_value, giving h [B, T, d] (after the final
//      norm, as transformers' hidden_states[-1]);
//   2. s = softmax(f(h) / τ) [B, T, L, N] (f: xlora_depth linear layers with ReLU and dropout
//      between; L = the adapted modules with layerwise_scalings, else 1, broadcast), optionally
//      the top-k experts only (top_k_lora) and a softmax over them (enable_softmax_topk); then
//      y = W x + Σ_n g · s_{t,l,n} · (α_n / r_n) B_n A_n x at module l (g: global_scaling_weight).
// Reference: peft_type "XLORA" (tuners/xlora); its file holds the classifier only,
// "base_model.internal_xlora_classifier.layers.<i>.{weight,bias}" (i counts ReLU and dropout
// modules: stride 3 with xlora_dropout_p > 0, else 2); the experts are LoRA folders named by
// `adapters` (the reference applies expert n only when it is named "n"). With
// use_trainable_adapters the experts train too and our file also holds them. X-LoRA starts at
// the mix of its experts, not at the base model (with every B = 0 it is the base model).
// Uses the contract's pre_pass hook (policy.hpp). Not mergeable (the mix changes per token); no
// key/value cache (the reference generates with use_cache=False). docs/methods/hybrid.md.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/reparameterized/lora.hpp"

namespace peft {

struct XLoraConfig {
  static constexpr std::string_view peft_type = "XLORA";
  int hidden_size = 4096;
  std::map<std::string, std::string> adapters;  ///< "n" → expert n's LoRA folder
  bool enable_softmax = true, enable_softmax_topk = false, layerwise_scalings = false;
  int xlora_depth = 1, xlora_size = 2048, top_k_lora = 0;  ///< top_k_lora 0: null (dense)
  double xlora_dropout_p = 0.2, softmax_temperature = 1.0;
  bool use_trainable_adapters = false;
  double scaling_pass_value = 0.0, global_scaling_weight = 1.0;
  std::vector<LoraConfig> experts;  ///< expert n's config (from its folder, or given)
  std::vector<std::filesystem::path> expert_folders;  ///< its tensors; empty: random A and B

  static auto fields() {
    using C = XLoraConfig;
    return config_fields(
        field("hidden_size", &C::hidden_size, check::dimension), field("adapters", &C::adapters),
        field("enable_softmax", &C::enable_softmax),
        field("enable_softmax_topk", &C::enable_softmax_topk),
        field("layerwise_scalings", &C::layerwise_scalings),
        field("xlora_depth", &C::xlora_depth, check::dimension),
        field("xlora_size", &C::xlora_size, check::dimension),
        field("top_k_lora", &C::top_k_lora, check::dimension_or_zero),
        float_field("xlora_dropout_p", &C::xlora_dropout_p, check::probability),
        float_field("softmax_temperature", &C::softmax_temperature, check::positive),
        field("use_trainable_adapters", &C::use_trainable_adapters),
        float_field("scaling_pass_value", &C::scaling_pass_value, check::scale),
        float_field("global_scaling_weight", &C::global_scaling_weight, check::scale));
  }
  /// The table, then expert n's adapter_config.json from adapters["n"] (relative: to `source`'s
  /// folder, which is where the reference's hub layout keeps them).
  static XLoraConfig from_json(const nlohmann::json& j, const std::string& source) {
    XLoraConfig c = read_config<XLoraConfig>(j, source);
    for (std::size_t n = 0; n < c.adapters.size(); ++n) {
      std::filesystem::path folder = c.adapters.at(std::to_string(n));
      if (folder.is_relative()) folder = std::filesystem::path(source).parent_path() / folder;
      const std::filesystem::path file = folder / "adapter_config.json";
      c.experts.push_back(config_from_json<LoraConfig>(io::load_json(file), file.string()));
      c.expert_folders.push_back(folder);
    }
    return c;
  }
  nlohmann::json to_json(const ModelConfig& model) const {
    nlohmann::json j = write_config(*this, model);
    if (top_k_lora == 0) j["top_k_lora"] = nullptr;
    return j;
  }
  void validate(const std::string& source) const {
    const auto fail = [&](const std::string& what) { throw ConfigError(source + ": " + what); };
    for (std::size_t n = 0; n < adapters.size(); ++n)
      if (!adapters.count(std::to_string(n)))
        fail("field 'adapters': expected the names 0.." + std::to_string(adapters.size() - 1) +
             " (the reference applies expert n only when it is named \"n\"), found " +
             nlohmann::json(adapters).dump().substr(0, 120));
    if (!experts.empty() && !adapters.empty() && experts.size() != adapters.size())
      fail("experts: expected one per adapters entry");
    if (top_k_lora > static_cast<int>(std::max(adapters.size(), experts.size())))
      fail("field 'top_k_lora': expected at most the number of experts, found " +
           std::to_string(top_k_lora));
  }
};

struct XLoRA {
  using family = family::Hybrid;
  static constexpr std::string_view name = "xlora", title = "X-LoRA";
  static constexpr std::string_view paper =
      "Buehler & Buehler, 2024, X-LoRA: Mixture of Low-Rank Adapter Experts";
  static constexpr std::string_view reference = "XLORA";
  using Config = XLoraConfig;

  /// One expert as a site table (LoRA's tensors; trainable as the config says).
  struct Expert {
    static constexpr std::string_view name = "X-LoRA expert";
    struct Config {
      LoraConfig lora;
      bool trainable = false;
    };
    static bool selects(const Config& c, const ModuleSite& m) {
      return selects_by_targets(c.lora, m);
    }
    static SiteTensors site_tensors(const Config& c, const ModuleSite& m) {
      SiteTensors t = LoRA::site_tensors(c.lora, m);
      for (TensorDecl& d : t) d.trainable = c.trainable;
      return t;
    }
  };
  /// The classifier's linear layers, as (in, out), and their index in the reference's Sequential.
  static std::vector<std::array<std::int64_t, 3>> classifier_shapes(const Config& c,
                                                                    std::int64_t sites) {
    const std::int64_t n =
        static_cast<std::int64_t>(c.experts.size()) * (c.layerwise_scalings ? sites : 1);
    const std::int64_t stride = c.xlora_dropout_p > 0 ? 3 : 2;
    std::vector<std::array<std::int64_t, 3>> out;
    for (int k = 0; k < c.xlora_depth; ++k)
      out.push_back({k == 0 ? c.hidden_size : c.xlora_size,
                     k + 1 == c.xlora_depth ? n : c.xlora_size, k * stride});
    return out;
  }
  static std::int64_t adapted_sites(const Config& c, const std::vector<LinearShape>& linears) {
    return std::count_if(linears.begin(), linears.end(), [&](const LinearShape& l) {
      return std::any_of(c.experts.begin(), c.experts.end(), [&](const LoraConfig& e) {
        return selects_by_targets(e, ModuleSite::of(l));
      });
    });
  }
  static ParameterCount count_parameters(const ModelConfig&, const std::vector<LinearShape>& l,
                                         const Config& c) {
    ParameterCount total;
    for (const auto& s : classifier_shapes(c, adapted_sites(c, l)))
      total.trainable += s[1] * (s[0] + 1);
    for (const LoraConfig& e : c.experts) {
      const ParameterCount x = count_site_tensors<Expert>(l, {e, c.use_trainable_adapters});
      total.trainable += x.trainable;
      total.frozen += x.frozen;
    }
    return total;
  }

  template <class T>
  class State {
   public:
    explicit State(const Config& config) : config_(config) {}
    const Config& config() const { return config_; }

    void attach(AttachContext<T>& ctx) {
      if (config_.experts.empty())
        throw ConfigError("X-LoRA: no experts (field 'adapters' is empty)");
      if (config_.hidden_size != ctx.config.hidden_size)
        throw ConfigError("X-LoRA: field 'hidden_size': expected the model's " +
                          std::to_string(ctx.config.hidden_size) + ", found " +
                          std::to_string(config_.hidden_size));
      layer_of_.assign(ctx.linears.size(), -1);
      for (std::size_t n = 0; n < config_.experts.size(); ++n) {
        const LoraConfig& e = config_.experts[n];
        experts_.emplace_back();
        experts_.back().template attach<Expert>({e, config_.use_trainable_adapters}, ctx.linears);
        if (n < config_.expert_folders.size()) {  // the project's LoRA loader, on expert n's file
          const io::SafetensorsFile file =
              io::SafetensorsFile::open(config_.expert_folders[n] / "adapter_model.safetensors");
          io::load_adapter_tensors(experts_.back().parameters(), file);
        } else {
          experts_.back().for_each([&](auto& s) {
            detail::kaiming_uniform(s[0].value(), ctx.rng);
            detail::kaiming_uniform(s[1].value(), ctx.rng);
          });
        }
      }
      int sites = 0;
      for (nn::Linear<T>* lin : ctx.linears)
        for (auto& table : experts_)
          if (table.adapts(*lin) && layer_of_[lin->site] < 0) layer_of_[lin->site] = sites++;
      for (const auto& s : classifier_shapes(config_, sites)) {
        const std::string key =
            "base_model.internal_xlora_classifier.layers." + std::to_string(s[2]);
        Tensor<T> w(Shape{s[1], s[0]}), b(Shape{s[1]});
        detail::kaiming_uniform(w, ctx.rng);  // torch's nn.Linear: U(±1/√in) for both
        std::uniform_real_distribution<double> u(-1 / std::sqrt(double(s[0])),
                                                 1 / std::sqrt(double(s[0])));
        for (std::int64_t i = 0; i < s[1]; ++i) b[i] = static_cast<T>(u(ctx.rng));
        classifier_.push_back({key + ".weight", Var<T>(std::move(w), true)});
        classifier_.push_back({key + ".bias", Var<T>(std::move(b), true)});
      }
    }
    std::vector<NamedParameter<T>> parameters() const {
      std::vector<NamedParameter<T>> out = classifier_;
      if (config_.use_trainable_adapters)
        for (std::size_t n = 0; n < experts_.size(); ++n)
          for (NamedParameter<T> p : experts_[n].parameters()) {  // the reference's names
            const auto dot = p.name.rfind('.');
            p.name = "base_model.lora_model." + p.name.substr(11, dot - 11) + "." +
                     std::to_string(n) + p.name.substr(dot);
            out.push_back(p);
          }
      return out;
    }

    /// The scaling pass (no gradient, every expert at v), then the classifier on the tape.
    void pre_pass(Tape<T>& tape, const std::function<Tensor<T>()>& hidden,
                  std::mt19937_64* dropout) {
      scalings_ = Var<T>();
      Var<T> h(hidden());
      const std::int64_t B = h.shape()[0], S = h.shape()[1];
      for (std::size_t k = 0; k < classifier_.size(); k += 2) {
        h = ops::linear(tape, h, classifier_[k].var, classifier_[k + 1].var,
                        ops::WeightLayout::OutIn);
        if (k + 2 == classifier_.size()) break;
        h = ops::relu(tape, h);
        if (dropout && config_.xlora_dropout_p > 0)
          h = Projection<T>::dropped(tape, h, config_.xlora_dropout_p, *dropout);
      }
      const auto N = static_cast<std::int64_t>(experts_.size());
      h = ops::reshape(tape, h, Shape{B, S, h.shape()[2] / N, N});
      if (config_.enable_softmax)
        h = ops::softmax(tape,
                         ops::scale(tape, h, static_cast<T>(1 / config_.softmax_temperature)));
      scalings_ = h;
    }

    void adapt(Projection<T>& p) const {
      const int l = layer_of_.at(p.module().site);
      if (l < 0) return;
      Tape<T>& tape = p.tape();
      Var<T> s;  // [B, T, N] at this module, or undefined in the scaling pass
      if (scalings_) s = module_scalings(tape, config_.layerwise_scalings ? l : 0);
      for (std::size_t n = 0; n < experts_.size(); ++n) {
        const auto* slot = experts_[n].find(p.module().site);
        if (!slot) continue;
        const LoraConfig& e = config_.experts[n];
        const std::int64_t r = slot->tensors[0].shape()[0];
        const T c = static_cast<T>(e.scaling(static_cast<int>(r), e.alpha_for(p.module().name)) *
                                   config_.global_scaling_weight);
        if (!s) {  // x · v: a constant scale
          if (config_.scaling_pass_value != 0)
            p.add_low_rank((*slot)[0], (*slot)[1], c * static_cast<T>(config_.scaling_pass_value),
                           e.lora_dropout);
          continue;
        }
        const Var<T> sn = ops::slice(tape, s, 2, static_cast<std::int64_t>(n), 1);  // [B, T, 1]
        const Var<T> ones(Tensor<T>::filled(Shape{r, 1}, c));
        const Var<T> a = (*slot)[0], b = (*slot)[1];
        p.add_delta(
            [a, b, sn, ones](Tape<T>& t, const Var<T>& x) {
              Var<T> h = ops::linear(t, x, a, Var<T>{}, ops::WeightLayout::OutIn);  // [..., r]
              const Var<T> w = ops::linear(t, sn, ones, Var<T>{}, ops::WeightLayout::OutIn);
              h = ops::mul(t, h, ops::reshape(t, w, h.shape()));
              return ops::linear(t, h, b, Var<T>{}, ops::WeightLayout::OutIn);
            },
            e.lora_dropout);
      }
    }
    /// The last scalings [B, T, L, N] (the reference's get_latest_scalings), before top-k.
    const Var<T>& latest_scalings() const { return scalings_; }

   private:
    /// Layer l's scalings [B, T, N], with the top-k mask and its softmax where configured.
    Var<T> module_scalings(Tape<T>& tape, int l) const {
      const Shape& sh = scalings_.shape();
      Var<T> s =
          ops::reshape(tape, ops::slice(tape, scalings_, 2, l, 1), Shape{sh[0], sh[1], sh[3]});
      if (config_.top_k_lora == 0 && !config_.enable_softmax_topk) return s;
      const std::int64_t N = sh[3], rows = sh[0] * sh[1];
      Tensor<T> keep = Tensor<T>::zeros(s.shape()), off = Tensor<T>::zeros(s.shape());
      for (std::int64_t i = 0; i < rows; ++i) {
        std::vector<std::int64_t> order(N);
        for (std::int64_t j = 0; j < N; ++j) order[j] = j;
        const T* v = s.value().data() + i * N;
        std::stable_sort(order.begin(), order.end(), [&](auto x, auto y) { return v[x] > v[y]; });
        const std::int64_t k = config_.top_k_lora ? config_.top_k_lora : N;
        for (std::int64_t j = 0; j < k; ++j) keep.data()[i * N + order[j]] = T(1);
        for (std::int64_t j = 0; j < N; ++j)
          if (v[j] == T(0) || keep.data()[i * N + j] == T(0))
            off.data()[i * N + j] = -std::numeric_limits<T>::infinity();
      }
      s = ops::mul(tape, s, Var<T>(keep));
      if (!config_.enable_softmax_topk) return s;
      return ops::mul(tape, ops::softmax(tape, ops::add(tape, s, Var<T>(off))), Var<T>(keep));
    }

    Config config_;
    std::vector<SiteTable<T>> experts_;
    std::vector<int> layer_of_;  ///< by site: the module's index among the adapted ones, or -1
    std::vector<NamedParameter<T>> classifier_;
    Var<T> scalings_;
  };
};

}  // namespace peft
