# RE2, the linear-time regular-expression engine that matches target_modules, layers_pattern
# and rank/alpha pattern keys (include/peft/methods/target_modules.hpp): a backtracking engine
# hangs or overflows its stack on hostile patterns. Found by its header and library alone
# (Debian's libre2-dev ships neither a CMake package nor needs abseil at 2022-06-01), without
# pkg-config and without downloading. Defines the imported target peft::re2 and sets
# PEFT_RE2_FOUND. Included by CMakeLists.txt and by the installed peftConfig.cmake.
if(NOT TARGET peft::re2)
  find_path(PEFT_RE2_INCLUDE_DIR re2/re2.h DOC "Folder holding re2/re2.h")
  find_library(PEFT_RE2_LIBRARY NAMES re2 DOC "The RE2 library (libre2)")
  mark_as_advanced(PEFT_RE2_INCLUDE_DIR PEFT_RE2_LIBRARY)
  if(PEFT_RE2_INCLUDE_DIR AND PEFT_RE2_LIBRARY)
    add_library(peft::re2 UNKNOWN IMPORTED)
    set_target_properties(peft::re2 PROPERTIES
      IMPORTED_LOCATION "${PEFT_RE2_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${PEFT_RE2_INCLUDE_DIR}")
  endif()
endif()
if(TARGET peft::re2)
  set(PEFT_RE2_FOUND TRUE)
else()
  set(PEFT_RE2_FOUND FALSE)
endif()
