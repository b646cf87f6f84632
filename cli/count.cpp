// `peft count` and `peft methods`: include/peft/commands/count.hpp and methods.hpp with the
// library's methods (one unit: both only read the registry).
#include <peft/commands/count.hpp>
#include <peft/commands/methods.hpp>

#include "commands.hpp"

namespace peft::cli {

int run_count(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  return commands::run_count<BuiltinMethods>(args, out, err);
}

int run_methods(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  return commands::run_methods<BuiltinMethods>(args, out, err);
}

}  // namespace peft::cli
