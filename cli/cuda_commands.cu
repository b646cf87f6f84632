// The CLI's CUDA entry points (cuda_commands.hpp): compiled by nvcc, so this file includes the
// CUDA decoder and none of the CPU library.
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <ostream>
#include <peft/backend/cuda/check.cuh>
#include <peft/backend/cuda/lora_decoder.cuh>

#include "cuda_commands.hpp"

namespace peft::cli::cuda_commands {

int device_count() { return peft::cuda::device_count(); }

std::string device_name() {
  if (device_count() == 0) return "";
  cudaDeviceProp prop{};
  PEFT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return prop.name;
}

namespace {

// total − free of the device, in MiB: the whole device's use (CUDA context, cuBLAS workspace and
// this process's buffers; other processes too, on a shared GPU).
double device_used_mb() {
  std::size_t free = 0, total = 0;
  PEFT_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return double(total - free) / (1024.0 * 1024.0);
}

template <class T>
int run_steps(const peft::cuda::DeviceModelSpec& spec, const peft::cuda::DeviceBatch& batch,
              const StepRun& run, std::ostream& out) {
  peft::cuda::LoraDecoder<T> decoder(spec);
  decoder.configure_adamw(run.adamw);
  std::vector<double> times;
  double peak_mb = device_used_mb();
  for (int i = 0; i < run.warmup + run.steps; ++i) {
    PEFT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto start = std::chrono::steady_clock::now();
    const float loss = decoder.forward(batch);  // waits for the loss: the step's forward is done
    decoder.zero_grad();
    decoder.backward();
    decoder.optimizer_step();
    PEFT_CUDA_CHECK(cudaDeviceSynchronize());
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    // Every buffer is allocated before the first step and none during one, so the use after a
    // step is the step's peak (up to cuBLAS-internal transients).
    peak_mb = std::max(peak_mb, device_used_mb());
    if (i >= run.warmup) times.push_back(ms);
    out << (i < run.warmup ? "warm-up" : "step") << ' ' << i << ": " << std::fixed
        << std::setprecision(2) << ms << " ms, loss " << std::setprecision(4) << loss << '\n';
  }
  std::sort(times.begin(), times.end());
  out << std::fixed << std::setprecision(1) << "decoder buffers " << std::setprecision(0)
      << double(decoder.device_bytes()) / (1024.0 * 1024.0)
      << " MiB; peak_mem_mb is the device's total - free (cudaMemGetInfo) after a step\n";
  out << std::setprecision(2) << "median_ms " << times[times.size() / 2] << " min_ms "
      << times.front() << " peak_mem_mb " << std::setprecision(0) << peak_mb << '\n';
  return 0;
}

}  // namespace

int bench_step(const peft::cuda::DeviceModelSpec& spec, const peft::cuda::DeviceBatch& batch,
               const StepRun& run, std::ostream& out) {
  if (run.bf16) return run_steps<peft::cuda::bf16>(spec, batch, run, out);
  return run_steps<float>(spec, batch, run, out);
}

LoraCaseResult run_lora_case(const peft::cuda::DeviceModelSpec& spec,
                             const peft::cuda::DeviceBatch& batch,
                             const peft::cuda::DeviceAdamW& adamw, int steps) {
  peft::cuda::LoraDecoder<float> decoder(spec);
  LoraCaseResult r;
  r.loss = decoder.forward(batch, &r.logits);
  decoder.backward();
  r.grads = decoder.lora_gradients();
  decoder.configure_adamw(adamw);
  for (int step = 0; step <= steps; ++step) {
    r.train_losses.push_back(decoder.forward(batch));
    if (step == steps) break;
    decoder.zero_grad();
    decoder.backward();
    decoder.optimizer_step();
  }
  r.trained = decoder.lora_parameters();
  return r;
}

}  // namespace peft::cli::cuda_commands
