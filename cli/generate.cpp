// `peft generate MODEL_DIR [--adapter DIR] (--prompt TEXT | --ids 1,2,3) [--max-new N]
//                [--temperature T] [--top-k K] [--seed N]`
// Continues a prompt with a model folder (config.json + model.safetensors: a reference
// checkpoint, or the base `peft study` caches), optionally with an adapter folder applied.
// Byte-level models (vocabulary 256, as the study's text base) take and print text; others take
// and print token ids.
#include <filesystem>
#include <iostream>
#include <peft/data/text.hpp>
#include <peft/generate.hpp>
#include <peft/peft.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "commands.hpp"

namespace peft::cli {

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

int run_generate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  const auto usage = [&] {
    err << "usage: peft generate MODEL_DIR [--adapter DIR] (--prompt TEXT | --ids 1,2,3)\n"
           "                     [--max-new N] [--temperature T] [--top-k K] [--seed N]\n";
    return 2;
  };
  if (args.empty() || args[0].rfind("--", 0) == 0) return usage();
  const std::filesystem::path model_dir = args[0];
  std::filesystem::path adapter_dir;
  std::string prompt_text, ids_text;
  GenerateOptions options;
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (i + 1 >= args.size()) return usage();
    const std::string& value = args[++i];
    if (flag == "--adapter")
      adapter_dir = value;
    else if (flag == "--prompt")
      prompt_text = value;
    else if (flag == "--ids")
      ids_text = value;
    else if (flag == "--max-new")
      options.max_new_tokens = std::stoll(value);
    else if (flag == "--temperature")
      options.temperature = std::stod(value);
    else if (flag == "--top-k")
      options.top_k = std::stoi(value);
    else if (flag == "--seed")
      options.seed = std::stoull(value);
    else
      return usage();
  }
  std::vector<std::int64_t> prompt;
  if (!ids_text.empty()) {
    std::stringstream in(ids_text);
    std::string item;
    while (std::getline(in, item, ',')) prompt.push_back(std::stoll(item));
  } else {
    for (unsigned char c : prompt_text)
      prompt.push_back(c);  // bytes: the byte-level models' tokens
  }
  if (prompt.empty()) return usage();

  const nlohmann::json config_json = io::load_json(model_dir / "config.json");
  const ModelConfig config =
      ModelConfig::from_json(config_json, (model_dir / "config.json").string());
  visit_arch_for(config.model_type, [&]<class Arch>() {
    if (adapter_dir.empty()) {
      auto model = Decoder<Arch, NoPeft, float>::load(model_dir);
      detail::print_generation(model, prompt, options, out);
      return;
    }
    const std::filesystem::path adapter_config = adapter_dir / "adapter_config.json";
    const nlohmann::json adapter_json = io::load_json(adapter_config);
    const bool known = visit_policy_for(adapter_json, [&]<class Policy>() {
      auto model = Decoder<Arch, Policy, float>::load(
          model_dir,
          config_from_json<typename Policy::Config>(adapter_json, adapter_config.string()));
      io::load_adapter_tensors(
          model.adapter().parameters(),
          io::SafetensorsFile::open(adapter_dir / "adapter_model.safetensors"));
      detail::print_generation(model, prompt, options, out);
    });
    if (!known)
      throw ConfigError(adapter_config.string() + ": peft_type '" +
                        adapter_json.value("peft_type", std::string("?")) + "' cannot be loaded");
  });
  return 0;
}

}  // namespace peft::cli
