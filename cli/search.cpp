// `peft search`: design-space search over PEFT configurations under a trainable-parameter budget
// (include/peft/experiment/search.hpp). Prints the candidates' table and the run's cost;
// writes the best configuration as adapter_config.json, with config.json (the searched model),
// search_table.md and search.json, into --out.
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <peft/experiment/search.hpp>
#include <peft/io/parse_text.hpp>

#include "commands.hpp"

namespace peft::cli {

namespace search_cli {

inline void print_usage(std::ostream& out) {
  out << "usage: peft search [--quick] [--out DIR] [--task NAME] [--budget N] [--steps N]\n"
         "                   [--candidates N] [--pretrain-steps N] [--seed N] [--threads N]\n"
         "Searches method, target modules, rank or size and layers with short proxy trainings on\n"
         "a synthetic task (a grid over LoRA, IA3, prefix tuning, adapters, MAM and UniPELT, and\n"
         "every other method of `peft study` at its study configuration); writes the best as\n"
         "adapter_config.json into --out (default ./search).\n"
         "  --budget N      trainable-parameter budget (default 4000)\n"
         "  --steps N       proxy training steps per candidate (default 300; --quick 150)\n"
         "  --candidates N  candidates trained (default 24; --quick 16)\n"
         "  --pretrain-steps N  base pretraining steps (default 3000; --quick 1500)\n"
         "  --threads N     OpenMP threads (default 1: the model is tiny, and the losses repeat\n"
         "                  exactly for a given thread count)\n"
         "  --quick         a run well under a minute on 2 cores\n";
}

// Bounds of the flags (docs/cli.md, "Bounds"): far above any useful run of this tiny model on a
// CPU (a million proxy steps per candidate is days), low enough that a typo fails at once.
inline constexpr std::int64_t kMaxSteps = 1000000;
inline constexpr std::int64_t kMaxCandidates = 10000;
inline constexpr std::int64_t kMaxThreads = 1024;

inline data::TaskKind task_argument(const std::string& flag, const std::string& name) {
  try {
    return data::task_from_name(name);
  } catch (const ConfigError& e) {
    throw io::ArgumentError(flag + ": " + e.what());
  }
}

}  // namespace search_cli

int run_search(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  search::SearchOptions o;
  std::filesystem::path dir = "search";
  bool quick = false;
  std::int64_t steps = 0, candidates = 0, pretrain_steps = -1;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw io::ArgumentError(a + ": expected a value, found none");
      return args[++i];
    };
    if (a == "--quick")
      quick = true;
    else if (a == "--out")
      dir = value();
    else if (a == "--task")
      o.task = search_cli::task_argument(a, value());
    else if (a == "--budget")
      o.parameter_budget = io::parse_integer(value(), a, {.min = 1, .max = 1LL << 53});
    else if (a == "--steps")
      steps = io::parse_integer(value(), a, {.min = 1, .max = search_cli::kMaxSteps});
    else if (a == "--candidates")
      candidates = io::parse_integer(value(), a, {.min = 1, .max = search_cli::kMaxCandidates});
    else if (a == "--pretrain-steps")
      pretrain_steps = io::parse_integer(value(), a, {.min = 0, .max = search_cli::kMaxSteps});
    else if (a == "--threads")
      o.threads = static_cast<int>(
          io::parse_integer(value(), a, {.min = 1, .max = search_cli::kMaxThreads}));
    else if (a == "--seed")
      o.seed = io::parse_unsigned(value(), a);
    else if (a == "--help" || a == "-h") {
      search_cli::print_usage(out);
      return 0;
    } else {
      err << "peft search: unknown option '" << a << "'\n";
      search_cli::print_usage(err);
      return 2;
    }
  }
  // --quick: about 15 s single-threaded on an idle core; the default about a minute.
  o.proxy_steps = steps ? steps : (quick ? 150 : 300);
  o.max_candidates = candidates ? candidates : (quick ? 16 : 24);
  o.pretrain_steps = pretrain_steps >= 0 ? pretrain_steps : (quick ? 1500 : 3000);
  o.eval_examples = quick ? 128 : 256;

  // Created and proven writable before any training: a bad --out fails now, not at the end.
  io::require_writable_dir(dir, "--out");
#ifdef _OPENMP
  omp_set_num_threads(o.threads);
#endif
  const search::SearchResult r = search::run_search(o, &out, study_table());
  out << '\n';
  search::print_table(out, r);
  const search::CandidateResult& best = r.rows[r.best];
  const search::Candidate& c = best.candidate;
  out << std::fixed << std::setprecision(4) << "\nbest: " << c.method << " (" << c.targets << ", "
      << c.layers << ", " << c.size_label << "), " << c.parameters
      << " trainable parameters of a budget of " << o.parameter_budget << ", eval loss "
      << best.eval_loss << " (base " << r.base_eval_loss << ")\n";
  out << "cost: " << r.total_steps << " optimizer steps (" << o.pretrain_steps << " pretraining), "
      << std::setprecision(1) << r.total_seconds << " s in all (" << r.pretrain_seconds
      << " s pretraining)\n";
  search::write_results(dir, r, o);
  out << "wrote " << (dir / "adapter_config.json").string() << ", config.json, search_table.md, "
      << "search.json\n";
  return 0;
}

}  // namespace peft::cli
