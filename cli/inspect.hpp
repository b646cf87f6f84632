#pragma once
// `peft inspect FILE...`: lists the tensors of safetensors files, one line each, aligned:
//   name  dtype  [shape]
// followed by a summary line per file. Every file is read and validated before anything is
// printed, so a bad file yields exactly one error line and no partial listing.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::cli {

namespace detail {

inline void print_inspect_usage(std::ostream& stream) {
  stream << "usage: peft inspect FILE.safetensors [FILE.safetensors ...]\n"
            "  Lists every tensor (name, dtype, shape) and a summary per file.\n";
}

/// The listing of one file. The file is mapped, not read (SafetensorsFile::map): only the
/// header's pages are touched, so a 2 GiB file lists in milliseconds and kilobytes.
inline std::string describe_safetensors_file(const std::string& path) {
  const io::SafetensorsFile file = io::SafetensorsFile::map(path);
  std::size_t name_width = 0;
  std::size_t dtype_width = 0;
  std::vector<std::string> names;
  names.reserve(file.tensors().size());
  for (const io::TensorInfo& info : file.tensors()) {
    // Names come from the file: escape control characters so one tensor is one line.
    names.push_back(io::printable(info.name, 1000));
    name_width = std::max(name_width, names.back().size());
    dtype_width = std::max(dtype_width, io::dtype_name(info.dtype).size());
  }
  std::ostringstream listing;
  std::uint64_t total_parameters = 0;
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const io::TensorInfo& info = file.tensors()[i];
    const std::string_view dtype = io::dtype_name(info.dtype);
    listing << names[i] << std::string(name_width - names[i].size() + 2, ' ') << dtype
            << std::string(dtype_width - dtype.size() + 2, ' ') << io::shape_to_string(info.shape)
            << '\n';
    total_parameters += static_cast<std::uint64_t>(info.numel());
  }
  const std::size_t count = file.tensors().size();
  listing << io::printable(path) << ": " << count << (count == 1 ? " tensor, " : " tensors, ")
          << total_parameters << (total_parameters == 1 ? " parameter" : " parameters") << '\n';
  return listing.str();
}

}  // namespace detail

// run_inspect (commands.hpp) is in inspect.cpp.

}  // namespace peft::cli
