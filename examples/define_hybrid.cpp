// A new hybrid PEFT method in a few lines: LoRA on the attention projections plus (IA)³ on the
// MLP, as one type. Each component contributes to the projections it adapts (in component
// order, so two may adapt the same module); Compose checks the composition at compile time, counts
// it from shapes, trains it, and saves it as one folder per component (each loadable on its own).
#include <cstdio>
#include <filesystem>
#include <peft/peft.hpp>

using LoraAttentionIa3Mlp = peft::Compose<peft::LoRA, peft::IA3>;  // the whole definition

int main() {
  peft::ModelConfig model;
  model.model_type = "llama";
  model.vocab_size = peft::data::TaskVocab::size;
  model.hidden_size = 32, model.num_layers = 2, model.num_heads = 4, model.num_kv_heads = 4;
  model.head_dim = 8, model.intermediate_size = 64, model.max_positions = 32;

  peft::LoraConfig lora;  // hyper-parameters are values
  lora.r = 4, lora.lora_alpha = 8;
  lora.targets.target_modules.names = {"q_proj", "k_proj", "v_proj", "o_proj"};
  peft::Ia3Config ia3;
  ia3.targets.target_modules.names = {"up_proj", "down_proj"};
  ia3.feedforward_modules.names = {"down_proj"};
  const LoraAttentionIa3Mlp::Config config{lora, ia3};

  const auto counted = peft::count_parameters<LoraAttentionIa3Mlp>(
      model, peft::linear_shapes<peft::arch::Llama>(model), config);
  peft::Decoder<peft::arch::Llama, LoraAttentionIa3Mlp, float> net(model, config, /*seed=*/1);

  const peft::data::TaskMixture task{
      {peft::data::TaskKind::Copy}, {.min_length = 1, .max_length = 4}, 0};
  peft::TrainerOptions options;
  options.max_steps = 30;
  options.adamw.lr = 2e-2;
  peft::Trainer trainer(net, options,
                        [&](std::mt19937_64& rng) { return task.train_batch(rng, 16); });
  const peft::TrainResult result = trainer.run();

  const auto dir = std::filesystem::temp_directory_path() / "peft_example_define_hybrid";
  peft::save_composite(dir, net);  // adapter_config.json + 0_lora/ + 1_ia3/
  std::printf("%lld trainable parameters; loss %.3f -> %.3f; saved to %s\n",
              static_cast<long long>(counted.trainable), result.losses.front(),
              result.losses.back(), dir.string().c_str());
  std::filesystem::remove_all(dir);
  return result.losses.back() < result.losses.front() ? 0 : 1;
}
