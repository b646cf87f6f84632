// Must NOT compile: two components that both supply prefix keys/values cannot share the
// attention's key/value site (Compose's static_assert says so). With
// PEFT_COMPILE_FAIL_CONTROL defined it composes prefix tuning with LoRA instead, which must
// compile: the control shows that only the composition rule breaks the build.
#include <peft/methods/additive/prefix_tuning.hpp>
#include <peft/methods/hybrid/compose.hpp>
#include <peft/methods/reparameterized/lora.hpp>
#include <peft/nn/decoder.hpp>

#ifdef PEFT_COMPILE_FAIL_CONTROL
using Composite = peft::Compose<peft::PrefixTuning, peft::LoRA>;
#else
using Composite = peft::Compose<peft::PrefixTuning, peft::PrefixTuning>;
#endif

int main() {
  peft::ModelConfig model;
  peft::Decoder<peft::arch::Llama, Composite, float> net(model);
  return 0;
}
