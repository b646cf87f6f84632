#pragma once
// `peft train MODEL_DIR --adapter-config CFG.json --data FILE... --out DIR [options]`: fine-tune
// a model folder (config.json + model.safetensors, or its shards) with an adapter config on a
// user's files, as a library function over a method registry (the `peft` binary:
// BuiltinMethods). Opt-in: not in <peft/peft.hpp>. docs/train.md describes every option.
//
// Everything that can be wrong with the input is found before the first step: flags (strict,
// io/parse_text.hpp), the model's config and size (Decoder::load checks it against this
// machine's memory), the tokenizer, every data file whole (data/token_data.hpp: file and line
// named), the sequence length against the model's positions, the output folder's permissions,
// and on --resume that the checkpoint was written by this very run (same data, model, adapter
// and options).
//
// OUT/ holds adapter/ (the reference layout: adapter_config.json + adapter_model.safetensors,
// written at every checkpoint and at the end, each time as one atomic unit), checkpoint/ (the
// trainer's state: tensors, AdamW moments, step, history; train/checkpoint.hpp), log.jsonl (one
// JSON object per step and per evaluation) and run.json (what was run).
//
// Data parallelism: with TrainArgs::process_group of N ranks (`mpirun -np N peft train ...`:
// cli/train_ranks.cpp makes the group from MPI), each rank loads the model, reads the data and
// trains on its share of every global batch (train/data_parallel.hpp); --batch is the global
// batch. Rank 0 alone writes OUT/ (run.json, the log, checkpoints, the adapter) and prints;
// evaluation is shared out by batches and summed. A checkpoint resumes on any number of ranks.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "peft/data/token_data.hpp"
#include "peft/data/tokenizer.hpp"
#include "peft/io/parse_text.hpp"
#include "peft/peft.hpp"
#include "peft/train/data_parallel.hpp"
#include "peft/train/trainer.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace peft::commands {

/// The options of `peft train`, parsed (parse_train_args) or set by a program.
struct TrainArgs {
  std::filesystem::path model_dir, adapter_config, out, tokenizer;
  /// The policy by name (--method), for a method whose files are another's (lora_fa trains a
  /// LORA adapter); empty: the one the adapter config's peft_type picks.
  std::string method;
  std::vector<std::filesystem::path> data;
  data::DataFormat data_format = data::DataFormat::automatic;
  std::int64_t seq_len = 0;  ///< 0: min(256, the model's positions)
  std::int64_t batch = 8, grad_accum = 1;
  std::int64_t steps = 0, epochs = 0;  ///< one of them; neither: 1 epoch
  double lr = 2e-4, weight_decay = 0.0, clip = 1.0, min_lr_ratio = 0.0;
  LrSchedule::Kind schedule = LrSchedule::Kind::Cosine;
  std::int64_t warmup = 0;
  double lora_plus_ratio = 0;  ///< 0: off; else lora_B's rate is lr · ratio (LoRA+)
  double val_fraction = 0.05;
  std::int64_t eval_every = 0, checkpoint_every = 0;  ///< 0: a tenth of the run
  /// Stop after this step, with a checkpoint, as if the job's time were up (the schedule stays
  /// the whole run's; --resume continues); 0: run to the end. Not part of the run's identity.
  std::int64_t stop_at = 0;
  bool resume = false, progress = true;
  BaseFormat base = BaseFormat::fp32;
  int threads = 0;  ///< 0: OpenMP's default
  std::uint64_t seed = 0;
  std::filesystem::path log;  ///< empty: OUT/log.jsonl
  /// The ranks that train together (not a flag: the program sets it, e.g. from MPI); default:
  /// this process alone.
  ProcessGroup process_group;
};

inline constexpr const char* kTrainUsage =
    "usage: peft train MODEL_DIR --adapter-config CFG.json --data FILE [FILE...] --out DIR\n"
    "                  [--tokenizer DIR|tokenizer.json] [--data-format auto|text|jsonl|bin|u16]\n"
    "                  [--seq-len N] [--batch N] [--grad-accum N] [--steps N | --epochs N]\n"
    "                  [--lr X] [--schedule cosine|linear|constant] [--warmup N]\n"
    "                  [--min-lr-ratio X] [--weight-decay X] [--lora-plus-ratio X] [--clip X]\n"
    "                  [--val-fraction X] [--eval-every N] [--checkpoint-every N] [--resume]\n"
    "                  [--stop-at STEP]\n"
    "                  [--base-dtype fp32|bf16|fp16|nf4] [--device cpu] [--threads N] [--seed N]\n"
    "                  [--log FILE] [--no-progress] [--method NAME]\n";

/// Parses the command's arguments strictly; throws io::ArgumentError (exit 2) naming the flag.
inline TrainArgs parse_train_args(const std::vector<std::string>& args) {
  TrainArgs a;
  const auto fail = [](const std::string& what) {
    throw io::ArgumentError(what + "\n" + kTrainUsage);
  };
  if (args.empty() || args[0].starts_with("--")) fail("expected MODEL_DIR first");
  a.model_dir = args[0];
  const io::IntegerRange positive{.min = 1, .max = 1'000'000'000};
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--resume") {
      a.resume = true;
      continue;
    }
    if (flag == "--no-progress") {
      a.progress = false;
      continue;
    }
    if (!flag.starts_with("--")) fail("unexpected argument '" + io::printable(flag) + "'");
    if (flag == "--data") {
      while (i + 1 < args.size() && !args[i + 1].starts_with("--")) a.data.emplace_back(args[++i]);
      if (a.data.empty()) fail("--data: expected at least one file");
      continue;
    }
    static const char* const kValued[] = {
        "--adapter-config", "--method",       "--out",          "--tokenizer",
        "--data-format",    "--seq-len",      "--batch",        "--grad-accum",
        "--steps",          "--epochs",       "--lr",           "--schedule",
        "--warmup",         "--min-lr-ratio", "--weight-decay", "--lora-plus-ratio",
        "--clip",           "--val-fraction", "--eval-every",   "--checkpoint-every",
        "--stop-at",        "--base-dtype",   "--device",       "--threads",
        "--seed",           "--log"};
    if (std::find(std::begin(kValued), std::end(kValued), flag) == std::end(kValued))
      fail("unknown option '" + io::printable(flag) + "'");
    if (i + 1 >= args.size()) fail(flag + " needs a value");
    const std::string& v = args[++i];
    if (flag == "--method")
      a.method = v;
    else if (flag == "--adapter-config")
      a.adapter_config = v;
    else if (flag == "--out")
      a.out = v;
    else if (flag == "--tokenizer")
      a.tokenizer = v;
    else if (flag == "--log")
      a.log = v;
    else if (flag == "--data-format") {
      try {
        a.data_format = data::parse_data_format(v, flag);
      } catch (const ConfigError& e) {
        throw io::ArgumentError(e.what());
      }
    } else if (flag == "--seq-len")
      a.seq_len = io::parse_integer(v, flag, {.min = 2, .max = 1 << 20});
    else if (flag == "--batch")
      a.batch = io::parse_integer(v, flag, {.min = 1, .max = 65536});
    else if (flag == "--grad-accum")
      a.grad_accum = io::parse_integer(v, flag, {.min = 1, .max = 65536});
    else if (flag == "--steps")
      a.steps = io::parse_integer(v, flag, positive);
    else if (flag == "--epochs")
      a.epochs = io::parse_integer(v, flag, {.min = 1, .max = 1'000'000});
    else if (flag == "--lr")
      a.lr = io::parse_number(v, flag, {.min = 0, .max = 10, .min_exclusive = true});
    else if (flag == "--schedule") {
      try {
        a.schedule = LrSchedule::kind_from_name(v);
      } catch (const ConfigError& e) {
        throw io::ArgumentError("--schedule: " + std::string(e.what()));
      }
    } else if (flag == "--warmup")
      a.warmup = io::parse_integer(v, flag, {.min = 0, .max = 1'000'000'000});
    else if (flag == "--min-lr-ratio")
      a.min_lr_ratio = io::parse_number(v, flag, {.min = 0, .max = 1});
    else if (flag == "--weight-decay")
      a.weight_decay = io::parse_number(v, flag, {.min = 0, .max = 1});
    else if (flag == "--lora-plus-ratio")
      a.lora_plus_ratio = io::parse_number(v, flag, {.min = 1, .max = 1e4});
    else if (flag == "--clip")
      a.clip = io::parse_number(v, flag, {.min = 0, .max = 1e9});
    else if (flag == "--val-fraction")
      a.val_fraction = io::parse_number(v, flag, {.min = 0, .max = 0.5});
    else if (flag == "--eval-every")
      a.eval_every = io::parse_integer(v, flag, positive);
    else if (flag == "--checkpoint-every")
      a.checkpoint_every = io::parse_integer(v, flag, positive);
    else if (flag == "--stop-at")
      a.stop_at = io::parse_integer(v, flag, positive);
    else if (flag == "--threads")
      a.threads = static_cast<int>(io::parse_integer(v, flag, {.min = 1, .max = 1024}));
    else if (flag == "--seed")
      a.seed = io::parse_unsigned(v, flag);
    else if (flag == "--base-dtype") {
      try {
        a.base = parse_base_format(v, flag);
      } catch (const ConfigError& e) {
        throw io::ArgumentError(e.what());
      }
    } else if (flag == "--device") {
      if (v != "cpu")
        throw io::ArgumentError(
            "--device: this build trains on the CPU; found '" + io::printable(v) +
            "' (GPU training of every method through the Decoder is not built yet)");
    }
  }
  if (a.adapter_config.empty()) fail("--adapter-config: expected the adapter config to train");
  if (a.data.empty()) fail("--data: expected at least one data file");
  if (a.out.empty()) fail("--out: expected the output folder");
  if (a.steps > 0 && a.epochs > 0) fail("--steps and --epochs: expected one of them, found both");
  return a;
}

namespace detail {

inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<long long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", s / 3600, (s / 60) % 60);
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
  return buf;
}

inline std::string data_hash_hex(std::uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

/// What the run is, stored in each checkpoint: a resume must match it.
inline nlohmann::json describe_run(const TrainArgs& a, const nlohmann::json& adapter_json,
                                   std::int64_t steps, std::int64_t seq_len,
                                   std::uint64_t data_hash) {
  nlohmann::json files = nlohmann::json::array();
  for (const auto& f : a.data)
    files.push_back(std::filesystem::absolute(f).lexically_normal().string());
  return {{"model", std::filesystem::absolute(a.model_dir).lexically_normal().string()},
          {"adapter_config", adapter_json},
          {"data", files},
          {"data_tokens_hash", data_hash_hex(data_hash)},
          {"tokenizer", a.tokenizer.empty()
                            ? ""
                            : std::filesystem::absolute(a.tokenizer).lexically_normal().string()},
          {"seq_len", seq_len},
          {"batch", a.batch},
          {"grad_accum", a.grad_accum},
          {"steps", steps},
          {"lr", a.lr},
          {"schedule", LrSchedule::kind_name(a.schedule)},
          {"warmup", a.warmup},
          {"min_lr_ratio", a.min_lr_ratio},
          {"weight_decay", a.weight_decay},
          {"lora_plus_ratio", a.lora_plus_ratio},
          {"method", a.method},
          {"clip", a.clip},
          {"val_fraction", a.val_fraction},
          {"base_dtype", base_format_name(a.base)},
          {"seed", a.seed}};
}

/// The first `count` training batches in the data's order (not the shuffled one): what a
/// calibrated method (FishMask's Fisher pass) sees before training, the same on every resume.
inline std::vector<Batch> calibration_batches(const data::SequenceSet& sequences,
                                              std::int64_t batch, std::int64_t count) {
  std::vector<Batch> out;
  for (std::int64_t start = 0; start < sequences.train_count() && std::int64_t(out.size()) < count;
       start += batch) {
    std::vector<std::int64_t> ids;
    for (std::int64_t i = start; i < std::min(sequences.train_count(), start + batch); ++i)
      ids.push_back(i);
    out.push_back(sequences.train_batch(ids));
  }
  return out;
}

/// evaluate() of the validation batches shared out over the group (batch i on rank i mod N),
/// the sums gathered: every rank gets the metrics of all of them.
template <class Model>
EvalMetrics evaluate_shared(Model& model, const std::vector<Batch>& val, ProcessGroup& group) {
  if (group.single()) return evaluate(model, val);
  std::vector<Batch> mine;
  for (std::size_t i = static_cast<std::size_t>(group.rank()); i < val.size();
       i += static_cast<std::size_t>(group.size()))
    mine.push_back(val[i]);
  const EvalMetrics m = evaluate(model, mine);
  const double t = double(m.tokens), n = double(m.sequences);
  std::vector<double> sums = {m.tokens > 0 ? m.loss * t : 0.0, m.token_accuracy * t,
                              m.exact_match * n, t, n};
  group.all_reduce_sum(std::span<double>(sums));
  EvalMetrics all;
  all.tokens = static_cast<std::int64_t>(std::llround(sums[3]));
  all.sequences = static_cast<std::int64_t>(std::llround(sums[4]));
  if (all.tokens > 0) {
    all.loss = sums[0] / sums[3];
    all.token_accuracy = sums[1] / sums[3];
  }
  if (all.sequences > 0) all.exact_match = sums[2] / sums[4];
  return all;
}

template <class Model>
int train_model(Model& model, const TrainArgs& a, const data::SequenceSet& sequences,
                std::int64_t steps, const nlohmann::json& run, std::ostream& out) {
  namespace fs = std::filesystem;
  using Adapter = typename Model::Adapter;
  const fs::path checkpoint_dir = a.out / "checkpoint", adapter_dir = a.out / "adapter";
  if constexpr (Calibrated<Adapter, Model, std::vector<Batch>>) {
    // FishMask picks its entries from the Fisher information of a few batches (deterministic,
    // so a resumed run recalibrates to the same mask before its tensors are restored).
    model.adapter().calibrate(model, calibration_batches(sequences, a.batch, 8));
  }
  if constexpr (TrainsInTwoPhases<Adapter>) {
    // Diff pruning: a dense phase with the L0 penalty (the first half of the steps), then the
    // pruned sparse diff (the second half), as the study runs it. The sparse phase's tensors are
    // not those of the dense phase's checkpoint, so such a run is not resumable.
    if (a.resume)
      throw ConfigError(
          "--resume: this method trains in two phases (dense, then pruned) and "
          "is not resumable yet");
  }
  if (a.stop_at > 0 && TrainsInTwoPhases<Adapter>)
    throw ConfigError("--stop-at: this method trains in two phases and is not resumable yet");
  TrainerOptions o;
  o.max_steps = TrainsInTwoPhases<Adapter> ? std::max<std::int64_t>(1, steps / 2) : steps;
  const std::int64_t schedule_steps = o.max_steps;
  if (a.stop_at > 0) o.max_steps = std::min(o.max_steps, a.stop_at);
  o.grad_accumulation = static_cast<int>(a.grad_accum);
  o.adamw.lr = a.lr;
  o.adamw.weight_decay = a.weight_decay;
  o.schedule.kind = a.schedule;
  o.schedule.warmup_steps = a.warmup;
  o.schedule.total_steps = schedule_steps;
  o.schedule.final_ratio = a.min_lr_ratio;
  o.clip_norm = a.clip;
  const std::int64_t tenth = std::max<std::int64_t>(1, steps / 10);
  o.eval_every = sequences.val_count() > 0 ? (a.eval_every > 0 ? a.eval_every : tenth) : 0;
  o.eval_at_start = sequences.val_count() > 0;
  if constexpr (!TrainsInTwoPhases<Adapter>) o.checkpoint_dir = checkpoint_dir;
  o.checkpoint_every = a.checkpoint_every > 0 ? a.checkpoint_every : tenth;
  o.seed = a.seed;
  o.run_description = run;
  o.process_group = a.process_group;
  ProcessGroup group = a.process_group;
  const bool root = group.is_root();
  if (a.lora_plus_ratio > 0)
    o.lr_multiplier = [ratio = a.lora_plus_ratio](const std::string& name) {
      return name.find("lora_B") != std::string::npos ? ratio : 1.0;
    };

  data::EpochSampler sampler(sequences.train_count(), a.seed);
  std::int64_t draw = 0;
  const auto next_batch = [&](std::mt19937_64&) {
    std::vector<std::int64_t> picks(static_cast<std::size_t>(a.batch));
    for (auto& p : picks) p = sampler(draw++);
    return sequences.train_batch(picks);
  };
  const std::vector<Batch> val = sequences.val_batches(a.batch);
  typename Trainer<Model>::Evaluator evaluator;
  if (!val.empty()) evaluator = [&](Model& m) { return evaluate_shared(m, val, group); };
  Trainer<Model> trainer(model, o, next_batch, evaluator);

  const fs::path log_path = a.log.empty() ? a.out / "log.jsonl" : a.log;
  if (a.resume) {
    if (!has_checkpoint(checkpoint_dir))
      throw FileError(checkpoint_dir.string() + ": --resume: no checkpoint to continue");
    const nlohmann::json state = read_checkpoint_state(checkpoint_dir);
    const nlohmann::json saved = state.contains("run") ? state["run"] : nlohmann::json();
    for (const auto& [key, value] : run.items())
      if (!saved.contains(key) || saved[key] != value)
        throw ConfigError(checkpoint_dir.string() + ": --resume: the checkpoint's run has " + key +
                          " = " + (saved.contains(key) ? saved[key].dump() : "nothing") +
                          ", this run " + value.dump() +
                          " (resume with the same data and options)");
    trainer.resume(checkpoint_dir);
    draw = trainer.step() * a.grad_accum * a.batch;
    out << "resuming at step " << trainer.step() << " of " << steps << '\n';
  }
  // Only rank 0 writes the log and shows progress; the others train silently.
  std::ofstream log;
  if (root) {
    log.open(log_path, a.resume ? std::ios::app : std::ios::trunc);
    if (!log) throw FileError(log_path.string() + ": cannot write the log");
  }
  if (!group.single())
    out << "data parallel: " << group.size() << " ranks, " << a.batch
        << " sequences a micro-batch shared out by rows; " << trainer.reduced_bytes_per_step()
        << " bytes of gradients summed a step\n";

  const bool progress = a.progress && root;
  const bool tty = progress && isatty(fileno(stderr)) != 0;
  const double tokens_per_step = double(a.batch * a.grad_accum * sequences.seq_len());
  double seconds = 0;
  std::int64_t timed = 0, last_line = -1;
  auto started = std::chrono::steady_clock::now();
  trainer.on_step = [&](const StepInfo& s) {
    const auto now = std::chrono::steady_clock::now();
    seconds += std::chrono::duration<double>(now - started).count();
    started = now;
    ++timed;
    if (!root) return;
    const double per_step = seconds / double(timed);
    const double tokens_per_second = tokens_per_step / per_step;
    log << nlohmann::json{{"step", s.step},
                          {"loss", s.loss},
                          {"lr", s.lr},
                          {"grad_norm", s.grad_norm},
                          {"tokens_per_second", tokens_per_second}}
               .dump()
        << '\n'
        << std::flush;
    if (!progress) return;
    std::ostringstream line;
    line << "step " << s.step << '/' << s.max_steps << "  loss " << std::fixed
         << std::setprecision(4) << s.loss << "  lr " << std::scientific << std::setprecision(2)
         << s.lr << std::fixed << std::setprecision(0) << "  " << tokens_per_second
         << " tok/s  ETA " << format_duration(per_step * double(s.max_steps - s.step));
    if (tty) {
      const int width = 24,
                filled = static_cast<int>(width * s.step / std::max<std::int64_t>(1, s.max_steps));
      std::cerr << "\r[" << std::string(std::size_t(filled), '#')
                << std::string(std::size_t(width - filled), '.') << "] " << line.str() << "   "
                << std::flush;
    } else if (const std::int64_t t = 10 * s.step / std::max<std::int64_t>(1, s.max_steps);
               t != last_line) {
      last_line = t;
      out << line.str() << '\n' << std::flush;
    }
  };
  trainer.on_eval = [&](const EvalPoint& p) {
    if (!root) return;
    log << nlohmann::json{{"step", p.step},
                          {"val_loss", p.metrics.loss},
                          {"val_token_accuracy", p.metrics.token_accuracy}}
               .dump()
        << '\n'
        << std::flush;
    if (tty) std::cerr << '\r' << std::string(100, ' ') << '\r';
    out << "step " << p.step << "  val_loss " << std::fixed << std::setprecision(4)
        << p.metrics.loss << '\n'
        << std::flush;
    started = std::chrono::steady_clock::now();  // evaluation time is not step time
  };
  const auto save = [&] {
    if (root)
      io::save_adapter(adapter_dir, config_to_json(model.adapter().config(), model.config()),
                       model.adapter().parameters());
  };
  trainer.on_checkpoint = [&](std::int64_t) {
    save();
    started = std::chrono::steady_clock::now();
  };
  TrainResult result = trainer.run();
  if (tty) std::cerr << '\n';
  if (result.reason == StopReason::NonFinite) throw Error(result.message);
  if constexpr (TrainsInTwoPhases<Adapter>) {
    model.adapter().prune();
    out << "pruned to the budget; the sparse phase\n";
    TrainerOptions sparse = o;
    sparse.max_steps = steps - o.max_steps;
    sparse.schedule.total_steps = sparse.max_steps;
    sparse.schedule.warmup_steps = 0;
    sparse.eval_at_start = false;
    sparse.checkpoint_dir.clear();
    Trainer<Model> second(model, sparse, next_batch, evaluator);
    const std::int64_t first = o.max_steps;
    second.on_step = [&, first](StepInfo info) {
      info.step += first;
      info.max_steps = steps;
      trainer.on_step(info);
    };
    second.on_eval = [&, first](EvalPoint point) {
      point.step += first;
      trainer.on_eval(point);
    };
    result = second.run();
    if (result.reason == StopReason::NonFinite) throw Error(result.message);
  }
  save();
  group.barrier();  // the adapter is on disk before any rank reports the run done
  if (a.stop_at > 0 && result.steps < steps)
    out << "stopped at step " << result.steps << " of " << steps
        << " (--stop-at; --resume continues); adapter " << adapter_dir.string() << '\n';
  else
    out << result.message << "; adapter " << adapter_dir.string() << '\n';
  if (!result.losses.empty())
    out << "final train loss " << std::fixed << std::setprecision(4) << result.losses.back();
  if (!result.evals.empty()) out << ", val_loss " << result.evals.back().metrics.loss;
  out << '\n';
  return 0;
}

}  // namespace detail

/// `peft train MODEL_DIR --adapter-config CFG --data FILE... --out DIR ...`: the exit status.
/// `group`: the ranks that train together (every one of them calls this with the same
/// arguments); default: this process alone.
template <class Registry = BuiltinMethods>
int run_train(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
              const ProcessGroup& group = {}) {
  for (const std::string& arg : args)
    if (arg == "--help" || arg == "-h") {
      err << kTrainUsage;
      return 0;
    }
  TrainArgs parsed = parse_train_args(args);
  parsed.process_group = group;
  const TrainArgs& a = parsed;
  const std::filesystem::path config_path = a.model_dir / "config.json";
  const ModelConfig config =
      ModelConfig::from_json(io::load_json(config_path), config_path.string());
  const std::int64_t seq_len =
      a.seq_len > 0 ? a.seq_len : std::min<std::int64_t>(256, config.max_positions);
  if (seq_len > config.max_positions)
    throw io::ArgumentError("--seq-len: expected at most the model's " +
                            std::to_string(config.max_positions) + " positions (" +
                            config_path.string() + "), found " + std::to_string(seq_len));
  const nlohmann::json adapter_json = io::load_json(a.adapter_config);
  if (!a.method.empty()) {
    const auto names = Registry::names();
    if (std::find(names.begin(), names.end(), a.method) == names.end())
      throw io::ArgumentError("--method: expected a method name (peft methods), found '" +
                              io::printable(a.method) + "'");
  }

  // The data, whole and checked, before any weight is allocated.
  std::unique_ptr<data::BpeTokenizer> tokenizer;
  if (!a.tokenizer.empty())
    tokenizer = std::make_unique<data::BpeTokenizer>(data::BpeTokenizer::load(a.tokenizer));
  const data::TokenDataReader reader(tokenizer.get(), config.vocab_size, a.data_format);
  std::vector<data::Document> examples;
  std::uint64_t hash = 1469598103934665603ull;
  for (const auto& file : a.data) {
    std::vector<data::Document> more = reader.read(file);
    for (const data::Document& e : more)
      for (const std::int32_t id : e.ids)
        hash = (hash ^ std::uint64_t(std::uint32_t(id))) * 1099511628211ull;
    examples.insert(examples.end(), std::make_move_iterator(more.begin()),
                    std::make_move_iterator(more.end()));
  }
  std::int32_t eos = -1;
  if (tokenizer)
    for (const char* name : {"<|endoftext|>", "<|end_of_text|>", "</s>"})
      if (const auto id = tokenizer->token_to_id(name); id && eos < 0) eos = *id;
  const data::SequenceSet sequences =
      data::SequenceSet::build(examples, seq_len, eos, a.val_fraction);
  examples.clear();
  const std::int64_t per_step = a.batch * a.grad_accum;
  const std::int64_t steps = a.steps > 0
                                 ? a.steps
                                 : std::max<std::int64_t>(1, a.epochs > 0 ? a.epochs : 1) *
                                       ((sequences.train_count() + per_step - 1) / per_step);
  io::require_writable_dir(a.out, "--out");
  const nlohmann::json run = detail::describe_run(a, adapter_json, steps, seq_len, hash);
  if (!a.resume && a.process_group.is_root())
    io::write_file_atomically(a.out / "run.json", run.dump(2) + "\n");
  out << "data: " << sequences.train_count() << " training and " << sequences.val_count()
      << " validation sequences of " << seq_len << " tokens; " << steps << " steps of " << per_step
      << " sequences\n";
#if defined(_OPENMP)
  if (a.threads > 0)
    omp_set_num_threads(a.threads);
  else if (const int local = launcher_local_size(); !a.process_group.single() && local > 1)
    // Ranks on one machine share its cores instead of each starting a thread per core.
    omp_set_num_threads(std::max(1, omp_get_num_procs() / local));
#endif
  int status = 0;
  try {
    visit_arch_for(config.model_type, [&]<class Arch>() {
      const auto train_with = [&]<class Policy>() {
        auto model = Decoder<Arch, Policy, float>::load(
            a.model_dir,
            config_from_json<typename Policy::Config>(adapter_json, a.adapter_config.string()),
            a.seed, a.base);
        out << trainable_parameters_line(model) << '\n';
        status = detail::train_model(model, a, sequences, steps, run, out);
      };
      if (!a.method.empty()) {
        bool loadable = false;
        const bool named = Registry::visit_named(a.method, [&]<class Policy>() {
          if constexpr (Loadable<Policy>) {
            loadable = true;
            train_with.template operator()<Policy>();
          }
        });
        if (!named || !loadable)
          throw ConfigError(
              "--method: expected the name of a method this build trains from an "
              "adapter config (peft methods), found '" +
              io::printable(a.method) + "'");
        return;
      }
      const bool known = Registry::visit_for(adapter_json, train_with);
      if (!known)
        throw ConfigError(a.adapter_config.string() + ": peft_type '" +
                          peft_type_text(adapter_json) + "' cannot be trained by this build");
    });
  } catch (const std::bad_alloc&) {
    throw ConfigError(config_path.string() + ": out of memory building the model or its adapter");
  }
  (void)err;
  return status;
}

}  // namespace peft::commands
