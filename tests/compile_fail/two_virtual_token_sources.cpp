// Must NOT compile: prompt tuning and P-tuning both prepend virtual tokens, and the decoder has
// one virtual-token site (Compose's static_assert says so). The control composes prompt tuning
// with an adapter, which must compile.
#include <peft/methods/additive/bottleneck_adapter.hpp>
#include <peft/methods/additive/p_tuning.hpp>
#include <peft/methods/additive/prompt_tuning.hpp>
#include <peft/methods/hybrid/compose.hpp>
#include <peft/nn/decoder.hpp>

#ifdef PEFT_COMPILE_FAIL_CONTROL
using Composite = peft::Compose<peft::PromptTuning, peft::SerialAdapter>;
#else
using Composite = peft::Compose<peft::PromptTuning, peft::PTuning>;
#endif

int main() {
  peft::ModelConfig model;
  peft::Decoder<peft::arch::Llama, Composite, float> net(model);
  return 0;
}
