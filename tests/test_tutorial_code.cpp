// The tutorial's code is the tested code: the C++ blocks of docs/tutorial-new-method.md's
// "Writing an op" section, joined, are tests/test_custom_op.cpp.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_tutorial_code {

namespace {

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  REQUIRE_MESSAGE(in, "cannot read " << path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

TEST_CASE("tutorial: the code of \"Writing an op\" is tests/test_custom_op.cpp") {
  const std::filesystem::path tests = std::filesystem::path(__FILE__).parent_path();
  const std::string doc = read_text(tests.parent_path() / "docs" / "tutorial-new-method.md");
  const std::string source = read_text(tests / "test_custom_op.cpp");
  const std::size_t section = doc.find("\n## Writing an op\n");
  REQUIRE(section != std::string::npos);
  // The section's ```cpp blocks, up to the next section, joined by the blank lines between them.
  const std::size_t end = doc.find("\n## ", section + 1);
  const std::string open = "```cpp\n", close = "```\n";
  std::string code;
  for (std::size_t at = doc.find(open, section); at < end; at = doc.find(open, at)) {
    at += open.size();
    const std::size_t stop = doc.find(close, at);
    REQUIRE(stop != std::string::npos);
    if (!code.empty()) code += "\n";
    code += doc.substr(at, stop - at);
    at = stop + close.size();
  }
  CHECK(code == source);
}

}  // namespace test_tutorial_code
