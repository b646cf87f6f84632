#pragma once
// `peft study`: how each PEFT method trades trainable parameters for quality, on one table.
//
//   1. Pretrain a small LLaMA-style decoder on a mixture of synthetic tasks (or byte-level text
//      with --pretrain-text), or load it from the cache: the cache key is a hash of everything
//      that decides the pretrained weights, so a second run skips this phase.
//   2. Adapt that base to a different downstream task (or text, --text) with full fine-tuning
//      and with every method of the table, each with the same step budget, data stream,
//      schedule and seed; only the learning rate differs, per method.
//   3. Print the table, write results.csv, results.json and curves.svg (eval loss against step
//      for every method) into --out.
//
// This header is the engine: run_study_table(args, out, err, table) over a table of rows, each
// `entry<P>(lr, make_config)`: the policy type, its learning rate, and a lambda that builds its
// config for the study's model (docs/study.md). The library's own table, study_methods(), and
// run_study(args, out, err, extra_rows) are in experiment/study_methods.hpp, apart, so that a
// program studying only its own methods compiles none of the library's (tests/consumer).
// The experiment module (include/peft/experiment/) is opt-in: not in <peft/peft.hpp>.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <peft/data/tasks.hpp>
#include <peft/data/text.hpp>
#include <peft/io/parse_text.hpp>
#include <peft/peft.hpp>
#include <peft/train/trainer.hpp>

#include "peft/experiment/training.hpp"

namespace peft::experiment {

namespace fs = std::filesystem;

/// Everything one run of the study is decided by (the command line, resolved).
struct Settings {
  bool quick = false;
  fs::path out = "study";
  fs::path cache;  ///< empty: out / "cache"
  std::uint64_t seed = 0;
  int threads = 1;
  bool progress = true;           ///< a bar on a terminal; plain lines otherwise
  std::vector<std::string> only;  ///< methods to run (empty: all); none and full always run
  std::map<std::string, double> lr_overrides;  ///< --lr method=rate: replaces an entry's rate
  // Tasks mode: pretrain on every task but the downstream one
  std::vector<data::TaskKind> pretrain_tasks;
  data::TaskKind downstream = data::TaskKind::KeyValue;
  // Text mode (both set)
  fs::path pretrain_text, text;
  // Budgets (filled from quick / default unless given)
  std::int64_t pretrain_steps = 0, adapt_steps = 0, batch = 0, eval_every = 0, eval_examples = 0;
  double pretrain_lr = 3e-3;

  bool text_mode() const { return !text.empty(); }
  fs::path cache_dir() const { return cache.empty() ? out / "cache" : cache; }
};

/// The data every method adapts on, and the pretrained base, shared by all rows.
struct Workload {
  ModelConfig model;
  fs::path base_dir;  ///< holds model.safetensors and config.json (the reference layout)
  std::function<Batch(std::mt19937_64&)> train_batch;
  std::vector<Batch> eval_batches;
  std::vector<Batch> calibration_batches;  ///< for methods that pick weights from data (FishMask)
  bool exact_match = true;  ///< accuracy = exact match (tasks) or next-byte accuracy (text)
  std::string description;
};

struct CurvePoint {
  std::int64_t step;
  double loss;
};

struct MethodResult {
  std::string family, method;
  std::int64_t trainable = 0, all = 0;
  double eval_loss = std::numeric_limits<double>::quiet_NaN();
  double eval_accuracy = std::numeric_limits<double>::quiet_NaN();
  double ms_per_step = 0, peak_mem_mb = 0, lr = 0;
  std::vector<CurvePoint> curve;
  std::string note;  ///< why a row is incomplete (an error, a non-finite stop)
  double trainable_pct() const { return all > 0 ? 100.0 * double(trainable) / double(all) : 0.0; }
};

// ---------------------------------------------------------------------------------------------
// Progress: a bar redrawn in place on a terminal, a line per tenth of the phase otherwise (logs
// of a CI run stay short and readable).
class Progress {
 public:
  Progress(std::ostream& out, bool enabled)
      : out_(out), enabled_(enabled), tty_(enabled && isatty(fileno(stdout)) != 0) {}

  void start(std::string label, std::int64_t total) {
    label_ = std::move(label);
    total_ = std::max<std::int64_t>(total, 1);
    last_logged_ = -1;
  }
  void update(std::int64_t done, double loss) {
    if (!enabled_) return;
    if (tty_) {
      const int width = 28, filled = static_cast<int>(width * done / total_);
      out_ << "\r  " << std::left << std::setw(16) << label_ << std::right << " ["
           << std::string(static_cast<std::size_t>(filled), '#')
           << std::string(static_cast<std::size_t>(width - filled), '.') << "] " << std::setw(5)
           << done << '/' << total_ << "  loss " << std::fixed << std::setprecision(4) << loss
           << "   " << std::flush;
    } else {
      const std::int64_t tenth = 10 * done / total_;
      if (tenth != last_logged_ && (tenth > last_logged_ || done == total_)) {
        last_logged_ = tenth;
        out_ << "  " << label_ << ": step " << done << '/' << total_ << ", loss " << std::fixed
             << std::setprecision(4) << loss << '\n'
             << std::flush;
      }
    }
  }
  void finish(const std::string& summary) {
    if (tty_ && enabled_) out_ << '\r' << std::string(80, ' ') << '\r';
    out_ << "  " << std::left << std::setw(16) << label_ << std::right << ' ' << summary << '\n'
         << std::flush;
  }

 private:
  std::ostream& out_;
  bool enabled_, tty_;
  std::string label_;
  std::int64_t total_ = 1, last_logged_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Peak memory per method: the process's peak resident set, reset before each method through
// /proc/self/clear_refs (Linux). Where the reset is refused the figure is the process peak so far.
inline void reset_peak_memory() {
  std::ofstream clear("/proc/self/clear_refs");
  if (clear) clear << "5";
}
inline double peak_memory_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

inline std::uint64_t fnv1a(std::string_view text, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

inline std::string hex16(std::uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

/// The study's model: LLaMA-style (RMSNorm, rotary, SwiGLU), tied embeddings, with biases.
inline ModelConfig study_model(std::int64_t vocab, std::int64_t positions) {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = vocab;
  c.hidden_size = 64;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.head_dim = 16;
  c.intermediate_size = 176;
  c.max_positions = positions;
  c.norm_eps = 1e-6;
  c.tie_word_embeddings = true;
  // Biases on (as Qwen-style LLaMA variants have them) so that BitFit has something to train.
  c.attention_bias = c.mlp_bias = true;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Phase 1: the pretrained base, from the cache or trained now.

/// Pretrains (or finds in the cache) the base; returns its folder.
inline fs::path pretrained_base(const Settings& s, const ModelConfig& model,
                                const std::function<Batch(std::mt19937_64&)>& train_batch,
                                const std::vector<Batch>& eval_batches, const std::string& data_key,
                                std::ostream& out, Progress& progress) {
  nlohmann::json key = {{"study-cache-format", 1}, {"model", model.to_json()},
                        {"data", data_key},        {"steps", s.pretrain_steps},
                        {"batch", s.batch},        {"lr", s.pretrain_lr},
                        {"seed", s.seed},          {"threads", s.threads}};
  const fs::path dir = s.cache_dir() / ("base-" + hex16(fnv1a(key.dump())));
  if (fs::is_regular_file(dir / "model.safetensors") && fs::is_regular_file(dir / "config.json")) {
    out << "pretrained base: cached at " << dir.string() << " (delete it to pretrain again)\n";
    return dir;
  }
  out << "pretraining the base (" << s.pretrain_steps << " steps; cached afterwards in "
      << dir.string() << ")\n";
  using Model = Decoder<arch::Llama, NoPeft, float>;
  Model base(model, {}, s.seed);
  progress.start("pretrain", s.pretrain_steps);
  const TrainResult r = pretrain_base(
      base,
      cosine_training(s.pretrain_steps, s.pretrain_lr, 0.01,
                      std::min<std::int64_t>(100, s.pretrain_steps / 10), 0.1, s.seed + 1),
      train_batch, "study", [&](Model& m) { return evaluate(m, eval_batches); },
      [&](const StepInfo& i) { progress.update(i.step, i.loss); });
  const EvalMetrics& m = r.evals.back().metrics;
  std::ostringstream summary;
  summary << "eval loss " << std::fixed << std::setprecision(4) << m.loss << ", accuracy "
          << std::setprecision(3) << m.exact_match << " (exact) " << m.token_accuracy
          << " (token), " << std::setprecision(1) << r.train_seconds << " s";
  progress.finish(summary.str());

  fs::create_directories(dir);
  io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const NamedParameter<float>& p : base.base_parameters())
    writer.add<float>(p.name, p.var.shape(), std::span<const float>(p.var.value().values()));
  // config.json last: its presence marks a complete cache entry.
  writer.write(dir / "model.safetensors");
  nlohmann::json info = key;
  info["eval_loss"] = m.loss;
  info["eval_exact_match"] = m.exact_match;
  info["eval_token_accuracy"] = m.token_accuracy;
  info["train_seconds"] = r.train_seconds;
  write_text_atomically(dir / "pretraining.json", info.dump(2) + "\n");
  write_text_atomically(dir / "config.json", model.to_json().dump(2) + "\n");
  return dir;
}

// ---------------------------------------------------------------------------------------------
// Phase 2: one method.

/// Trains `Policy` with `config` from the cached base on the workload; `full`: every base
/// tensor trainable too (full fine-tuning); `steps` 0: evaluation only (the base row).
template <class Policy>
MethodResult adapt(const Workload& w, const Settings& s, const typename Policy::Config& config,
                   double lr, bool full, std::int64_t steps, Progress& progress,
                   const std::string& label) {
  using Model = Decoder<arch::Llama, Policy, float>;
  MethodResult row;
  row.lr = lr;
  reset_peak_memory();
  Model model(w.model, config, s.seed);
  model.load_base_weights(io::SafetensorsFile::open(w.base_dir / "model.safetensors"));
  if (full) model.set_base_trainable(true);
  if constexpr (Calibrated<typename Model::Adapter, Model, std::vector<Batch>>)
    model.adapter().calibrate(model, w.calibration_batches);
  const auto count = [&] {
    std::int64_t n = 0;
    for (const NamedParameter<float>& p : model.trainable_parameters()) n += p.var.value().numel();
    return n;
  };
  std::int64_t base_count = 0;
  for (const NamedParameter<float>& p : model.base_parameters())
    base_count += p.var.value().numel();
  const auto evaluator = [&](Model& m) { return evaluate(m, w.eval_batches); };
  const auto accuracy = [&](const EvalMetrics& m) {
    return w.exact_match ? m.exact_match : m.token_accuracy;
  };
  if (steps == 0) {
    const EvalMetrics m = evaluate(model, w.eval_batches);
    row.eval_loss = m.loss;
    row.eval_accuracy = accuracy(m);
    row.all = base_count;
    row.peak_mem_mb = peak_memory_mb();
    return row;
  }

  // No weight decay (decaying adapters toward 0 fights short budgets; off for all); every
  // method sees the same stream of batches.
  TrainerOptions o = cosine_training(steps, lr, 0.0, steps / 10, 0.1, s.seed + 2);
  o.eval_every = s.eval_every;

  // Methods that train in two phases (diff pruning: dense with the L0 penalty, then the pruned
  // sparse diff) split the budget; both phases' steps count toward it.
  constexpr bool two_phase = TrainsInTwoPhases<typename Model::Adapter>;
  const std::int64_t first = two_phase ? steps / 2 : steps;
  progress.start(label, steps);
  double seconds = 0;
  std::int64_t timed = 0;
  const auto train = [&](std::int64_t phase_steps, std::int64_t offset, bool eval_at_start) {
    TrainerOptions po = o;
    po.max_steps = phase_steps;
    po.schedule.warmup_steps = phase_steps / 10;
    po.eval_at_start = eval_at_start;
    Trainer<Model> trainer(model, po, w.train_batch, evaluator);
    trainer.on_step = [&](const StepInfo& i) { progress.update(offset + i.step, i.loss); };
    const TrainResult r = trainer.run();
    for (const EvalPoint& e : r.evals) row.curve.push_back({offset + e.step, e.metrics.loss});
    seconds += r.train_seconds;
    timed += r.timed_steps;
    if (r.reason == StopReason::NonFinite) row.note = r.message;
    return r;
  };
  TrainResult r = train(first, 0, true);
  if constexpr (two_phase) {
    if (r.reason == StopReason::Completed) {
      model.adapter().prune();
      r = train(steps - first, first, false);
    }
  }
  const EvalMetrics m = evaluate(model, w.eval_batches);
  row.trainable = count();
  row.all = full ? base_count : base_count + row.trainable;
  row.eval_loss = m.loss;
  row.eval_accuracy = accuracy(m);
  row.ms_per_step = timed > 0 ? 1000.0 * seconds / double(timed) : 0.0;
  row.peak_mem_mb = peak_memory_mb();
  std::ostringstream summary;
  summary << "eval loss " << std::fixed << std::setprecision(4) << row.eval_loss << ", accuracy "
          << std::setprecision(3) << row.eval_accuracy << ", " << row.trainable << " trainable, "
          << std::setprecision(1) << row.ms_per_step << " ms/step";
  if (!row.note.empty()) summary << "  [" << row.note << "]";
  progress.finish(summary.str());
  return row;
}

/// A method with a config as one point of the design-space search (search.hpp): counted from
/// shapes, written as adapter_config.json, and its proxy training.
struct SearchPoint {
  std::int64_t parameters = 0;  ///< trainable, from shapes
  std::function<nlohmann::json(const ModelConfig&)> config_json;
  std::function<ProxyResult(const ProxyTraining&)> run;
};

/// Policy with `config` on `model` (LLaMA module names) as a search point.
template <class Policy>
requires CountableFromShapes<Policy> && Savable<Policy> SearchPoint
make_search_point(const ModelConfig& model, const typename Policy::Config& config) {
  SearchPoint point;
  point.parameters =
      count_parameters<Policy>(model, linear_shapes<arch::Llama>(model), config).trainable;
  point.config_json = [config](const ModelConfig& m) { return config_to_json(config, m); };
  point.run = [config](const ProxyTraining& t) {
    Decoder<arch::Llama, Policy, float> net(t.model, config, t.seed);
    return proxy_train(net, t);
  };
  return point;
}

/// One row of the study: a method, its family, its learning rate and how to run it (with the
/// learning rate it is given, so --lr can override the entry's).
struct MethodEntry {
  std::string family, method;
  double lr = 0;
  std::function<MethodResult(const Workload&, const Settings&, Progress&, double lr)> run;
  /// The entry's config on another model, for `peft search`; empty where the method cannot be
  /// counted from shapes or saved as a config (none, full).
  std::function<SearchPoint(const ModelConfig&, std::int64_t steps)> search_point;
};

/// The entry for a PEFT policy: the family and the name (`P::name`) come from the type, the
/// config from `make_config` (given the study's model config and its step budget). `label`
/// names a row other than by the method's name (a variant: "rslora"; a composition: "unipelt").
template <class Policy>
MethodEntry entry(
    double lr,
    std::function<typename Policy::Config(const ModelConfig&, std::int64_t steps)> make_config,
    std::string method = std::string(Policy::name)) {
  MethodEntry e{std::string(Policy::family::name), method, lr, {}, {}};
  e.run = [method, make_config](const Workload& w, const Settings& s, Progress& p, double rate) {
    return adapt<Policy>(w, s, make_config(w.model, s.adapt_steps), rate, false, s.adapt_steps, p,
                         method);
  };
  if constexpr (CountableFromShapes<Policy> && Savable<Policy>)
    e.search_point = [make_config](const ModelConfig& model, std::int64_t steps) {
      return make_search_point<Policy>(model, make_config(model, steps));
    };
  return e;
}

/// The same, for a row named `method` (a variant or a composition alias).
template <class Policy>
MethodEntry entry(
    std::string method, double lr,
    std::function<typename Policy::Config(const ModelConfig&, std::int64_t steps)> make_config) {
  return entry<Policy>(lr, std::move(make_config), std::move(method));
}

inline TargetRules modules(std::vector<std::string> names) {
  TargetRules t;
  t.target_modules.names = std::move(names);
  return t;
}
inline TargetRules all_linear() {
  TargetRules t;
  t.target_modules.all_linear = true;
  return t;
}

/// Rows `none` and `full`, then the rows of `table` (filtered by --methods).
inline std::vector<MethodEntry> all_entries(const Settings& s, std::vector<MethodEntry> table) {
  std::vector<MethodEntry> out;
  out.push_back({"none",
                 "none",
                 0,
                 [](const Workload& w, const Settings& st, Progress& p, double) {
                   MethodResult r = adapt<NoPeft>(w, st, {}, 0, false, 0, p, "none");
                   p.start("none", 1);
                   std::ostringstream summary;
                   summary << "eval loss " << std::fixed << std::setprecision(4) << r.eval_loss
                           << ", accuracy " << std::setprecision(3) << r.eval_accuracy
                           << " (the base, un-adapted)";
                   p.finish(summary.str());
                   return r;
                 },
                 {}});
  const double full_lr = 1e-3;
  out.push_back({"none",
                 "full",
                 full_lr,
                 [](const Workload& w, const Settings& st, Progress& p, double rate) {
                   return adapt<NoPeft>(w, st, {}, rate, true, st.adapt_steps, p, "full");
                 },
                 {}});
  for (const std::string& name : s.only) {
    const bool known = std::any_of(table.begin(), table.end(),
                                   [&](const MethodEntry& e) { return e.method == name; });
    if (!known && name != "none" && name != "full")
      throw io::ArgumentError(
          "--methods: expected method names of the study (peft study "
          "--list), found '" +
          name + "'");
  }
  // Checked before the entries are moved out of the table.
  for (const auto& override_entry : s.lr_overrides) {
    // A named copy, not a structured binding: clang 14 cannot capture those in a lambda.
    const std::string& name = override_entry.first;
    const bool known = std::any_of(table.begin(), table.end(),
                                   [&](const MethodEntry& e) { return e.method == name; }) ||
                       name == "full";
    if (!known)
      throw io::ArgumentError(
          "--lr: expected method=rate with a method of the study (peft study "
          "--list) that trains, found '" +
          name + "'");
  }
  for (MethodEntry& e : table) {
    if (!s.only.empty() && std::find(s.only.begin(), s.only.end(), e.method) == s.only.end())
      continue;
    out.push_back(std::move(e));
  }
  for (MethodEntry& e : out)
    if (const auto it = s.lr_overrides.find(e.method); it != s.lr_overrides.end())
      e.lr = it->second;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Phase 3: outputs.

inline std::string format_double(double x, int precision) {
  if (!std::isfinite(x)) return "nan";
  std::ostringstream s;
  s << std::fixed << std::setprecision(precision) << x;
  return s.str();
}

inline void print_table(std::ostream& out, const std::vector<MethodResult>& rows) {
  out << '\n'
      << std::left << std::setw(16) << "family" << std::setw(18) << "method" << std::right
      << std::setw(12) << "trainable" << std::setw(12) << "trainable%" << std::setw(11)
      << "eval_loss" << std::setw(10) << "accuracy" << std::setw(10) << "ms/step" << std::setw(10)
      << "peak_MB" << '\n'
      << std::string(99, '-') << '\n';
  for (const MethodResult& r : rows) {
    out << std::left << std::setw(16) << r.family << std::setw(18) << r.method << std::right
        << std::setw(12) << r.trainable << std::setw(12) << format_double(r.trainable_pct(), 3)
        << std::setw(11) << format_double(r.eval_loss, 4) << std::setw(10)
        << format_double(r.eval_accuracy, 3) << std::setw(10) << format_double(r.ms_per_step, 1)
        << std::setw(10) << format_double(r.peak_mem_mb, 1);
    if (!r.note.empty()) out << "  " << r.note;
    out << '\n';
  }
}

inline void write_csv(const fs::path& path, const std::vector<MethodResult>& rows) {
  std::ostringstream csv;
  csv << "family,method,trainable_params,trainable_pct,eval_loss,eval_accuracy,ms_per_step,"
         "peak_mem_mb\n";
  for (const MethodResult& r : rows)
    csv << r.family << ',' << r.method << ',' << r.trainable << ','
        << format_double(r.trainable_pct(), 4) << ',' << format_double(r.eval_loss, 6) << ','
        << format_double(r.eval_accuracy, 6) << ',' << format_double(r.ms_per_step, 3) << ','
        << format_double(r.peak_mem_mb, 2) << '\n';
  write_text_atomically(path, csv.str());
}

inline nlohmann::json number_or_null(double x) {
  return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json();
}

inline void write_json(const fs::path& path, const Settings& s, const Workload& w,
                       const std::vector<MethodResult>& rows, double seconds) {
  nlohmann::json j;
  j["workload"] = w.description;
  j["quick"] = s.quick;
  j["seed"] = s.seed;
  j["threads"] = s.threads;
  j["adapt_steps"] = s.adapt_steps;
  j["pretrain_steps"] = s.pretrain_steps;
  j["batch"] = s.batch;
  j["accuracy"] = w.exact_match ? "exact match of the answer" : "next-byte accuracy";
  j["wall_seconds"] = seconds;
  j["model"] = w.model.to_json();
  j["results"] = nlohmann::json::array();
  for (const MethodResult& r : rows) {
    nlohmann::json curve = nlohmann::json::array();
    for (const CurvePoint& c : r.curve)
      curve.push_back({{"step", c.step}, {"eval_loss", number_or_null(c.loss)}});
    j["results"].push_back({{"family", r.family},
                            {"method", r.method},
                            {"trainable_params", r.trainable},
                            {"all_params", r.all},
                            {"trainable_pct", r.trainable_pct()},
                            {"eval_loss", number_or_null(r.eval_loss)},
                            {"eval_accuracy", number_or_null(r.eval_accuracy)},
                            {"ms_per_step", r.ms_per_step},
                            {"peak_mem_mb", r.peak_mem_mb},
                            {"lr", r.lr},
                            {"note", r.note},
                            {"curve", curve}});
  }
  write_text_atomically(path, j.dump(2) + "\n");
}

/// `text` with XML's five special characters escaped, for SVG text (a title holds file paths).
inline std::string xml_escape(std::string_view text) {
  std::string out;
  for (const char c : text) switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out += c;
    }
  return out;
}

/// The opening of a study figure: the `<svg>` element, a white background, the title and the
/// plot's frame (left, top, plot_w, plot_h); `font_size` is the figure's text size.
inline void svg_frame(std::ostream& svg, double width, double height, double left, double top,
                      double plot_w, double plot_h, const std::string& title, int font_size) {
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" font-family=\"sans-serif\" font-size=\"" << font_size << "\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << left << "\" y=\"24\" font-size=\"15\">" << xml_escape(title) << "</text>\n"
      << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << plot_w << "\" height=\""
      << plot_h << "\" fill=\"none\" stroke=\"#333\"/>\n";
}

/// The `index`-th of `count` colours, all different: hues evenly spaced around the circle, and
/// neighbours in alternating lightness and saturation so that adjacent hues stay apart (a fixed
/// palette repeats once a study has more rows than it has colours).
inline std::string distinct_colour(std::size_t index, std::size_t count) {
  const double hue = 360.0 * double(index) / double(std::max<std::size_t>(count, 1));
  const double light = index % 2 == 0 ? 0.38 : 0.55, sat = index % 3 == 1 ? 0.55 : 0.80;
  // HSL to RGB (CSS Color 4).
  const auto channel = [&](double n) {
    const double k = std::fmod(n + hue / 30.0, 12.0);
    const double a = sat * std::min(light, 1.0 - light);
    return light - a * std::max(-1.0, std::min({k - 3.0, 9.0 - k, 1.0}));
  };
  char out[8];
  std::snprintf(out, sizeof out, "#%02x%02x%02x", int(std::lround(255 * channel(0))),
                int(std::lround(255 * channel(8))), int(std::lround(255 * channel(4))));
  return out;
}

/// Each family's colour and marker in the Pareto figure (the curves' colours are per method).
struct FamilyStyle {
  std::string_view family, colour, marker;  ///< marker: circle, square, triangle, diamond, cross
};
inline constexpr FamilyStyle kFamilyStyles[] = {{"additive", "#1f77b4", "circle"},
                                                {"selective", "#2ca02c", "square"},
                                                {"reparameterized", "#d62728", "triangle"},
                                                {"hybrid", "#9467bd", "diamond"},
                                                {"none", "#000000", "cross"}};

inline const FamilyStyle& family_style(std::string_view family) {
  for (const FamilyStyle& f : kFamilyStyles)
    if (f.family == family) return f;
  return kFamilyStyles[std::size(kFamilyStyles) - 1];
}

/// An SVG marker of `style` centred on (x, y).
inline void svg_marker(std::ostream& svg, const FamilyStyle& style, double x, double y) {
  const double r = 5;
  const std::string paint =
      "fill=\"" + std::string(style.colour) + "\" stroke=\"#222\" stroke-width=\"0.6\"";
  if (style.marker == "circle") {
    svg << "<circle cx=\"" << x << "\" cy=\"" << y << "\" r=\"" << r << "\" " << paint << "/>\n";
  } else if (style.marker == "square") {
    svg << "<rect x=\"" << x - r << "\" y=\"" << y - r << "\" width=\"" << 2 * r << "\" height=\""
        << 2 * r << "\" " << paint << "/>\n";
  } else if (style.marker == "triangle") {
    svg << "<polygon points=\"" << x << ',' << y - 1.2 * r << ' ' << x - 1.1 * r << ','
        << y + 0.8 * r << ' ' << x + 1.1 * r << ',' << y + 0.8 * r << "\" " << paint << "/>\n";
  } else if (style.marker == "diamond") {
    svg << "<polygon points=\"" << x << ',' << y - 1.3 * r << ' ' << x + r << ',' << y << ' ' << x
        << ',' << y + 1.3 * r << ' ' << x - r << ',' << y << "\" " << paint << "/>\n";
  } else {
    svg << "<path d=\"M" << x - r << ',' << y - r << "L" << x + r << ',' << y + r << "M" << x - r
        << ',' << y + r << "L" << x + r << ',' << y - r << "\" stroke=\"" << style.colour
        << "\" stroke-width=\"2\"/>\n";
  }
}

/// The Pareto figure: final eval loss against trainable parameters (log scale), one marker and
/// colour per family, every method labelled, and the frontier (the methods no other method
/// beats with fewer parameters) as a grey step line; the base (`none`, nothing trained) is the
/// dashed line. Rows without a finite loss or without trainable parameters are left out.
inline void write_pareto_svg(const fs::path& path, const std::vector<MethodResult>& rows,
                             const std::string& title) {
  const double width = 900, height = 560, left = 70, right = 150, top = 40, bottom = 50;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  std::vector<const MethodResult*> points;
  double base_loss = std::numeric_limits<double>::quiet_NaN();
  for (const MethodResult& r : rows) {
    if (r.method == "none" && std::isfinite(r.eval_loss)) base_loss = r.eval_loss;
    if (r.trainable > 0 && std::isfinite(r.eval_loss)) points.push_back(&r);
  }
  double lo = 1e300, hi = -1e300, pmin = 1e300, pmax = 1;
  for (const MethodResult* r : points) {
    lo = std::min(lo, r->eval_loss), hi = std::max(hi, r->eval_loss);
    pmin = std::min(pmin, double(r->trainable)), pmax = std::max(pmax, double(r->trainable));
  }
  if (std::isfinite(base_loss)) lo = std::min(lo, base_loss), hi = std::max(hi, base_loss);
  if (!(lo <= hi)) lo = 0, hi = 1;  // nothing to plot: an empty frame
  const double pad = lo < hi ? 0.06 * (hi - lo) : std::max(0.05 * std::abs(lo), 0.05);
  lo -= pad, hi += pad;
  if (!(pmin < pmax)) pmin = std::max(1.0, pmax / 10);
  const double log_lo = std::floor(std::log10(pmin)), log_hi = std::ceil(std::log10(pmax) + 1e-9);
  const auto x_of = [&](double params) {
    return left + plot_w * (std::log10(params) - log_lo) / std::max(log_hi - log_lo, 1e-9);
  };
  const auto y_of = [&](double loss) { return top + plot_h * (hi - loss) / (hi - lo); };

  std::ostringstream svg;
  svg_frame(svg, width, height, left, top, plot_w, plot_h, title, 11);
  for (int e = int(log_lo); e <= int(log_hi); ++e) {
    const double x = x_of(std::pow(10.0, e));
    svg << "<line x1=\"" << x << "\" x2=\"" << x << "\" y1=\"" << top << "\" y2=\"" << top + plot_h
        << "\" stroke=\"#e4e4e4\"/>\n<text x=\"" << x << "\" y=\"" << top + plot_h + 16
        << "\" text-anchor=\"middle\">1e" << e << "</text>\n";
  }
  for (int i = 0; i <= 5; ++i) {
    const double loss = lo + (hi - lo) * i / 5, y = y_of(loss);
    svg << "<line x1=\"" << left << "\" x2=\"" << left + plot_w << "\" y1=\"" << y << "\" y2=\""
        << y << "\" stroke=\"#eee\"/>\n<text x=\"" << left - 6 << "\" y=\"" << y + 4
        << "\" text-anchor=\"end\">" << format_double(loss, 3) << "</text>\n";
  }
  svg << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << height - 12
      << "\" text-anchor=\"middle\">trainable parameters (log scale)</text>\n"
      << "<text transform=\"translate(16," << top + plot_h / 2
      << ") rotate(-90)\" text-anchor=\"middle\">final eval loss</text>\n";
  if (std::isfinite(base_loss)) {
    const double y = y_of(base_loss);
    svg << "<line x1=\"" << left << "\" x2=\"" << left + plot_w << "\" y1=\"" << y << "\" y2=\""
        << y << "\" stroke=\"#000\" stroke-dasharray=\"6,4\"/>\n<text x=\"" << left + plot_w - 4
        << "\" y=\"" << y - 4 << "\" text-anchor=\"end\">none (the base)</text>\n";
  }
  // The frontier: by increasing parameter count, each method that beats every cheaper one.
  std::vector<const MethodResult*> by_size = points;
  std::stable_sort(
      by_size.begin(), by_size.end(),
      [](const MethodResult* a, const MethodResult* b) { return a->trainable < b->trainable; });
  std::ostringstream frontier;
  double best = std::numeric_limits<double>::infinity();
  for (const MethodResult* r : by_size)
    if (r->eval_loss < best) {
      const double x = x_of(double(r->trainable)), y = y_of(r->eval_loss);
      if (std::isfinite(best)) frontier << x << ',' << y_of(best) << ' ';
      frontier << x << ',' << y << ' ';
      best = r->eval_loss;
    }
  svg << "<polyline class=\"frontier\" fill=\"none\" stroke=\"#999\" stroke-width=\"1.5\" points=\""
      << frontier.str() << "\"/>\n";
  for (const MethodResult* r : points) {
    const double x = x_of(double(r->trainable)), y = y_of(r->eval_loss);
    svg_marker(svg, family_style(r->family), x, y);
    svg << "<text x=\"" << x + 8 << "\" y=\"" << y + 4 << "\">" << xml_escape(r->method)
        << "</text>\n";
  }
  double ly = top + 10;
  for (const FamilyStyle& f : kFamilyStyles) {
    const bool used = std::any_of(points.begin(), points.end(),
                                  [&](const MethodResult* r) { return r->family == f.family; });
    if (!used) continue;
    svg_marker(svg, f, left + plot_w + 22, ly);
    svg << "<text x=\"" << left + plot_w + 34 << "\" y=\"" << ly + 4 << "\">"
        << (f.family == "none" ? std::string_view("full fine-tuning") : f.family) << "</text>\n";
    ly += 20;
  }
  svg << "</svg>\n";
  write_text_atomically(path, svg.str());
}

/// Eval loss against step for every method, log-scaled, as a standalone SVG.
inline void write_svg(const fs::path& path, const std::vector<MethodResult>& rows,
                      const std::string& title) {
  const double width = 900, height = 520, left = 70, right = 200, top = 40, bottom = 50;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  double lo = 1e300, hi = -1e300;
  std::int64_t max_step = 1;
  double base_loss = std::numeric_limits<double>::quiet_NaN();
  for (const MethodResult& r : rows) {
    if (r.method == "none") base_loss = r.eval_loss;
    if (std::isfinite(r.eval_loss) && r.method == "none")
      lo = std::min(lo, r.eval_loss), hi = std::max(hi, r.eval_loss);
    for (const CurvePoint& c : r.curve)
      if (std::isfinite(c.loss) && c.loss > 0) {
        lo = std::min(lo, c.loss);
        hi = std::max(hi, c.loss);
        max_step = std::max(max_step, c.step);
      }
  }
  if (!(lo < hi)) lo = 0.5, hi = 2;
  lo = std::max(lo, 1e-4);
  const double log_lo = std::floor(std::log10(lo) * 4) / 4,
               log_hi = std::ceil(std::log10(hi) * 4) / 4;
  const auto x_of = [&](double step) { return left + plot_w * step / double(max_step); };
  const auto y_of = [&](double loss) {
    const double l = std::clamp(std::log10(std::max(loss, 1e-4)), log_lo, log_hi);
    return top + plot_h * (log_hi - l) / (log_hi - log_lo);
  };
  std::size_t curves = 0;
  for (const MethodResult& r : rows) curves += r.curve.empty() ? 0 : 1;
  std::ostringstream svg;
  svg_frame(svg, width, height, left, top, plot_w, plot_h, title, 12);
  // Grid: powers of ten and their 2x, 5x within range; steps in fifths.
  for (int e = static_cast<int>(std::floor(log_lo)); e <= static_cast<int>(std::ceil(log_hi)); ++e)
    for (double f : {1.0, 2.0, 5.0}) {
      const double v = f * std::pow(10.0, e), l = std::log10(v);
      if (l < log_lo - 1e-9 || l > log_hi + 1e-9) continue;
      const double y = y_of(v);
      svg << "<line x1=\"" << left << "\" x2=\"" << left + plot_w << "\" y1=\"" << y << "\" y2=\""
          << y << "\" stroke=\"#ddd\"/>\n<text x=\"" << left - 6 << "\" y=\"" << y + 4
          << "\" text-anchor=\"end\">" << v << "</text>\n";
    }
  for (int i = 0; i <= 5; ++i) {
    const double step = double(max_step) * i / 5, x = x_of(step);
    svg << "<line x1=\"" << x << "\" x2=\"" << x << "\" y1=\"" << top << "\" y2=\"" << top + plot_h
        << "\" stroke=\"#eee\"/>\n<text x=\"" << x << "\" y=\"" << top + plot_h + 16
        << "\" text-anchor=\"middle\">" << static_cast<std::int64_t>(step) << "</text>\n";
  }
  svg << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << height - 12
      << "\" text-anchor=\"middle\">step</text>\n"
      << "<text transform=\"translate(16," << top + plot_h / 2
      << ") rotate(-90)\" text-anchor=\"middle\">eval loss (log scale)</text>\n";
  int legend = 0;
  if (std::isfinite(base_loss)) {
    const double y = y_of(base_loss);
    svg << "<line x1=\"" << left << "\" x2=\"" << left + plot_w << "\" y1=\"" << y << "\" y2=\""
        << y << "\" stroke=\"#000\" stroke-dasharray=\"6,4\"/>\n"
        << "<line x1=\"" << left + plot_w + 12 << "\" x2=\"" << left + plot_w + 36 << "\" y1=\""
        << top + 8 << "\" y2=\"" << top + 8 << "\" stroke=\"#000\" stroke-dasharray=\"6,4\"/>\n"
        << "<text x=\"" << left + plot_w + 42 << "\" y=\"" << top + 12 << "\">none (base)</text>\n";
    ++legend;
  }
  std::size_t colour = 0;
  for (const MethodResult& r : rows) {
    if (r.curve.empty()) continue;
    const std::string c = distinct_colour(colour++, curves);
    svg << "<polyline fill=\"none\" stroke=\"" << c << "\" stroke-width=\"1.8\" points=\"";
    for (const CurvePoint& p : r.curve)
      if (std::isfinite(p.loss)) svg << x_of(double(p.step)) << ',' << y_of(p.loss) << ' ';
    const double ly = top + 8 + 18 * legend++;
    svg << "\"/>\n<line x1=\"" << left + plot_w + 12 << "\" x2=\"" << left + plot_w + 36
        << "\" y1=\"" << ly << "\" y2=\"" << ly << "\" stroke=\"" << c
        << "\" stroke-width=\"2.5\"/>\n<text x=\"" << left + plot_w + 42 << "\" y=\"" << ly + 4
        << "\">" << xml_escape(r.method) << "</text>\n";
  }
  svg << "</svg>\n";
  write_text_atomically(path, svg.str());
}

// ---------------------------------------------------------------------------------------------
// The command line.

inline void print_usage(std::ostream& out) {
  out << "usage: peft study [--quick] [--out DIR] [--cache DIR] [--seed N] [--threads N]\n"
         "                  [--methods a,b,...] [--lr method=rate,...] [--task NAME] [--steps N]\n"
         "                  [--pretrain-steps N]\n"
         "                  [--pretrain-text FILE1 --text FILE2] [--no-progress] [--list]\n"
         "Pretrains a small decoder (cached), adapts it with full fine-tuning and every PEFT\n"
         "method, writes results.csv, results.json and curves.svg into --out (default ./study).\n"
         "docs/study.md explains the setup and every option.\n";
}

/// Bounds of the step flags (docs/cli.md, "Bounds"): a million steps of the study's model are
/// days of CPU; a larger value is a typo, refused before anything runs.
inline constexpr std::int64_t kMaxSteps = 1000000;
inline constexpr std::int64_t kMaxThreads = 1024;

/// Parses the arguments; returns false (after a message) when they are wrong. A value that is not
/// what its flag expects throws io::ArgumentError (run_study: exit status 2).
inline bool parse_settings(const std::vector<std::string>& args, Settings& s, bool& list,
                           std::ostream& err) {
  std::int64_t steps = 0, pretrain_steps = 0;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw io::ArgumentError(a + ": expected a value, found none");
      return args[++i];
    };
    const auto integer = [&](std::int64_t lo, std::int64_t hi) {
      return io::parse_integer(value(), a, {.min = lo, .max = hi});
    };
    if (a == "--quick")
      s.quick = true;
    else if (a == "--out")
      s.out = value();
    else if (a == "--cache")
      s.cache = value();
    else if (a == "--seed")
      s.seed = io::parse_unsigned(value(), a);
    else if (a == "--threads")
      s.threads = static_cast<int>(integer(1, kMaxThreads));
    else if (a == "--methods")
      s.only = io::parse_list(value(), a);
    else if (a == "--lr") {
      for (const std::string& item : io::parse_list(value(), a)) {
        const std::size_t eq = item.find('=');
        if (eq == std::string::npos || eq == 0)
          throw io::ArgumentError("--lr: expected method=rate[,method=rate], found '" + item + "'");
        s.lr_overrides[item.substr(0, eq)] =
            io::parse_number(item.substr(eq + 1), "--lr " + item.substr(0, eq),
                             {.min = 0, .max = 10, .min_exclusive = true});
      }
    } else if (a == "--task") {
      try {
        s.downstream = data::task_from_name(value());
      } catch (const ConfigError& e) {
        throw io::ArgumentError(a + ": " + e.what());
      }
    } else if (a == "--steps")
      steps = integer(1, kMaxSteps);
    else if (a == "--pretrain-steps")
      pretrain_steps = integer(1, kMaxSteps);
    else if (a == "--pretrain-text")
      s.pretrain_text = value();
    else if (a == "--text")
      s.text = value();
    else if (a == "--no-progress")
      s.progress = false;
    else if (a == "--list")
      list = true;
    else if (a == "--help" || a == "-h") {
      print_usage(err);
      return false;
    } else {
      err << "peft study: unknown option '" << a << "'\n";
      print_usage(err);
      return false;
    }
  }
  if (s.pretrain_text.empty() != s.text.empty()) {
    err << "peft study: --pretrain-text and --text go together (pretrain on one file, adapt to the "
           "other)\n";
    return false;
  }
  s.pretrain_tasks.clear();
  for (data::TaskKind k : data::kAllTasks)
    if (k != s.downstream) s.pretrain_tasks.push_back(k);
  // Budgets: --quick fits in under 3 minutes on 2 cores, the default in under 10.
  s.pretrain_steps = pretrain_steps
                         ? pretrain_steps
                         : (s.text_mode() ? (s.quick ? 600 : 1500) : (s.quick ? 1000 : 2500));
  s.adapt_steps = steps ? steps : (s.quick ? 150 : 400);
  s.batch = s.text_mode() ? 16 : 32;
  s.eval_every = std::max<std::int64_t>(1, s.adapt_steps / (s.quick ? 6 : 10));
  s.eval_examples = s.quick ? 192 : 384;
  return true;
}

/// `peft study ARGS` over the rows of `table` (after `none` and `full`): the study's engine.
/// `run_study` (experiment/study_methods.hpp) calls it with the library's methods and any extra
/// rows; a program that studies only its own methods calls it with those alone, and compiles
/// none of the library's (tests/consumer does). See print_usage and docs/study.md. Returns the
/// exit status (2: bad arguments).
inline int run_study_table(const std::vector<std::string>& args, std::ostream& out,
                           std::ostream& err, std::vector<MethodEntry> table) {
  using namespace std::chrono;
  namespace fs = std::filesystem;
  Settings s;
  bool list = false;
  try {
    if (!parse_settings(args, s, list, err)) return 2;
    all_entries(s, table);  // --methods and --lr name methods of the study: checked now
  } catch (const io::ArgumentError& e) {
    err << "peft study: error: " << e.what() << '\n';
    return 2;
  }
  if (list) {
    for (const MethodEntry& e : all_entries(s, table))
      out << std::left << std::setw(18) << e.family << std::setw(18) << e.method << " lr " << e.lr
          << '\n';
    return 0;
  }
#ifdef _OPENMP
  omp_set_num_threads(s.threads);
#endif
  const auto started = steady_clock::now();
  // Created and proven writable before any training: a bad --out fails now, not at the end.
  io::require_writable_dir(s.out, "--out");
  io::require_writable_dir(s.cache_dir(), s.cache.empty() ? "--out (its cache/)" : "--cache");
  Progress progress(out, s.progress);

  // The workload: data for pretraining and for adaptation.
  Workload w;
  std::function<Batch(std::mt19937_64&)> pretrain_batch;
  std::vector<Batch> pretrain_eval;
  std::string data_key;
  std::optional<data::ByteCorpus> pretrain_corpus, corpus;
  std::optional<data::TaskMixture> pretrain_mix, downstream_mix;
  const std::int64_t batch = s.batch;
  if (s.text_mode()) {
    const std::int64_t seq = 64;
    w.model = study_model(data::kByteVocabSize, seq);
    pretrain_corpus.emplace(data::ByteCorpus::from_file(s.pretrain_text, seq));
    corpus.emplace(data::ByteCorpus::from_file(s.text, seq));
    const std::vector<std::uint8_t> bytes = data::read_bytes(s.pretrain_text);
    data_key =
        "text:" +
        hex16(fnv1a(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size())));
    pretrain_batch = [&](std::mt19937_64& rng) { return pretrain_corpus->train_batch(rng, batch); };
    pretrain_eval = pretrain_corpus->eval_batches(s.eval_examples / 2, 32);
    w.train_batch = [&](std::mt19937_64& rng) { return corpus->train_batch(rng, batch); };
    w.eval_batches = corpus->eval_batches(s.eval_examples / 2, 32);
    std::mt19937_64 calib(s.seed + 3);
    for (int i = 0; i < 4; ++i) w.calibration_batches.push_back(corpus->train_batch(calib, batch));
    w.exact_match = false;
    w.description = "byte-level LM: pretrain on " + s.pretrain_text.string() + ", adapt to " +
                    s.text.string() + " (eval on its last 10%)";
  } else {
    pretrain_mix.emplace(data::TaskMixture{s.pretrain_tasks, {}, 0});
    downstream_mix.emplace(data::TaskMixture{{s.downstream}, {}, 0});
    // Both pad to one length, so batch shapes (and step times) match across the phases.
    const std::int64_t seq = std::max(pretrain_mix->seq_len(), downstream_mix->seq_len());
    pretrain_mix->min_seq_len = downstream_mix->min_seq_len = seq;
    w.model = study_model(data::TaskVocab::size, 64);
    data_key = "tasks:";
    for (data::TaskKind k : s.pretrain_tasks) data_key += std::string(data::task_name(k)) + ",";
    pretrain_batch = [&](std::mt19937_64& rng) { return pretrain_mix->train_batch(rng, batch); };
    pretrain_eval = pretrain_mix->eval_batches(s.seed + 11, s.eval_examples, 64);
    w.train_batch = [&](std::mt19937_64& rng) { return downstream_mix->train_batch(rng, batch); };
    w.eval_batches = downstream_mix->eval_batches(s.seed + 12, s.eval_examples, 64);
    std::mt19937_64 calib(s.seed + 3);
    for (int i = 0; i < 4; ++i)
      w.calibration_batches.push_back(downstream_mix->train_batch(calib, batch));
    w.exact_match = true;
    std::string mix;
    for (data::TaskKind k : s.pretrain_tasks)
      mix += (mix.empty() ? "" : "+") + std::string(data::task_name(k));
    w.description = "synthetic tasks: pretrain on " + mix + ", adapt to " +
                    std::string(data::task_name(s.downstream)) + " (exact-match accuracy)";
  }
  out << "peft study" << (s.quick ? " --quick" : "") << ": " << w.description << "\n"
      << "model: llama-style, d=" << w.model.hidden_size << ", " << w.model.num_layers
      << " layers, " << w.model.num_heads << " heads, vocab " << w.model.vocab_size << "; "
      << s.threads << " thread(s), seed " << s.seed << "\n";
  w.base_dir = pretrained_base(s, w.model, pretrain_batch, pretrain_eval, data_key, out, progress);

  out << "adapting: " << s.adapt_steps << " steps of batch " << batch
      << " per method, cosine schedule, AdamW, clip 1.0\n";
  std::vector<MethodResult> rows;
  for (const MethodEntry& e : all_entries(s, table)) {
    MethodResult r;
    try {
      r = e.run(w, s, progress, e.lr);
    } catch (const std::exception& ex) {
      r.note = std::string("failed: ") + ex.what();
      progress.finish(r.note);
    }
    r.family = e.family;
    r.method = e.method;
    r.lr = e.lr;
    rows.push_back(std::move(r));
  }
  const double seconds = duration<double>(steady_clock::now() - started).count();
  print_table(out, rows);
  write_csv(s.out / "results.csv", rows);
  write_json(s.out / "results.json", s, w, rows, seconds);
  write_svg(s.out / "curves.svg", rows, w.description);
  write_pareto_svg(s.out / "pareto.svg", rows, w.description);
  out << "\nwrote " << (s.out / "results.csv").string() << ", " << (s.out / "results.json").string()
      << ", " << (s.out / "curves.svg").string() << ", " << (s.out / "pareto.svg").string()
      << " in " << std::fixed << std::setprecision(1) << seconds << " s\n";
  return 0;
}

}  // namespace peft::experiment
