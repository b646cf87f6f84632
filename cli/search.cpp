// `peft search`: design-space search over PEFT configurations under a trainable-parameter budget
// (include/peft/methods/hybrid/search.hpp). Prints the candidates' table and the run's cost;
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

#include <peft/methods/hybrid/search.hpp>

#include "commands.hpp"

namespace peft::cli {

namespace search_cli {

inline void print_usage(std::ostream& out) {
  out << "usage: peft search [--quick] [--out DIR] [--task NAME] [--budget N] [--steps N]\n"
         "                   [--candidates N] [--pretrain-steps N] [--seed N] [--threads N]\n"
         "Searches method, target modules, rank or size and layers with short proxy trainings on\n"
         "a synthetic task; writes the best as adapter_config.json into --out (default ./search).\n"
         "  --budget N      trainable-parameter budget (default 4000)\n"
         "  --steps N       proxy training steps per candidate (default 300; --quick 150)\n"
         "  --candidates N  candidates trained (default 24; --quick 16)\n"
         "  --pretrain-steps N  base pretraining steps (default 3000; --quick 1500)\n"
         "  --threads N     OpenMP threads (default 1: the model is tiny, and the losses repeat\n"
         "                  exactly for a given thread count)\n"
         "  --quick         a run well under a minute on 2 cores\n";
}

inline std::int64_t parse_integer(const std::string& option, const std::string& v,
                                  std::int64_t lo) {
  std::size_t used = 0;
  long long n = 0;
  try {
    n = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || n < lo)
    throw ConfigError("option " + option + " expects an integer ≥ " + std::to_string(lo) +
                      ", got '" + v + "'");
  return static_cast<std::int64_t>(n);
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
      if (i + 1 >= args.size()) throw ConfigError("option " + a + " needs a value");
      return args[++i];
    };
    if (a == "--quick")
      quick = true;
    else if (a == "--out")
      dir = value();
    else if (a == "--task")
      o.task = data::task_from_name(value());
    else if (a == "--budget")
      o.parameter_budget = search_cli::parse_integer(a, value(), 1);
    else if (a == "--steps")
      steps = search_cli::parse_integer(a, value(), 1);
    else if (a == "--candidates")
      candidates = search_cli::parse_integer(a, value(), 1);
    else if (a == "--pretrain-steps")
      pretrain_steps = search_cli::parse_integer(a, value(), 0);
    else if (a == "--threads")
      o.threads = static_cast<int>(search_cli::parse_integer(a, value(), 1));
    else if (a == "--seed")
      o.seed = static_cast<std::uint64_t>(search_cli::parse_integer(a, value(), 0));
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

#ifdef _OPENMP
  omp_set_num_threads(o.threads);
#endif
  const search::SearchResult r = search::run_search(o, &out);
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
