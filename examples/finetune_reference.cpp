// Fine-tune a reference checkpoint with a reference adapter config, then save an adapter the
// reference stack loads (adapter_config.json + adapter_model.safetensors, its key names), and
// check that loading it back reproduces the trained model's logits.
// Usage: example_finetune_reference GOLDEN_DIR   (GOLDEN_DIR/models/gpt2-tiny, gpt2_lora/)
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <peft/data/tasks.hpp>
#include <peft/peft.hpp>
#include <peft/train/trainer.hpp>

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: %s GOLDEN_DIR\n", argv[0]), 2;
  const std::filesystem::path golden = argv[1],
                              config_file = golden / "gpt2_lora/adapter/adapter_config.json";
  const peft::LoraConfig config =
      peft::LoraConfig::from_json(peft::io::load_json(config_file), config_file.string());
  using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;
  Model model = Model::load(golden / "models/gpt2-tiny", config, /*seed=*/0);

  // Any token ids below the vocabulary work: a synthetic task stands in for real data.
  const peft::data::TaskMixture task{
      {peft::data::TaskKind::Sort}, {.min_length = 2, .max_length = 6}, 0};
  peft::TrainerOptions options;
  options.max_steps = 25;
  options.adamw.lr = 1e-2;
  peft::Trainer trainer(model, options,
                        [&](std::mt19937_64& rng) { return task.train_batch(rng, 8); });
  const peft::TrainResult result = trainer.run();
  std::printf("loss %.4f -> %.4f over %lld steps\n", result.losses.front(), result.losses.back(),
              static_cast<long long>(result.steps));

  const std::filesystem::path saved = "finetuned-gpt2-lora";
  peft::io::save_adapter(saved, config.to_json(model.config()), model.adapter().parameters());
  Model reloaded = Model::load(golden / "models/gpt2-tiny", config, /*seed=*/1);
  peft::io::load_adapter_tensors(
      reloaded.adapter().parameters(),
      peft::io::SafetensorsFile::open(saved / "adapter_model.safetensors"));
  std::mt19937_64 rng(5);
  const peft::Batch probe = task.train_batch(rng, 2);
  const peft::Tensor<float> a = model.logits(probe), b = reloaded.logits(probe);
  const bool same = a.values() == b.values();
  std::printf("saved %s/ (adapter_config.json, adapter_model.safetensors); reload %s\n",
              saved.string().c_str(), same ? "reproduces the logits" : "DIFFERS");
  return same && result.losses.back() < result.losses.front() ? 0 : 1;
}
