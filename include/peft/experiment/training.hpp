#pragma once
// What the study (experiment/study.hpp) and the design-space search (experiment/search.hpp)
// share about training: the optimizer and schedule every run uses, pretraining a frozen base by
// full fine-tuning, and the search's proxy training of any method from given base weights. One
// definition, so the two experiments' numbers mean the same.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/methods/policy.hpp"
#include "peft/train/trainer.hpp"

namespace peft::experiment {

/// AdamW at `lr` with `weight_decay`, a cosine schedule warming up over `warmup_steps` and
/// ending at `final_ratio` x lr, `steps` steps, no evaluation before the first step, batches
/// drawn from `seed`.
inline TrainerOptions cosine_training(std::int64_t steps, double lr, double weight_decay,
                                      std::int64_t warmup_steps, double final_ratio,
                                      std::uint64_t seed) {
  TrainerOptions o;
  o.max_steps = steps;
  o.adamw.lr = lr;
  o.adamw.weight_decay = weight_decay;
  o.schedule.kind = LrSchedule::Kind::Cosine;
  o.schedule.warmup_steps = warmup_steps;
  o.schedule.final_ratio = final_ratio;
  o.eval_at_start = false;
  o.seed = seed;
  return o;
}

/// Pretrains `base` (a model without an adapter) by full fine-tuning for options.max_steps,
/// then freezes its tensors again. `evaluate` (may be empty) gives the run's evaluations;
/// `on_step` (may be empty) sees every step. A non-finite loss is an Error naming `what`.
template <class Model, class BatchFn>
TrainResult pretrain_base(Model& base, const TrainerOptions& options, BatchFn train_batch,
                          const std::string& what,
                          std::type_identity_t<std::function<EvalMetrics(Model&)>> evaluate = {},
                          std::function<void(const StepInfo&)> on_step = {}) {
  base.set_base_trainable(true);
  TrainResult r;
  {
    Trainer<Model> trainer(base, options, train_batch, std::move(evaluate));
    if (on_step) trainer.on_step = on_step;
    r = trainer.run();
  }
  base.set_base_trainable(false);
  if (r.reason == StopReason::NonFinite) throw Error(what + ": pretraining stopped: " + r.message);
  return r;
}

/// A short training from given base weights: the design-space search's proxy for a candidate of
/// any method (search.hpp; the study's entries reach it through MethodEntry::search_point).
struct ProxyTraining {
  ModelConfig model;
  const std::vector<NamedParameter<float>>* base = nullptr;  ///< pretrained tensors, copied in
  std::function<Batch(std::mt19937_64&)> train_batch;
  const std::vector<Batch>* eval_batches = nullptr;
  TrainerOptions options;  ///< steps, rate, schedule and the data stream's seed
  std::uint64_t seed = 0;  ///< the adapter's initialisation
};
struct ProxyResult {
  double eval_loss = std::numeric_limits<double>::quiet_NaN();  ///< NaN: a non-finite stop
  double exact_match = 0;
  std::int64_t steps = 0, trained_parameters = 0;
};

/// Copies t.base into `model` and trains its adapter for t.options.max_steps; scored by the last
/// evaluation on t.eval_batches. Methods that pick weights from data (FishMask) calibrate on two
/// training batches first; methods that train in two phases (diff pruning) prune halfway.
template <class Model>
ProxyResult proxy_train(Model& model, const ProxyTraining& t) {
  auto base = model.base_parameters();
  if (!t.base || base.size() != t.base->size())
    throw Error("proxy training: the base tensors do not match the model");
  for (std::size_t i = 0; i < base.size(); ++i) base[i].var.value() = (*t.base)[i].var.value();
  model.base_weights_changed();
  if constexpr (Calibrated<typename Model::Adapter, Model, std::vector<Batch>>) {
    std::mt19937_64 rng(t.options.seed + 5);
    const std::vector<Batch> calibration = {t.train_batch(rng), t.train_batch(rng)};
    model.adapter().calibrate(model, calibration);
  }
  ProxyResult out;
  for (const NamedParameter<float>& p : model.trainable_parameters())
    out.trained_parameters += p.var.value().numel();
  const auto evaluator = [&](Model& m) { return evaluate(m, *t.eval_batches); };
  constexpr bool two_phase = TrainsInTwoPhases<typename Model::Adapter>;
  const std::int64_t steps = t.options.max_steps, first = two_phase ? steps / 2 : steps;
  TrainResult r;
  for (int phase = 0; phase < (two_phase ? 2 : 1); ++phase) {
    TrainerOptions o = t.options;
    o.max_steps = phase == 0 ? first : steps - first;
    if constexpr (two_phase) {
      if (phase == 1) model.adapter().prune();
    }
    Trainer<Model> trainer(model, o, t.train_batch, evaluator);
    r = trainer.run();
    out.steps += r.steps;
    if (r.reason == StopReason::NonFinite || r.evals.empty()) return out;  // NaN: ranks last
  }
  out.eval_loss = r.evals.back().metrics.loss;
  out.exact_match = r.evals.back().metrics.exact_match;
  return out;
}

}  // namespace peft::experiment
