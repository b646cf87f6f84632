// Tests for peft/io/parse_text.hpp (strict command-line numbers, lists and output folders), the
// non-finite logits check of peft/generate.hpp and the case.json checks of testing/golden.hpp.
// No model type is instantiated here: the file stays cheap to compile.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <peft/generate.hpp>
#include <peft/io/parse_text.hpp>
#include <peft/testing/golden.hpp>
#include <string>
#include <vector>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_parse_text {

using peft::io::ArgumentError;

namespace {
// The message of the ArgumentError `f` throws ("" when it throws none).
template <class F>
std::string argument_error(F&& f) {
  try {
    f();
  } catch (const ArgumentError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("parse_integer takes the whole string, in range, and names the flag otherwise") {
  using peft::io::parse_integer;
  CHECK(parse_integer("42", "--n") == 42);
  CHECK(parse_integer("-7", "--n") == -7);
  CHECK(parse_integer("0", "--n", {.min = 0, .max = 0}) == 0);
  CHECK(parse_integer("9223372036854775807", "--n") == std::numeric_limits<std::int64_t>::max());
  for (const char* bad : {"", "1x", "2abc", " 1", "1 ", "+1", "0x10", "1e3", "1.0", "x", "--1",
                          "9223372036854775808", "99999999999999999999"})
    CHECK_THROWS_AS(parse_integer(bad, "--n"), ArgumentError);
  CHECK(argument_error([] { parse_integer("1x", "--layers", {.min = 1, .max = 10}); }) ==
        "--layers: expected an integer in [1, 10], found '1x'");
  CHECK(argument_error([] { parse_integer("11", "--layers", {.min = 1, .max = 10}); }) ==
        "--layers: expected an integer in [1, 10], found '11'");
  CHECK(argument_error([] {
          parse_integer("99999999999999999999", "--n");
        }).find("(out of range)") != std::string::npos);
  // A hostile value is cut in the message, which stays one line.
  const std::string message =
      argument_error([] { parse_integer(std::string(1000, '7') + "\nx", "--n"); });
  CHECK(message.size() < 200);
  CHECK(message.find('\n') == std::string::npos);
}

TEST_CASE("parse_unsigned covers every seed and refuses signs") {
  using peft::io::parse_unsigned;
  CHECK(parse_unsigned("18446744073709551615", "--seed") ==
        std::numeric_limits<std::uint64_t>::max());
  CHECK(parse_unsigned("0", "--seed") == 0);
  CHECK_THROWS_AS(parse_unsigned("-1", "--seed"), ArgumentError);
  CHECK_THROWS_AS(parse_unsigned("18446744073709551616", "--seed"), ArgumentError);
  CHECK_THROWS_AS(parse_unsigned("5", "--seed", 4), ArgumentError);
  CHECK(argument_error([] { parse_unsigned("-1", "--seed"); }) ==
        "--seed: expected an integer in [0, 18446744073709551615], found '-1'");
}

TEST_CASE("parse_number is finite, whole and in range, with exclusive ends") {
  using peft::io::parse_number;
  CHECK(parse_number("0.5", "--t") == 0.5);
  CHECK(parse_number("-2", "--t") == -2.0);
  CHECK(parse_number("1e-3", "--t") == 1e-3);
  CHECK(parse_number("0", "--t", {.min = 0}) == 0.0);
  for (const char* bad : {"", "inf", "-inf", "nan", "NaN", "1e999", "2.5x", " 1", "0x1p3", "--1"})
    CHECK_THROWS_AS(parse_number(bad, "--t"), ArgumentError);
  CHECK_THROWS_AS(parse_number("-1", "--temperature", {.min = 0}), ArgumentError);
  CHECK_THROWS_AS(parse_number("0", "--lr", {.min = 0, .max = 10, .min_exclusive = true}),
                  ArgumentError);
  CHECK_THROWS_AS(parse_number("1", "--p", {.min = 0, .max = 1, .max_exclusive = true}),
                  ArgumentError);
  CHECK(argument_error([] {
          parse_number("-1", "--lr", {.min = 0, .max = 10, .min_exclusive = true});
        }) == "--lr: expected a finite number in (0, 10], found '-1'");
}

TEST_CASE("parse_list and parse_integer_list reject empty items and name the bad item") {
  using peft::io::parse_integer_list;
  using peft::io::parse_list;
  CHECK(parse_list("a,b", "--methods") == std::vector<std::string>{"a", "b"});
  CHECK(parse_list("lora", "--methods") == std::vector<std::string>{"lora"});
  for (const char* bad : {"", ",", "a,", ",a", "a,,b"})
    CHECK_THROWS_AS(parse_list(bad, "--methods"), ArgumentError);
  CHECK(parse_integer_list("1,2,3", "--ids") == std::vector<std::int64_t>{1, 2, 3});
  CHECK(argument_error([] { parse_integer_list("1,x,3", "--ids", {.min = 0}); }) ==
        "--ids item 2 of 3: expected an integer in [0, 9223372036854775807], found 'x'");
  CHECK(argument_error([] {
          parse_integer_list("1,2abc,3", "--ids", {.min = 0});
        }).find("found '2abc'") != std::string::npos);
  CHECK_THROWS_AS(parse_integer_list("1,-2", "--ids", {.min = 0}), ArgumentError);
  CHECK_THROWS_AS(parse_integer_list("1,,3", "--ids"), ArgumentError);
}

TEST_CASE("require_writable_dir creates the folder, leaves it empty, and fails before compute") {
  namespace fs = std::filesystem;
  const fs::path base = fs::temp_directory_path() / "peft_parse_text_test";
  fs::remove_all(base);
  const fs::path dir = base / "a" / "b";
  peft::io::require_writable_dir(dir, "--out");
  CHECK(fs::is_directory(dir));
  CHECK(fs::is_empty(dir));                      // the probe is gone
  peft::io::require_writable_dir(dir, "--out");  // an existing folder is fine
  { std::ofstream(base / "file") << "x"; }
  CHECK_THROWS_AS(peft::io::require_writable_dir(base / "file", "--out"), peft::FileError);
  CHECK_THROWS_AS(peft::io::require_writable_dir(base / "file" / "sub", "--out"), peft::FileError);
  try {
    peft::io::require_writable_dir("/proc/nope", "--out");
    FAIL("no error for /proc/nope");
  } catch (const peft::FileError& e) {
    CHECK(std::string(e.what()).starts_with("--out /proc/nope: cannot create the output folder"));
  }
  CHECK_THROWS_AS(peft::io::require_writable_dir("/proc", "--out"), peft::FileError);
  CHECK_THROWS_AS(peft::io::require_writable_dir("", "--out"), ArgumentError);
  fs::remove_all(base);
}

TEST_CASE("generate refuses non-finite logits instead of picking token 0") {
  using peft::detail::require_finite_logits;
  const float ok[3] = {0.f, 1.f, -2.f};
  CHECK_NOTHROW(require_finite_logits(ok, 3, 0));
  const float nan[3] = {0.f, std::numeric_limits<float>::quiet_NaN(), 1.f};
  try {
    require_finite_logits(nan, 3, 4);
    FAIL("no error for a NaN logit");
  } catch (const peft::Error& e) {
    const std::string m = e.what();
    CHECK(m.find("logits of new token 5 are not finite") != std::string::npos);
    CHECK(m.find("token id 1 is NaN") != std::string::npos);
  }
  const double inf[2] = {std::numeric_limits<double>::infinity(), 0.0};
  CHECK_THROWS_AS(require_finite_logits(inf, 2, 0), peft::Error);
}

TEST_CASE("case.json training fields are bounded and typed, the file and field named") {
  using peft::testing::GoldenTraining;
  using peft::testing::read_training;
  const auto message = [](const nlohmann::json& j) {
    try {
      read_training(j, "c/case.json");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const GoldenTraining t = read_training(
      nlohmann::json::parse(R"({"train": {"lr": 0.02, "betas": [0.8, 0.99], "eps": 1e-6,
                                          "weight_decay": 0, "steps": 3}})"),
      "c/case.json");
  CHECK(t.lr == 0.02);
  CHECK(t.beta1 == 0.8);
  CHECK(t.beta2 == 0.99);
  CHECK(t.eps == 1e-6);
  CHECK(t.weight_decay == 0.0);
  CHECK(t.steps == 3);
  CHECK(read_training(nlohmann::json::object(), "c/case.json").steps == 4);  // the defaults
  CHECK(read_training(nlohmann::json::parse(R"({"train": null})"), "c/case.json").steps == 4);
  CHECK(message(nlohmann::json::parse(R"({"train": {"steps": 1000000000}})")) ==
        "c/case.json: train.steps: expected an integer in [0, 1000], found 1000000000");
  CHECK(message(nlohmann::json::parse(R"({"train": {"steps": 2.5}})"))
            .starts_with("c/case.json: train.steps: expected an integer"));
  CHECK(message(nlohmann::json::parse(R"({"train": {"lr": "fast"}})")) ==
        "c/case.json: train.lr: expected a finite number in (0, 1e+06], found \"fast\"");
  CHECK(message(nlohmann::json::parse(R"({"train": {"lr": -1}})"))
            .starts_with("c/case.json: train.lr:"));
  CHECK(message(nlohmann::json::parse(R"({"train": {"betas": [0.9, 1.0]}})"))
            .starts_with("c/case.json: train.betas[1]: expected a finite number in [0, 1)"));
  CHECK(message(nlohmann::json::parse(R"({"train": {"betas": 3}})"))
            .starts_with("c/case.json: train.betas: expected [beta1, beta2]"));
  CHECK(message(nlohmann::json::parse(R"({"train": 3})")) ==
        "c/case.json: train: expected an object, found number");
  CHECK(
      message(nlohmann::json::parse(R"([1])")).starts_with("c/case.json: expected a JSON object"));
  CHECK_THROWS_AS(peft::testing::case_model_dir("c", nlohmann::json::parse(R"({"model_dir": 3})"),
                                                "c/case.json"),
                  peft::ConfigError);
}

}  // namespace test_parse_text
