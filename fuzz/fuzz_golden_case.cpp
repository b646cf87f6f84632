// libFuzzer harness: the golden-case loader (peft/testing/golden.hpp) on a hostile case.json and
// expected.safetensors, with a real reference adapter and base model beside them, as
// `peft parity` runs a case. It runs a model (forward, backward, merge, the AdamW trajectory),
// so it is slow: budget it in CPU time, not executions.
//
// Input: case.json, then the separator line below, then expected.safetensors. Without the
// separator the whole input is case.json and the reference's expected.safetensors is used.
// The adapter beside it is gpt2_lora's when case.json mentions "gpt2" (its model_dir does), else
// llama_lora_rslora's.
//
// The golden folder comes from $PEFT_GOLDEN_DIR, else from the build's PEFT_GOLDEN_DIR.
// Each process writes its case under a private temporary folder (removed at exit).
//
// The case runs through testing::run_golden_case_throwing, the library's run_golden_case without
// its catch-all (which turns every exception into a FAIL line and would hide a std::bad_alloc
// or a raw nlohmann error). Only LoRA is instantiated: every
// Decoder<Arch, Method> type costs minutes of compile time, and the fuzzed files (case.json and
// expected.safetensors) are read the same way for every method.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "harness.hpp"
#include "peft/testing/golden.hpp"

#ifndef PEFT_GOLDEN_DIR
#define PEFT_GOLDEN_DIR "../shared/golden"
#endif

namespace {

namespace fs = std::filesystem;

constexpr std::string_view kSeparator = "\n#expected.safetensors\n";

struct Workspace {
  fs::path golden;
  fs::path root;  // <tmp>/peft-fuzz-golden-XXXXXX: models -> golden/models, <case>/adapter -> ...

  Workspace() {
    const char* env = std::getenv("PEFT_GOLDEN_DIR");
    golden = fs::absolute(env != nullptr && *env != '\0' ? env : PEFT_GOLDEN_DIR);
    if (!fs::is_directory(golden / "models")) {
      peft::fuzz::finding(
          "setup", "golden",
          ("no golden cases at " + golden.string() + " (set PEFT_GOLDEN_DIR)").c_str());
    }
    std::string pattern = (fs::temp_directory_path() / "peft-fuzz-golden-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) peft::fuzz::finding("setup", "mkdtemp", "failed");
    root = pattern;
    fs::create_directory_symlink(golden / "models", root / "models");
    for (const char* name : {"gpt2_lora", "llama_lora_rslora"}) {
      fs::create_directory(root / name);
      fs::create_directory_symlink(golden / name / "adapter", root / name / "adapter");
    }
  }
  ~Workspace() {
    std::error_code ignored;
    fs::remove_all(root, ignored);
  }
};

Workspace& workspace() {
  static Workspace w;  // one per process, created on the first input
  return w;
}

void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) peft::fuzz::finding("setup", "write", path.c_str());
}

// testing::run_golden_case less its catch-all, with the LoRA-only registry.
void run_case(const fs::path& case_dir) {
  peft::testing::GoldenReport report;
  peft::testing::run_golden_case_throwing<peft::MethodRegistry<peft::LoRA>, double>(case_dir,
                                                                                    report);
  (void)report.line();  // formats every check, NaN errors included
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
#ifdef _OPENMP
  omp_set_num_threads(1);  // one core per fuzzing job
#endif
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input = peft::fuzz::as_text(data, size);
  const std::size_t split = input.find(kSeparator);
  const std::string_view case_text = input.substr(0, split);
  const bool llama = case_text.find("gpt2") == std::string_view::npos;
  const Workspace& w = workspace();
  const fs::path case_dir = w.root / (llama ? "llama_lora_rslora" : "gpt2_lora");
  write_file(case_dir / "case.json", case_text);
  if (split == std::string_view::npos) {
    std::error_code ignored;
    fs::remove(case_dir / "expected.safetensors", ignored);
    fs::create_symlink(w.golden / case_dir.filename() / "expected.safetensors",
                       case_dir / "expected.safetensors", ignored);
  } else {
    std::error_code ignored;
    fs::remove(case_dir / "expected.safetensors", ignored);
    write_file(case_dir / "expected.safetensors", input.substr(split + kSeparator.size()));
  }
  peft::fuzz::expect_peft_errors_only([&] { run_case(case_dir); });
  return 0;
}
