// What fine-tuning a 7B model costs under several methods, from its shapes alone (no weights
// are allocated): the reference's print_trainable_parameters line for each.
#include <cstdio>
#include <peft/commands/count.hpp>
#include <peft/peft.hpp>

template <class Policy>
void report(const char* label, const peft::ModelConfig& model,
            const typename Policy::Config& config) {
  const auto shapes = peft::linear_shapes<peft::arch::Llama>(model);
  const peft::ParameterCount c = peft::count_parameters<Policy>(model, shapes, config);
  const std::int64_t all =
      peft::base_parameter_count<peft::arch::Llama>(model) + c.trainable + c.frozen;
  std::printf("%-26s %s\n", label, peft::trainable_parameters_line(c.trainable, all).c_str());
}

int main() {
  peft::ModelConfig llama7b;  // Llama-2-7B
  llama7b.model_type = "llama";
  llama7b.vocab_size = 32000, llama7b.hidden_size = 4096, llama7b.num_layers = 32;
  llama7b.num_heads = 32, llama7b.num_kv_heads = 32, llama7b.head_dim = 128;
  llama7b.intermediate_size = 11008, llama7b.max_positions = 4096,
  llama7b.tie_word_embeddings = false;
  llama7b.attention_bias = llama7b.mlp_bias = false;
  std::printf("full fine-tuning           %s\n",
              peft::with_thousands(peft::base_parameter_count<peft::arch::Llama>(llama7b)).c_str());

  peft::LoraConfig lora;  // the classic: r = 8 on q and v
  lora.r = 8;
  lora.targets.target_modules.names = {"q_proj", "v_proj"};
  report<peft::LoRA>("LoRA r=8 q,v", llama7b, lora);
  lora.r = 16;
  lora.targets.target_modules = {{}, {}, true};  // all-linear
  report<peft::LoRA>("LoRA r=16 all-linear", llama7b, lora);
  peft::DoraConfig dora{lora};
  report<peft::DoRA>("DoRA r=16 all-linear", llama7b, dora);
  report<peft::IA3>("IA3 (k, v, down)", llama7b, peft::Ia3Config{});
  peft::VeraConfig vera;
  vera.targets.target_modules.names = {"q_proj", "v_proj"};
  report<peft::VeRA>("VeRA r=256 q,v", llama7b, vera);
  peft::PrefixTuningConfig prefix;
  report<peft::PrefixTuning>("prefix tuning, 20 tokens", llama7b, prefix);
  return 0;
}
