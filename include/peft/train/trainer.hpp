#pragma once
// Trainer: the training loop every experiment shares.
//
//   for each step: draw grad_accumulation micro-batches from the data generator, back-propagate
//   each with weight 1/grad_accumulation, check the loss and gradient are finite, clip by global
//   norm, set the scheduled learning rate, take an AdamW step; every eval_every steps evaluate,
//   track the best eval loss for early stopping, and write a checkpoint.
//
// Determinism: the only randomness is the data generator (a std::mt19937_64 seeded from
// options.seed) and the model's dropout generator (Decoder::dropout_generator, used in training
// mode, which the trainer turns on for its steps only), both checkpointed with the run, and
// every op's arithmetic depends only on the thread count. So the same seed and thread count give
// bit-identical losses, and a run resumed from a checkpoint continues exactly as the uninterrupted
// run did.
//
// A non-finite loss or gradient stops the run before the update is applied; the model is put
// back to the last good checkpoint (when there is one) and the checkpoint is left untouched.
//
// Data parallelism (options.process_group with more than one rank; train/data_parallel.hpp,
// docs/distributed.md): every rank draws the same global micro-batches, runs forward and
// backward on its rows only, weighting its mean loss by its share of the labelled positions,
// and the trainable gradients (never the frozen weights) are summed over the ranks in buckets
// before the clip and the optimizer step, which every rank then takes alike. Rank 0 writes the
// checkpoints; any number of ranks can resume one. Without dropout, N ranks reproduce one
// process's run up to the order of floating-point sums; with dropout, each rank draws its
// masks from a generator keyed by (seed, step, rank) (a valid run, not the one process's masks).
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/core/ops/loss.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/checkpoint.hpp"
#include "peft/train/data_parallel.hpp"
#include "peft/train/optimizer.hpp"
#include "peft/train/schedule.hpp"

namespace peft {

/// Evaluation of a model on held-out batches.
struct EvalMetrics {
  double loss = std::numeric_limits<double>::quiet_NaN();  ///< mean cross-entropy per label
  double token_accuracy = 0;   ///< argmax == label, over labelled positions
  double exact_match = 0;      ///< sequences whose every labelled position is right
  std::int64_t tokens = 0;     ///< labelled positions seen
  std::int64_t sequences = 0;  ///< sequences with at least one label
};

/// Teacher-forced evaluation: for each labelled position, the cross-entropy of the logits that
/// predict it and whether their argmax is right. With answer-only labels, a sequence scores an
/// exact match iff greedy decoding would have produced its whole answer.
template <class Model>
EvalMetrics evaluate(Model& model, const std::vector<Batch>& batches) {
  using T = typename Model::Scalar;
  const EvaluationScope<Model> no_dropout(model);
  EvalMetrics m;
  double total = 0;
  std::int64_t correct = 0, exact = 0;
  for (const Batch& batch : batches) {
    Tape<T> tape(false);
    ForwardResult<T> out = model.forward(tape, batch, false);
    const Tensor<T>& logits = out.logits.value();  // [B, P + T, V]
    const std::int64_t P = out.virtual_tokens, S = P + batch.seq, V = logits.dim(2);
    for (std::int64_t b = 0; b < batch.batch; ++b) {
      bool all_right = true, any = false;
      for (std::int64_t t = 0; t + 1 < batch.seq; ++t) {
        const auto next = static_cast<std::size_t>(b * batch.seq + t + 1);
        std::int64_t label;
        if (!batch.labels.empty())
          label = batch.labels[next];
        else if (!batch.attention_mask.empty() && batch.attention_mask[next] == 0)
          label = ops::kIgnoreIndex;
        else
          label = batch.input_ids[next];
        if (label == ops::kIgnoreIndex) continue;
        const T* row = logits.data() + (b * S + P + t) * V;
        std::int64_t best = 0;
        double mx = row[0];
        for (std::int64_t v = 1; v < V; ++v)
          if (row[v] > mx) mx = row[v], best = v;
        double z = 0;
        for (std::int64_t v = 0; v < V; ++v) z += std::exp(double(row[v]) - mx);
        total += std::log(z) + mx - double(row[label]);
        ++m.tokens;
        any = true;
        if (best == label)
          ++correct;
        else
          all_right = false;
      }
      if (any) {
        ++m.sequences;
        exact += all_right;
      }
    }
  }
  if (m.tokens > 0) {
    m.loss = total / double(m.tokens);
    m.token_accuracy = double(correct) / double(m.tokens);
  }
  if (m.sequences > 0) m.exact_match = double(exact) / double(m.sequences);
  return m;
}

struct TrainerOptions {
  std::int64_t max_steps = 100;  ///< optimizer steps
  int grad_accumulation = 1;     ///< micro-batches per optimizer step
  AdamWOptions adamw;            ///< adamw.lr is the peak learning rate
  LrSchedule schedule;           ///< total_steps 0: max_steps
  double clip_norm = 1.0;        ///< clip the global gradient norm to this; 0: no clipping
  std::int64_t eval_every = 0;   ///< 0: evaluate only at the start and the end
  bool eval_at_start = true;     ///< an evaluation at step 0 (the curve's first point)
  int early_stopping_patience =
      0;  ///< stop after this many evaluations without improvement; 0: never
  double early_stopping_min_delta = 0;   ///< an improvement must lower the best eval loss by more
  std::filesystem::path checkpoint_dir;  ///< empty: no checkpoints
  std::int64_t checkpoint_every = 0;     ///< 0: at each evaluation (and at the end)
  std::uint64_t seed = 0;                ///< seeds the data generator
  /// A learning-rate multiplier per trainable tensor, by name (LoRA+: 16 for lora_B); empty: 1.
  std::function<double(const std::string& name)> lr_multiplier;
  /// Stored in every checkpoint's state under "run" (what the run was: `peft train` compares it
  /// before resuming, so that a checkpoint is never continued with other data or options).
  nlohmann::json run_description;
  /// The ranks that train this model together (data_parallel.hpp); default: this process
  /// alone. Every rank passes the same options and a batch source that yields the same global
  /// micro-batches (of at least as many rows as there are ranks).
  ProcessGroup process_group;
  /// Gradient buckets of the data-parallel reduction: one collective per bucket.
  std::size_t bucket_bytes = GradientBuckets<float>::kDefaultBucketBytes;
};

enum class StopReason { Completed, EarlyStopped, NonFinite };

inline std::string_view stop_reason_name(StopReason r) {
  switch (r) {
    case StopReason::Completed:
      return "completed";
    case StopReason::EarlyStopped:
      return "early stopped";
    case StopReason::NonFinite:
      return "non-finite";
  }
  return "?";
}

struct EvalPoint {
  std::int64_t step = 0;
  EvalMetrics metrics;
};

/// What one optimizer step did, for progress display.
struct StepInfo {
  std::int64_t step = 0;  ///< steps done, 1-based
  std::int64_t max_steps = 0;
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;  ///< before clipping
};

struct TrainResult {
  std::vector<double> losses;  ///< training loss of every step (mean over micro-batches)
  std::vector<EvalPoint> evals;
  StopReason reason = StopReason::Completed;
  std::string message;           ///< why the run stopped, for people
  std::int64_t steps = 0;        ///< steps done
  double train_seconds = 0;      ///< wall time in steps (evaluation and checkpoints excluded)
  std::int64_t timed_steps = 0;  ///< steps train_seconds covers (those run by this process)
  double reduce_seconds = 0;     ///< of train_seconds, in the data-parallel sums (0 in one process)
  std::filesystem::path last_checkpoint;  ///< empty when none was written or found
  std::int64_t last_checkpoint_step = -1;
};

// The trainer's protocols are the contract's capabilities (methods/policy.hpp, section 4):
// AllocatesBudget (update_and_allocate(i) after optimizer step i, 0-based, before the gradients
// are zeroed), SamplesRank (a random rank drawn before each step, the full rank to evaluate),
// ProjectsGradients (project_gradients() after the clip, before the step) and PrescribesAdamW.

template <class Model>
class Trainer {
 public:
  using T = typename Model::Scalar;
  /// Draws one micro-batch with the trainer's generator (whose state is checkpointed).
  using BatchSource = std::function<Batch(std::mt19937_64&)>;
  using Evaluator = std::function<EvalMetrics(Model&)>;

  Trainer(Model& model, TrainerOptions options, BatchSource next_batch, Evaluator evaluator = {})
      : model_(model),
        options_(std::move(options)),
        next_batch_(std::move(next_batch)),
        evaluator_(std::move(evaluator)),
        params_(model.trainable_parameters()),
        optimizer_(params_, prescribed(options_.adamw)),
        buckets_(params_, options_.bucket_bytes),
        rng_(options_.seed) {
    if (options_.grad_accumulation < 1) throw ConfigError("trainer: grad_accumulation must be ≥ 1");
    if (options_.max_steps < 0) throw ConfigError("trainer: max_steps must be ≥ 0");
    if (params_.empty()) throw ConfigError("trainer: the model has no trainable tensor");
    if (options_.schedule.total_steps == 0) options_.schedule.total_steps = options_.max_steps;
    if (options_.lr_multiplier) {
      std::vector<double> multipliers;
      for (const NamedParameter<T>& p : params_)
        multipliers.push_back(options_.lr_multiplier(p.name));
      optimizer_.set_lr_multipliers(std::move(multipliers));
    }
  }

  /// The optimizer's options, in the form the method prescribes (PrescribesAdamW: LoRA-FA).
  static AdamWOptions prescribed(AdamWOptions options) {
    if constexpr (PrescribesAdamW<typename Model::AdapterPolicy>)
      options.form = Model::AdapterPolicy::adamw_form;
    return options;
  }

  /// Called after every optimizer step (progress bars, logs, tests that inject faults).
  std::function<void(const StepInfo&)> on_step;
  /// Called after every evaluation.
  std::function<void(const EvalPoint&)> on_eval;
  /// Called after every checkpoint is written (the step it holds): `peft train` saves the
  /// adapter beside it.
  std::function<void(std::int64_t step)> on_checkpoint;

  std::int64_t step() const { return step_; }
  AdamW<T>& optimizer() { return optimizer_; }
  /// Bytes each rank contributes to the gradient reduction of a step (0 in one process).
  std::size_t reduced_bytes_per_step() const {
    return options_.process_group.single() ? 0 : buckets_.bytes_per_step(2);
  }
  const TrainResult& result() const { return result_; }

  /// Continues from the checkpoint in `dir` (written by a run with the same model and options).
  void resume(const std::filesystem::path& dir) {
    const nlohmann::json state = load_checkpoint(dir, params_, optimizer_);
    const std::string source = (dir / kCheckpointTensors).string();
    step_ = io::json_get<std::int64_t>(state, "step", source);
    std::istringstream rng_text(io::json_get<std::string>(state, "rng", source));
    rng_text >> rng_;
    if (!rng_text) throw FileError(source + ": unreadable generator state");
    if constexpr (HasRunningState<typename Model::Adapter>) {
      if (state.contains("method_state"))
        model_.adapter().restore_running_state(state["method_state"]);
    }
    if constexpr (requires { model_.dropout_generator(); }) {
      // Checkpoints older than dropout have no dropout state: the generator stays as it is.
      if (state.contains("dropout_rng")) {
        std::istringstream dropout_text(io::json_get<std::string>(state, "dropout_rng", source));
        dropout_text >> model_.dropout_generator();
        if (!dropout_text) throw FileError(source + ": unreadable dropout generator state");
      }
    }
    result_ = TrainResult{};
    result_.losses = io::json_get<std::vector<double>>(state, "losses", source);
    for (const nlohmann::json& e : state.at("evals")) {
      EvalPoint p;
      p.step = e.at("step").get<std::int64_t>();
      p.metrics.loss = e.at("loss").get<double>();
      p.metrics.token_accuracy = e.at("token_accuracy").get<double>();
      p.metrics.exact_match = e.at("exact_match").get<double>();
      p.metrics.tokens = e.at("tokens").get<std::int64_t>();
      p.metrics.sequences = e.at("sequences").get<std::int64_t>();
      result_.evals.push_back(p);
    }
    best_eval_ = io::json_get<double>(state, "best_eval_loss", source);
    evals_without_improvement_ = io::json_get<int>(state, "evals_without_improvement", source);
    result_.steps = step_;
    result_.last_checkpoint = dir;
    result_.last_checkpoint_step = step_;
  }

  /// Trains from the current step to max_steps (or until stopped); returns the whole history.
  TrainResult run() {
    using Clock = std::chrono::steady_clock;
    if (step_ == 0 && options_.eval_at_start && result_.evals.empty()) evaluate_now();
    while (step_ < options_.max_steps) {
      const auto started = Clock::now();
      const double lr = options_.adamw.lr * options_.schedule.factor(step_);
      optimizer_.zero_grad();
      if constexpr (SamplesRank<typename Model::Adapter>) model_.adapter().sample_rank();
      double loss_sum = 0;
      if (!group().single()) {
        if (const std::string what = data_parallel_micro_batches(loss_sum); !what.empty())
          return stop_non_finite(what);
      } else {
        set_training(true);
        for (int micro = 0; micro < options_.grad_accumulation; ++micro) {
          const Batch batch = next_batch_(rng_);
          Tape<T> tape;
          ForwardResult<T> out = model_.forward(tape, batch);
          const double loss = double(out.loss.value()[0]);
          if (!std::isfinite(loss)) {
            set_training(false);
            return stop_non_finite("training loss is " + describe(loss));
          }
          loss_sum += loss;
          tape.backward(out.loss, T(1) / T(options_.grad_accumulation));
        }
        set_training(false);
      }
      const double norm = gradient_norm();
      if (!std::isfinite(norm)) return stop_non_finite("gradient norm is " + describe(norm));
      if (options_.clip_norm > 0 && norm > options_.clip_norm)
        scale_gradients(options_.clip_norm / (norm + 1e-6));
      if constexpr (ProjectsGradients<typename Model::Adapter>)
        model_.adapter().project_gradients();
      optimizer_.set_lr(lr);
      optimizer_.step();
      if constexpr (AllocatesBudget<typename Model::Adapter>)
        model_.adapter().update_and_allocate(static_cast<int>(step_));
      ++step_;
      result_.train_seconds += std::chrono::duration<double>(Clock::now() - started).count();
      ++result_.timed_steps;
      result_.losses.push_back(loss_sum / options_.grad_accumulation);
      result_.steps = step_;
      if (on_step) on_step(StepInfo{step_, options_.max_steps, result_.losses.back(), lr, norm});

      const bool last = step_ == options_.max_steps;
      const bool eval_due = (options_.eval_every > 0 && step_ % options_.eval_every == 0) || last;
      bool stop_early = false;
      if (eval_due && evaluator_) stop_early = evaluate_now();
      const bool checkpoint_due =
          options_.checkpoint_every > 0 ? step_ % options_.checkpoint_every == 0 : eval_due;
      if (!options_.checkpoint_dir.empty() && (checkpoint_due || last || stop_early)) {
        if (group().is_root()) write_checkpoint();
        // The other ranks wait for it: a rank that restores the last good checkpoint (after a
        // non-finite step) must find it whole.
        group().barrier();
        result_.last_checkpoint = options_.checkpoint_dir;
        result_.last_checkpoint_step = step_;
      }
      if (stop_early) {
        result_.reason = StopReason::EarlyStopped;
        result_.message = "early stopping at step " + std::to_string(step_) + ": no eval-loss " +
                          "improvement in " + std::to_string(options_.early_stopping_patience) +
                          " evaluations (best " + std::to_string(best_eval_) + ")";
        return result_;
      }
    }
    result_.reason = StopReason::Completed;
    result_.message = "completed " + std::to_string(step_) + " steps";
    return result_;
  }

 private:
  ProcessGroup& group() { return options_.process_group; }

  /// One step's micro-batches on this rank's rows (data parallelism): forward and backward of
  /// the rank's share of each global micro-batch, then the sum over the ranks of the gradients,
  /// of the loss and of a non-finite count. Adds the step's loss to `loss_sum` (the same on every
  /// rank); returns what went non-finite on some rank (every rank then stops), else "".
  std::string data_parallel_micro_batches(double& loss_sum) {
    ProcessGroup& g = group();
    if constexpr (requires { model_.dropout_generator(); }) {
      // Keyed by (seed, step, rank): a resumed run draws the masks the uninterrupted one drew,
      // and ranks never share a stream.
      std::uint64_t key = options_.seed ^ 0x9E3779B97F4A7C15ull * std::uint64_t(step_ + 1);
      key ^= 0xBF58476D1CE4E5B9ull * std::uint64_t(g.rank() + 1);
      model_.dropout_generator().seed(key);
    }
    double contribution = 0, non_finite = 0;
    set_training(true);
    for (int micro = 0; micro < options_.grad_accumulation; ++micro) {
      const Batch global = next_batch_(rng_);
      if (global.batch < g.size())
        throw ConfigError("trainer: a micro-batch of " + std::to_string(global.batch) +
                          " rows cannot be shared by " + std::to_string(g.size()) +
                          " ranks (expected at least one row each)");
      const Batch shard = shard_rows(global, g.rank(), g.size());
      Tape<T> tape;
      ForwardResult<T> out = model_.forward(tape, shard);
      // The share of the global mean: the rank's labelled positions over the batch's.
      const std::int64_t mine = count_targets(shard, out.virtual_tokens),
                         all = count_targets(global, out.virtual_tokens);
      const double weight = all > 0 ? double(mine) / double(all) : 1.0 / g.size();
      const double loss = double(out.loss.value()[0]);
      if (mine == 0 && all > 0) continue;  // no labelled position here: no share of the loss
      if (!std::isfinite(loss)) {
        non_finite += 1;
        continue;
      }
      contribution += weight * loss;
      tape.backward(out.loss, T(weight / options_.grad_accumulation));
    }
    set_training(false);
    std::vector<T> extra = {T(contribution), T(non_finite)};
    const auto reduce_started = std::chrono::steady_clock::now();
    buckets_.all_reduce(g, std::span<T>(extra));
    result_.reduce_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - reduce_started).count();
    if (extra[1] > T(0))
      return "training loss is non-finite on " + std::to_string(static_cast<long>(extra[1])) +
             " micro-batch share(s) of the ranks";
    loss_sum = double(extra[0]);
    return {};
  }

  /// Training mode (the adapters' dropout) for the steps' forward passes only: evaluation,
  /// and whatever the caller does with the model between runs, sees the deterministic model.
  void set_training(bool on) {
    if constexpr (requires { model_.set_training(on); }) model_.set_training(on);
  }

  static std::string describe(double x) {
    return std::isnan(x) ? "NaN" : (x > 0 ? "+Inf" : "-Inf");
  }

  double gradient_norm() const {
    double sum = 0;
    for (const NamedParameter<T>& p : params_)
      if (p.var.has_grad()) {
        const T* g = p.var.grad().data();
        for (std::int64_t i = 0; i < p.var.value().numel(); ++i) sum += double(g[i]) * double(g[i]);
      }
    return std::sqrt(sum);
  }

  void scale_gradients(double factor) {
    for (const NamedParameter<T>& p : params_)
      if (p.var.has_grad()) p.var.grad().vector() *= static_cast<T>(factor);
  }

  /// Evaluates, records, updates the early-stopping state; true when the run should stop.
  bool evaluate_now() {
    if (!evaluator_) return false;
    if constexpr (SamplesRank<typename Model::Adapter>)
      model_.adapter().set_rank(model_.adapter().config().r);
    EvalPoint point{step_, evaluator_(model_)};
    result_.evals.push_back(point);
    if (on_eval) on_eval(point);
    if (point.metrics.loss < best_eval_ - options_.early_stopping_min_delta) {
      best_eval_ = point.metrics.loss;
      evals_without_improvement_ = 0;
    } else if (step_ > 0) {
      ++evals_without_improvement_;
    }
    return options_.early_stopping_patience > 0 &&
           evals_without_improvement_ >= options_.early_stopping_patience;
  }

  void write_checkpoint() {
    std::ostringstream rng_text;
    rng_text << rng_;
    nlohmann::json evals = nlohmann::json::array();
    for (const EvalPoint& e : result_.evals)
      evals.push_back({{"step", e.step},
                       {"loss", e.metrics.loss},
                       {"token_accuracy", e.metrics.token_accuracy},
                       {"exact_match", e.metrics.exact_match},
                       {"tokens", e.metrics.tokens},
                       {"sequences", e.metrics.sequences}});
    std::ostringstream dropout_text;
    if constexpr (requires { model_.dropout_generator(); })
      dropout_text << model_.dropout_generator();
    nlohmann::json state = {{"step", step_},
                            {"rng", rng_text.str()},
                            {"dropout_rng", dropout_text.str()},
                            {"losses", result_.losses},
                            {"evals", evals},
                            // JSON has no infinity: before any evaluation the best is "none yet"
                            {"best_eval_loss", std::isfinite(best_eval_) ? best_eval_ : 1e300},
                            {"evals_without_improvement", evals_without_improvement_},
                            {"lr", options_.adamw.lr},
                            {"seed", options_.seed}};
    if (!options_.run_description.is_null()) state["run"] = options_.run_description;
    if constexpr (HasRunningState<typename Model::Adapter>)
      state["method_state"] = model_.adapter().running_state();
    save_checkpoint(options_.checkpoint_dir, params_, optimizer_, std::move(state));
    result_.last_checkpoint = options_.checkpoint_dir;
    result_.last_checkpoint_step = step_;
    if (on_checkpoint) on_checkpoint(step_);
  }

  TrainResult stop_non_finite(const std::string& what) {
    optimizer_.zero_grad();
    std::string message =
        "step " + std::to_string(step_ + 1) + ": " + what + "; stopped before applying the update";
    if (!result_.last_checkpoint.empty()) {
      // Parameters may be what went non-finite: put the model back to the last good state
      // (resume() rebuilds the history from the checkpoint; the timings are this process's).
      const double seconds = result_.train_seconds;
      const std::int64_t timed = result_.timed_steps;
      const std::filesystem::path good = result_.last_checkpoint;
      resume(good);
      result_.train_seconds = seconds;
      result_.timed_steps = timed;
      message += "; the model is restored to the last good checkpoint " + good.string() +
                 " (step " + std::to_string(result_.last_checkpoint_step) + "), left untouched";
    } else {
      message += "; no checkpoint was written (set checkpoint_dir to keep one)";
    }
    result_.reason = StopReason::NonFinite;
    result_.message = std::move(message);
    return result_;
  }

  Model& model_;
  TrainerOptions options_;
  BatchSource next_batch_;
  Evaluator evaluator_;
  std::vector<NamedParameter<T>> params_;
  AdamW<T> optimizer_;
  GradientBuckets<T> buckets_;
  std::mt19937_64 rng_;
  std::int64_t step_ = 0;
  TrainResult result_;
  double best_eval_ = std::numeric_limits<double>::infinity();
  int evals_without_improvement_ = 0;
};

/// `peft::Trainer trainer(model, options, batches, evaluator)` deduces Trainer<Model>: the
/// implicit guide would try to deduce Model from the evaluator's std::function<…(Model&)> too,
/// which a lambda cannot give. (Without an evaluator the implicit guide already deduces.)
template <class Model, class BatchSource, class Evaluator>
Trainer(Model&, TrainerOptions, BatchSource, Evaluator) -> Trainer<Model>;

}  // namespace peft
