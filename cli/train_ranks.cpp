// `peft train` as it was started: alone, or as one rank of `mpirun -np N peft train ...`
// (docs/distributed.md). Under an MPI launcher this initialises MPI, trains as one rank of the
// job (rank 0 prints and writes OUT/), and on an error on any rank prints it with the rank and
// ends the whole job (MPI_Abort) so that no rank waits for a peer that left. Built with MPI when
// CMake finds it (PEFT_WITH_MPI); without, a run under a launcher is refused with the reason.
#include <ostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "peft/commands/report_errors.hpp"
#include "peft/train/data_parallel.hpp"
#if defined(PEFT_CLI_WITH_MPI)
#include "peft/distributed/mpi.hpp"
#endif

namespace peft::cli {

int run_train_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const int launched = launcher_world_size();
  if (launched <= 1)
    return commands::report_errors("train", err, [&] { return run_train(args, out, err, {}); });
#if defined(PEFT_CLI_WITH_MPI)
  int status = 1;
  std::ostream discarded(nullptr);  // what the ranks other than 0 would print
  {
    const MpiSession mpi;
    const bool root = mpi.rank() == 0;
    status = commands::report_errors("train (rank " + std::to_string(mpi.rank()) + " of " +
                                         std::to_string(mpi.size()) + ")",
                                     err, [&] {
                                       return run_train(args, root ? out : discarded, err,
                                                        mpi.world());
                                     });
    if (status != 0 && mpi.size() > 1) {
      err.flush();
      mpi.abort(status);  // the other ranks may be waiting in a collective for this one
    }
  }
  return status;
#else
  err << "peft train: error: started by an MPI launcher as one of " << launched
      << " ranks, but this peft was built without MPI (install libopenmpi-dev, reconfigure "
         "with -DPEFT_WITH_MPI=ON and rebuild; docs/distributed.md)\n";
  return 1;
#endif
}

}  // namespace peft::cli
