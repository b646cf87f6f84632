#pragma once
// The registry-dependent `peft` commands as one front end over a method registry, for a program
// that adds its own methods: the whole of its main is
//
//   int main(int argc, char** argv) {
//     return peft::commands::main<peft::BuiltinMethods::with<MyMethod>>(argc, argv);
//   }
//
// and `./my-peft count model.json adapter_config.json` or `./my-peft generate MODEL_DIR
// --adapter DIR --ids 1,2,3` then know MyMethod (tests/consumer does this). The prebuilt `peft`
// binary is the same code with BuiltinMethods (cli/main.cpp), plus the commands that do not
// depend on a registry. The study takes rows, not a registry: experiment/study.hpp.
// Opt-in: not in <peft/peft.hpp>.
#include <iostream>
#include <string>
#include <vector>

#include "peft/commands/count.hpp"
#include "peft/commands/generate.hpp"
#include "peft/commands/methods.hpp"
#include "peft/commands/report_errors.hpp"

namespace peft::commands {

/// `PROGRAM count ...` and `PROGRAM generate ...` over `Registry` (see the top of this file).
template <class Registry = BuiltinMethods>
int main(int argc, char** argv) {
  const std::string program = argc > 0 ? argv[0] : "peft";
  const auto usage = [&](std::ostream& out) {
    out << "usage: " << program << " count MODEL_CONFIG ADAPTER_CONFIG\n"
        << "       " << program << " methods [--json]\n"
        << "       " << program << " generate MODEL_DIR [--adapter DIR] (--prompt TEXT | --ids "
        << "1,2,3) [...]\n"
        << "methods:";
    for (std::string_view name : Registry::names()) out << ' ' << name;
    out << '\n';
  };
  if (argc < 2) {
    usage(std::cerr);
    return 2;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "help" || command == "--help" || command == "-h") {
    usage(std::cout);
    return 0;
  }
  return report_errors(command, std::cerr, [&] {
    if (command == "count") return run_count<Registry>(args, std::cout, std::cerr);
    if (command == "methods") return run_methods<Registry>(args, std::cout, std::cerr);
    if (command == "generate") return run_generate<Registry>(args, std::cout, std::cerr);
    std::cerr << program << ": unknown command '" << command << "'\n";
    usage(std::cerr);
    return 2;
  });
}

}  // namespace peft::commands
