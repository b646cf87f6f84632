// The CPU reference of test_cuda_decoder.cu (see cpu_reference.hpp). Compiled by the host
// compiler: it includes the whole CPU library, which the nvcc-compiled tests do not.
#include "cpu_reference.hpp"

#include <peft/backend/cuda/export_lora.hpp>
#include <peft/peft.hpp>
#include <random>

namespace peft_cuda_test {

namespace {

// Sizes chosen to be awkward: no multiple of a tile, r padded, grouped-query heads (LLaMA).
peft::ModelConfig tiny_config(bool llama) {
  peft::ModelConfig c;
  c.model_type = llama ? "llama" : "gpt2";
  c.vocab_size = 97;
  c.hidden_size = 40;
  c.num_layers = 2;
  c.num_heads = 5;
  c.num_kv_heads = llama ? 1 : 5;
  c.head_dim = 8;
  c.intermediate_size = llama ? 56 : 72;
  c.max_positions = 16;
  c.norm_eps = llama ? 1e-6 : 1e-5;
  c.tie_word_embeddings = !llama;
  c.attention_bias = c.mlp_bias = !llama;
  return c;
}

peft::LoraConfig tiny_lora(bool llama) {
  peft::LoraConfig c;
  if (llama) {
    // k_proj and gate_proj stay frozen: the plain-product path beside adapted projections that
    // read the same input.
    c.r = 3;
    c.lora_alpha = 5;
    c.use_rslora = true;
    c.targets.target_modules.names = {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"};
  } else {
    c.r = 5;
    c.lora_alpha = 7;
    c.targets.target_modules.names = {"c_attn", "c_proj", "c_fc"};  // c_proj: both of them
  }
  return c;
}

template <class Arch>
DecoderReference run(bool llama, std::uint32_t seed, int steps) {
  using peft::Tape;
  using Model = peft::Decoder<Arch, peft::LoRA, double>;
  Model model(tiny_config(llama), tiny_lora(llama), seed);
  std::mt19937 rng(seed + 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  auto signed_value = [&](double lo, double hi) {
    const double v = lo + (hi - lo) * unit(rng);
    return unit(rng) < 0.5 ? -v : v;
  };
  // Every value a float (the device gets floats), nothing zero: biases and norm parameters
  // random (they start at 0 and 1), LoRA B random (it starts at 0).
  for (peft::NamedParameter<double>& p : model.base_parameters()) {
    auto& t = p.var.value();
    const bool vector = t.shape().size() == 1;
    const bool bias = p.name.ends_with(".bias");
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      double v = t[i];
      if (vector) v = bias ? signed_value(0.02, 0.2) : 1.0 + signed_value(0.0, 0.3);
      t[i] = static_cast<double>(static_cast<float>(v));
    }
  }
  for (peft::NamedParameter<double>& p : model.adapter().parameters()) {
    auto& t = p.var.value();
    const bool is_b = p.name.ends_with("lora_B.weight");
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const double v = is_b ? signed_value(0.05, 0.3) : t[i] + signed_value(0.01, 0.05);
      t[i] = static_cast<double>(static_cast<float>(v));
    }
  }

  DecoderReference ref;
  ref.spec = peft::cuda::export_lora_model(model);
  peft::Batch batch;
  batch.batch = 3;
  batch.seq = 13;
  std::uniform_int_distribution<std::int64_t> token(0, 96);
  for (std::int64_t i = 0; i < batch.batch * batch.seq; ++i) batch.input_ids.push_back(token(rng));
  // Row 0 full, row 1 padded by 4, row 2 a single token (its padded queries see one key).
  for (std::int64_t b = 0; b < batch.batch; ++b)
    for (std::int64_t t = 0; t < batch.seq; ++t)
      batch.attention_mask.push_back(t < (b == 0 ? 13 : b == 1 ? 9 : 1) ? 1 : 0);
  ref.batch = peft::cuda::device_batch(batch);

  {
    Tape<double> tape;
    peft::ForwardResult<double> out = model.forward(tape, batch);
    ref.logits.assign(out.logits.value().values().begin(), out.logits.value().values().end());
    ref.loss = out.loss.value()[0];
    tape.backward(out.loss);
    for (peft::NamedParameter<double>& p : model.trainable_parameters())
      ref.grads.emplace_back(
          p.name, std::vector<double>(p.var.grad().values().begin(), p.var.grad().values().end()));
  }
  peft::AdamWOptions options;
  options.lr = ref.adamw.lr;
  options.beta1 = ref.adamw.beta1;
  options.beta2 = ref.adamw.beta2;
  options.eps = ref.adamw.eps;
  options.weight_decay = ref.adamw.weight_decay;
  peft::AdamW<double> optimizer(model.trainable_parameters(), options);
  for (int step = 0; step <= steps; ++step) {
    Tape<double> tape(step < steps);
    peft::ForwardResult<double> out = model.forward(tape, batch);
    ref.train_losses.push_back(out.loss.value()[0]);
    if (step == steps) break;
    optimizer.zero_grad();
    tape.backward(out.loss);
    optimizer.step();
  }
  for (peft::NamedParameter<double>& p : model.trainable_parameters())
    ref.trained.emplace_back(
        p.name, std::vector<double>(p.var.value().values().begin(), p.var.value().values().end()));
  return ref;
}

}  // namespace

DecoderReference decoder_reference(bool llama, std::uint32_t seed, int steps) {
  return llama ? run<peft::arch::Llama>(true, seed, steps)
               : run<peft::arch::Gpt2>(false, seed, steps);
}

}  // namespace peft_cuda_test
