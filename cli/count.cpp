// `peft count MODEL_CONFIG.json ADAPTER_CONFIG.json` (count.hpp holds the counting itself,
// shared with tests/ and examples/).
#include "count.hpp"

#include <ostream>
#include <peft/io/json.hpp>
#include <string>
#include <vector>

#include "commands.hpp"

namespace peft::cli {

int run_count(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.size() != 2) {
    err << "usage: peft count MODEL_CONFIG.json ADAPTER_CONFIG.json\n";
    return 2;
  }
  const auto [trainable, all] =
      count_parameters(io::load_json(args[0]), args[0], io::load_json(args[1]), args[1]);
  out << trainable_line(trainable, all) << '\n';
  return 0;
}

}  // namespace peft::cli
