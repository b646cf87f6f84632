# Run after peft_tests (or another doctest executable) is linked, by peft_discover_doctests():
# lists its test cases and writes one ctest test per case into CTEST_FILE.
#   -DTEST_EXECUTABLE=... -DCTEST_FILE=... -DWORKING_DIR=... -DLABEL=... -DTIMEOUT=...
execute_process(COMMAND "${TEST_EXECUTABLE}" --list-test-cases
  OUTPUT_VARIABLE output ERROR_VARIABLE error RESULT_VARIABLE rc WORKING_DIRECTORY "${WORKING_DIR}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${TEST_EXECUTABLE} --list-test-cases failed (${rc}):\n${output}${error}")
endif()

# Case names may hold any character: protect the ones CMake lists treat specially.
string(REPLACE ";" "<peft-semicolon>" output "${output}")
string(REPLACE "[" "<peft-open>" output "${output}")
string(REPLACE "]" "<peft-close>" output "${output}")
string(REPLACE "\n" ";" lines "${output}")

set(script "")
set(count 0)
foreach(line IN LISTS lines)
  if(line STREQUAL "" OR line MATCHES "^=+$" OR line MATCHES "^<peft-open>doctest<peft-close> ")
    continue()
  endif()
  string(REPLACE "<peft-semicolon>" ";" name "${line}")
  string(REPLACE "<peft-open>" "[" name "${name}")
  string(REPLACE "<peft-close>" "]" name "${name}")
  # doctest filters are wildcards where ',' separates and '\' escapes: put '?' (any one
  # character) for those and for the wildcards themselves. ctest names cannot hold ';'.
  string(REGEX REPLACE "[][*?,\\;]" "?" filter "${name}")
  string(REPLACE ";" "," test_name "${name}")
  string(APPEND script
    "add_test([==[${test_name}]==] [==[${TEST_EXECUTABLE}]==] [==[--test-case=${filter}]==])\n"
    "set_tests_properties([==[${test_name}]==] PROPERTIES"
    " WORKING_DIRECTORY [==[${WORKING_DIR}]==] LABELS [==[${LABEL}]==] TIMEOUT ${TIMEOUT}"
    # A filter that matches no case would pass silently: make that a failure.
    " FAIL_REGULAR_EXPRESSION [==[test cases: 0 [|]]==])\n")
  math(EXPR count "${count} + 1")
endforeach()
if(count EQUAL 0)
  message(FATAL_ERROR "${TEST_EXECUTABLE} lists no test case")
endif()
file(WRITE "${CTEST_FILE}" "${script}")
