// `peft demo [GOLDEN_DIR]`: the README's first command until the study lands. Loads the
// reference GPT-2 checkpoint and LoRA adapter of the gpt2_lora golden case, trains the adapter
// for a few AdamW steps on the case's batch, prints the losses, and saves the adapter.
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <peft/io/parse_text.hpp>
#include <peft/peft.hpp>
#include <string>
#include <vector>

#include "commands.hpp"

namespace peft::cli {

int run_demo(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.size() > 1 || (!args.empty() && args[0].starts_with("--"))) {
    err << "usage: peft demo [GOLDEN_DIR]\n";
    return 2;
  }
  const std::filesystem::path golden = args.empty() ? "../shared/golden" : args[0];
  // The adapter is saved into the working folder: checked before any training.
  const std::filesystem::path saved = "demo-adapter";
  io::require_writable_dir(".", "the working folder (demo saves demo-adapter/ there)");
  const std::filesystem::path case_dir = golden / "gpt2_lora";
  if (!std::filesystem::exists(case_dir / "case.json")) {
    err << "peft demo: error: no golden case at " << case_dir.string()
        << " (pass the golden folder: peft demo PATH/TO/golden)\n";
    return 1;
  }
  const nlohmann::json adapter_json = io::load_json(case_dir / "adapter" / "adapter_config.json");
  const LoraConfig config =
      LoraConfig::from_json(adapter_json, (case_dir / "adapter" / "adapter_config.json").string());
  auto model = Decoder<arch::Gpt2, LoRA, float>::load(golden / "models" / "gpt2-tiny", config);
  io::load_adapter_tensors(
      model.adapter().parameters(),
      io::SafetensorsFile::open(case_dir / "adapter" / "adapter_model.safetensors"));
  const io::SafetensorsFile expected = io::SafetensorsFile::open(case_dir / "expected.safetensors");
  Batch batch;
  batch.batch = expected.info("input_ids").shape[0];
  batch.seq = expected.info("input_ids").shape[1];
  batch.input_ids = expected.read<std::int64_t>("input_ids");
  batch.attention_mask = expected.read<std::int64_t>("attention_mask");

  std::int64_t trainable = 0, total = 0;
  for (auto& p : model.trainable_parameters()) trainable += p.var.value().numel();
  for (auto& p : model.base_parameters()) total += p.var.value().numel();
  out << "gpt2-tiny + LoRA r=" << config.r << " on "
      << config.targets.target_modules.to_json().dump() << ": " << trainable << " trainable of "
      << total + trainable << " parameters\n";
  AdamW<float> optimizer(model.trainable_parameters(), AdamWOptions{.lr = 1e-2});
  const int steps = 10;
  for (int step = 0; step < steps; ++step) {
    Tape<float> tape;
    ForwardResult<float> result = model.forward(tape, batch);
    out << "step " << std::setw(2) << step << "  loss " << std::fixed << std::setprecision(5)
        << result.loss.value()[0] << '\n';
    optimizer.zero_grad();
    tape.backward(result.loss);
    optimizer.step();
  }
  io::save_adapter(saved, config.to_json(model.config()), model.adapter().parameters());
  out << "saved the trained adapter to " << saved.string() << "/\n";
  return 0;
}

}  // namespace peft::cli
