// The doctest main of peft_tests.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdlib>
#if defined(_OPENMP)
#include <omp.h>
#endif

int main(int argc, char** argv) {
#if defined(_OPENMP)
  // ctest runs one process per test case, two at a time on two cores: OpenMP teams in each
  // would oversubscribe the cores, and their spinning barriers then cost more than the work
  // (a 0.5 s gradient check took 57 s). One thread each, unless OMP_NUM_THREADS says otherwise.
  if (std::getenv("OMP_NUM_THREADS") == nullptr) omp_set_num_threads(1);
#endif
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
