#pragma once
// Runs a golden case of ../shared/golden (format in its README.md): loads the base model and the
// adapter the reference wrote, and checks logits, loss, every gradient, the merged logits, the
// 4-step AdamW trajectory and the trained tensors against the reference's numbers.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <new>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/registry.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/optimizer.hpp"

namespace peft::testing {

/// One compared quantity: its worst error under its measure, against its tolerance.
struct QuantityCheck {
  std::string name;
  double error = 0;
  double tolerance = 0;
  bool ok() const { return error <= tolerance; }  // NaN error fails
};

struct GoldenReport {
  std::string case_name;
  bool passed = false;
  bool skipped =
      false;  ///< the case's method refuses the base format asked for (`failure` says why)
  std::string failure;  ///< why the case could not run, when it could not
  std::vector<QuantityCheck> checks;

  /// "PASS gpt2_lora  logits 2.1e-08/1e-05  loss ..." (worst of each group of quantities).
  std::string line() const {
    if (skipped) return "SKIP " + case_name + "  " + failure;
    std::string out = (passed ? "PASS " : "FAIL ") + case_name;
    if (!failure.empty()) return out + "  " + failure;
    std::map<std::string, QuantityCheck> worst;  // grad.* → "grads", trained.* → "trained"
    std::vector<std::string> order;
    for (const QuantityCheck& c : checks) {
      std::string group = c.name.starts_with("grad.")      ? "grads"
                          : c.name.starts_with("trained.") ? "trained"
                                                           : c.name;
      auto it = worst.find(group);
      if (it == worst.end()) {
        order.push_back(group);
        worst[group] = c;
      } else if (!(c.error <= it->second.error) || (!c.ok() && it->second.ok())) {
        it->second = c;
      }
    }
    char buf[160];
    for (const std::string& g : order) {
      const QuantityCheck& c = worst[g];
      std::snprintf(buf, sizeof buf, "  %s %.2e/%.0e%s", g.c_str(), c.error, c.tolerance,
                    c.ok() ? "" : (" FAIL(" + c.name + ")").c_str());
      out += buf;
    }
    return out;
  }
};

/// Tolerances of the golden README.
struct GoldenTolerances {
  double logits = 1e-5, loss = 1e-5, grad = 1e-4, train_losses = 1e-4, trained = 1e-3;
};

/// The tolerances of a case run on a `format` base: for fp32 the golden README's, against the
/// reference's numbers; otherwise those of the float run against the double run on the same
/// stored weights (docs/quantization.md, "Parity on a bf16 base", derives them). A bf16 product
/// rounds its other operand to bf16, a relative change of at most u = 2^-8 per element, and to
/// first order each quantity moves by u times its sensitivity to those inputs: logits 4u, loss
/// u/2, each gradient 16u (the backward rounds dy too, on top of the forward's change),
/// train_losses 2u. fp16 and NF4 keep x fp32, but an NF4 model's token embedding and head are
/// bf16, so it gets bf16's; fp16 gets them too (its errors are fp32 rounding, about 1e-6). The
/// trained tensors are checked against trained_tolerance(), an absolute bound from AdamW's step.
inline GoldenTolerances base_format_tolerances(BaseFormat format) {
  if (format == BaseFormat::fp32) return {};
  constexpr double u = 1.0 / 256.0;  // bf16's unit roundoff
  GoldenTolerances t;
  t.logits = 4 * u;
  t.loss = u / 2;
  t.grad = 16 * u;
  t.train_losses = 2 * u;
  t.trained = 0;  // unused: trained_tolerance()
  return t;
}

/// The AdamW recipe of a case.json's "train" object, every field checked: a hostile case (10^9
/// steps, a negative learning rate, a string where a number belongs) is an error naming the file
/// and the field, never an unbounded or meaningless run.
struct GoldenTraining {
  /// The reference writes 4 steps; a case is a check, not a training run, and 1,000 steps of
  /// the golden models already take about a minute. More is refused.
  static constexpr int kMaxSteps = 1000;

  double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  int steps = 4;

  AdamWOptions adamw() const {
    AdamWOptions o;
    o.lr = lr;
    o.beta1 = beta1;
    o.beta2 = beta2;
    o.eps = eps;
    o.weight_decay = weight_decay;
    return o;
  }
};

/// Max |θ_float − θ_double| of a trained tensor after `t.steps` AdamW steps from the same start,
/// on a base whose products round their inputs: AdamW normalises each gradient element, so a
/// rounding that changes an element's gradient in sign or size can move it by a whole step the
/// other way. With bias correction and β2 near 1, step k's update is at most lr·√k in size
/// (|m̂| ≤ max |g|, √v̂ ≥ max |g| / √k), so two runs part by at most 2·lr·Σ_{k=1..steps} √k, plus
/// the decoupled weight decay's lr·wd of that difference per step (a factor 1 + lr·wd·steps).
inline double trained_tolerance(const GoldenTraining& t) {
  double steps = 0;
  for (int k = 1; k <= t.steps; ++k) steps += std::sqrt(double(k));
  return 2 * t.lr * steps * (1 + t.lr * t.weight_decay * t.steps);
}

namespace detail {
inline double case_number(const nlohmann::json& j, const std::string& field, double fallback,
                          double lo, double hi, bool lo_open, bool hi_open,
                          const std::string& source) {
  if (!j.contains(field)) return fallback;
  const nlohmann::json& v = j[field];
  const bool number = v.is_number() && !v.is_boolean();
  const double x = number ? v.get<double>() : 0;
  const bool ok =
      number && std::isfinite(x) && (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
  if (!ok) {
    char range[96];
    std::snprintf(range, sizeof range, "%s%g, %g%s", lo_open ? "(" : "[", lo, hi,
                  hi_open ? ")" : "]");
    throw ConfigError(source + ": train." + field + ": expected a finite number in " + range +
                      ", found " + v.dump().substr(0, 64));
  }
  return x;
}
}  // namespace detail

/// Reads and checks case_json["train"] (absent or null: the reference's defaults).
inline GoldenTraining read_training(const nlohmann::json& case_json, const std::string& source) {
  GoldenTraining t;
  if (!case_json.is_object())
    throw ConfigError(source + ": expected a JSON object, found " + case_json.type_name());
  // null: a case without a training trajectory (the reference writes that for AdaLoRA).
  if (!case_json.contains("train") || case_json["train"].is_null()) return t;
  const nlohmann::json& train = case_json["train"];
  if (!train.is_object())
    throw ConfigError(source + ": train: expected an object, found " + train.type_name());
  constexpr double kBig = 1e6;
  t.lr = detail::case_number(train, "lr", t.lr, 0, kBig, true, false, source);
  if (train.contains("betas")) {
    const nlohmann::json& b = train["betas"];
    if (!b.is_array() || b.size() != 2)
      throw ConfigError(source + ": train.betas: expected [beta1, beta2], found " +
                        b.dump().substr(0, 64));
    const nlohmann::json pair = {{"betas[0]", b[0]}, {"betas[1]", b[1]}};
    t.beta1 = detail::case_number(pair, "betas[0]", t.beta1, 0, 1, false, true, source);
    t.beta2 = detail::case_number(pair, "betas[1]", t.beta2, 0, 1, false, true, source);
  }
  t.eps = detail::case_number(train, "eps", t.eps, 0, 1, true, false, source);
  t.weight_decay =
      detail::case_number(train, "weight_decay", t.weight_decay, 0, kBig, false, false, source);
  if (train.contains("steps")) {
    const nlohmann::json& v = train["steps"];
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
        v.get<std::int64_t>() > GoldenTraining::kMaxSteps)
      throw ConfigError(source + ": train.steps: expected an integer in [0, " +
                        std::to_string(GoldenTraining::kMaxSteps) + "], found " +
                        v.dump().substr(0, 64));
    t.steps = static_cast<int>(v.get<std::int64_t>());
  }
  return t;
}

/// The case's model folder: case_json["model_dir"], a relative path string.
inline std::filesystem::path case_model_dir(const std::filesystem::path& case_dir,
                                            const nlohmann::json& case_json,
                                            const std::string& source) {
  if (!case_json.is_object())
    throw ConfigError(source + ": expected a JSON object, found " + case_json.type_name());
  if (!case_json.contains("model_dir")) return case_dir / "../models/unknown";
  const nlohmann::json& v = case_json["model_dir"];
  if (!v.is_string() || v.get<std::string>().empty())
    throw ConfigError(source + ": model_dir: expected a folder name (a string), found " +
                      v.dump().substr(0, 64));
  return case_dir / v.get<std::string>();
}

/// Throws when a forward pass produced a non-finite value: a NaN compared with a tolerance
/// fails anyway, but the case's line should say why ("logits are not finite"), not print an
/// error of inf.
template <class T>
void require_finite(const Tensor<T>& t, const std::string& what) {
  const auto& v = t.values();
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(double(v[i])))
      throw Error(what + " are not finite (element " + std::to_string(i) + " of " +
                  std::to_string(v.size()) + " is " + (std::isnan(double(v[i])) ? "NaN" : "Inf") +
                  "): check the model's weights and the adapter's values and scaling");
}

namespace detail {
// max |a − b| / max |b|: the README's relative measure.
inline double relative_error(const std::vector<double>& actual,
                             const std::vector<double>& expected) {
  if (actual.size() != expected.size()) return std::numeric_limits<double>::infinity();
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double d = std::abs(actual[i] - expected[i]);
    diff = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(diff, d);
    scale = std::max(scale, std::abs(expected[i]));
  }
  return scale > 0 ? diff / scale : diff;
}
inline double max_abs_error(const std::vector<double>& actual,
                            const std::vector<double>& expected) {
  if (actual.size() != expected.size()) return std::numeric_limits<double>::infinity();
  double diff = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double d = std::abs(actual[i] - expected[i]);
    diff = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(diff, d);
  }
  return diff;
}
template <class T>
std::vector<double> as_doubles(const Tensor<T>& t) {
  return std::vector<double>(t.values().begin(), t.values().end());
}

// What one run of a case computes, as doubles: logits, loss, the gradient of every trainable
// tensor ("grad.<key>"), and with a trajectory the losses and the trained tensors.
struct CaseRun {
  std::vector<double> logits, train_losses;
  double loss = 0;
  std::vector<std::pair<std::string, std::vector<double>>> grads, trained;
};

// Reads the case's batch (input_ids, attention_mask, labels) from expected.safetensors.
inline Batch read_case_batch(const io::SafetensorsFile& expected) {
  Batch batch;
  const auto& ids_info = expected.info("input_ids");
  if (ids_info.shape.size() != 2) throw FileError(expected.name() + ": input_ids must be [B, T]");
  batch.batch = ids_info.shape[0];
  batch.seq = ids_info.shape[1];
  batch.input_ids = expected.read<std::int64_t>("input_ids");
  batch.attention_mask = expected.read<std::int64_t>("attention_mask", ids_info.shape);
  batch.labels = expected.read<std::int64_t>("labels", ids_info.shape);
  return batch;
}

/// The AdamW trajectory of a golden case on `model` (its adapter as loaded): the loss before each
/// step and after the last, and every trainable tensor after the last step — read before the
/// final loss's forward (a forward may move them: COFT projects its parameters in place, as the
/// reference does).
template <class Model, class T = typename Model::Scalar>
std::pair<std::vector<double>, std::vector<std::pair<std::string, std::vector<double>>>>
run_trajectory(Model& model, const Batch& batch, const GoldenTraining& training) {
  for (NamedParameter<T>& p : model.trainable_parameters()) p.var.zero_grad();
  AdamWOptions options = training.adamw();
  if constexpr (PrescribesAdamW<typename Model::AdapterPolicy>)
    options.form = Model::AdapterPolicy::adamw_form;  // LoRA-FA's optimizer (policy.hpp)
  AdamW<T> optimizer(model.trainable_parameters(), options);
  std::vector<double> losses;
  std::vector<std::pair<std::string, std::vector<double>>> trained;
  for (int step = 0; step <= training.steps; ++step) {
    if (step == training.steps)
      for (NamedParameter<T>& p : model.trainable_parameters())
        trained.emplace_back("trained." + p.name, as_doubles(p.var.value()));
    Tape<T> tape(step < training.steps);
    ForwardResult<T> out = model.forward(tape, batch);
    losses.push_back(double(out.loss.value()[0]));
    if (step == training.steps) break;
    optimizer.zero_grad();
    tape.backward(out.loss);
    if constexpr (ProjectsGradients<typename Model::Adapter>) model.adapter().project_gradients();
    optimizer.step();
  }
  return {std::move(losses), std::move(trained)};
}

template <class Arch, class Policy, class T>
void run_case(const std::filesystem::path& case_dir, const nlohmann::json& case_json,
              const nlohmann::json& adapter_json, const std::filesystem::path& model_dir,
              GoldenReport& report, const GoldenTolerances& tol) {
  const std::filesystem::path adapter_dir = case_dir / "adapter";
  const io::SafetensorsFile expected = io::SafetensorsFile::open(case_dir / "expected.safetensors");
  const io::SafetensorsFile adapter_file =
      io::SafetensorsFile::open(adapter_dir / "adapter_model.safetensors");
  auto config = config_from_json<typename Policy::Config>(
      adapter_json, (adapter_dir / "adapter_config.json").string());
  auto model = Decoder<Arch, Policy, T>::load(model_dir, config);
  auto load_adapter = [&] { io::load_adapter_tensors(model.adapter().parameters(), adapter_file); };
  load_adapter();

  const Batch batch = read_case_batch(expected);
  auto check = [&](const std::string& name, double error, double tolerance) {
    report.checks.push_back({name, error, tolerance});
  };

  // Logits, loss, gradients.
  {
    Tape<T> tape;
    ForwardResult<T> out = model.forward(tape, batch);
    require_finite(out.logits.value(), "logits");
    require_finite(out.loss.value(), "loss");
    const auto& logits_shape = expected.info("logits").shape;
    if (out.logits.shape() != Shape(logits_shape.begin(), logits_shape.end()))
      throw ShapeError("logits shape " + shape_string(out.logits.shape()) + ", reference " +
                       shape_string(Shape(logits_shape.begin(), logits_shape.end())));
    check("logits", relative_error(as_doubles(out.logits.value()), expected.read<double>("logits")),
          tol.logits);
    check("loss", max_abs_error({double(out.loss.value()[0])}, expected.read<double>("loss")),
          tol.loss);
    tape.backward(out.loss);
    for (NamedParameter<T>& p : model.trainable_parameters()) {
      const std::string key = "grad." + p.name;
      if (!expected.contains(key)) {
        check(key + " (missing from reference)", std::numeric_limits<double>::infinity(), tol.grad);
        continue;
      }
      const Tensor<T> g = p.var.has_grad() ? p.var.grad() : Tensor<T>::zeros(p.var.shape());
      check(key, relative_error(as_doubles(g), expected.read<double>(key, p.var.shape())),
            tol.grad);
    }
    for (const io::TensorInfo& info : expected.tensors())
      if (info.name.starts_with("grad.")) {
        bool known = false;
        for (NamedParameter<T>& p : model.trainable_parameters())
          known = known || "grad." + p.name == info.name;
        if (!known)
          check(info.name + " (no such trainable tensor)", std::numeric_limits<double>::infinity(),
                tol.grad);
      }
  }

  // Merged logits.
  if (case_json.contains("has_merged_logits") && !case_json["has_merged_logits"].is_boolean())
    throw ConfigError((case_dir / "case.json").string() +
                      ": has_merged_logits: expected true or false, found " +
                      case_json["has_merged_logits"].dump().substr(0, 64));
  if (case_json.value("has_merged_logits", false) && expected.contains("merged_logits")) {
    if constexpr (Mergeable<typename Policy::template State<T>, T>) {
      model.merge();
      check("merged_logits",
            relative_error(as_doubles(model.logits(batch)), expected.read<double>("merged_logits")),
            tol.logits);
      model.unmerge();
    } else {
      check("merged_logits (method cannot merge)", std::numeric_limits<double>::infinity(),
            tol.logits);
    }
  }

  // The AdamW trajectory: the same batch each step.
  if (expected.contains("train_losses")) {
    load_adapter();
    const auto [losses, trained] =
        run_trajectory(model, batch, read_training(case_json, (case_dir / "case.json").string()));
    check("train_losses", max_abs_error(losses, expected.read<double>("train_losses")),
          tol.train_losses);
    const std::vector<NamedParameter<T>> params = model.trainable_parameters();
    for (std::size_t i = 0; i < trained.size(); ++i) {
      const auto& [key, values] = trained[i];
      if (!expected.contains(key)) continue;
      check(key, relative_error(values, expected.read<double>(key, params[i].var.shape())),
            tol.trained);
    }
  }
}

// Runs a case on its base model loaded in `format`, in precision T: forward and backward, and
// the AdamW trajectory when `training` is given (the adapter reloaded first, as run_case does).
template <class Arch, class Policy, class T>
CaseRun run_in_format(const std::filesystem::path& model_dir, const typename Policy::Config& config,
                      const io::SafetensorsFile& adapter_file, const Batch& batch,
                      const GoldenTraining* training, BaseFormat format) {
  auto model = Decoder<Arch, Policy, T>::load(model_dir, config, 0, format);
  io::load_adapter_tensors(model.adapter().parameters(), adapter_file);
  CaseRun run;
  {
    Tape<T> tape;
    ForwardResult<T> out = model.forward(tape, batch);
    require_finite(out.logits.value(), "logits");
    require_finite(out.loss.value(), "loss");
    run.logits = as_doubles(out.logits.value());
    run.loss = double(out.loss.value()[0]);
    tape.backward(out.loss);
    for (NamedParameter<T>& p : model.trainable_parameters())
      run.grads.emplace_back(
          "grad." + p.name,
          as_doubles(p.var.has_grad() ? p.var.grad() : Tensor<T>::zeros(p.var.shape())));
  }
  if (training != nullptr) {
    io::load_adapter_tensors(model.adapter().parameters(), adapter_file);
    std::tie(run.train_losses, run.trained) = run_trajectory(model, batch, *training);
  }
  return run;
}

// The float run of a case on a `format` base against the double run on the same base (the
// same stored weights, exact products): logits, loss, every gradient, the trajectory.
template <class Arch, class Policy>
void run_case_in_format(const std::filesystem::path& case_dir, const nlohmann::json& case_json,
                        const nlohmann::json& adapter_json, const std::filesystem::path& model_dir,
                        BaseFormat format, GoldenReport& report, const GoldenTolerances& tol) {
  const std::filesystem::path adapter_dir = case_dir / "adapter";
  const io::SafetensorsFile expected = io::SafetensorsFile::open(case_dir / "expected.safetensors");
  const io::SafetensorsFile adapter_file =
      io::SafetensorsFile::open(adapter_dir / "adapter_model.safetensors");
  const auto config = config_from_json<typename Policy::Config>(
      adapter_json, (adapter_dir / "adapter_config.json").string());
  const Batch batch = read_case_batch(expected);
  const GoldenTraining training = read_training(case_json, (case_dir / "case.json").string());
  const GoldenTraining* trajectory = expected.contains("train_losses") ? &training : nullptr;
  const CaseRun ours = run_in_format<Arch, Policy, float>(model_dir, config, adapter_file, batch,
                                                          trajectory, format);
  const CaseRun reference = run_in_format<Arch, Policy, double>(model_dir, config, adapter_file,
                                                                batch, trajectory, format);
  auto check = [&](const std::string& name, double error, double tolerance) {
    report.checks.push_back({name, error, tolerance});
  };
  check("logits", relative_error(ours.logits, reference.logits), tol.logits);
  check("loss", max_abs_error({ours.loss}, {reference.loss}), tol.loss);
  const auto compare = [&](const auto& mine, const auto& theirs, double tolerance, auto measure) {
    for (std::size_t i = 0; i < mine.size(); ++i)
      check(mine[i].first,
            i < theirs.size() && theirs[i].first == mine[i].first
                ? measure(mine[i].second, theirs[i].second)
                : std::numeric_limits<double>::infinity(),
            tolerance);
  };
  compare(ours.grads, reference.grads, tol.grad, relative_error);
  if (trajectory != nullptr) {
    check("train_losses", max_abs_error(ours.train_losses, reference.train_losses),
          tol.train_losses);
    // Absolute (trained_tolerance), not relative: the bound is on each element's drift.
    compare(ours.trained, reference.trained, trained_tolerance(training), max_abs_error);
  }
}
}  // namespace detail

/// Runs one case folder with the methods of Registry and fills `report`; throws what reading
/// the case's files throws (a peft::Error naming the file and the field, std::bad_alloc).
/// Returns false when Registry has no method for the case's adapter config (nothing was run).
/// run_golden_case is this behind a catch-all; the golden-case fuzzer calls it directly so that
/// an exception that is not a peft::Error stays visible.
///
/// `format` other than fp32 runs the case on its base model loaded in that format
/// (`peft parity --base-dtype`): the float run against the double run on the same stored
/// weights (detail::run_case_in_format; the reference's numbers are for the fp32 base and do
/// not apply), within `tol` (base_format_tolerances(format) for the derived ones); T is unused.
template <class Registry = BuiltinMethods, class T = double>
bool run_golden_case_throwing(const std::filesystem::path& case_dir, GoldenReport& report,
                              const GoldenTolerances& tol = {},
                              BaseFormat format = BaseFormat::fp32) {
  const nlohmann::json case_json = io::load_json(case_dir / "case.json");
  const std::string case_source = (case_dir / "case.json").string();
  const std::filesystem::path model_dir = case_model_dir(case_dir, case_json, case_source);
  read_training(case_json, case_source);  // checked before any model is built
  const std::filesystem::path adapter_config = case_dir / "adapter" / "adapter_config.json";
  const nlohmann::json adapter_json = io::load_json(adapter_config);
  const nlohmann::json model_json = io::load_json(model_dir / "config.json");
  const std::string model_type = model_json.is_object() && model_json.contains("model_type") &&
                                         model_json["model_type"].is_string()
                                     ? model_json["model_type"].get<std::string>()
                                     : std::string();
  // "peft_method" (this project's field): the policy by name, for a method whose files are
  // another's (LoRA-FA trains a LoRA adapter); else the one accepting adapter_config.json.
  const auto run = [&]<class Policy>() {
    visit_arch_for(model_type, [&]<class Arch>() {
      if (format == BaseFormat::fp32)
        detail::run_case<Arch, Policy, T>(case_dir, case_json, adapter_json, model_dir, report,
                                          tol);
      else
        detail::run_case_in_format<Arch, Policy>(case_dir, case_json, adapter_json, model_dir,
                                                 format, report, tol);
    });
  };
  const bool supported = case_json.contains("peft_method") && case_json["peft_method"].is_string()
                             ? Registry::visit_named(case_json["peft_method"].get<std::string>(),
                                                     [&]<class Policy>() {
                                                       if constexpr (Loadable<Policy>)
                                                         run.template operator()<Policy>();
                                                     })
                             : visit_policy_for<Registry>(adapter_json, run);
  if (!supported) {
    const auto text = [](const nlohmann::json& j, const char* key) {
      return j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>()
                                                                    : std::string("?");
    };
    report.failure = "method " + text(adapter_json, "peft_type") + " (" +
                     text(case_json, "method") + ") is not supported yet";
    return false;
  }
  report.passed =
      !report.checks.empty() && std::all_of(report.checks.begin(), report.checks.end(),
                                            [](const QuantityCheck& c) { return c.ok(); });
  return true;
}

/// Runs one case folder; never throws (a case that cannot run is a FAIL saying why; with a
/// `format` its method refuses, a BaseFormatError, a SKIP saying why).
template <class T = double>
GoldenReport run_golden_case(const std::filesystem::path& case_dir,
                             const GoldenTolerances& tol = {},
                             BaseFormat format = BaseFormat::fp32) {
  GoldenReport report;
  report.case_name = case_dir.filename().string();
  if (report.case_name.empty()) report.case_name = case_dir.parent_path().filename().string();
  try {
    run_golden_case_throwing<BuiltinMethods, T>(case_dir, report, tol, format);
  } catch (const BaseFormatError& e) {
    report.passed = false;
    report.skipped = true;
    report.checks.clear();
    report.failure = std::string("(") + std::string(base_format_name(format)) +
                     " base refused: " + e.what() + ")";
  } catch (const std::bad_alloc&) {
    report.passed = false;
    report.checks.clear();
    report.failure =
        "error: out of memory (std::bad_alloc) building the case's model or tensors: a size in " +
        (case_dir / "case.json").string() +
        ", its model's config.json or its adapter config is "
        "too large for this machine";
  } catch (const std::exception& e) {
    report.passed = false;
    report.checks.clear();
    report.failure = std::string("error: ") + e.what();
  }
  return report;
}

}  // namespace peft::testing
