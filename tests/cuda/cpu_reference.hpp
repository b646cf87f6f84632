#pragma once
// The CPU decoder's results for test_cuda_decoder.cu, computed in a g++-compiled file
// (cpu_reference.cpp) so that the nvcc-compiled test needs none of the CPU library: only plain
// data crosses (model_spec.hpp).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peft/backend/cuda/model_spec.hpp"

namespace peft_cuda_test {

struct DecoderReference {
  peft::cuda::DeviceModelSpec spec;  ///< the model, every value exactly a float
  peft::cuda::DeviceBatch batch;     ///< padded
  peft::cuda::DeviceAdamW adamw;
  std::vector<double> logits;  ///< [B, T, V]
  double loss = 0;
  std::vector<std::pair<std::string, std::vector<double>>> grads;  ///< LoRA A, B per module
  std::vector<double> train_losses;  ///< before each AdamW step, then after the last
  std::vector<std::pair<std::string, std::vector<double>>> trained;  ///< after the steps
};

/// A tiny random GPT-2 (llama = false) or LLaMA decoder with random, never-zero LoRA adapters,
/// and the CPU decoder's results on it, computed in double precision from float-exact values.
DecoderReference decoder_reference(bool llama, std::uint32_t seed, int steps);

}  // namespace peft_cuda_test
