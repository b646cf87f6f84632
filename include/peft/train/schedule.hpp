#pragma once
// Learning-rate schedules: a multiplier of the peak rate as a function of the step, so the
// schedule holds no state and a resumed run needs only the step to continue it exactly.
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>

#include "peft/core/error.hpp"

namespace peft {

struct LrSchedule {
  enum class Kind { Constant, Linear, Cosine };

  Kind kind = Kind::Constant;
  /// Steps 0 .. warmup_steps − 1 ramp linearly up to the peak: step s uses (s + 1) / warmup, so
  /// no step is wasted at a rate of zero.
  std::int64_t warmup_steps = 0;
  /// The step at which linear and cosine decay reach `final_ratio` (the run's length).
  std::int64_t total_steps = 0;
  /// The rate at the end, as a fraction of the peak.
  double final_ratio = 0.0;

  /// The multiplier for step `step` (0-based: the step about to be taken).
  double factor(std::int64_t step) const {
    if (step < warmup_steps) return double(step + 1) / double(warmup_steps);
    if (kind == Kind::Constant) return 1.0;
    const std::int64_t decay_steps = total_steps - warmup_steps;
    if (decay_steps <= 0) return 1.0;
    const double progress = std::min(1.0, double(step - warmup_steps) / double(decay_steps));
    const double shape =
        kind == Kind::Linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
    return final_ratio + (1.0 - final_ratio) * shape;
  }

  static std::string_view kind_name(Kind kind) {
    switch (kind) {
      case Kind::Constant:
        return "constant";
      case Kind::Linear:
        return "linear";
      case Kind::Cosine:
        return "cosine";
    }
    return "?";
  }
  static Kind kind_from_name(std::string_view name) {
    for (Kind k : {Kind::Constant, Kind::Linear, Kind::Cosine})
      if (kind_name(k) == name) return k;
    throw ConfigError("unknown learning-rate schedule '" + std::string(name) +
                      "' (constant, linear, cosine)");
  }
};

}  // namespace peft
