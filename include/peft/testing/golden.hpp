#pragma once
// Runs a golden case of ../shared/golden (format in its README.md): loads the base model and the
// adapter the reference wrote, and checks logits, loss, every gradient, the merged logits, the
// 4-step AdamW trajectory and the trained tensors against the reference's numbers.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
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
  std::string failure;  ///< why the case could not run, when it could not
  std::vector<QuantityCheck> checks;

  /// "PASS gpt2_lora  logits 2.1e-08/1e-05  loss ..." (worst of each group of quantities).
  std::string line() const {
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

  Batch batch;
  const auto& ids_info = expected.info("input_ids");
  if (ids_info.shape.size() != 2) throw FileError(expected.name() + ": input_ids must be [B, T]");
  batch.batch = ids_info.shape[0];
  batch.seq = ids_info.shape[1];
  batch.input_ids = expected.read<std::int64_t>("input_ids");
  batch.attention_mask = expected.read<std::int64_t>("attention_mask", ids_info.shape);
  batch.labels = expected.read<std::int64_t>("labels", ids_info.shape);
  auto check = [&](const std::string& name, double error, double tolerance) {
    report.checks.push_back({name, error, tolerance});
  };

  // Logits, loss, gradients.
  {
    Tape<T> tape;
    ForwardResult<T> out = model.forward(tape, batch);
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
    for (NamedParameter<T>& p : model.trainable_parameters()) p.var.zero_grad();
    const nlohmann::json train = case_json.value("train", nlohmann::json::object());
    AdamWOptions options;
    options.lr = train.value("lr", 1e-2);
    if (train.contains("betas") && train["betas"].size() == 2) {
      options.beta1 = train["betas"][0].get<double>();
      options.beta2 = train["betas"][1].get<double>();
    }
    options.eps = train.value("eps", 1e-8);
    options.weight_decay = train.value("weight_decay", 0.01);
    const int steps = train.value("steps", 4);
    AdamW<T> optimizer(model.trainable_parameters(), options);
    std::vector<double> losses;
    for (int step = 0; step <= steps; ++step) {
      Tape<T> tape(step < steps);
      ForwardResult<T> out = model.forward(tape, batch);
      losses.push_back(double(out.loss.value()[0]));
      if (step == steps) break;
      optimizer.zero_grad();
      tape.backward(out.loss);
      optimizer.step();
    }
    check("train_losses", max_abs_error(losses, expected.read<double>("train_losses")),
          tol.train_losses);
    for (NamedParameter<T>& p : model.trainable_parameters()) {
      const std::string key = "trained." + p.name;
      if (!expected.contains(key)) continue;
      check(key,
            relative_error(as_doubles(p.var.value()), expected.read<double>(key, p.var.shape())),
            tol.trained);
    }
  }
}
}  // namespace detail

/// Runs one case folder; never throws (a case that cannot run is a FAIL saying why).
template <class T = double>
GoldenReport run_golden_case(const std::filesystem::path& case_dir,
                             const GoldenTolerances& tol = {}) {
  GoldenReport report;
  report.case_name = case_dir.filename().string();
  if (report.case_name.empty()) report.case_name = case_dir.parent_path().filename().string();
  try {
    const nlohmann::json case_json = io::load_json(case_dir / "case.json");
    const std::filesystem::path model_dir =
        case_dir / case_json.value("model_dir", std::string("../models/unknown"));
    const std::filesystem::path adapter_config = case_dir / "adapter" / "adapter_config.json";
    const nlohmann::json adapter_json = io::load_json(adapter_config);
    const nlohmann::json model_json = io::load_json(model_dir / "config.json");
    const std::string model_type = model_json.value("model_type", std::string());
    const bool supported = visit_policy_for(adapter_json, [&]<class Policy>() {
      visit_arch_for(model_type, [&]<class Arch>() {
        detail::run_case<Arch, Policy, T>(case_dir, case_json, adapter_json, model_dir, report,
                                          tol);
      });
    });
    if (!supported) {
      report.failure = "method " + adapter_json.value("peft_type", std::string("?")) + " (" +
                       case_json.value("method", std::string("?")) + ") is not supported yet";
      return report;
    }
    report.passed =
        !report.checks.empty() && std::all_of(report.checks.begin(), report.checks.end(),
                                              [](const QuantityCheck& c) { return c.ok(); });
  } catch (const std::exception& e) {
    report.passed = false;
    report.failure = std::string("error: ") + e.what();
  }
  return report;
}

}  // namespace peft::testing
