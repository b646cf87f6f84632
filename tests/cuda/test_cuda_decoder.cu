// The GPU LoRA decoder (lora_decoder.cuh) against the CPU decoder: a tiny GPT-2 and a tiny
// LLaMA (awkward sizes, padding in the batch, random never-zero adapters, some projections not
// adapted), compared on logits, loss, every LoRA gradient and a 3-step AdamW trajectory; fp32
// tightly, bf16 loosely. The CPU side runs in double precision in cpu_reference.cpp.
#include <cmath>
#include <string>
#include <vector>

#include "cpu_reference.hpp"
#include "cuda_test_support.cuh"
#include "peft/backend/cuda/lora_decoder.cuh"
#include "peft/backend/cuda/tensor.cuh"

using namespace peft_cuda_test;
namespace pc = peft::cuda;

namespace {

struct Tolerances {
  double forward, grads, trained;
};

double relative_scalar(double got, double ref) {
  if (!std::isfinite(got)) return INFINITY;
  return std::abs(got - ref) / std::max(std::abs(ref), 1e-300);
}

template <class T>
void check_decoder(bool llama, const Tolerances& tol) {
  const std::uint32_t seed = fresh_seed();
  constexpr int kSteps = 3;
  const DecoderReference ref = decoder_reference(llama, seed, kSteps);
  pc::LoraDecoder<T> decoder(ref.spec);

  std::vector<float> logits;
  const float loss = decoder.forward(ref.batch, &logits);
  CHECK(relative_error(logits, ref.logits) < tol.forward);
  CHECK(relative_scalar(loss, ref.loss) < tol.forward);
  decoder.backward();
  const std::vector<pc::NamedHostTensor> grads = decoder.lora_gradients();
  REQUIRE(grads.size() == ref.grads.size());
  for (std::size_t i = 0; i < grads.size(); ++i) {
    CAPTURE(ref.grads[i].first);
    CHECK(grads[i].name == ref.grads[i].first);
    CHECK(relative_error(grads[i].values, ref.grads[i].second) < tol.grads);
  }

  // The trajectory starts from the same (untouched) parameters, as on the CPU.
  decoder.configure_adamw(ref.adamw);
  std::vector<double> losses;
  for (int step = 0; step <= kSteps; ++step) {
    losses.push_back(decoder.forward(ref.batch));
    if (step == kSteps) break;
    decoder.zero_grad();
    decoder.backward();
    decoder.optimizer_step();
  }
  peft_cuda_test::sync();
  REQUIRE(losses.size() == ref.train_losses.size());
  for (std::size_t i = 0; i < losses.size(); ++i) {
    CAPTURE(i);
    CHECK(relative_scalar(losses[i], ref.train_losses[i]) < tol.forward);
  }
  const std::vector<pc::NamedHostTensor> trained = decoder.lora_parameters();
  REQUIRE(trained.size() == ref.trained.size());
  for (std::size_t i = 0; i < trained.size(); ++i) {
    CAPTURE(ref.trained[i].first);
    CHECK(trained[i].name == ref.trained[i].first);
    CHECK(relative_error(trained[i].values, ref.trained[i].second) < tol.trained);
  }
}

// fp32 (no TF32): the differences are fp32 rounding and attention's fast exponential.
constexpr Tolerances kFp32{3e-5, 1e-4, 1e-4};
// bf16 operands and products: about three significant digits at each rounding point.
constexpr Tolerances kBf16{2e-2, 5e-2, 2e-2};

}  // namespace

PEFT_CUDA_CASE("cuda decoder: GPT-2 LoRA step in fp32 matches the CPU decoder") {
  check_decoder<float>(false, kFp32);
}

PEFT_CUDA_CASE(
    "cuda decoder: LLaMA (GQA, rotary, untied head, frozen k/gate) fp32 matches the CPU") {
  check_decoder<float>(true, kFp32);
}

PEFT_CUDA_CASE("cuda decoder: GPT-2 and LLaMA in bf16 stay within bf16 rounding of the CPU") {
  SUBCASE("gpt2") { check_decoder<bf16>(false, kBf16); }
  SUBCASE("llama") { check_decoder<bf16>(true, kBf16); }
}

PEFT_CUDA_CASE("cuda tensor: to_device / to_host round trip, shape kept") {
  std::mt19937 rng(fresh_seed());
  const std::vector<float> values = random_values(rng, 3 * 7 * 5);
  const peft::Tensor<float> host(peft::Shape{3, 7, 5}, values);
  const peft::Tensor<float, peft::backend::Cuda> device = pc::to_device(host);
  CHECK(device.shape() == host.shape());
  CHECK(device.numel() == 105);
  const peft::Tensor<float> back = device.to_host();
  CHECK(back.shape() == host.shape());
  CHECK(std::vector<float>(back.values().begin(), back.values().end()) == values);
}
