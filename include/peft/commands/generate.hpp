#pragma once
// `peft generate MODEL_DIR [--adapter DIR | --adapter-per-row DIR|base ...]
//                (--prompt TEXT | --ids 1,2,3)... [--max-new N] [--temperature T] ...`, as a
// library function over a method registry (the `peft` binary: BuiltinMethods; a program with its own methods: its registry, or
// peft::commands::main<Registry>, main.hpp). Opt-in: not in <peft/peft.hpp>.
// Continues a prompt with a model folder (config.json + model.safetensors: a reference
// checkpoint, or the base `peft study` caches), optionally with an adapter folder applied.
// Several prompts (each --prompt / --ids a row, of one length) are generated as one batch; with
// --adapter-per-row each row runs with its own adapter folder (or `base`), all of one method:
// one base model serves them all in a mixed-adapter batch (generate_batch).
// Byte-level models (vocabulary 256, as the study's text base) take and print text; others take
// and print token ids. Every flag is parsed strictly (io/parse_text.hpp); the prompt is checked
// against the model's vocabulary, and Decoder::load checks the model's size against this
// machine's memory before any weight is allocated; non-finite logits are an error
// (generate.hpp), never tokens.
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "peft/data/text.hpp"
#include "peft/generate.hpp"
#include "peft/io/parse_text.hpp"
#include "peft/peft.hpp"

namespace peft::commands {

namespace detail {
/// Generates every row (one batch; `names`: each row's adapter, or empty) and prints one line a
/// row: text for byte-level models, token ids otherwise.
template <class Model>
void print_generation(Model& model, const std::vector<std::vector<std::int64_t>>& prompts,
                      const std::vector<std::string>& names, const GenerateOptions& options,
                      std::ostream& out) {
  const auto rows = generate_batch(model, prompts, names, options);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const std::vector<std::int64_t>& tokens = rows[r];
    if (model.config().vocab_size == data::kByteVocabSize) {
      out << data::printable_bytes(prompts[r]) << data::printable_bytes(tokens) << '\n';
    } else {
      for (std::size_t i = 0; i < tokens.size(); ++i) out << (i ? " " : "") << tokens[i];
      out << '\n';
    }
  }
}
}  // namespace detail

/// `generate MODEL_DIR [--adapter DIR] ...`: the exit status (2: usage). The adapter folder's
/// method is the first of `Registry` that accepts its adapter_config.json.
template <class Registry = BuiltinMethods>
int run_generate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const auto usage = [&] {
    err << "usage: peft generate MODEL_DIR [--adapter DIR] (--prompt TEXT | --ids 1,2,3)...\n"
           "                     [--adapter-per-row DIR|base]... [--max-new N]\n"
           "                     [--temperature T] [--top-k K] [--top-p P]\n"
           "                     [--stop ID1,ID2,...] [--seed N] [--no-cache]\n"
           "                     [--base-dtype fp32|bf16|fp16|nf4]\n";
    return 2;
  };
  if (args.empty() || args[0].rfind("--", 0) == 0) return usage();
  const std::filesystem::path model_dir = args[0];
  std::filesystem::path adapter_dir;
  std::vector<std::string> prompt_texts, ids_texts, row_adapters;
  GenerateOptions options;
  BaseFormat base = BaseFormat::fp32;
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--no-cache") {  // the one flag without a value
      options.use_cache = false;
      continue;
    }
    static const char* const kFlags[] = {"--adapter", "--prompt",      "--ids",  "--max-new",
                                         "--top-k",   "--temperature", "--seed", "--base-dtype",
                                         "--top-p",   "--stop",        "--adapter-per-row"};
    if (std::find(std::begin(kFlags), std::end(kFlags), flag) == std::end(kFlags)) {
      err << "peft generate: error: unknown option '" << flag << "'\n";
      return usage();
    }
    if (i + 1 >= args.size()) {
      err << "peft generate: error: " << flag << " needs a value\n";
      return usage();
    }
    const std::string& value = args[++i];
    if (flag == "--adapter")
      adapter_dir = value;
    else if (flag == "--adapter-per-row")
      row_adapters.push_back(value);
    else if (flag == "--prompt")
      prompt_texts.push_back(value);
    else if (flag == "--ids")
      ids_texts.push_back(value);
    else if (flag == "--max-new")
      options.max_new_tokens =
          io::parse_integer(value, flag, {.min = 0, .max = GenerateOptions::kMaxNewTokens});
    else if (flag == "--temperature")
      options.temperature = io::parse_number(value, flag, {.min = 0});
    else if (flag == "--top-k")
      options.top_k = static_cast<int>(
          io::parse_integer(value, flag, {.min = 0, .max = std::numeric_limits<int>::max()}));
    else if (flag == "--top-p")
      options.top_p = io::parse_number(value, flag, {.min = 0, .max = 1, .min_exclusive = true});
    else if (flag == "--stop")
      options.stop_tokens = io::parse_integer_list(value, flag, {.min = 0});
    else if (flag == "--seed")
      options.seed = io::parse_unsigned(value, flag);
    else if (flag == "--base-dtype") {
      try {
        base = parse_base_format(value, flag);
      } catch (const ConfigError& e) {
        throw io::ArgumentError(e.what());
      }
    }
  }
  if (!prompt_texts.empty() && !ids_texts.empty())
    throw io::ArgumentError("--prompt and --ids: expected one of them, found both");
  const bool ids = !ids_texts.empty();
  std::vector<std::vector<std::int64_t>> prompts;
  for (const std::string& text : ids_texts)
    prompts.push_back(io::parse_integer_list(text, "--ids", {.min = 0}));
  for (const std::string& text : prompt_texts) {
    if (text.empty()) throw io::ArgumentError("--prompt: expected at least one byte, found ''");
    std::vector<std::int64_t>& bytes = prompts.emplace_back();  // the byte-level models' tokens
    for (unsigned char c : text) bytes.push_back(c);
  }
  if (prompts.empty()) {
    err << "peft generate: error: expected a prompt (--prompt TEXT or --ids 1,2,3)\n";
    return usage();
  }
  for (const std::vector<std::int64_t>& p : prompts)
    if (p.size() != prompts.front().size())
      throw io::ArgumentError(std::string(ids ? "--ids" : "--prompt") + ": the rows have " +
                              std::to_string(prompts.front().size()) + " and " +
                              std::to_string(p.size()) +
                              " tokens; rows generated together need one length");
  if (!row_adapters.empty() && !adapter_dir.empty())
    throw io::ArgumentError("--adapter and --adapter-per-row: expected one of them, found both");
  if (!row_adapters.empty() && row_adapters.size() != prompts.size())
    throw io::ArgumentError("--adapter-per-row: expected one per prompt (" +
                            std::to_string(prompts.size()) + "), found " +
                            std::to_string(row_adapters.size()));
  // Each distinct folder becomes one named adapter; the first is the model's own ("default").
  std::vector<std::filesystem::path> folders;
  std::vector<std::string> names;
  for (const std::string& a : row_adapters) {
    if (a == "base") {
      names.emplace_back(kBaseAdapterName);
      continue;
    }
    auto it = std::find(folders.begin(), folders.end(), std::filesystem::path(a));
    if (it == folders.end()) {
      folders.emplace_back(a);
      it = folders.end() - 1;
    }
    const auto k = static_cast<std::size_t>(it - folders.begin());
    names.push_back(k == 0 ? std::string(kDefaultAdapterName) : "row_adapter_" + std::to_string(k));
  }
  if (!adapter_dir.empty()) folders = {adapter_dir};

  const std::filesystem::path config_path = model_dir / "config.json";
  const nlohmann::json config_json = io::load_json(config_path);
  const ModelConfig config = ModelConfig::from_json(config_json, config_path.string());
  // Checked before any weight is allocated.
  for (const std::vector<std::int64_t>& prompt : prompts)
    for (std::size_t i = 0; i < prompt.size(); ++i)
      if (prompt[i] >= config.vocab_size)
        throw io::ArgumentError((ids ? "--ids item " : "--prompt byte ") + std::to_string(i + 1) +
                                ": expected a token id below the model's " + "vocab_size " +
                                std::to_string(config.vocab_size) + " (" + config_path.string() +
                                "), found " + std::to_string(prompt[i]));
  // Decoder::load checks the sizes against this machine's memory, then the checkpoint's header
  // against the config, before it allocates any weight.
  try {
    visit_arch_for(config.model_type, [&]<class Arch>() {
      if (folders.empty()) {
        auto model = Decoder<Arch, NoPeft, float>::load(model_dir, {}, 0, base);
        detail::print_generation(model, prompts, {}, options, out);
        return;
      }
      const std::filesystem::path adapter_config = folders.front() / "adapter_config.json";
      const nlohmann::json adapter_json = io::load_json(adapter_config);
      const bool known = Registry::visit_for(adapter_json, [&]<class Policy>() {
        auto model = Decoder<Arch, Policy, float>::load(
            model_dir,
            config_from_json<typename Policy::Config>(adapter_json, adapter_config.string()), 0,
            base);
        load_adapter_state<Policy>(folders.front(), model.adapter(), model.linear_modules());
        for (std::size_t k = 1; k < folders.size(); ++k)
          load_adapter(model, folders[k], "row_adapter_" + std::to_string(k));
        detail::print_generation(model, prompts, names, options, out);
      });
      if (!known)
        throw ConfigError(adapter_config.string() + ": peft_type '" + peft_type_text(adapter_json) +
                          "' cannot be loaded");
    });
  } catch (const std::bad_alloc&) {
    throw ConfigError(
        config_path.string() + ": out of memory building the model or its adapter (vocab_size " +
        std::to_string(config.vocab_size) + ", hidden_size " + std::to_string(config.hidden_size) +
        ", num_layers " + std::to_string(config.num_layers) + ")");
  }
  return 0;
}

}  // namespace peft::commands
