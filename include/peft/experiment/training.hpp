#pragma once
// What the study (experiment/study.hpp) and the design-space search (experiment/search.hpp)
// share about training: the optimizer and schedule every run uses, and pretraining a frozen
// base by full fine-tuning. One definition, so the two experiments' numbers mean the same.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

#include "peft/core/error.hpp"
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

}  // namespace peft::experiment
