// `peft study`: the study of the library's methods (include/peft/experiment/study_methods.hpp;
// the engine, which an outside project also calls with its own methods, is experiment/study.hpp).
#include <peft/experiment/study_methods.hpp>

#include "commands.hpp"

namespace peft::cli {

int run_study(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  return experiment::run_study(args, out, err);
}

std::vector<experiment::MethodEntry> study_table() { return experiment::study_methods(); }

}  // namespace peft::cli
