// `peft parity [--device cpu|cuda] CASE_DIR...`: runs golden cases, one line each, then
// "N passed, M failed" (and ", K skipped" on CUDA).
//
// --device cpu (the default) runs every case in double precision (testing/golden.hpp).
// --device cuda runs the LoRA cases (peft_type LORA without use_dora; rsLoRA included) with the
// GPU decoder in fp32 (include/peft/backend/cuda/lora_decoder.cuh): logits, loss, every LoRA
// gradient, the AdamW trajectory and the trained tensors, each against the golden README's
// tolerance. Merged logits are not compared on CUDA (merging is a host operation). Cases of
// other methods print `SKIP <case> (method X not on CUDA yet)` and count as skipped.
//
// --base-dtype bf16|fp16|nf4 (CPU) loads each case's base model in that format and checks the
// float run against the double run on the same stored weights (testing/golden.hpp,
// run_case_in_format), within testing::base_format_tolerances (docs/quantization.md, "Parity
// on a bf16 base"); a case whose method refuses the format prints `SKIP <case> (... refused:
// why)` and counts as skipped.
//
// On the CPU each case runs in a child process (parity_detail::run_isolated): a case that
// throws, crashes or runs past --timeout is a FAIL line naming why, and the batch always ends
// with its summary line (exit 1 when any case failed).
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <peft/io/parse_text.hpp>
#include <peft/peft.hpp>
#include <peft/testing/golden.hpp>
#include <sstream>
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

  const testing::GoldenTraining train =
      testing::read_training(case_json, (case_dir / "case.json").string());
  cuda::DeviceAdamW adamw;
  adamw.lr = train.lr;
  adamw.beta1 = train.beta1;
  adamw.beta2 = train.beta2;
  adamw.eps = train.eps;
  adamw.weight_decay = train.weight_decay;
  const bool trajectory = expected.contains("train_losses");
  const int steps = trajectory ? train.steps : 0;

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
        testing::case_model_dir(case_dir, case_json, (case_dir / "case.json").string());
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

namespace parity_detail {

// One case's outcome as the batch reports it.
struct CaseOutcome {
  std::string line;
  bool passed = false;
  bool skipped = false;
};

inline std::string case_name_of(const std::filesystem::path& dir) {
  std::string name = dir.filename().string();
  return name.empty() ? dir.parent_path().filename().string() : name;
}

// Runs `run` in a child process and reads its outcome through a pipe, so that a case that
// crashes (a signal), aborts, or runs past `timeout_s` (0: no limit) is that case's FAIL line and
// the batch goes on to its summary. The parent never computes, so no OpenMP or CUDA state is
// live when it forks.
inline CaseOutcome run_isolated(const std::string& dir, double timeout_s,
                                const std::function<CaseOutcome()>& run, std::ostream& out) {
  const std::string name = case_name_of(dir);
  out << std::flush;
  std::cerr << std::flush;
  int fds[2];
  if (::pipe(fds) != 0)
    return {"FAIL " + name + "  error: cannot create a pipe (" + std::strerror(errno) + ")"};
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return {"FAIL " + name + "  error: cannot fork (" + std::strerror(errno) + ")"};
  }
  if (pid == 0) {
    ::close(fds[0]);
    CaseOutcome o;
    try {
      o = run();
    } catch (const std::exception& e) {
      o = {"FAIL " + name + "  error: " + e.what()};
    } catch (...) {
      o = {"FAIL " + name + "  error: an exception that is not a std::exception"};
    }
    const std::string msg = std::string(o.skipped ? "S" : (o.passed ? "P" : "F")) + o.line;
    std::size_t done = 0;
    while (done < msg.size()) {
      const ssize_t n = ::write(fds[1], msg.data() + done, msg.size() - done);
      if (n <= 0) break;
      done += static_cast<std::size_t>(n);
    }
    ::_exit(done == msg.size() ? 0 : 3);  // no atexit handlers, no flush of the parent's buffers
  }
  ::close(fds[1]);
  std::string msg;
  bool timed_out = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  char buf[4096];
  while (true) {
    int wait_ms = -1;
    if (timeout_s > 0) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            deadline - std::chrono::steady_clock::now())
                            .count();
      if (left <= 0) {
        timed_out = true;
        break;
      }
      wait_ms = static_cast<int>(std::min<long long>(left, 1000));
    }
    pollfd p{fds[0], POLLIN, 0};
    const int r = ::poll(&p, 1, wait_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) continue;
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    msg.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    std::ostringstream line;
    line << "FAIL " << name << "  error: timed out after " << timeout_s
         << " s (--timeout); the case was killed";
    return {line.str()};
  }
  if (WIFSIGNALED(status))
    return {"FAIL " + name + "  crashed: signal " + std::to_string(WTERMSIG(status)) + " (" +
            strsignal(WTERMSIG(status)) + ")"};
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || msg.empty())
    return {"FAIL " + name + "  error: the case's process exited with status " +
            std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) + " without a result"};
  CaseOutcome o;
  o.skipped = msg[0] == 'S';
  o.passed = msg[0] == 'P';
  o.line = msg.substr(1);
  return o;
}

}  // namespace parity_detail

int run_parity(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::vector<std::string> cases;
  std::string device = "cpu";
  double timeout_s = 0;
  BaseFormat format = BaseFormat::fp32;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--device" || args[i] == "--timeout" || args[i] == "--base-dtype") {
      if (i + 1 >= args.size()) {
        err << "peft parity: error: " << args[i] << " needs a value ("
            << (args[i] == "--device"    ? "cpu or cuda"
                : args[i] == "--timeout" ? "seconds"
                                         : "fp32, bf16, fp16 or nf4")
            << ")\n";
        return 2;
      }
      try {
        if (args[i] == "--device")
          device = args[++i];
        else if (args[i] == "--timeout")
          timeout_s = io::parse_number(args[++i], "--timeout", {.min = 0, .max = 86400 * 7});
        else
          format = parse_base_format(args[++i], "--base-dtype");
      } catch (const Error& e) {
        err << "peft parity: error: " << e.what() << '\n';
        return 2;
      }
      continue;
    }
    if (args[i].starts_with("--")) {
      err << "peft parity: error: unknown option '" << args[i]
          << "' (--device, --timeout, --base-dtype)\n";
      return 2;
    }
    cases.push_back(args[i]);
  }
  if (device != "cpu" && device != "cuda") {
    err << "peft parity: error: --device: expected cpu or cuda, found '" << device << "'\n";
    return 2;
  }
  if (cases.empty()) {
    err << "usage: peft parity [--device cpu|cuda] [--timeout SECONDS] [--base-dtype "
           "fp32|bf16|fp16|nf4] CASE_DIR...   (a folder of cases runs them all)\n";
    return 2;
  }
  if (device == "cuda" && format != BaseFormat::fp32) {
    err << "peft parity: error: --base-dtype " << base_format_name(format)
        << " runs on the CPU only (--device cpu); the CUDA decoder holds fp32 weights\n";
    return 2;
  }
  const testing::GoldenTolerances tolerances = testing::base_format_tolerances(format);
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
    std::error_code ec;
    if (fs::is_directory(dir, ec) && !fs::exists(fs::path(dir) / "case.json", ec)) {
      std::vector<std::string> found;
      for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
        if (fs::exists(it->path() / "case.json", ec)) found.push_back(it->path().string());
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
    parity_detail::CaseOutcome outcome;
#if defined(PEFT_WITH_CUDA)
    if (device == "cuda") {
      // In-process: the CUDA context is live in this process since device_count(), and a
      // forked child cannot use it.
      bool skip = false;
      std::string reason;
      const testing::GoldenReport report = detail::run_golden_case_cuda(dir, skip, reason);
      if (skip) {
        out << "SKIP " << report.case_name << " (" << reason << ")\n" << std::flush;
        ++skipped;
        continue;
      }
      outcome = {report.line() + "  [cuda fp32]", report.passed};
    }
#endif
    if (device == "cpu")
      outcome = parity_detail::run_isolated(
          dir, timeout_s,
          [&] {
            const testing::GoldenReport report =
                testing::run_golden_case<double>(dir, tolerances, format);
            return parity_detail::CaseOutcome{report.line(), report.passed, report.skipped};
          },
          out);
    out << outcome.line << '\n' << std::flush;
    if (outcome.skipped)
      ++skipped;
    else
      (outcome.passed ? passed : failed)++;
  }
  out << passed << " passed, " << failed << " failed";
  if (device == "cuda" || skipped > 0) out << ", " << skipped << " skipped";
  out << '\n';
  return failed == 0 ? 0 : 1;
}

}  // namespace peft::cli
