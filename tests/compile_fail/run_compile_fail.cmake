# Runs at test time (cmake -P): compiles SOURCE with the compiler and include folders the
# library's consumers get, once with -DPEFT_COMPILE_FAIL_CONTROL (must compile: the include
# paths are right) and once without (must fail, with EXPECT in the diagnostics).
#   -DCXX=... -DSOURCE=... -DEXPECT=<regex> -DINCLUDES=<dir|dir|...> -DSTD=c++20
#   [-DMAX_ERRORS=N: at most N `error:` lines]
string(REPLACE "|" ";" _includes "${INCLUDES}")
# PEFT_PRECOMPILED_OPS: the ops are declared, not instantiated (core/ops/instantiations.hpp), so
# each check parses the composition, not the ops' Eigen kernels (about 15 s instead of 65).
set(_flags -std=${STD} -fsyntax-only -fopenmp -DPEFT_PRECOMPILED_OPS)
foreach(_dir IN LISTS _includes)
  if(_dir)
    list(APPEND _flags "-isystem" "${_dir}")
  endif()
endforeach()

execute_process(COMMAND "${CXX}" ${_flags} -DPEFT_COMPILE_FAIL_CONTROL "${SOURCE}"
  RESULT_VARIABLE _rc ERROR_VARIABLE _err OUTPUT_VARIABLE _out)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "the control build of ${SOURCE} failed, so the test proves nothing:\n${_err}")
endif()

execute_process(COMMAND "${CXX}" ${_flags} "${SOURCE}"
  RESULT_VARIABLE _rc ERROR_VARIABLE _err OUTPUT_VARIABLE _out)
if(_rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but the composition rule must reject it")
endif()
if(NOT "${_err}${_out}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "${SOURCE} failed to compile, but not with the expected message "
                      "'${EXPECT}':\n${_err}")
endif()
if(DEFINED MAX_ERRORS)
  string(REGEX MATCHALL "error:" _errors "${_err}${_out}")
  list(LENGTH _errors _count)
  if(_count GREATER MAX_ERRORS)
    message(FATAL_ERROR "${SOURCE}: ${_count} errors, at most ${MAX_ERRORS} expected (one message "
                        "naming the missing member, no template noise):\n${_err}")
  endif()
endif()
message(STATUS "${SOURCE}: rejected as expected ('${EXPECT}')")
