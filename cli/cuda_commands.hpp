#pragma once
// The CLI's entry points into the CUDA backend, as plain C++ declarations: the definitions are in
// cuda_commands.cu (compiled by nvcc, linked into bin/peft when the build has CUDA), and the
// callers (bench_step.hpp, parity.hpp, compiled by the host compiler) call them only
// `#if defined(PEFT_WITH_CUDA)`. Only model_spec.hpp's plain data crosses.
#include <iosfwd>
#include <peft/backend/cuda/model_spec.hpp>
#include <string>
#include <vector>

namespace peft::cli::cuda_commands {

/// Usable CUDA devices (0 without a driver or a GPU; never throws).
int device_count();
/// "NVIDIA H100 80GB HBM3" etc. for device 0 ("" when there is none).
std::string device_name();

struct StepRun {
  bool bf16 = true;  ///< frozen weights and products in bf16; else fp32 (no TF32)
  int warmup = 2, steps = 5;
  peft::cuda::DeviceAdamW adamw{1e-3, 0.9, 0.999, 1e-8, 0.01};  ///< torch.optim.AdamW(lr=1e-3)
};

/// Times LoRA training steps (forward, loss, backward, AdamW) of `spec` on the GPU: one line per
/// step, then `median_ms X min_ms Y peak_mem_mb Z`. Returns the exit status.
int bench_step(const peft::cuda::DeviceModelSpec& spec, const peft::cuda::DeviceBatch& batch,
               const StepRun& run, std::ostream& out);

/// What a golden LoRA case compares, computed on the GPU in fp32.
struct LoraCaseResult {
  std::vector<float> logits;  ///< [B, T, V]
  float loss = 0;
  std::vector<peft::cuda::NamedHostTensor> grads;    ///< LoRA A, B per module, parameter order
  std::vector<float> train_losses;                   ///< before each step, then after the last
  std::vector<peft::cuda::NamedHostTensor> trained;  ///< after the steps
};

/// Forward + backward on `batch`, then `steps` AdamW steps on the same batch (gradients zeroed
/// between steps), as testing::run_golden_case does on the CPU.
LoraCaseResult run_lora_case(const peft::cuda::DeviceModelSpec& spec,
                             const peft::cuda::DeviceBatch& batch,
                             const peft::cuda::DeviceAdamW& adamw, int steps);

}  // namespace peft::cli::cuda_commands
