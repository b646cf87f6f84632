// `peft count`: include/peft/commands/count.hpp with the library's methods.
#include <peft/commands/count.hpp>

#include "commands.hpp"

namespace peft::cli {

int run_count(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  return commands::run_count<BuiltinMethods>(args, out, err);
}

}  // namespace peft::cli
