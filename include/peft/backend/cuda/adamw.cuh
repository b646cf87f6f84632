#pragma once
// Multi-tensor AdamW: one launch updates every trainable tensor, with torch.optim.AdamW's
// semantics as peft/train/optimizer.hpp has them (decoupled decay, bias correction, eps added
// after the square root of the corrected second moment):
//   p ← p · (1 − lr·wd)
//   m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
//   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
// Parameters, gradients and both moments are fp32. The tensor list is uploaded once (the set of
// trainable tensors is fixed for a run); each step is then one kernel with the step's scalars
// as arguments. Work is cut into fixed-size chunks so that a few large tensors and many small
// ones keep every multiprocessor busy alike.
#include <cmath>
#include <cstdint>
#include <vector>

#include "peft/backend/cuda/memory.cuh"

namespace peft::cuda {

/// One trainable tensor: device pointers, numel elements each.
struct AdamWTensor {
  float* param = nullptr;
  const float* grad = nullptr;
  float* exp_avg = nullptr;     ///< m
  float* exp_avg_sq = nullptr;  ///< v
  std::int64_t numel = 0;
};

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

namespace detail {

inline constexpr std::int64_t kAdamWChunk = 8192;

struct AdamWChunk {
  std::int32_t tensor;
  std::int64_t begin;
};

struct AdamWStepScalars {
  float lr, beta1, beta2, eps, decay, step_size, bc2_sqrt;
};

template <class Unused = void>
__global__ void adamw_multi_tensor_kernel(const AdamWTensor* __restrict__ tensors,
                                          const AdamWChunk* __restrict__ chunks,
                                          AdamWStepScalars s) {
  const AdamWChunk chunk = chunks[blockIdx.x];
  const AdamWTensor t = tensors[chunk.tensor];
  const std::int64_t end =
      chunk.begin + kAdamWChunk < t.numel ? chunk.begin + kAdamWChunk : t.numel;
  for (std::int64_t i = chunk.begin + threadIdx.x; i < end; i += blockDim.x) {
    const float g = t.grad[i];
    float p = t.param[i] * s.decay;
    const float m = s.beta1 * t.exp_avg[i] + (1.f - s.beta1) * g;
    const float v = s.beta2 * t.exp_avg_sq[i] + (1.f - s.beta2) * g * g;
    p -= s.step_size * m / (sqrtf(v) / s.bc2_sqrt + s.eps);
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    t.param[i] = p;
  }
}

}  // namespace detail

/// The optimizer over a fixed list of tensors. step() advances t and updates them all.
class MultiTensorAdamW {
 public:
  MultiTensorAdamW(const std::vector<AdamWTensor>& tensors, AdamWHyper hyper)
      : hyper_(hyper), tensors_(static_cast<std::int64_t>(tensors.size())) {
    std::vector<detail::AdamWChunk> chunks;
    for (std::size_t i = 0; i < tensors.size(); ++i)
      for (std::int64_t begin = 0; begin < tensors[i].numel; begin += detail::kAdamWChunk)
        chunks.push_back({static_cast<std::int32_t>(i), begin});
    chunks_ = DeviceBuffer<detail::AdamWChunk>(static_cast<std::int64_t>(chunks.size()));
    if (!tensors.empty()) tensors_.upload(tensors);
    if (!chunks.empty()) chunks_.upload(chunks);
  }

  std::int64_t step_count() const { return step_; }

  void step(cudaStream_t stream = nullptr) {
    ++step_;
    const double bc1 = 1.0 - std::pow(hyper_.beta1, double(step_));
    const double bc2 = 1.0 - std::pow(hyper_.beta2, double(step_));
    const detail::AdamWStepScalars s{float(hyper_.lr),
                                     float(hyper_.beta1),
                                     float(hyper_.beta2),
                                     float(hyper_.eps),
                                     float(1.0 - hyper_.lr * hyper_.weight_decay),
                                     float(hyper_.lr / bc1),
                                     float(std::sqrt(bc2))};
    if (chunks_.size() == 0) return;
    detail::adamw_multi_tensor_kernel<<<static_cast<unsigned>(chunks_.size()), 256, 0, stream>>>(
        tensors_.data(), chunks_.data(), s);
    PEFT_CUDA_CHECK_LAUNCH("adamw_multi_tensor_kernel");
  }

 private:
  AdamWHyper hyper_;
  std::int64_t step_ = 0;
  DeviceBuffer<AdamWTensor> tensors_;
  DeviceBuffer<detail::AdamWChunk> chunks_;
};

}  // namespace peft::cuda
