// The peft command-line front end: build/bin/peft COMMAND [ARGS...]. Dispatches only: each
// command is its own translation unit (cli/<command>.cpp, declared in commands.hpp).
#include <iostream>
#include <peft/commands/report_errors.hpp>
#include <string>
#include <vector>

#include "commands.hpp"

namespace {

void print_usage(std::ostream& out) {
  out << "usage: peft COMMAND [ARGS...]\n"
         "\n"
         "commands:\n"
         "  bench-step [FLAGS]       time a LoRA training step (the PyTorch peer's flags;\n"
         "                           --device cuda [--dtype bf16|fp32] on a GPU build)\n"
         "  count MODEL_CONFIG ADAPTER_CONFIG  the reference's trainable-parameter line, from "
         "shapes\n"
         "  demo [GOLDEN_DIR]        load a golden case, train its LoRA a few steps, print the "
         "losses\n"
         "  generate MODEL_DIR ...   continue a prompt (greedy, temperature, top-k, top-p; "
         "--adapter "
         "DIR)\n"
         "  inspect FILE...          list a safetensors file's tensors (name, dtype, shape)\n"
         "  methods [--json]         every method: family, name, the reference's peft_type, "
         "paper\n"
         "  merge --adapters D1,D2 --weights W1,W2 --combination TYPE --out DIR  LoRA\n"
         "                           adapters merged into one (linear, cat, svd, ties, dare_*)\n"
         "  parity [--device cpu|cuda] [--timeout S] CASE_DIR...  check golden cases (logits,\n"
         "                           loss, gradients, merge, AdamW); cuda: the LoRA cases, fp32\n"
         "  search [--quick] [...]   search PEFT configurations under a parameter budget\n"
         "  study [--quick] [...]    pretrain a small decoder, adapt it with every method, "
         "compare\n"
         "  train MODEL_DIR --adapter-config CFG --data FILE... --out DIR  fine-tune an\n"
         "                           adapter on text, JSONL or token files (docs/train.md)\n"
         "  tokenize TOKENIZER FILE  a text's ids as a JSON array with a byte-level BPE\n"
         "                           tokenizer (--decode: ids back to text)\n"
         "  help                     this text\n"
         "\n"
         "docs/cli.md describes every command.\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(std::cerr);
    return 2;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "help" || command == "--help" || command == "-h") {
    print_usage(std::cout);
    return 0;
  }
  // train reports its own errors: under mpirun an error on one rank must end the others too.
  if (command == "train") return peft::cli::run_train_command(args, std::cout, std::cerr);
  return peft::commands::report_errors(command, std::cerr, [&] {
    if (command == "inspect") return peft::cli::run_inspect(args, std::cout, std::cerr);
    if (command == "merge") return peft::cli::run_merge(args, std::cout, std::cerr);
    if (command == "parity") return peft::cli::run_parity(args, std::cout, std::cerr);
    if (command == "count") return peft::cli::run_count(args, std::cout, std::cerr);
    if (command == "methods") return peft::cli::run_methods(args, std::cout, std::cerr);
    if (command == "bench-step") return peft::cli::run_bench_step(args, std::cout, std::cerr);
    if (command == "generate") return peft::cli::run_generate(args, std::cout, std::cerr);
    if (command == "search") return peft::cli::run_search(args, std::cout, std::cerr);
    if (command == "study") return peft::cli::run_study(args, std::cout, std::cerr);
    if (command == "demo") return peft::cli::run_demo(args, std::cout, std::cerr);
    if (command == "tokenize") return peft::cli::run_tokenize(args, std::cout, std::cerr);
    std::cerr << "peft: unknown command '" << command << "'\n";
    print_usage(std::cerr);
    return 2;
  });
}
