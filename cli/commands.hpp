#pragma once
// The `peft` commands, one translation unit each (cli/<command>.cpp, compiled apart so that no
// one file instantiates every model type the CLI uses); cli/main.cpp only dispatches to them.
// Each returns the process's exit status: 0 success, 1 error, 2 usage error.
#include <iosfwd>
#include <string>
#include <vector>

namespace peft {
class ProcessGroup;
}
namespace peft::experiment {
struct MethodEntry;
}

namespace peft::cli {

int run_bench_step(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_count(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_methods(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_demo(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_generate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_inspect(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_merge(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_parity(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_search(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_study(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
/// The study's table (experiment::study_methods()), compiled once in study.cpp: `peft search`
/// adds its methods to the design space without compiling every method again.
std::vector<experiment::MethodEntry> study_table();
/// `peft train` as one rank of `group` (cli/train.cpp).
int run_train(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
              const ProcessGroup& group);
/// `peft train` as started: alone, or as one of the ranks of `mpirun -np N` (MPI initialised,
/// rank 0 prints, an error on any rank ends the job); reports its own errors (cli/train_ranks.cpp).
int run_train_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int run_tokenize(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace peft::cli
