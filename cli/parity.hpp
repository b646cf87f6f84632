#pragma once
// `peft parity CASE_DIR...`: runs golden cases, one line each, then "N passed, M failed".
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <peft/peft.hpp>

namespace peft::cli {

inline int run_parity(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::vector<std::string> cases;
  for (const std::string& a : args) {
    if (a == "--device") continue;  // handled below
    cases.push_back(a);
  }
  for (std::size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == "--device") {
      if (args[i + 1] != "cpu") {
        err << "peft parity: error: device '" << args[i + 1]
            << "' is not available in this build (cpu)\n";
        return 2;
      }
      cases.erase(std::find(cases.begin(), cases.end(), args[i + 1]));
    }
  if (cases.empty()) {
    err << "usage: peft parity [--device cpu] CASE_DIR...   (a folder of cases runs them all)\n";
    return 2;
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
  int passed = 0, failed = 0;
  for (const std::string& dir : cases) {
    const testing::GoldenReport report = testing::run_golden_case<double>(dir);
    out << report.line() << '\n' << std::flush;
    (report.passed ? passed : failed)++;
  }
  out << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}

}  // namespace peft::cli
