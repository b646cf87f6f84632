// `peft study`: the study of include/peft/experiment/study.hpp (the experiment module, which an
// outside project also calls with its own methods), with the library's methods.
#include <peft/experiment/study.hpp>

#include "commands.hpp"

namespace peft::cli {

int run_study(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  return experiment::run_study(args, out, err);
}

}  // namespace peft::cli
