# cmake -DEXPECT_RC=N -DEXPECT=REGEX [-DWORKDIR=DIR] -P expect_exit.cmake -- COMMAND ARGS...
#
# Runs COMMAND and checks that it exited with status EXPECT_RC (a number: a signal, which
# execute_process reports as text such as "Segmentation fault", never matches) and that its
# stdout + stderr match REGEX. On success prints "hostile-cli ok: exit N: <output>", which the
# test's PASS_REGULAR_EXPRESSION looks for; on failure prints "FAILED ..." and exits non-zero.
set(_cmd "")
set(_seen_separator FALSE)
math(EXPR _last "${CMAKE_ARGC} - 1")
foreach(_i RANGE 0 ${_last})
  if(_seen_separator)
    list(APPEND _cmd "${CMAKE_ARGV${_i}}")
  elseif("${CMAKE_ARGV${_i}}" STREQUAL "--")
    set(_seen_separator TRUE)
  endif()
endforeach()
if(NOT _cmd)
  message(FATAL_ERROR "FAILED: expect_exit.cmake: no command after --")
endif()
if(NOT DEFINED WORKDIR)
  set(WORKDIR "${CMAKE_CURRENT_BINARY_DIR}")
endif()
execute_process(COMMAND ${_cmd}
  WORKING_DIRECTORY "${WORKDIR}"
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
set(_all "${_out}${_err}")
string(REPLACE "\n" " | " _flat "${_all}")
if(NOT "${_rc}" STREQUAL "${EXPECT_RC}")
  message(FATAL_ERROR "FAILED: exit '${_rc}', expected ${EXPECT_RC}; output: ${_flat}")
endif()
if(NOT "${_all}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "FAILED: the output does not match '${EXPECT}'; output: ${_flat}")
endif()
message("hostile-cli ok: exit ${_rc}: ${_flat}")
