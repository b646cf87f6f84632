// The study's figures (include/peft/experiment/study.hpp): every curve a colour of its own, and
// the Pareto figure of final eval loss against trainable parameters.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <peft/experiment/study.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_study_outputs {

namespace {

namespace fs = std::filesystem;
using peft::experiment::MethodResult;

std::string read_all(const fs::path& p) {
  std::ifstream in(p);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

MethodResult row(std::string family, std::string method, std::int64_t trainable, double loss) {
  MethodResult r;
  r.family = std::move(family);
  r.method = std::move(method);
  r.trainable = trainable;
  r.all = 100000 + trainable;
  r.eval_loss = loss;
  r.curve = {{0, loss + 1}, {10, loss}};
  return r;
}

std::size_t count_of(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("study: distinct_colour gives every one of up to 64 curves a colour of its own") {
  for (std::size_t n = 1; n <= 64; ++n) {
    std::set<std::string> seen;
    for (std::size_t i = 0; i < n; ++i) {
      const std::string c = peft::experiment::distinct_colour(i, n);
      CHECK(std::regex_match(c, std::regex("#[0-9a-f]{6}")));
      seen.insert(c);
    }
    CHECK(seen.size() == n);
  }
}

TEST_CASE("study: the Pareto figure marks each family, labels each method, draws the frontier") {
  const fs::path dir = fs::temp_directory_path() / "peft_test_study_outputs";
  fs::remove_all(dir);
  fs::create_directories(dir);
  MethodResult none = row("none", "none", 0, 2.0);
  none.curve.clear();
  const std::vector<MethodResult> rows = {
      none,
      row("none", "full", 100000, 1.0),
      row("reparameterized", "lora", 1000, 1.2),
      row("reparameterized", "vera", 100, 1.5),
      row("additive", "ia3", 50, 1.6),       // fewest parameters: on the frontier
      row("selective", "bitfit", 400, 1.7),  // beaten by vera with fewer: off the frontier
      row("hybrid", "unipelt", 5000, 1.1),
      row("additive", "prompt_tuning", 300, std::numeric_limits<double>::quiet_NaN()),
  };
  peft::experiment::write_pareto_svg(dir / "pareto.svg", rows, "adapt to a&b <text>");
  const std::string svg = read_all(dir / "pareto.svg");
  REQUIRE(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  // The title (a file path in text mode) is escaped, so the file stays well-formed XML.
  CHECK(svg.find("adapt to a&amp;b &lt;text&gt;") != std::string::npos);
  for (const char* method : {"full", "lora", "vera", "ia3", "bitfit", "unipelt"})
    CHECK_MESSAGE(svg.find(std::string(">") + method + "</text>") != std::string::npos, method);
  // A row without a finite loss is not plotted; the base is the dashed line, not a point.
  CHECK(svg.find(">prompt_tuning<") == std::string::npos);
  CHECK(svg.find("none (the base)") != std::string::npos);
  // One marker shape and colour per family: ia3 circle, bitfit square, lora and vera triangles,
  // unipelt diamond, full a cross; and the legend's five entries.
  CHECK(count_of(svg, "<circle") == 2);           // ia3 + the legend's additive
  CHECK(count_of(svg, "fill=\"#2ca02c\"") == 2);  // bitfit + legend (selective)
  CHECK(count_of(svg, "fill=\"#d62728\"") == 3);  // lora, vera + legend (reparameterized)
  CHECK(count_of(svg, "fill=\"#9467bd\"") == 2);  // unipelt + legend (hybrid)
  CHECK(svg.find("full fine-tuning") != std::string::npos);
  // The frontier: ia3 (50), vera (100), lora (1000), unipelt (5000), full (100000) each beat
  // every cheaper method; bitfit (400, 1.7) does not. Five corners, four steps: 9 points.
  const std::smatch m = [&] {
    std::smatch found;
    REQUIRE(
        std::regex_search(svg, found, std::regex("class=\"frontier\"[^>]*points=\"([^\"]*)\"")));
    return found;
  }();
  std::istringstream points(m[1].str());
  std::string point;
  std::size_t corners = 0;
  while (points >> point) ++corners;
  CHECK(corners == 9);
  fs::remove_all(dir);
}

TEST_CASE("study: curves.svg draws each curve in a colour no other curve has") {
  const fs::path dir = fs::temp_directory_path() / "peft_test_study_curves";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<MethodResult> rows;
  for (int i = 0; i < 30; ++i)
    rows.push_back(row("additive", "m" + std::to_string(i), 10, 1.0 + i));
  peft::experiment::write_svg(dir / "curves.svg", rows, "thirty methods");
  const std::string svg = read_all(dir / "curves.svg");
  std::set<std::string> colours;
  const std::regex polyline("<polyline fill=\"none\" stroke=\"(#[0-9a-f]{6})\"");
  std::size_t lines = 0;
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), polyline);
       it != std::sregex_iterator(); ++it, ++lines)
    colours.insert((*it)[1].str());
  CHECK(lines == 30);
  CHECK(colours.size() == 30);
  fs::remove_all(dir);
}

}  // namespace test_study_outputs
