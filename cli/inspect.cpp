// `peft inspect FILE...` (inspect.hpp: the listing of one file).
#include "inspect.hpp"

#include <exception>
#include <ostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "peft/io/json.hpp"

namespace peft::cli {

/// Returns 0 on success, 1 on any error (one line "peft inspect: error: <message>" on err),
/// 2 on a usage error.
int run_inspect(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::vector<std::string> paths;
  bool options_done = false;
  for (const std::string& arg : args) {
    if (!options_done && (arg == "-h" || arg == "--help")) {
      detail::print_inspect_usage(out);
      return 0;
    }
    if (!options_done && arg == "--") {
      options_done = true;
      continue;
    }
    if (!options_done && arg.size() > 1 && arg[0] == '-') {
      err << "peft inspect: error: unknown option '" << io::printable(arg) << "'\n";
      detail::print_inspect_usage(err);
      return 2;
    }
    paths.push_back(arg);
  }
  if (paths.empty()) {
    detail::print_inspect_usage(err);
    return 2;
  }
  std::string report;
  try {
    for (std::size_t i = 0; i < paths.size(); ++i) {
      if (i != 0) report += '\n';  // a blank line between files
      report += detail::describe_safetensors_file(paths[i]);
    }
  } catch (const std::exception& e) {
    // Library messages are already one line; printable() guarantees it for anything else.
    err << "peft inspect: error: " << io::printable(e.what(), 2000) << '\n';
    return 1;
  }
  out << report;
  return out ? 0 : 1;
}

}  // namespace peft::cli
