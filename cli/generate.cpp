// `peft generate`: include/peft/commands/generate.hpp with the library's methods.
#include <peft/commands/generate.hpp>

#include "commands.hpp"

namespace peft::cli {

int run_generate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  return commands::run_generate<BuiltinMethods>(args, out, err);
}

}  // namespace peft::cli
