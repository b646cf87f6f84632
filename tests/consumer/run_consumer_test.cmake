# Installs peft from a build folder into a fresh prefix, then configures, builds and runs the
# outside project beside this file against that prefix alone.
#
#   cmake -DPEFT_BUILD_DIR=<build> -DPREFIX=<prefix> -DCONSUMER_BUILD_DIR=<dir>
#         [-DPEFT_SOURCE_DIR=<src> -DPEFT_CONFIGURE_ARGS=<-Da=b|-Dc=d>]
#         [-DEXPECT_CLI=ON|OFF] [-DCOMPONENT=<component>] [-DSMOKE=ON]
#         [-DGENERATOR=<g>] [-DMAKE_PROGRAM=<p>] [-DCXX_COMPILER=<c>] [-DCONFIG=<cfg>]
#         -P run_consumer_test.cmake
#
# With PEFT_SOURCE_DIR, PEFT_BUILD_DIR is first configured afresh from that source with
# PEFT_CONFIGURE_ARGS ('|'-separated) and nothing is built, as a user who wants the headers
# alone would do: the install must still succeed. Without COMPONENT, everything is installed
# (`cmake --install` as the README says); EXPECT_CLI says whether bin/peft must then be in the
# prefix (ON) or must not be (OFF); unset, it is not checked. SMOKE builds the consumer's short
# form (its method and one model, not the whole workout): for the install variants, which check
# the install, not the method.

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

set(generator_args "")
if(GENERATOR)
  list(APPEND generator_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND generator_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND generator_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()

file(REMOVE_RECURSE "${PREFIX}" "${CONSUMER_BUILD_DIR}")

# 0. Optionally, a fresh configure of peft itself (never built).
if(PEFT_SOURCE_DIR)
  file(REMOVE_RECURSE "${PEFT_BUILD_DIR}")
  string(REPLACE "|" ";" peft_args "${PEFT_CONFIGURE_ARGS}")
  run_step("configure peft (${PEFT_CONFIGURE_ARGS})"
    "${CMAKE_COMMAND}" -S "${PEFT_SOURCE_DIR}" -B "${PEFT_BUILD_DIR}" ${generator_args}
    "-DCMAKE_BUILD_TYPE=${CONFIG}" ${peft_args})
endif()

# 1. Install: everything, or one component.
set(install_args --install "${PEFT_BUILD_DIR}" --prefix "${PREFIX}" --config "${CONFIG}")
if(COMPONENT)
  list(APPEND install_args --component "${COMPONENT}")
endif()
run_step("install" "${CMAKE_COMMAND}" ${install_args})
foreach(file IN ITEMS include/peft/peft.hpp share/cmake/peft/peftConfig.cmake)
  if(NOT EXISTS "${PREFIX}/${file}")
    message(FATAL_ERROR "consumer test: install did not write ${PREFIX}/${file}")
  endif()
endforeach()
if(DEFINED EXPECT_CLI AND NOT EXPECT_CLI STREQUAL "")
  if(EXPECT_CLI AND NOT EXISTS "${PREFIX}/bin/peft")
    message(FATAL_ERROR "consumer test: the CLI was built but not installed to ${PREFIX}/bin/peft")
  elseif(NOT EXPECT_CLI AND EXISTS "${PREFIX}/bin/peft")
    message(FATAL_ERROR "consumer test: ${PREFIX}/bin/peft installed, but it was not built")
  endif()
endif()

# 2. Configure the consumer against the prefix only (no package registry).
if(SMOKE)
  set(smoke ON)
else()
  set(smoke OFF)
endif()
run_step("configure" "${CMAKE_COMMAND}"
  -S "${CMAKE_CURRENT_LIST_DIR}" -B "${CONSUMER_BUILD_DIR}" ${generator_args}
  "-DCMAKE_PREFIX_PATH=${PREFIX}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  "-DPEFT_CONSUMER_SMOKE=${smoke}"
  "-DCMAKE_BUILD_TYPE=${CONFIG}")
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
