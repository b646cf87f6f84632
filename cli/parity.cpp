// `peft parity [--device cpu|cuda] CASE_DIR...`: runs golden cases, one line each, then
// "N passed, M failed" (and ", K skipped" on CUDA).
//
// --device cpu (the default) runs every case in double precision (testing/golden.hpp).
// --device cuda runs the LoRA cases (peft_type LORA without use_dora; rsLoRA included) with the
// GPU decoder in fp32 (include/peft/backend/cuda/lora_decoder.cuh): logits, loss, every LoRA
// gradient, the AdamW trajectory and the trained tensors, each against the golden README's
// tolerance. Merged logits are not compared on CUDA (merging is a host operation). Cases of
// other methods print `SKIP <case> (method X not on CUDA yet)` and count as skipped.
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <limits>
#include <peft/peft.hpp>
#include <peft/testing/golden.hpp>
#include <string>
#include <vector>

#if defined(PEFT_WITH_CUDA)
#include <peft/backend/cuda/export_lora.hpp>

#include "cuda_commands.hpp"
#endif

#include "commands.hpp"

namespace peft::cli {

#if defined(PEFT_WITH_CUDA)
namespace detail {

// The method a case's adapter_config.json describes, for the SKIP line.
inline std::string method_label(const nlohmann::json& adapter_json) {
  const std::string type = adapter_json.value("peft_type", std::string("?"));
  if (type == "LORA" && adapter_json.contains("use_dora") &&
      adapter_json["use_dora"].is_boolean() && adapter_json["use_dora"].get<bool>())
    return "DORA";
  return type;
}

// Loads the case on the CPU (model, adapter, batch, recipe), runs it on the GPU, compares.
template <class Arch>
void run_cuda_case(const std::filesystem::path& case_dir, const nlohmann::json& case_json,
                   const nlohmann::json& adapter_json, const std::filesystem::path& model_dir,
                   testing::GoldenReport& report, const testing::GoldenTolerances& tol) {
  using testing::detail::max_abs_error;
  using testing::detail::relative_error;
  const std::filesystem::path adapter_dir = case_dir / "adapter";
  const io::SafetensorsFile expected = io::SafetensorsFile::open(case_dir / "expected.safetensors");
  const io::SafetensorsFile adapter_file =
      io::SafetensorsFile::open(adapter_dir / "adapter_model.safetensors");
  auto config =
      LoRA::Config::from_json(adapter_json, (adapter_dir / "adapter_config.json").string());
  auto model = Decoder<Arch, LoRA, float>::load(model_dir, config);
  io::load_adapter_tensors(model.adapter().parameters(), adapter_file);
  const cuda::DeviceModelSpec spec = cuda::export_lora_model(model);

  cuda::DeviceBatch batch;
  const auto& ids_info = expected.info("input_ids");
  if (ids_info.shape.size() != 2) throw FileError(expected.name() + ": input_ids must be [B, T]");
  batch.batch = ids_info.shape[0];
  batch.seq = ids_info.shape[1];
  batch.input_ids = expected.read<std::int64_t>("input_ids");
  batch.attention_mask = expected.read<std::int64_t>("attention_mask", ids_info.shape);
  batch.labels = expected.read<std::int64_t>("labels", ids_info.shape);

  const nlohmann::json train = case_json.value("train", nlohmann::json::object());
  cuda::DeviceAdamW adamw;
  adamw.lr = train.value("lr", 1e-2);
  if (train.contains("betas") && train["betas"].size() == 2) {
    adamw.beta1 = train["betas"][0].get<double>();
    adamw.beta2 = train["betas"][1].get<double>();
  }
  adamw.eps = train.value("eps", 1e-8);
  adamw.weight_decay = train.value("weight_decay", 0.01);
  const bool trajectory = expected.contains("train_losses");
  const int steps = trajectory ? train.value("steps", 4) : 0;

  const cuda_commands::LoraCaseResult r = cuda_commands::run_lora_case(spec, batch, adamw, steps);
  auto check = [&](const std::string& name, double error, double tolerance) {
    report.checks.push_back({name, error, tolerance});
  };
  auto doubles = [](const std::vector<float>& v) {
    return std::vector<double>(v.begin(), v.end());
  };
  check("logits", relative_error(doubles(r.logits), expected.read<double>("logits")), tol.logits);
  check("loss", max_abs_error({double(r.loss)}, expected.read<double>("loss")), tol.loss);
  // Every grad.* of the reference must be one of ours, and each of ours must be in it.
  std::vector<std::string> ours;
  for (const cuda::NamedHostTensor& g : r.grads) {
    ours.push_back("grad." + g.name);
    if (!expected.contains("grad." + g.name)) {
      check("grad." + g.name + " (missing from reference)", std::numeric_limits<double>::infinity(),
            tol.grad);
      continue;
    }
    check("grad." + g.name,
          relative_error(doubles(g.values), expected.read<double>("grad." + g.name)), tol.grad);
  }
  for (const io::TensorInfo& info : expected.tensors())
    if (info.name.starts_with("grad.") &&
        std::find(ours.begin(), ours.end(), info.name) == ours.end())
      check(info.name + " (no such trainable tensor)", std::numeric_limits<double>::infinity(),
            tol.grad);
  if (trajectory) {
    check("train_losses",
          max_abs_error(doubles(r.train_losses), expected.read<double>("train_losses")),
          tol.train_losses);
    for (const cuda::NamedHostTensor& t : r.trained) {
      const std::string key = "trained." + t.name;
      if (!expected.contains(key)) continue;
      check(key, relative_error(doubles(t.values), expected.read<double>(key)), tol.trained);
    }
  }
}

// One case on the GPU; never throws. skipped: a method the CUDA decoder does not run.
inline testing::GoldenReport run_golden_case_cuda(const std::filesystem::path& case_dir,
                                                  bool& skipped, std::string& skip_reason) {
  testing::GoldenReport report;
  report.case_name = case_dir.filename().string();
  if (report.case_name.empty()) report.case_name = case_dir.parent_path().filename().string();
  skipped = false;
  try {
    const nlohmann::json case_json = io::load_json(case_dir / "case.json");
    const std::filesystem::path model_dir =
        case_dir / case_json.value("model_dir", std::string("../models/unknown"));
    const nlohmann::json adapter_json = io::load_json(case_dir / "adapter" / "adapter_config.json");
    if (!LoRA::accepts(adapter_json)) {
      skipped = true;
      skip_reason = "method " + method_label(adapter_json) + " not on CUDA yet";
      return report;
    }
    const nlohmann::json model_json = io::load_json(model_dir / "config.json");
    visit_arch_for(model_json.value("model_type", std::string()), [&]<class Arch>() {
      run_cuda_case<Arch>(case_dir, case_json, adapter_json, model_dir, report, {});
    });
    report.passed = !report.checks.empty() &&
                    std::all_of(report.checks.begin(), report.checks.end(),
                                [](const testing::QuantityCheck& c) { return c.ok(); });
  } catch (const std::exception& e) {
    report.passed = false;
    report.failure = std::string("error: ") + e.what();
  }
  return report;
}

}  // namespace detail
#endif

int run_parity(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::vector<std::string> cases;
  std::string device = "cpu";
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--device") {
      if (i + 1 >= args.size()) {
        err << "peft parity: error: --device needs a value (cpu or cuda)\n";
        return 2;
      }
      device = args[++i];
      continue;
    }
    cases.push_back(args[i]);
  }
  if (device != "cpu" && device != "cuda") {
    err << "peft parity: error: device '" << device << "' is not known (cpu, cuda)\n";
    return 2;
  }
  if (cases.empty()) {
    err << "usage: peft parity [--device cpu|cuda] CASE_DIR...   (a folder of cases runs them "
           "all)\n";
    return 2;
  }
  if (device == "cuda") {
#if defined(PEFT_WITH_CUDA)
    if (cuda_commands::device_count() == 0) {
      err << "peft parity: error: no CUDA device (the driver reports none); "
             "run --device cpu, or run on a machine with a GPU\n";
      return 2;
    }
#else
    err << "peft parity: error: this build has no CUDA (configure with -DPEFT_WITH_CUDA=ON)\n";
    return 2;
#endif
  }
  // A folder without case.json that holds case folders (../shared/golden) stands for all of them.
  std::vector<std::string> expanded;
  for (const std::string& dir : cases) {
    namespace fs = std::filesystem;
    if (fs::is_directory(dir) && !fs::exists(fs::path(dir) / "case.json")) {
      std::vector<std::string> found;
      for (const fs::directory_entry& e : fs::directory_iterator(dir))
        if (fs::exists(e.path() / "case.json")) found.push_back(e.path().string());
      std::sort(found.begin(), found.end());
      if (!found.empty()) {
        expanded.insert(expanded.end(), found.begin(), found.end());
        continue;
      }
    }
    expanded.push_back(dir);
  }
  cases = std::move(expanded);
  int passed = 0, failed = 0, skipped = 0;
  for (const std::string& dir : cases) {
    testing::GoldenReport report;
#if defined(PEFT_WITH_CUDA)
    if (device == "cuda") {
      bool skip = false;
      std::string reason;
      report = detail::run_golden_case_cuda(dir, skip, reason);
      if (skip) {
        out << "SKIP " << report.case_name << " (" << reason << ")\n" << std::flush;
        ++skipped;
        continue;
      }
    } else {
      report = testing::run_golden_case<double>(dir);
    }
#else
    report = testing::run_golden_case<double>(dir);
#endif
    out << report.line() << (device == "cuda" ? "  [cuda fp32]" : "") << '\n' << std::flush;
    (report.passed ? passed : failed)++;
  }
  out << passed << " passed, " << failed << " failed";
  if (device == "cuda") out << ", " << skipped << " skipped";
  out << '\n';
  return failed == 0 ? 0 : 1;
}

}  // namespace peft::cli
