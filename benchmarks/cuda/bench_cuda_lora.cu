// GPU benchmarks (Google Benchmark, timed with CUDA events, manual time): the fused LoRA linear
// against the base GEMM and the unfused three-product form, and mixed-adapter batches against
// a per-adapter loop and the base GEMM. bf16 operands, fp32 accumulation throughout.
//
// Each benchmark iteration times kCallsPerIteration back-to-back calls between two events and
// reports their mean; repetitions give the median. Inputs are random and never zero (zeros
// run faster than real data on these GPUs). Like the peer script, no rotation of input sets:
// at 512 tokens the weight fits in L2 for both sides alike.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "peft/backend/cuda/gemm.cuh"
#include "peft/backend/cuda/lora_linear.cuh"
#include "peft/backend/cuda/memory.cuh"
#include "peft/backend/cuda/mixed_adapter.cuh"

namespace {

namespace pc = peft::cuda;
using pc::bf16;
using pc::DeviceBuffer;

constexpr int kCallsPerIteration = 10;

// Random values in ±[0.1, 1]·scale from a hash of the index: no host upload of large inputs.
template <class T>
__global__ void fill_random_kernel(T* out, std::int64_t n, std::uint32_t seed, float scale) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    const float magnitude = 0.1f + 0.9f * float(h & 0xFFFFFFu) / float(0xFFFFFF);
    out[i] = pc::from_float<T>(((h >> 24) & 1u ? -magnitude : magnitude) * scale);
  }
}

template <class T>
DeviceBuffer<T> random_buffer(std::int64_t n, std::uint32_t seed, float scale) {
  DeviceBuffer<T> buffer(n);
  fill_random_kernel<<<1024, 256>>>(buffer.data(), n, seed, scale);
  PEFT_CUDA_CHECK_LAUNCH("fill_random_kernel");
  return buffer;
}

// y += s·t elementwise (the add of the unfused form).
__global__ void add_scaled_kernel(bf16* y, const bf16* t, float s, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + s * __bfloat162float(t[i]));
}

// Events around kCallsPerIteration calls of `body`; the mean per call is the iteration's time.
template <class Body>
void time_with_events(benchmark::State& state, double flops_per_call, Body body) {
  cudaEvent_t start, stop;
  PEFT_CUDA_CHECK(cudaEventCreate(&start));
  PEFT_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) body();  // warm-up: handle, heuristics, clocks
  PEFT_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto _ : state) {
    PEFT_CUDA_CHECK(cudaEventRecord(start));
    for (int i = 0; i < kCallsPerIteration; ++i) body();
    PEFT_CUDA_CHECK(cudaEventRecord(stop));
    PEFT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    PEFT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(double(ms) / 1e3 / kCallsPerIteration);
  }
  PEFT_CUDA_CHECK(cudaGetLastError());
  state.counters["TFLOPs"] = benchmark::Counter(flops_per_call * double(state.iterations()) / 1e12,
                                                benchmark::Counter::kIsRate);
  PEFT_CUDA_CHECK(cudaEventDestroy(start));
  PEFT_CUDA_CHECK(cudaEventDestroy(stop));
}

constexpr std::int64_t kIn = 4096, kOut = 4096, kRank = 16;
constexpr float kScale = 2.f;

// The buffers every LoRA-linear variant uses, filled once per benchmark run.
struct LoraLinearData {
  pc::LoraLinearDims d;
  DeviceBuffer<bf16> x, x_aug, w, w_aug, a16, b16, y, h, t, gy, gy_aug, dx, gh;
  DeviceBuffer<float> a, b, da, db;

  explicit LoraLinearData(std::int64_t tokens)
      : d{tokens, kIn, kOut, kRank},
        x(random_buffer<bf16>(tokens * kIn, 1, 1.f)),
        x_aug(random_buffer<bf16>(tokens * d.x_ld(), 1, 1.f)),
        w(random_buffer<bf16>(kOut * kIn, 2, 1.f / 64)),
        w_aug(d.w_rows() * d.w_ld()),
        a16(random_buffer<bf16>(kRank * kIn, 3, 1.f / 64)),
        b16(random_buffer<bf16>(kOut * kRank, 4, 1.f / 64)),
        y(tokens * kOut),
        h(tokens * kRank),
        t(tokens * kOut),
        gy(random_buffer<bf16>(tokens * kOut, 5, 1.f)),
        gy_aug(random_buffer<bf16>(tokens * d.gy_ld(), 5, 1.f)),
        dx(tokens * kIn),
        gh(tokens * kRank),
        a(random_buffer<float>(kRank * kIn, 3, 1.f / 64)),
        b(random_buffer<float>(kOut * kRank, 4, 1.f / 64)),
        da(random_buffer<float>(kRank * kIn, 6, 1.f)),
        db(random_buffer<float>(kOut * kRank, 7, 1.f)) {
    pc::lora_pack_base(d, w.data(), w_aug.data());
    pc::lora_pack_adapter(d, a.data(), b.data(), kScale, w_aug.data());
    PEFT_CUDA_CHECK(cudaDeviceSynchronize());
  }

  double base_flops() const { return 2.0 * double(d.tokens) * kIn * kOut; }

  void base_forward(const pc::Cublas& blas) {
    pc::linear(blas, d.tokens, kIn, kOut, x.data(), w.data(), y.data());
  }
  void base_backward(const pc::Cublas& blas) {  // dx = gy W (W frozen: no dW)
    pc::gemm(blas, false, false, d.tokens, kIn, kOut, 1.f, gy.data(), kOut, w.data(), kIn, 0.f,
             dx.data(), kIn);
  }
  void fused_forward(const pc::Cublas& blas) {
    pc::lora_linear_forward(blas, d, x_aug.data(), w_aug.data(), y.data());
  }
  void fused_backward(const pc::Cublas& blas) {
    pc::lora_linear_backward(blas, d, x_aug.data(), w_aug.data(), gy_aug.data(), kScale, dx.data(),
                             0.f, da.data(), db.data());
  }
  // PyTorch's form: y = x Wᵀ + s·((x Aᵀ) Bᵀ), each product separate, [M, N] temporary t.
  void unfused_forward(const pc::Cublas& blas) {
    pc::linear(blas, d.tokens, kIn, kOut, x.data(), w.data(), y.data());
    pc::linear(blas, d.tokens, kIn, kRank, x.data(), a16.data(), h.data());
    pc::linear(blas, d.tokens, kRank, kOut, h.data(), b16.data(), t.data());
    add_scaled_kernel<<<4096, 256>>>(y.data(), t.data(), kScale, d.tokens * kOut);
    PEFT_CUDA_CHECK_LAUNCH("add_scaled_kernel");
  }
  // Its backward: gh = s·gy B, dB = s·gyᵀ h, dA = ghᵀ x, dx = gy W, dx += gh A (full-size pass).
  void unfused_backward(const pc::Cublas& blas) {
    pc::gemm(blas, false, false, d.tokens, kRank, kOut, kScale, gy.data(), kOut, b16.data(), kRank,
             0.f, gh.data(), kRank);
    pc::gemm(blas, true, false, kOut, kRank, d.tokens, kScale, gy.data(), kOut, h.data(), kRank,
             1.f, db.data(), kRank);
    pc::gemm(blas, true, false, kRank, kIn, d.tokens, 1.f, gh.data(), kRank, x.data(), kIn, 1.f,
             da.data(), kIn);
    base_backward(blas);
    pc::gemm(blas, false, false, d.tokens, kIn, kRank, 1.f, gh.data(), kRank, a16.data(), kIn, 1.f,
             dx.data(), kIn);
  }
};

// One cuBLAS handle for the whole run: creating one per benchmark run costs more than the run.
pc::Cublas& shared_cublas() {
  static pc::Cublas blas;
  return blas;
}

// FusedShrink and FusedProduct time the fused forward's two parts alone (the thin h = x Aᵀ, and
// the K + R deep product), so that its overhead over the base GEMM can be attributed.
enum class LoraVariant { Base, Fused, Unfused, FusedShrink, FusedProduct };

void BM_LoraLinear(benchmark::State& state, LoraVariant variant, bool backward) {
  const std::int64_t tokens = state.range(0);
  pc::Cublas& blas = shared_cublas();
  LoraLinearData data(tokens);
  const double flops = data.base_flops() * (backward ? 2.0 : 1.0);
  time_with_events(state, flops, [&] {
    switch (variant) {
      case LoraVariant::Base:
        data.base_forward(blas);
        if (backward) data.base_backward(blas);
        break;
      case LoraVariant::Fused:
        data.fused_forward(blas);
        if (backward) data.fused_backward(blas);
        break;
      case LoraVariant::Unfused:
        data.unfused_forward(blas);
        if (backward) data.unfused_backward(blas);
        break;
      case LoraVariant::FusedShrink:
        pc::gemm(blas, false, true, data.d.tokens, data.d.rank_padded(), kIn, 1.f,
                 data.x_aug.data(), data.d.x_ld(), data.w_aug.data() + kOut * data.d.w_ld(),
                 data.d.w_ld(), 0.f, data.x_aug.data() + kIn, data.d.x_ld());
        break;
      case LoraVariant::FusedProduct:
        pc::gemm(blas, false, true, data.d.tokens, kOut, data.d.x_ld(), 1.f, data.x_aug.data(),
                 data.d.x_ld(), data.w_aug.data(), data.d.w_ld(), 0.f, data.y.data(), kOut);
        break;
    }
  });
}

// Mixed-adapter batches: M rows, each with an adapter drawn from a stack of `adapters`.
struct MixedAdapterData {
  pc::MixedAdapterDims d;
  DeviceBuffer<bf16> x, w, a_stack, b_stack, y;
  DeviceBuffer<float> h;
  DeviceBuffer<bf16> h16;  // the loop's h: a bf16 product needs bf16 operands
  DeviceBuffer<std::int32_t> index;
  std::vector<std::int32_t> host_index;

  MixedAdapterData(std::int64_t rows, std::int64_t adapters)
      : d{rows, kIn, kOut, kRank, adapters},
        x(random_buffer<bf16>(rows * kIn, 11, 1.f)),
        w(random_buffer<bf16>(kOut * kIn, 12, 1.f / 64)),
        a_stack(random_buffer<bf16>(adapters * kRank * kIn, 13, 1.f / 64)),
        b_stack(random_buffer<bf16>(adapters * kOut * kRank, 14, 1.f / 64)),
        y(rows * kOut),
        h(rows * kRank),
        h16(rows * kRank),
        index(rows),
        host_index(static_cast<std::size_t>(rows)) {
    // Every adapter used when rows ≥ adapters (64 requests, 64 adapters: one each).
    for (std::int64_t i = 0; i < rows; ++i)
      host_index[i] = static_cast<std::int32_t>((i * 7 + 3) % adapters);
    index.upload(host_index);
    PEFT_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

enum class MixedVariant { Base, Kernel, PerAdapterLoop };

void BM_MixedAdapter(benchmark::State& state, MixedVariant variant) {
  const std::int64_t rows = state.range(0), adapters = state.range(1);
  pc::Cublas& blas = shared_cublas();
  MixedAdapterData data(rows, adapters);
  const auto& d = data.d;
  // The loop a framework runs today: per adapter, the rows that use it, two thin products.
  std::vector<std::vector<std::int64_t>> rows_of(static_cast<std::size_t>(adapters));
  for (std::int64_t i = 0; i < rows; ++i) rows_of[data.host_index[i]].push_back(i);
  time_with_events(state, 2.0 * double(rows) * kIn * kOut, [&] {
    switch (variant) {
      case MixedVariant::Base:
        pc::linear(blas, rows, kIn, kOut, data.x.data(), data.w.data(), data.y.data());
        break;
      case MixedVariant::Kernel:
        pc::mixed_adapter_linear(blas, nullptr, d, data.x.data(), data.w.data(),
                                 data.a_stack.data(), data.b_stack.data(), data.index.data(),
                                 kScale, data.h.data(), data.y.data());
        break;
      case MixedVariant::PerAdapterLoop:
        pc::linear(blas, rows, kIn, kOut, data.x.data(), data.w.data(), data.y.data());
        for (std::int64_t a = 0; a < adapters; ++a)
          for (std::int64_t i : rows_of[a]) {  // rows are scattered: one row at a time
            const bf16* xa = data.x.data() + i * kIn;
            const bf16* aa = data.a_stack.data() + a * kRank * kIn;
            const bf16* ba = data.b_stack.data() + a * kOut * kRank;
            pc::gemm(blas, false, true, 1, kRank, kIn, 1.f, xa, kIn, aa, kIn, 0.f,
                     data.h16.data() + i * kRank, kRank);
            pc::gemm(blas, false, true, 1, kOut, kRank, kScale, data.h16.data() + i * kRank, kRank,
                     ba, kRank, 1.f, data.y.data() + i * kOut, kOut);
          }
        break;
    }
  });
}

}  // namespace

#define PEFT_MIXED_BENCH(name, variant)             \
  BENCHMARK_CAPTURE(BM_MixedAdapter, name, variant) \
      ->Args({64, 64})                              \
      ->Args({1024, 32})                            \
      ->UseManualTime()                             \
      ->Unit(benchmark::kMicrosecond)               \
      ->MinTime(0.05)                               \
      ->Repetitions(3)                              \
      ->ReportAggregatesOnly(true)
PEFT_MIXED_BENCH(base, MixedVariant::Base);
PEFT_MIXED_BENCH(kernel, MixedVariant::Kernel);
PEFT_MIXED_BENCH(per_adapter_loop, MixedVariant::PerAdapterLoop);

// Registration: tokens 8192 and 512 for the LoRA linear; (rows, adapters) (64, 64), (1024, 32).
#define PEFT_LORA_BENCH(name, variant, backward)            \
  BENCHMARK_CAPTURE(BM_LoraLinear, name, variant, backward) \
      ->Arg(8192)                                           \
      ->Arg(512)                                            \
      ->UseManualTime()                                     \
      ->Unit(benchmark::kMicrosecond)                       \
      ->MinTime(0.05)                                       \
      ->Repetitions(3)                                      \
      ->ReportAggregatesOnly(true)
PEFT_LORA_BENCH(base_fwd, LoraVariant::Base, false);
PEFT_LORA_BENCH(fused_fwd, LoraVariant::Fused, false);
PEFT_LORA_BENCH(unfused_fwd, LoraVariant::Unfused, false);
PEFT_LORA_BENCH(base_fwdbwd, LoraVariant::Base, true);
PEFT_LORA_BENCH(fused_fwdbwd, LoraVariant::Fused, true);
PEFT_LORA_BENCH(unfused_fwdbwd, LoraVariant::Unfused, true);
PEFT_LORA_BENCH(fused_fwd_shrink_only, LoraVariant::FusedShrink, false);
PEFT_LORA_BENCH(fused_fwd_product_only, LoraVariant::FusedProduct, false);

int main(int argc, char** argv) {
  if (peft::cuda::device_count() == 0) {
    std::printf("no CUDA device: skipped (peft_cuda_bench needs a GPU)\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft_cuda_bench: %s\n", e.what());
    return 1;
  }
  benchmark::Shutdown();
  return 0;
}
