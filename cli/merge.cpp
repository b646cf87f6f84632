// `peft merge --adapters DIR1,DIR2,... --weights W1,W2,... --combination TYPE --out DIR`: LoRA
// adapters merged into one new adapter, as the reference's add_weighted_adapter merges them
// (include/peft/methods/reparameterized/weighted_merge.hpp). docs/cli.md, "peft merge".
#include <optional>
#include <ostream>
#include <peft/io/parse_text.hpp>
#include <peft/io/printable.hpp>
#include <peft/methods/reparameterized/weighted_merge.hpp>
#include <string>
#include <vector>

#include "commands.hpp"

namespace peft::cli {

namespace {

constexpr const char* kUsage =
    "usage: peft merge --adapters DIR1,DIR2,... --weights W1,W2,... --out DIR\n"
    "                  [--combination TYPE] [--density D] [--rank R] [--svd-clamp Q]\n"
    "                  [--majority-sign total|frequency] [--seed N]\n"
    "TYPE: linear, cat, svd (default, as the reference), ties, ties_svd, dare_linear,\n"
    "      dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd\n";

}  // namespace

int run_merge(const std::vector<std::string>& args, std::ostream& out, std::ostream& /*err*/) {
  std::optional<std::string> adapters, weights, out_dir;
  merge::WeightedMergeOptions o;
  // A name the library refuses (ConfigError) is a usage error here, prefixed with its flag.
  const auto as_usage_error = [](const std::string& flag, const auto& parse) {
    try {
      return parse();
    } catch (const ConfigError& e) {
      throw io::ArgumentError(flag + ": " + e.what());
    }
  };
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      out << kUsage;
      return 0;
    }
    if (!flag.starts_with("--"))
      throw io::ArgumentError("unexpected argument " + io::printable(flag) + "\n" + kUsage);
    if (i + 1 >= args.size())
      throw io::ArgumentError(flag + ": expected a value\n" + std::string(kUsage));
    const std::string& value = args[++i];
    if (flag == "--adapters") {
      adapters = value;
    } else if (flag == "--weights") {
      weights = value;
    } else if (flag == "--out") {
      out_dir = value;
    } else if (flag == "--combination") {
      o.combination = as_usage_error(flag, [&] { return merge::parse_combination(value); });
    } else if (flag == "--density") {
      o.density = io::parse_number(value, "--density", {.min = 0, .max = 1});
    } else if (flag == "--rank") {
      o.svd_rank = static_cast<int>(io::parse_integer(value, "--rank", {.min = 1, .max = 1 << 20}));
    } else if (flag == "--svd-clamp") {
      o.svd_clamp = io::parse_number(value, "--svd-clamp", {.min = 0, .max = 1});
    } else if (flag == "--majority-sign") {
      o.majority_sign = as_usage_error(flag, [&] { return merge::parse_majority_sign(value); });
    } else if (flag == "--seed") {
      o.seed = io::parse_unsigned(value, "--seed");
    } else {
      throw io::ArgumentError("unknown flag " + io::printable(flag) + "\n" + kUsage);
    }
  }
  if (!adapters || !weights || !out_dir)
    throw io::ArgumentError("--adapters, --weights and --out are required\n" + std::string(kUsage));
  const std::vector<std::string> dirs = io::parse_list(*adapters, "--adapters");
  std::vector<double> w;
  const std::vector<std::string> weight_items = io::parse_list(*weights, "--weights");
  for (std::size_t i = 0; i < weight_items.size(); ++i)
    w.push_back(io::parse_number(weight_items[i], "--weights item " + std::to_string(i + 1)));
  if (w.size() != dirs.size())
    throw io::ArgumentError("--weights: " + std::to_string(w.size()) + " weights for " +
                            std::to_string(dirs.size()) + " adapters (one weight per adapter)");
  std::vector<merge::LoraAdapter> loaded;
  for (const std::string& dir : dirs) loaded.push_back(merge::read_lora_adapter(dir));
  merge::plan_weighted_merge(loaded, w, o);     // every check, before the folder is made
  io::require_writable_dir(*out_dir, "--out");  // and before the SVDs (minutes on a 7B model)
  const merge::LoraAdapter merged = merge::add_weighted_adapter(loaded, w, o);
  merge::save_lora_adapter(*out_dir, merged);
  std::int64_t parameters = 0;
  for (const auto& [module, f] : merged.modules) parameters += f.A.size() + f.B.size();
  out << "merged " << dirs.size() << " adapters ("
      << merge::combination_name(dirs.size() == 1 ? merge::Combination::Linear : o.combination)
      << ") into " << io::printable(*out_dir) << ": rank " << merged.r << ", "
      << merged.modules.size() << " modules, " << parameters << " parameters\n";
  return 0;
}

}  // namespace peft::cli
