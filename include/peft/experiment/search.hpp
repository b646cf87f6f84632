#pragma once
// Design-space search over PEFT configurations under a trainable-parameter budget, in the spirit
// of S4 (Chen et al., 2023, "Parameter-Efficient Fine-Tuning Design Spaces") and AutoPEFT (Zhou
// et al., 2024): short proxy trainings rank candidate configurations, the best is kept.
//
//   1. A small LLaMA-style base is pretrained in-process on a mixture of the synthetic tasks
//      (all but the downstream one), so that candidates adapt a model that knows something.
//   2. The design space: method (LoRA, IA3, prefix tuning, serial / parallel adapter, MAM
//      adapter, UniPELT), target modules (attention, query+value, MLP, all), rank or size, and
//      layers (all, or the upper half). Every candidate is counted with its policy's
//      count_parameters from shapes alone; those over the budget are dropped before any
//      training, so no candidate exceeds it.
//   3. Up to max_candidates are drawn, seeded: shuffled within each method, then taken round-robin
//      over the methods so every method is represented.
//   4. Each is trained for the same number of proxy steps (same data stream, schedule and seed,
//      a per-method learning rate) and scored by its eval loss on held-out examples.
//   5. The best is written as its adapter config (JSON) with the table of every candidate.
// Determinism: everything is drawn from `seed`; for a fixed thread count the losses, and so the
// choice, repeat exactly (only the times differ).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "peft/data/tasks.hpp"
#include "peft/experiment/study.hpp"
#include "peft/experiment/training.hpp"
#include "peft/io/atomic_file.hpp"
#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/ia3.hpp"
#include "peft/methods/additive/prefix_tuning.hpp"
#include "peft/methods/hybrid/mam_adapter.hpp"
#include "peft/methods/hybrid/unipelt.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/train/trainer.hpp"

namespace peft::search {

struct SearchOptions {
  data::TaskKind task = data::TaskKind::KeyValue;  ///< the downstream task
  std::int64_t parameter_budget = 4000;  ///< no candidate trains more parameters than this
  std::int64_t proxy_steps = 60;         ///< training steps per candidate
  std::int64_t max_candidates = 12;      ///< candidates trained (after the budget filter)
  std::int64_t pretrain_steps = 300;     ///< base pretraining (0: a random base)
  std::int64_t batch = 16;
  std::int64_t eval_examples = 96;
  std::uint64_t seed = 0;
  int threads = 1;  ///< recorded (the caller sets OpenMP's count): results repeat per thread count
  ModelConfig model = default_model();
  data::TaskOptions task_options = default_task_options();

  static ModelConfig default_model() {
    ModelConfig c;
    c.model_type = "llama";
    c.vocab_size = data::TaskVocab::size;
    c.hidden_size = 32;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 4;
    c.head_dim = 8;
    c.intermediate_size = 64;
    c.max_positions = 64;
    c.norm_eps = 1e-6;
    c.tie_word_embeddings = true;
    c.attention_bias = c.mlp_bias = false;
    return c;
  }
  static data::TaskOptions default_task_options() {
    data::TaskOptions o;
    o.min_length = 2;
    o.max_length = 5;
    return o;
  }
};

struct Workload;
struct CandidateResult;

/// One point of the design space.
struct Candidate {
  std::string method;      ///< the policy's name, or the named composition's ("unipelt", ...)
  std::string targets;     ///< "attention", "qv", "mlp", "all", or "-" where the method has none
  std::string layers;      ///< "all" or "upper"
  std::int64_t size = 0;   ///< rank, virtual tokens or bottleneck width
  std::string size_label;  ///< what `size` is ("r=4", "tokens=8", ...)
  std::int64_t parameters = 0;  ///< trainable, counted from shapes before training
  double lr = 1e-2;
  /// Builds the model from the pretrained base, trains it, evaluates it.
  std::function<void(const Workload&, const SearchOptions&, CandidateResult&)> run;
  /// The config as the method's adapter_config.json.
  std::function<nlohmann::json(const ModelConfig&)> config_json;
};

struct CandidateResult {
  Candidate candidate;
  double eval_loss = std::numeric_limits<double>::quiet_NaN();
  double accuracy = 0;  ///< exact match on the eval examples
  double seconds = 0;   ///< proxy training and evaluation
  std::int64_t steps = 0;
  std::int64_t trained_parameters = 0;  ///< counted on the built model (equals the shapes count)
  std::string note;  ///< why a candidate has no loss (its config does not fit the model, ...)
};

/// The data and the pretrained base weights every candidate starts from.
struct Workload {
  ModelConfig model;
  std::vector<NamedParameter<float>> base;  ///< pretrained tensors (copied into each candidate)
  Decoder<arch::Llama, NoPeft, float>* base_model = nullptr;
  std::function<Batch(std::mt19937_64&)> train_batch;
  std::vector<Batch> eval_batches;
  double base_eval_loss = 0;
};

struct SearchResult {
  std::vector<CandidateResult> rows;  ///< in training order
  std::size_t best = 0;               ///< index into rows
  std::int64_t space_size = 0;        ///< candidates in the design space
  std::int64_t over_budget = 0;       ///< dropped before training
  /// Study entries whose config cannot be made for the searched model: "method: why".
  std::vector<std::string> unfit;
  double base_eval_loss = 0;  ///< the pretrained base on the downstream task
  double pretrain_seconds = 0;
  double total_seconds = 0;      ///< the whole search, pretraining included
  std::int64_t total_steps = 0;  ///< optimizer steps, pretraining included
};

namespace detail {

inline std::uint64_t draw(std::mt19937_64& rng, std::uint64_t n) { return rng() % n; }

/// Fisher–Yates with a portable bound (std::shuffle's algorithm differs between libraries).
template <class V>
void portable_shuffle(V& v, std::mt19937_64& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[draw(rng, i)]);
}

inline std::vector<int> upper_layers(const ModelConfig& m) {
  std::vector<int> out;
  for (int l = static_cast<int>(m.num_layers / 2); l < static_cast<int>(m.num_layers); ++l)
    out.push_back(l);
  return out;
}

inline std::vector<std::string> llama_modules(const std::string& targets) {
  if (targets == "attention") return {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (targets == "qv") return {"q_proj", "v_proj"};
  if (targets == "mlp") return {"gate_proj", "up_proj", "down_proj"};
  return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
}

/// The proxy training of every candidate: the same data stream, schedule and seed for all.
inline experiment::ProxyTraining proxy_training(const Workload& w, const SearchOptions& o,
                                                double lr) {
  experiment::ProxyTraining t;
  t.model = w.model;
  t.base = &w.base;
  t.train_batch = w.train_batch;
  t.eval_batches = &w.eval_batches;
  t.options = experiment::cosine_training(o.proxy_steps, lr, 0.0,
                                          std::max<std::int64_t>(1, o.proxy_steps / 10),
                                          LrSchedule{}.final_ratio, o.seed + 2);
  t.seed = o.seed + 1;
  return t;
}
inline void record(const experiment::ProxyResult& r, CandidateResult& row) {
  row.trained_parameters = r.trained_parameters;
  row.steps = r.steps;
  row.eval_loss = r.eval_loss;
  row.accuracy = r.exact_match;
}

/// A search point as a candidate: trained by the shared proxy training; a config the model
/// refuses at construction (ConfigError) trains no step and ranks last, its reason in the note.
inline Candidate candidate_of(experiment::SearchPoint point, std::string method,
                              std::string targets, std::string layers, std::int64_t size,
                              std::string size_label, double lr) {
  Candidate c;
  c.method = std::move(method);
  c.targets = std::move(targets);
  c.layers = std::move(layers);
  c.size = size;
  c.size_label = std::move(size_label);
  c.lr = lr;
  c.parameters = point.parameters;
  c.config_json = std::move(point.config_json);
  c.run = [run = std::move(point.run)](const Workload& w, const SearchOptions& o,
                                       CandidateResult& row) {
    try {
      record(run(proxy_training(w, o, row.candidate.lr)), row);
    } catch (const ConfigError& error) {
      row.note = error.what();
    }
  };
  return c;
}

/// A grid candidate of policy P with `config`, named P::name ("lora", ..., "unipelt").
template <class P>
requires PeftPolicy<P> && CountableFromShapes<P> && Savable<P> Candidate
make_candidate(const ModelConfig& model, typename P::Config config, std::string targets,
               std::string layers, std::int64_t size, std::string size_label, double lr) {
  return candidate_of(experiment::make_search_point<P>(model, config), std::string(P::name),
                      std::move(targets), std::move(layers), size, std::move(size_label), lr);
}

}  // namespace detail

/// A study entry (study_methods.hpp, or a project's own) as one candidate: the method at the
/// study's configuration for `model`, at the study's learning rate.
inline Candidate study_candidate(const experiment::MethodEntry& e, const ModelConfig& model,
                                 std::int64_t proxy_steps) {
  return detail::candidate_of(e.search_point(model, proxy_steps), e.method, "study", "all", 0,
                              "study config", e.lr);
}

/// Every point of the design space for `model` (LLaMA module names), counted, not yet filtered:
/// the grid below (LoRA, IA3, prefix tuning, serial and parallel adapters, MAM, UniPELT over
/// targets, sizes and layers), then every method of `study` (the study's table: one point each,
/// at its study configuration) that the grid does not cover. `unfit` receives the study entries
/// whose config cannot be made for `model`.
inline std::vector<Candidate> design_space(const ModelConfig& model,
                                           const std::vector<experiment::MethodEntry>& study = {},
                                           std::int64_t proxy_steps = 60,
                                           std::vector<std::string>* unfit = nullptr) {
  std::vector<Candidate> out;
  const std::vector<std::string> layer_choices = {"all", "upper"};
  auto layers_of = [&](const std::string& l) {
    return l == "all" ? std::vector<int>{} : detail::upper_layers(model);
  };
  for (const std::string targets : {"qv", "attention", "mlp", "all"})
    for (int r : {1, 2, 4, 8})
      for (const std::string& layers : layer_choices) {
        LoraConfig c;
        c.r = r;
        c.lora_alpha = 2.0 * r;
        c.targets.target_modules.names = detail::llama_modules(targets);
        c.targets.layers_to_transform = layers_of(layers);
        out.push_back(detail::make_candidate<LoRA>(model, c, targets, layers, r,
                                                   "r=" + std::to_string(r), 1e-2));
      }
  for (const std::string targets : {"attention", "mlp", "all"})
    for (const std::string& layers : layer_choices) {
      Ia3Config c;
      if (targets != "mlp") c.targets.target_modules.names = {"k_proj", "v_proj"};
      if (targets != "attention") {
        c.targets.target_modules.names.push_back("down_proj");
        c.feedforward_modules.names = {"down_proj"};
      }
      c.targets.layers_to_transform = layers_of(layers);
      out.push_back(detail::make_candidate<IA3>(model, c, targets, layers, 0, "-", 3e-2));
    }
  for (std::int64_t tokens : {2, 4, 8, 16}) {
    PrefixTuningConfig c;
    c.num_virtual_tokens = tokens;
    out.push_back(detail::make_candidate<PrefixTuning>(model, c, "-", "all", tokens,
                                                       "tokens=" + std::to_string(tokens), 3e-2));
  }
  for (std::int64_t width : {2, 4, 8, 16})
    for (const std::string& layers : layer_choices) {
      SerialAdapter::Config s;
      s.bottleneck_size = width;
      s.layers_to_transform = layers_of(layers);
      out.push_back(detail::make_candidate<SerialAdapter>(model, s, "-", layers, width,
                                                          "width=" + std::to_string(width), 1e-2));
      ParallelAdapter::Config p;
      p.bottleneck_size = width;
      p.layers_to_transform = layers_of(layers);
      out.push_back(detail::make_candidate<ParallelAdapter>(
          model, p, "-", layers, width, "width=" + std::to_string(width), 1e-2));
    }
  for (std::int64_t size : {4, 8, 16}) {
    const auto c = mam_config({.prefix_tokens = size / 2, .adapter_width = size, .scaling = 4.0});
    out.push_back(detail::make_candidate<MAMAdapter>(
        model, c, "-", "all", size,
        "tokens=" + std::to_string(size / 2) + ",width=" + std::to_string(size), 1e-2));
  }
  for (int r : {2, 4}) {
    const auto c = unipelt_config(
        model, {.lora_r = r, .lora_alpha = 2.0 * r, .prefix_tokens = r, .adapter_width = 2 * r});
    out.push_back(detail::make_candidate<UniPELT>(model, c, "qv", "all", r,
                                                  "r=" + std::to_string(r) +
                                                      ",tokens=" + std::to_string(r) +
                                                      ",width=" + std::to_string(2 * r),
                                                  1e-2));
  }
  std::set<std::string> gridded;
  for (const Candidate& c : out) gridded.insert(c.method);
  for (const experiment::MethodEntry& e : study) {
    if (!e.search_point || gridded.count(e.method)) continue;
    try {
      out.push_back(study_candidate(e, model, proxy_steps));
    } catch (const ConfigError& error) {
      if (unfit) unfit->push_back(e.method + ": " + error.what());
    }
  }
  return out;
}

/// Keeps the candidates within the budget, then draws up to `max` of them (seeded, round-robin
/// over methods). `over_budget` receives how many were dropped.
inline std::vector<Candidate> select_candidates(std::vector<Candidate> space, std::int64_t budget,
                                                std::int64_t max, std::uint64_t seed,
                                                std::int64_t& over_budget) {
  std::vector<std::string> methods;
  std::vector<std::vector<Candidate>> groups;
  over_budget = 0;
  for (Candidate& c : space) {
    if (c.parameters > budget) {
      ++over_budget;
      continue;
    }
    auto it = std::find(methods.begin(), methods.end(), c.method);
    if (it == methods.end()) {
      methods.push_back(c.method);
      groups.emplace_back();
      it = methods.end() - 1;
    }
    groups[static_cast<std::size_t>(it - methods.begin())].push_back(std::move(c));
  }
  std::mt19937_64 rng(seed ^ 0x5ea4c4ull);
  for (auto& g : groups) detail::portable_shuffle(g, rng);
  // The methods' order is drawn too: with the study's methods there are more methods than
  // candidates, and a fixed order would always train the same ones.
  detail::portable_shuffle(groups, rng);
  std::vector<Candidate> out;
  for (std::size_t round = 0; static_cast<std::int64_t>(out.size()) < max; ++round) {
    bool any = false;
    for (auto& g : groups)
      if (round < g.size() && static_cast<std::int64_t>(out.size()) < max) {
        out.push_back(g[round]);
        any = true;
      }
    if (!any) break;
  }
  return out;
}

/// Pretrains the base and builds the downstream data.
inline Workload make_workload(const SearchOptions& o, Decoder<arch::Llama, NoPeft, float>& base,
                              SearchResult& result) {
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  std::vector<data::TaskKind> pretrain_tasks;
  for (data::TaskKind k : data::kAllTasks)
    if (k != o.task) pretrain_tasks.push_back(k);
  data::TaskMixture downstream{{o.task}, o.task_options, 0};
  data::TaskMixture pretrain{pretrain_tasks, o.task_options, 0};
  const std::int64_t seq = std::max(downstream.seq_len(), pretrain.seq_len());
  downstream.min_seq_len = pretrain.min_seq_len = seq;
  if (seq > o.model.max_positions)
    throw ConfigError("search: sequences of " + std::to_string(seq) +
                      " tokens exceed the model's " + std::to_string(o.model.max_positions) +
                      " positions");
  Workload w;
  w.model = o.model;
  const std::int64_t batch = o.batch;
  w.train_batch = [downstream, batch](std::mt19937_64& rng) {
    return downstream.train_batch(rng, batch);
  };
  w.eval_batches = downstream.eval_batches(o.seed + 3, o.eval_examples, 32);
  if (o.pretrain_steps > 0) {
    const TrainResult r = experiment::pretrain_base(
        base,
        experiment::cosine_training(o.pretrain_steps, 3e-3, TrainerOptions{}.adamw.weight_decay,
                                    std::max<std::int64_t>(1, o.pretrain_steps / 10),
                                    LrSchedule{}.final_ratio, o.seed + 4),
        [pretrain, batch](std::mt19937_64& rng) { return pretrain.train_batch(rng, batch); },
        "search");
    result.total_steps += r.steps;
  }
  w.base = base.base_parameters();
  w.base_model = &base;
  w.base_eval_loss = evaluate(base, w.eval_batches).loss;
  result.pretrain_seconds = std::chrono::duration<double>(Clock::now() - started).count();
  return w;
}

/// Runs the search over the grid and the methods of `study` (see design_space); `progress` (may
/// be null) gets one line per candidate.
inline SearchResult run_search(const SearchOptions& o, std::ostream* progress = nullptr,
                               const std::vector<experiment::MethodEntry>& study = {}) {
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  if (o.parameter_budget <= 0 || o.proxy_steps <= 0 || o.max_candidates <= 0)
    throw ConfigError("search: budget, proxy steps and candidates must be positive");
  SearchResult result;
  std::vector<Candidate> space = design_space(o.model, study, o.proxy_steps, &result.unfit);
  result.space_size = static_cast<std::int64_t>(space.size());
  std::vector<Candidate> chosen = select_candidates(std::move(space), o.parameter_budget,
                                                    o.max_candidates, o.seed, result.over_budget);
  if (chosen.empty())
    throw ConfigError("search: no candidate fits a budget of " +
                      std::to_string(o.parameter_budget) + " trainable parameters");
  Decoder<arch::Llama, NoPeft, float> base(o.model, {}, o.seed + 1);
  const Workload w = make_workload(o, base, result);
  result.base_eval_loss = w.base_eval_loss;
  if (progress)
    *progress << "search: " << result.space_size << " candidates in the space, "
              << result.over_budget << " over the budget of " << o.parameter_budget
              << (result.unfit.empty()
                      ? ""
                      : ", " + std::to_string(result.unfit.size()) + " study methods unfit")
              << ", training " << chosen.size() << " for " << o.proxy_steps
              << " steps each (base eval loss " << std::fixed << std::setprecision(4)
              << w.base_eval_loss << ")\n";
  for (const std::string& why : result.unfit)
    if (progress) *progress << "  unfit: " << why << "\n";
  for (Candidate& c : chosen) {
    CandidateResult row;
    row.candidate = std::move(c);
    const auto t0 = Clock::now();
    row.candidate.run(w, o, row);
    row.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    result.total_steps += row.steps;
    if (progress)
      *progress << "  " << std::setw(16) << std::left << row.candidate.method << std::right << " "
                << std::setw(9) << row.candidate.targets << " " << std::setw(5)
                << row.candidate.layers << " " << std::setw(22) << row.candidate.size_label << " "
                << std::setw(7) << row.candidate.parameters << " params  loss " << std::fixed
                << std::setprecision(4) << row.eval_loss << "  " << std::setprecision(1)
                << row.seconds << " s" << (row.note.empty() ? "" : "  [" + row.note + "]") << "\n";
    result.rows.push_back(std::move(row));
  }
  for (std::size_t i = 0; i < result.rows.size(); ++i) {
    const double l = result.rows[i].eval_loss, best = result.rows[result.best].eval_loss;
    if (std::isfinite(l) && (!std::isfinite(best) || l < best)) result.best = i;
  }
  result.total_seconds = std::chrono::duration<double>(Clock::now() - started).count();
  return result;
}

/// The candidates' table (Markdown): method, targets, layers, size, parameters, loss, accuracy,
/// time; the chosen row marked.
inline void print_table(std::ostream& out, const SearchResult& r) {
  out << "| # | method | targets | layers | size | params | eval loss | exact match | time (s) |\n"
         "|---|---|---|---|---|---:|---:|---:|---:|\n";
  for (std::size_t i = 0; i < r.rows.size(); ++i) {
    const CandidateResult& row = r.rows[i];
    const Candidate& c = row.candidate;
    char loss[32], acc[32], secs[32];
    std::snprintf(loss, sizeof loss, "%.4f", row.eval_loss);
    std::snprintf(acc, sizeof acc, "%.3f", row.accuracy);
    std::snprintf(secs, sizeof secs, "%.1f", row.seconds);
    out << "| " << i + 1 << (i == r.best ? " (best)" : "") << " | " << c.method << " | "
        << c.targets << " | " << c.layers << " | " << c.size_label << " | " << c.parameters << " | "
        << loss << " | " << acc << " | " << secs << " |\n";
  }
}

/// Writes into `dir`: adapter_config.json (the best candidate's config), config.json (the
/// searched model's), search_table.md, search.json (every row, the budget and the cost).
inline void write_results(const std::filesystem::path& dir, const SearchResult& r,
                          const SearchOptions& o) {
  std::filesystem::create_directories(dir);
  const CandidateResult& best = r.rows.at(r.best);
  auto write = [&](const std::string& name, const std::string& text) {
    io::write_file_atomically(dir / name, text);
  };
  write("adapter_config.json", best.candidate.config_json(o.model).dump(2) + "\n");
  write("config.json", o.model.to_json().dump(2) + "\n");
  std::ostringstream table;
  print_table(table, r);
  write("search_table.md", table.str());
  nlohmann::json rows = nlohmann::json::array();
  for (const CandidateResult& row : r.rows) {
    const Candidate& c = row.candidate;
    rows.push_back({{"method", c.method},
                    {"targets", c.targets},
                    {"layers", c.layers},
                    {"size", c.size_label},
                    {"parameters", c.parameters},
                    {"eval_loss", std::isfinite(row.eval_loss) ? nlohmann::json(row.eval_loss)
                                                               : nlohmann::json()},
                    {"exact_match", row.accuracy},
                    {"seconds", row.seconds},
                    {"steps", row.steps},
                    {"note", row.note},
                    {"config", c.config_json(o.model)}});
  }
  const nlohmann::json summary = {{"task", std::string(data::task_name(o.task))},
                                  {"parameter_budget", o.parameter_budget},
                                  {"proxy_steps", o.proxy_steps},
                                  {"seed", o.seed},
                                  {"threads", o.threads},
                                  {"space_size", r.space_size},
                                  {"over_budget", r.over_budget},
                                  {"unfit", r.unfit},
                                  {"base_eval_loss", r.base_eval_loss},
                                  {"best", r.best},
                                  {"cost",
                                   {{"total_seconds", r.total_seconds},
                                    {"pretrain_seconds", r.pretrain_seconds},
                                    {"total_steps", r.total_steps}}},
                                  {"candidates", rows}};
  write("search.json", summary.dump(2) + "\n");
}

}  // namespace peft::search
