#pragma once
// How a command's failure reaches the user: one line "peft COMMAND: error: ..." and an exit
// status (0 success, 1 error, 2 usage error). Shared by the `peft` binary (cli/main.cpp) and
// commands::main<Registry> (main.hpp); light, so that cli/main.cpp stays a small TU.
#include <exception>
#include <new>
#include <ostream>
#include <string>

#include "peft/io/parse_text.hpp"

namespace peft::commands {

/// Runs `run()` (a command; returns its exit status) and turns what it throws into one line
/// "peft COMMAND: error: ..." on `err` and an exit status: 2 for a bad argument
/// (io::ArgumentError), 1 for anything else. The `peft` binary reports every command this way.
template <class Run>
int report_errors(const std::string& command, std::ostream& err, Run&& run) {
  // The line is written in one piece: ranks of one job share a terminal (docs/distributed.md),
  // and an unbuffered stream would interleave their pieces.
  const auto report = [&](const std::string& what) {
    err << ("peft " + command + ": error: " + what + "\n") << std::flush;
  };
  try {
    return run();
  } catch (const io::ArgumentError& e) {
    report(e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    // Commands check sizes before they allocate (docs/cli.md, "Bounds"); what still gets here is
    // a size the checks let through but the machine cannot hold.
    report(
        "out of memory (std::bad_alloc): a size in the command's arguments or in a config it "
        "read (vocab_size, hidden_size, num_layers, ...) is too large for this machine");
    return 1;
  } catch (const std::exception& e) {
    report(e.what());
    return 1;
  } catch (...) {
    report("an exception that is not a std::exception");
    return 1;
  }
}

}  // namespace peft::commands
