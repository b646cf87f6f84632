// The ops' double instantiations, compiled once for the project's own executables (the CLI, the
// tests, the examples, the benchmarks): they are compiled with PEFT_PRECOMPILED_OPS and link
// this object, so none of their TUs instantiates and optimises the ops again
// (include/peft/core/ops/instantiations.hpp; cmake/PeftHelpers.cmake).
#define PEFT_INSTANTIATE_OPS_FOR double
#include <peft/core/ops.hpp>
#include <peft/methods/reparameterized/pissa.hpp>
