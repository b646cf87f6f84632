// `peft train`: include/peft/commands/train.hpp with the library's methods.
#include <peft/commands/train.hpp>

#include "commands.hpp"

namespace peft::cli {

int run_train(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
              const ProcessGroup& group) {
  return commands::run_train<BuiltinMethods>(args, out, err, group);
}

}  // namespace peft::cli
