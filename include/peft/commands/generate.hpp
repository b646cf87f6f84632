#pragma once
// `peft generate MODEL_DIR [--adapter DIR] (--prompt TEXT | --ids 1,2,3) [--max-new N]
//                [--temperature T] [--top-k K] [--seed N]`, as a library function over a method
// registry (the `peft` binary: BuiltinMethods; a program with its own methods: its registry, or
// peft::commands::main<Registry>, main.hpp). Opt-in: not in <peft/peft.hpp>.
// Continues a prompt with a model folder (config.json + model.safetensors: a reference
// checkpoint, or the base `peft study` caches), optionally with an adapter folder applied.
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
#include <optional>
#include <string>
#include <vector>

#include "peft/data/text.hpp"
#include "peft/generate.hpp"
#include "peft/io/parse_text.hpp"
#include "peft/peft.hpp"

namespace peft::commands {

namespace detail {
template <class Model>
void print_generation(Model& model, const std::vector<std::int64_t>& prompt,
                      const GenerateOptions& options, std::ostream& out) {
  const std::vector<std::int64_t> tokens = generate(model, prompt, options);
  if (model.config().vocab_size == data::kByteVocabSize) {
    out << data::printable_bytes(prompt) << data::printable_bytes(tokens) << '\n';
  } else {
    for (std::size_t i = 0; i < tokens.size(); ++i) out << (i ? " " : "") << tokens[i];
    out << '\n';
  }
}
}  // namespace detail

/// `generate MODEL_DIR [--adapter DIR] ...`: the exit status (2: usage). The adapter folder's
/// method is the first of `Registry` that accepts its adapter_config.json.
template <class Registry = BuiltinMethods>
int run_generate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const auto usage = [&] {
    err << "usage: peft generate MODEL_DIR [--adapter DIR] (--prompt TEXT | --ids 1,2,3)\n"
           "                     [--max-new N] [--temperature T] [--top-k K] [--top-p P]\n"
           "                     [--stop ID1,ID2,...] [--seed N] [--no-cache]\n"
           "                     [--base-dtype fp32|bf16|nf4]\n";
    return 2;
  };
  if (args.empty() || args[0].rfind("--", 0) == 0) return usage();
  const std::filesystem::path model_dir = args[0];
  std::filesystem::path adapter_dir;
  std::optional<std::string> prompt_text, ids_text;
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
                                         "--top-p",   "--stop"};
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
    else if (flag == "--prompt")
      prompt_text = value;
    else if (flag == "--ids")
      ids_text = value;
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
  if (prompt_text && ids_text)
    throw io::ArgumentError("--prompt and --ids: expected one of them, found both");
  std::vector<std::int64_t> prompt;
  if (ids_text) {
    prompt = io::parse_integer_list(*ids_text, "--ids", {.min = 0});
  } else if (prompt_text) {
    if (prompt_text->empty())
      throw io::ArgumentError("--prompt: expected at least one byte, found ''");
    for (unsigned char c : *prompt_text)
      prompt.push_back(c);  // bytes: the byte-level models' tokens
  } else {
    err << "peft generate: error: expected a prompt (--prompt TEXT or --ids 1,2,3)\n";
    return usage();
  }

  const std::filesystem::path config_path = model_dir / "config.json";
  const nlohmann::json config_json = io::load_json(config_path);
  const ModelConfig config = ModelConfig::from_json(config_json, config_path.string());
  // Checked before any weight is allocated.
  for (std::size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= config.vocab_size)
      throw io::ArgumentError((ids_text ? "--ids item " : "--prompt byte ") +
                              std::to_string(i + 1) + ": expected a token id below the model's " +
                              "vocab_size " + std::to_string(config.vocab_size) + " (" +
                              config_path.string() + "), found " + std::to_string(prompt[i]));
  // Decoder::load checks the sizes against this machine's memory, then the checkpoint's header
  // against the config, before it allocates any weight.
  try {
    visit_arch_for(config.model_type, [&]<class Arch>() {
      if (adapter_dir.empty()) {
        auto model = Decoder<Arch, NoPeft, float>::load(model_dir, {}, 0, base);
        detail::print_generation(model, prompt, options, out);
        return;
      }
      const std::filesystem::path adapter_config = adapter_dir / "adapter_config.json";
      const nlohmann::json adapter_json = io::load_json(adapter_config);
      const bool known = Registry::visit_for(adapter_json, [&]<class Policy>() {
        auto model = Decoder<Arch, Policy, float>::load(
            model_dir,
            config_from_json<typename Policy::Config>(adapter_json, adapter_config.string()), 0,
            base);
        io::load_adapter_tensors(
            model.adapter().parameters(),
            io::SafetensorsFile::open(adapter_dir / "adapter_model.safetensors"));
        detail::print_generation(model, prompt, options, out);
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
