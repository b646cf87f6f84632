# Installs peft from a build folder into a fresh prefix, then configures, builds and runs the
# outside project beside this file against that prefix alone.
#
#   cmake -DPEFT_BUILD_DIR=<build> -DPREFIX=<prefix> -DCONSUMER_BUILD_DIR=<dir>
#         [-DGENERATOR=<g>] [-DMAKE_PROGRAM=<p>] [-DCXX_COMPILER=<c>] [-DCONFIG=<cfg>]
#         -P run_consumer_test.cmake

foreach(var IN ITEMS PEFT_BUILD_DIR PREFIX CONSUMER_BUILD_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "run_consumer_test.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${PREFIX}" "${CONSUMER_BUILD_DIR}")

# 1. Install headers and package config (component Development: no binaries needed).
run_step("install"
  "${CMAKE_COMMAND}" --install "${PEFT_BUILD_DIR}" --prefix "${PREFIX}"
  --component Development --config "${CONFIG}")
if(NOT EXISTS "${PREFIX}/include/peft/peft.hpp")
  message(FATAL_ERROR "consumer test: install did not write ${PREFIX}/include/peft/peft.hpp")
endif()

# 2. Configure the consumer against the prefix only (no package registry).
set(configure_args
  -S "${CMAKE_CURRENT_LIST_DIR}" -B "${CONSUMER_BUILD_DIR}"
  "-DCMAKE_PREFIX_PATH=${PREFIX}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  "-DCMAKE_BUILD_TYPE=${CONFIG}")
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
run_step("configure" "${CMAKE_COMMAND}" ${configure_args})
string(REGEX MATCH "using peft [^\n]*" found_line "${step_output}")
message(STATUS "consumer test: ${found_line}")
file(REAL_PATH "${PREFIX}" real_prefix)
string(FIND "${found_line}" "from ${PREFIX}/" at_prefix)
string(FIND "${found_line}" "from ${real_prefix}/" at_real_prefix)
if(at_prefix EQUAL -1 AND at_real_prefix EQUAL -1)
  message(FATAL_ERROR "consumer test: peft was not found in ${PREFIX}:\n${step_output}")
endif()

# 3. Build and run.
run_step("build" "${CMAKE_COMMAND}" --build "${CONSUMER_BUILD_DIR}" --config "${CONFIG}")
run_step("run" "${CONSUMER_BUILD_DIR}/bin/peft_consumer")
if(NOT step_output MATCHES "consumer ok")
  message(FATAL_ERROR "consumer test: unexpected output:\n${step_output}")
endif()
message(STATUS "consumer test: ${step_output}")
