#pragma once
// Tensor<T, backend::Cuda>: a dense, row-major, contiguous tensor in device memory, the device
// counterpart of Tensor<T> (core/tensor.hpp): a shape and an owning DeviceBuffer. Move-only
// (a device copy is explicit: to_host / to_device), no arithmetic: the kernels in this folder
// work on its data().
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peft/backend/cuda/memory.cuh"
#include "peft/core/tensor.hpp"

namespace peft {

template <class T>
class Tensor<T, backend::Cuda> {
 public:
  Tensor() = default;
  /// Uninitialised device storage of the given shape.
  explicit Tensor(Shape shape) : shape_(std::move(shape)), data_(shape_numel(shape_)) {}
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  const Shape& shape() const { return shape_; }
  std::int64_t dim(std::size_t i) const { return shape_.at(i); }
  std::int64_t numel() const { return data_.size(); }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }

  /// A device copy of a host tensor.
  static Tensor to_device(const Tensor<T>& host) {
    Tensor out(host.shape());
    if (out.numel() > 0)
      PEFT_CUDA_CHECK(
          cudaMemcpy(out.data(), host.data(), out.data_.bytes(), cudaMemcpyHostToDevice));
    return out;
  }

  /// A host copy (waits for the device).
  Tensor<T> to_host() const {
    Tensor<T> out(shape_);
    if (numel() > 0)
      PEFT_CUDA_CHECK(cudaMemcpy(out.data(), data(), data_.bytes(), cudaMemcpyDeviceToHost));
    return out;
  }

 private:
  Shape shape_;
  cuda::DeviceBuffer<T> data_;
};

namespace cuda {

/// Tensor<T, backend::Cuda>::to_device as a free function: `auto d = cuda::to_device(host);`.
template <class T>
Tensor<T, backend::Cuda> to_device(const Tensor<T>& host) {
  return Tensor<T, backend::Cuda>::to_device(host);
}

}  // namespace cuda
}  // namespace peft
