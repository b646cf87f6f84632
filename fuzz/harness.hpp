#pragma once
// Shared by the libFuzzer harnesses in fuzz/: what counts as an expected outcome of hostile
// input and what is a finding.
//
// Expected: the input is accepted, or the library rejects it with a peft::Error (FileError,
// ConfigError, ShapeError), which is how the library reports bad input.
// Finding: anything else. A crash or a sanitizer report stops the process by itself; an
// exception that is not a peft::Error (std::bad_alloc from an unchecked size, a raw
// nlohmann::json exception the library did not wrap, std::out_of_range from stoll, ...) is
// printed with its type and message and then aborts, so libFuzzer saves the input as a crash
// artifact. Huge allocations and hangs are found by libFuzzer itself (-malloc_limit_mb,
// -rss_limit_mb, -timeout; scripts/fuzz.sh sets them).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <typeinfo>

#include "peft/core/error.hpp"

namespace peft::fuzz {

[[noreturn]] inline void finding(const char* kind, const char* type, const char* what) {
  std::fprintf(stderr, "FINDING: %s (%s): %s\n", kind, type, what);
  std::fflush(stderr);
  std::abort();
}

/// Runs `body`; a peft::Error is the expected rejection, any other exception is a finding.
template <class Body>
void expect_peft_errors_only(Body&& body) {
  try {
    body();
  } catch (const peft::Error&) {
    // The library rejected the input with its own error: the expected outcome.
  } catch (const std::bad_alloc& e) {
    finding("allocation failed before validation", typeid(e).name(), e.what());
  } catch (const nlohmann::json::exception& e) {
    finding("nlohmann::json exception not wrapped in a peft::Error", typeid(e).name(), e.what());
  } catch (const std::exception& e) {
    finding("non-peft exception", typeid(e).name(), e.what());
  } catch (...) {
    finding("non-standard exception", "?", "(caught by ...)");
  }
}

/// The input as text (JSON harnesses): the bytes unchanged, NULs included.
inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

}  // namespace peft::fuzz
