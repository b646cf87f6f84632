# peft_discover_doctests(<target> [LABEL <label>] [TIMEOUT <seconds>])
# Registers every doctest case of <target> as its own ctest test, named after the case. The list
# is read from the executable after each link (no re-configure needed when cases change).
# Unlike doctest's own doctest_discover_tests, case names may hold ';', ',', '[', ']' or '*',
# and a case whose filter matches nothing fails instead of passing silently.
include_guard(GLOBAL)
set(_PEFT_DOCTEST_ADD_TESTS "${CMAKE_CURRENT_LIST_DIR}/PeftDoctestAddTests.cmake")

function(peft_discover_doctests target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "LABEL;TIMEOUT" "")
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 600)
  endif()
  set(tests_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_tests.cmake")
  set(include_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_include.cmake")
  add_custom_command(TARGET ${target} POST_BUILD
    BYPRODUCTS "${tests_file}"
    COMMAND "${CMAKE_COMMAND}"
      "-DTEST_EXECUTABLE=$<TARGET_FILE:${target}>"
      "-DCTEST_FILE=${tests_file}"
      "-DWORKING_DIR=${CMAKE_CURRENT_BINARY_DIR}"
      "-DLABEL=${arg_LABEL}"
      "-DTIMEOUT=${arg_TIMEOUT}"
      -P "${_PEFT_DOCTEST_ADD_TESTS}"
    VERBATIM)
  file(WRITE "${include_file}"
    "if(EXISTS [==[${tests_file}]==])\n"
    "  include([==[${tests_file}]==])\n"
    "else()\n"
    "  add_test(${target}_NOT_BUILT ${target}_NOT_BUILT)\n"
    "endif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${include_file}")
endfunction()
