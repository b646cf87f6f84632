#pragma once
// A fresh directory per test case, shared by the test files that write files (ctest may run
// cases in parallel processes, so each gets a name of its own).
#include <chrono>
#include <filesystem>
#include <string>

namespace test_support {

/// $TMPDIR/peft_test_<file>_<purpose>_<clock>, created.
inline std::filesystem::path scratch_dir(const std::string& file, const std::string& purpose) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("peft_test_" + file + "_" + purpose + "_" +
                    std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace test_support
