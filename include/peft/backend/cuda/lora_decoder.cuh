#pragma once
// A decoder with LoRA adapters trained on the GPU: forward, loss, backward to the LoRA tensors,
// AdamW. GPT-2 (LayerNorm, learned positions, fused qkv, tanh-GELU MLP, biases, tied head) and
// LLaMA (RMSNorm, rotary positions, separate q/k/v with grouped-query heads, SiLU-gated MLP,
// tied or untied head), with the semantics of peft::Decoder<Arch, LoRA> on the CPU
// (include/peft/nn/decoder.hpp), which is its reference.
//
// Built from plain host data (model_spec.hpp), so that this header needs none of the CPU
// library; export_lora.hpp fills the spec from a CPU decoder.
//
// Precision. T is the storage type of the frozen weights and of every product's operands and
// outputs: float (fp32, no TF32: cuBLAS's pedantic compute type) or bf16 (fp32 accumulation).
// Whatever T, the residual stream and its gradient, the norms' statistics, attention (whose
// kernels are fp32 only), the loss, and the LoRA tensors, their gradients and AdamW moments are
// fp32. So in bf16 mode the rounding points are: a norm's output into a product, attention's
// output into the output projection, the MLP's hidden activations, the products' outputs and
// the logits.
//
// Every projection runs through the fused LoRA linear (lora_linear.cuh), whose contract is that
// its input x sits in a buffer with R spare columns per row (x_aug). The ops that feed a
// projection therefore write its input straight into that projection's own x_aug (the glue
// kernels below take a destination leading dimension), and the buffer is kept as the saved
// input for backward. Projections that read the same input (LLaMA's q, k, v and gate, up) each
// get their own copy, since each keeps its own h = x Aᵀ beside it. Likewise the gradients
// reaching a projection are written into its gy_aug with R spare columns.
//
// Memory: every buffer is allocated once per (batch, seq) shape (ensure_shape) and reused; a
// step allocates nothing. Frozen weights have no gradient buffers, and no product computes a
// frozen weight's gradient. Activations kept for backward, per layer: the block input and the
// post-attention residual (fp32), the norms' statistics, q, k, v, attention's output and
// log-sum-exp (fp32), each projection's x_aug (T), the MLP's pre-activations (T).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "peft/backend/cuda/activations.cuh"
#include "peft/backend/cuda/adamw.cuh"
#include "peft/backend/cuda/attention.cuh"
#include "peft/backend/cuda/check.cuh"
#include "peft/backend/cuda/cross_entropy.cuh"
#include "peft/backend/cuda/gemm.cuh"
#include "peft/backend/cuda/lora_linear.cuh"
#include "peft/backend/cuda/memory.cuh"
#include "peft/backend/cuda/model_spec.hpp"
#include "peft/backend/cuda/norms.cuh"

namespace peft::cuda {

// ---------------------------------------------------------------------------------------------
// Glue kernels: the decoder's element-wise steps that have no kernel of their own elsewhere.
// Each is a grid-stride loop; rows are [rows, cols] with an explicit leading dimension where the
// destination is an augmented operand.
namespace detail {

#define PEFT_GRID_STRIDE(i, total)                                                        \
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < (total); \
       i += std::int64_t(gridDim.x) * blockDim.x)

// out[r, :] = wte[ids[r], :] (+ wpe[r % seq, :]), fp32.
template <class T>
__global__ void embedding_forward_kernel(const std::int64_t* __restrict__ ids,
                                         const T* __restrict__ wte, const T* __restrict__ wpe,
                                         std::int64_t seq, std::int64_t rows, std::int64_t d,
                                         float* __restrict__ out) {
  PEFT_GRID_STRIDE(i, rows * d) {
    const std::int64_t r = i / d, c = i % d;
    float v = to_float(wte[ids[r] * d + c]);
    if (wpe) v += to_float(wpe[(r % seq) * d + c]);
    out[i] = v;
  }
}

// dst[r, c] (ld dst_ld) = src[r, c] (ld src_ld), converted.
template <class S, class D>
__global__ void copy_rows_kernel(const S* __restrict__ src, std::int64_t src_ld,
                                 D* __restrict__ dst, std::int64_t dst_ld, std::int64_t rows,
                                 std::int64_t cols) {
  PEFT_GRID_STRIDE(i, rows * cols) {
    const std::int64_t r = i / cols, c = i % cols;
    dst[r * dst_ld + c] = from_float<D>(to_float(src[r * src_ld + c]));
  }
}

// out = x + y + bias (bias may be null): the residual add after a projection.
template <class T>
__global__ void residual_add_kernel(const float* __restrict__ x, const T* __restrict__ y,
                                    const float* __restrict__ bias, float* __restrict__ out,
                                    std::int64_t rows, std::int64_t d) {
  PEFT_GRID_STRIDE(i, rows * d) out[i] = x[i] + to_float(y[i]) + (bias ? bias[i % d] : 0.f);
}

// One projection's output [rows, heads·D] (ld src_ld) + bias → fp32 [rows, heads·D], rotated
// (rotate-half form) when cos/sin tables [seq, D/2] are given. One thread per element pair.
template <class T>
__global__ void heads_forward_kernel(const T* __restrict__ src, std::int64_t src_ld,
                                     const float* __restrict__ bias, const float* __restrict__ cs,
                                     const float* __restrict__ sn, std::int64_t seq,
                                     std::int64_t rows, std::int64_t heads, std::int64_t D,
                                     float* __restrict__ dst) {
  const std::int64_t width = heads * D;
  if (!cs) {
    PEFT_GRID_STRIDE(i, rows * width) {
      const std::int64_t r = i / width, c = i % width;
      dst[i] = to_float(src[r * src_ld + c]) + (bias ? bias[c] : 0.f);
    }
    return;
  }
  const std::int64_t half = D / 2;
  PEFT_GRID_STRIDE(i, rows * heads * half) {
    const std::int64_t r = i / (heads * half), h = (i / half) % heads, j = i % half;
    const std::int64_t c1 = h * D + j, c2 = c1 + half;
    const float x1 = to_float(src[r * src_ld + c1]) + (bias ? bias[c1] : 0.f);
    const float x2 = to_float(src[r * src_ld + c2]) + (bias ? bias[c2] : 0.f);
    const std::int64_t t = r % seq;
    const float c = cs[t * half + j], s = sn[t * half + j];
    dst[r * width + c1] = x1 * c - x2 * s;
    dst[r * width + c2] = x2 * c + x1 * s;
  }
}

// The backward of heads_forward_kernel: g fp32 [rows, heads·D] rotated back (the transposed
// rotation) when tables are given, written as T into a projection's gy_aug (ld dst_ld).
template <class T>
__global__ void heads_backward_kernel(const float* __restrict__ g, const float* __restrict__ cs,
                                      const float* __restrict__ sn, std::int64_t seq,
                                      std::int64_t rows, std::int64_t heads, std::int64_t D,
                                      T* __restrict__ dst, std::int64_t dst_ld) {
  const std::int64_t width = heads * D;
  if (!cs) {
    PEFT_GRID_STRIDE(i, rows * width) {
      const std::int64_t r = i / width, c = i % width;
      dst[r * dst_ld + c] = from_float<T>(g[i]);
    }
    return;
  }
  const std::int64_t half = D / 2;
  PEFT_GRID_STRIDE(i, rows * heads * half) {
    const std::int64_t r = i / (heads * half), h = (i / half) % heads, j = i % half;
    const std::int64_t c1 = h * D + j, c2 = c1 + half;
    const float g1 = g[r * width + c1], g2 = g[r * width + c2];
    const std::int64_t t = r % seq;
    const float c = cs[t * half + j], s = sn[t * half + j];
    dst[r * dst_ld + c1] = from_float<T>(g1 * c + g2 * s);
    dst[r * dst_ld + c2] = from_float<T>(g2 * c - g1 * s);
  }
}

// GPT-2's MLP activation into the next projection's x_aug: out[r, c] (ld) = gelu(pre + b).
template <class T>
__global__ void gelu_forward_kernel(const T* __restrict__ pre, const float* __restrict__ bias,
                                    T* __restrict__ out, std::int64_t out_ld, std::int64_t rows,
                                    std::int64_t d) {
  PEFT_GRID_STRIDE(i, rows * d) {
    const std::int64_t r = i / d, c = i % d;
    const float z = to_float(pre[i]) + (bias ? bias[c] : 0.f);
    out[r * out_ld + c] = from_float<T>(activation_value<Activation::GeluTanh>(z));
  }
}

// Its backward into the first projection's gy_aug: dx[r, c] (ld) = dy · gelu'(pre + b).
template <class T>
__global__ void gelu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ pre,
                                     const float* __restrict__ bias, T* __restrict__ dx,
                                     std::int64_t dx_ld, std::int64_t rows, std::int64_t d) {
  PEFT_GRID_STRIDE(i, rows * d) {
    const std::int64_t r = i / d, c = i % d;
    const float z = to_float(pre[i]) + (bias ? bias[c] : 0.f);
    dx[r * dx_ld + c] =
        from_float<T>(to_float(dy[i]) * activation_derivative<Activation::GeluTanh>(z));
  }
}

// LLaMA's MLP: out[r, c] (ld) = silu(gate + bg) · (up + bu).
template <class T>
__global__ void swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                      const float* __restrict__ bg, const float* __restrict__ bu,
                                      T* __restrict__ out, std::int64_t out_ld, std::int64_t rows,
                                      std::int64_t d) {
  PEFT_GRID_STRIDE(i, rows * d) {
    const std::int64_t r = i / d, c = i % d;
    const float g = to_float(gate[i]) + (bg ? bg[c] : 0.f);
    const float u = to_float(up[i]) + (bu ? bu[c] : 0.f);
    out[r * out_ld + c] = from_float<T>(activation_value<Activation::Silu>(g) * u);
  }
}

// Its backward: dgate = dy · u · silu'(g), dup = dy · silu(g), each into its projection's gy_aug.
template <class T>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ gate,
                                       const T* __restrict__ up, const float* __restrict__ bg,
                                       const float* __restrict__ bu, T* __restrict__ dgate,
                                       std::int64_t dgate_ld, T* __restrict__ dup,
                                       std::int64_t dup_ld, std::int64_t rows, std::int64_t d) {
  PEFT_GRID_STRIDE(i, rows * d) {
    const std::int64_t r = i / d, c = i % d;
    const float g = to_float(gate[i]) + (bg ? bg[c] : 0.f);
    const float u = to_float(up[i]) + (bu ? bu[c] : 0.f);
    const float grad = to_float(dy[i]);
    dgate[r * dgate_ld + c] = from_float<T>(grad * u * activation_derivative<Activation::Silu>(g));
    dup[r * dup_ld + c] = from_float<T>(grad * activation_value<Activation::Silu>(g));
  }
}

#undef PEFT_GRID_STRIDE

// Kernel launches: each checked.
template <class S, class D>
void copy_rows(const S* src, std::int64_t src_ld, D* dst, std::int64_t dst_ld, std::int64_t rows,
               std::int64_t cols) {
  if (rows * cols <= 0) return;
  copy_rows_kernel<<<elementwise_blocks(rows * cols), 256>>>(src, src_ld, dst, dst_ld, rows, cols);
  PEFT_CUDA_CHECK_LAUNCH("copy_rows_kernel");
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------

/// The decoder on the device. T: float or bf16 (see the top of this file). Single stream (the
/// default one); not thread-safe. Usage per step: forward → backward → optimizer_step (after
/// configure_adamw once) → zero_grad.
template <class T>
class LoraDecoder {
 public:
  explicit LoraDecoder(const DeviceModelSpec& spec) : spec_shape_(shape_of(spec)) {
    const bool gpt2 = spec.arch == DeviceArch::Gpt2;
    const std::int64_t d = spec.hidden, qdim = spec.heads * spec.head_dim;
    const std::int64_t kvdim = spec.kv_heads * spec.head_dim, ff = spec.intermediate;
    if (spec.layers <= 0 || static_cast<std::int64_t>(spec.blocks.size()) != spec.layers)
      throw ConfigError("CUDA decoder: " + std::to_string(spec.blocks.size()) +
                        " blocks for a config of " + std::to_string(spec.layers) + " layers");
    if (spec.heads <= 0 || spec.kv_heads <= 0 || spec.heads % spec.kv_heads != 0 ||
        spec.head_dim <= 0 || spec.head_dim > 128)
      throw ConfigError("CUDA decoder: heads " + std::to_string(spec.heads) + ", kv heads " +
                        std::to_string(spec.kv_heads) + ", head_dim " +
                        std::to_string(spec.head_dim) +
                        ": needs kv heads | heads and head_dim <= 128 (the attention kernels)");
    if (!gpt2 &&
        static_cast<std::int64_t>(spec.rope_inverse_frequencies.size()) * 2 != spec.head_dim)
      throw ConfigError("CUDA decoder: LLaMA needs head_dim / 2 rotary frequencies");
    expect_size("token_embedding", spec.token_embedding, spec.vocab * d);
    token_embedding_ = upload_as_t(spec.token_embedding);
    if (gpt2) {
      expect_size("position_embedding", spec.position_embedding, spec.max_positions * d);
      position_embedding_ = upload_as_t(spec.position_embedding);
    }
    final_norm_w_ = upload_floats("final norm weight", spec.final_norm_weight, d);
    if (gpt2) final_norm_b_ = upload_floats("final norm bias", spec.final_norm_bias, d);
    if (!spec.tied_head) {
      expect_size("lm_head", spec.lm_head, spec.vocab * d);
      lm_head_ = upload_as_t(spec.lm_head);
    }
    // Expected (in, out) of each projection, in the block's site order.
    std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
    if (gpt2)
      shapes = {{d, qdim + 2 * kvdim}, {qdim, d}, {d, ff}, {ff, d}};
    else
      shapes = {{d, qdim}, {d, kvdim}, {d, kvdim}, {qdim, d}, {d, ff}, {d, ff}, {ff, d}};
    role_rank_.assign(shapes.size(), 0);
    for (const DeviceBlockSpec& bs : spec.blocks) {
      Layer layer;
      layer.norm1_w = upload_floats("attention norm weight", bs.attention_norm_weight, d);
      layer.norm2_w = upload_floats("mlp norm weight", bs.mlp_norm_weight, d);
      if (gpt2) {
        layer.norm1_b = upload_floats("attention norm bias", bs.attention_norm_bias, d);
        layer.norm2_b = upload_floats("mlp norm bias", bs.mlp_norm_bias, d);
      }
      if (bs.linears.size() != shapes.size())
        throw ConfigError("CUDA decoder: a block has " + std::to_string(bs.linears.size()) +
                          " projections, expected " + std::to_string(shapes.size()));
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        const DeviceLinearSpec& ls = bs.linears[i];
        if (ls.in != shapes[i].first || ls.out != shapes[i].second)
          throw ConfigError("CUDA decoder: " + ls.name + " is [" + std::to_string(ls.out) + ", " +
                            std::to_string(ls.in) + "], expected [" +
                            std::to_string(shapes[i].second) + ", " +
                            std::to_string(shapes[i].first) + "]");
        layer.linears.push_back(make_linear(ls));
        role_rank_[i] = std::max(role_rank_[i], layer.linears.back().rank_padded);
      }
      layers_.push_back(std::move(layer));
    }
    if (!gpt2) rope_inverse_frequencies_ = spec.rope_inverse_frequencies;
    dloss_ = DeviceBuffer<float>(1);
    dloss_.upload({1.f});  // d loss / d loss: the backward's seed
  }

  LoraDecoder(const LoraDecoder&) = delete;
  LoraDecoder& operator=(const LoraDecoder&) = delete;

  /// Forward on a batch; returns the loss (NaN when no label counts, as the CPU). With `logits`,
  /// also downloads them, [B, T, V] as fp32.
  float forward(const DeviceBatch& batch, std::vector<float>* logits = nullptr) {
    prepare_batch(batch);
    const std::int64_t M = rows_, d = spec_shape_.hidden;
    const bool gpt2 = spec_shape_.arch == DeviceArch::Gpt2;
    detail::embedding_forward_kernel<<<detail::elementwise_blocks(M * d), 256>>>(
        ids_.data(), token_embedding_.data(), gpt2 ? position_embedding_.data() : nullptr, seq_, M,
        d, residual_[0].data());
    PEFT_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
    for (std::size_t l = 0; l < layers_.size(); ++l) block_forward(l);

    // Final norm, head, loss.
    norm_forward(residual_.back().data(), final_norm_w_.data(), final_norm_b_.data(),
                 norm_out_.data(), final_mean_.data(), final_rstd_.data());
    const T* hf = head_input();
    gemm(blas_, false, true, M, spec_shape_.vocab, d, 1.f, hf, d, head_weight(), d, 0.f,
         logits_.data(), spec_shape_.vocab);
    cross_entropy_forward(logits_.data(), targets_.data(), M, spec_shape_.vocab, row_loss_.data(),
                          ce_lse_.data(), loss_.data(), count_.data());
    if (logits) {
      *logits = to_float_host(logits_.download());
    }
    float loss = 0.f;
    PEFT_CUDA_CHECK(cudaMemcpy(&loss, loss_.data(), sizeof(float), cudaMemcpyDeviceToHost));
    forward_done_ = true;
    return loss;
  }

  /// Backward from the last forward's loss: adds d loss / d A and d B into the LoRA gradients
  /// (which zero_grad clears). Consumes the logits (their gradient is formed in place).
  void backward() {
    if (!forward_done_) throw Error("CUDA decoder: backward() needs a forward() first");
    forward_done_ = false;
    const std::int64_t M = rows_, d = spec_shape_.hidden, V = spec_shape_.vocab;
    cross_entropy_backward(logits_.data(), targets_.data(), M, V, ce_lse_.data(), dloss_.data(),
                           count_.data(), logits_.data(), false);
    // d hf [M, d] = dlogits [M, V] · W_head [V, d]: fp32 out, straight into the norm's gradient.
    gemm(blas_, false, false, M, d, V, 1.f, logits_.data(), V, head_weight(), d, 0.f, dnorm_.data(),
         d);
    norm_backward(dnorm_.data(), residual_.back().data(), final_norm_w_.data(), final_mean_.data(),
                  final_rstd_.data(), grad_.data(), false);
    for (std::size_t l = layers_.size(); l-- > 0;) block_backward(l);
  }

  void zero_grad() {
    for (Layer& layer : layers_)
      for (Linear& lin : layer.linears)
        if (lin.rank > 0) {
          lin.da.set_zero();
          lin.db.set_zero();
        }
  }

  /// Sets up AdamW over every LoRA tensor (moments zero, step count 0).
  void configure_adamw(const DeviceAdamW& h) {
    std::vector<AdamWTensor> tensors;
    for (Layer& layer : layers_)
      for (Linear& lin : layer.linears)
        if (lin.rank > 0) {
          for (DeviceBuffer<float>* m : {&lin.ma, &lin.va, &lin.mb, &lin.vb}) m->set_zero();
          tensors.push_back(
              {lin.a.data(), lin.da.data(), lin.ma.data(), lin.va.data(), lin.a.size()});
          tensors.push_back(
              {lin.b.data(), lin.db.data(), lin.mb.data(), lin.vb.data(), lin.b.size()});
        }
    optimizer_ = std::make_unique<MultiTensorAdamW>(
        tensors, AdamWHyper{h.lr, h.beta1, h.beta2, h.eps, h.weight_decay});
  }

  /// One AdamW step on the LoRA tensors, then their rounding into the augmented weights.
  void optimizer_step() {
    if (!optimizer_) throw Error("CUDA decoder: optimizer_step() before configure_adamw()");
    optimizer_->step();
    for (Layer& layer : layers_)
      for (Linear& lin : layer.linears)
        if (lin.rank > 0)
          lora_pack_adapter(lin.dims, lin.a.data(), lin.b.data(), lin.scale, lin.w.data());
  }

  /// The LoRA tensors (A, B per adapted module, in the CPU decoder's parameter order).
  std::vector<NamedHostTensor> lora_parameters() const { return lora_tensors(false); }
  /// Their accumulated gradients.
  std::vector<NamedHostTensor> lora_gradients() const { return lora_tensors(true); }

  std::int64_t trainable_count() const {
    std::int64_t n = 0;
    for (const Layer& layer : layers_)
      for (const Linear& lin : layer.linears) n += lin.a.size() + lin.b.size();
    return n;
  }

  /// Bytes of device memory this decoder holds (weights, LoRA state, activation buffers); the
  /// CUDA context and cuBLAS's workspace come on top.
  std::size_t device_bytes() const { return bytes_; }

 private:
  struct Linear {
    std::string name, a_name, b_name;
    std::int64_t in = 0, out = 0;
    int rank = 0;
    std::int64_t rank_padded = 0;  // R: 0 when not adapted
    float scale = 0.f;
    LoraLinearDims dims;                 // adapted only
    DeviceBuffer<T> w;                   // adapted: w_aug [N + R, K + R]; else W [N, K]
    DeviceBuffer<float> bias;            // [N] or empty
    DeviceBuffer<float> a, b, da, db;    // fp32 A [r, K], B [N, r] and gradients
    DeviceBuffer<float> ma, va, mb, vb;  // AdamW moments
    DeviceBuffer<T> x;                   // saved input x_aug [M, K + R]
    std::int64_t x_ld() const { return in + rank_padded; }
    std::int64_t gy_ld() const { return out + rank_padded; }
    const float* bias_ptr() const { return bias.size() ? bias.data() : nullptr; }
  };

  struct Layer {
    std::vector<Linear> linears;
    DeviceBuffer<float> norm1_w, norm1_b, norm2_w, norm2_b;
    // Saved for backward (sized per batch shape):
    DeviceBuffer<float> mean1, rstd1, mean2, rstd2;
    DeviceBuffer<float> q, k, v, att, lse;  // fp32 attention inputs, output, row log-sum-exp
    DeviceBuffer<float> h;                  // residual after attention [M, d]
    DeviceBuffer<T> mlp_pre, mlp_up;        // fc (GPT-2) or gate (LLaMA) output; up (LLaMA)
  };

  // Roles: indices into Layer::linears.
  enum Gpt2Role { kQkv = 0, kAttnOut = 1, kFc = 2, kFc2 = 3 };
  enum LlamaRole { kQ = 0, kK = 1, kV = 2, kO = 3, kGate = 4, kUp = 5, kDown = 6 };

  struct ModelShape {
    DeviceArch arch;
    std::int64_t vocab, hidden, heads, kv_heads, head_dim, intermediate, max_positions;
    float eps;
    bool tied;
  };
  static ModelShape shape_of(const DeviceModelSpec& s) {
    return {s.arch,     s.vocab,        s.hidden,        s.heads,    s.kv_heads,
            s.head_dim, s.intermediate, s.max_positions, s.norm_eps, s.tied_head};
  }

  static void expect_size(const std::string& what, const std::vector<float>& v, std::int64_t n) {
    if (static_cast<std::int64_t>(v.size()) != n)
      throw ShapeError("CUDA decoder: " + what + " has " + std::to_string(v.size()) +
                       " values, expected " + std::to_string(n));
  }

  template <class U>
  DeviceBuffer<U> allocate(std::int64_t n) {
    DeviceBuffer<U> buffer(n);
    bytes_ += buffer.bytes();
    return buffer;
  }

  DeviceBuffer<float> upload_floats(const std::string& what, const std::vector<float>& v,
                                    std::int64_t n) {
    expect_size(what, v, n);
    DeviceBuffer<float> buffer = allocate<float>(n);
    buffer.upload(v);
    return buffer;
  }

  // fp32 host values → a T device buffer (converted on the device).
  DeviceBuffer<T> upload_as_t(const std::vector<float>& v) {
    const auto n = static_cast<std::int64_t>(v.size());
    DeviceBuffer<T> out = allocate<T>(n);
    if constexpr (std::is_same_v<T, float>) {
      out.upload(v);
    } else {
      DeviceBuffer<float> staging(n);
      staging.upload(v);
      detail::copy_rows(staging.data(), n, out.data(), n, 1, n);
      PEFT_CUDA_CHECK(cudaDeviceSynchronize());  // staging is freed on return
    }
    return out;
  }

  Linear make_linear(const DeviceLinearSpec& s) {
    Linear lin;
    lin.name = s.name;
    lin.in = s.in;
    lin.out = s.out;
    lin.rank = s.rank;
    expect_size(s.name + " weight", s.weight, s.in * s.out);
    if (!s.bias.empty()) lin.bias = upload_floats(s.name + " bias", s.bias, s.out);
    if (s.rank <= 0) {
      lin.w = upload_as_t(s.weight);
      return lin;
    }
    lin.a_name = s.lora_a_name;
    lin.b_name = s.lora_b_name;
    lin.scale = s.scale;
    lin.dims = LoraLinearDims{0, s.in, s.out, s.rank};
    lin.rank_padded = lin.dims.rank_padded();
    lin.a = upload_floats(s.name + " lora_A", s.lora_a, std::int64_t(s.rank) * s.in);
    lin.b = upload_floats(s.name + " lora_B", s.lora_b, s.out * s.rank);
    lin.da = allocate<float>(lin.a.size());
    lin.db = allocate<float>(lin.b.size());
    lin.da.set_zero();
    lin.db.set_zero();
    lin.ma = allocate<float>(lin.a.size());
    lin.va = allocate<float>(lin.a.size());
    lin.mb = allocate<float>(lin.b.size());
    lin.vb = allocate<float>(lin.b.size());
    lin.w = allocate<T>(lin.dims.w_rows() * lin.dims.w_ld());
    {
      DeviceBuffer<float> w32(s.in * s.out);
      w32.upload(s.weight);
      lora_pack_base(lin.dims, w32.data(), lin.w.data());
      lora_pack_adapter(lin.dims, lin.a.data(), lin.b.data(), lin.scale, lin.w.data());
      PEFT_CUDA_CHECK(cudaDeviceSynchronize());  // w32 is freed at the end of this scope
    }
    return lin;
  }

  // Buffers sized for B·T rows, allocated when the batch shape changes (and only then).
  void ensure_shape(std::int64_t batch, std::int64_t seq) {
    if (batch == batch_ && seq == seq_) return;
    batch_ = batch;
    seq_ = seq;
    rows_ = batch * seq;
    const std::int64_t M = rows_, d = spec_shape_.hidden, ff = spec_shape_.intermediate;
    const std::int64_t qdim = spec_shape_.heads * spec_shape_.head_dim;
    const std::int64_t kvdim = spec_shape_.kv_heads * spec_shape_.head_dim;
    const std::int64_t H = spec_shape_.heads;
    // Drop the old ones first so that peak memory is one shape's worth.
    residual_.clear();
    for (Layer& layer : layers_) {
      for (DeviceBuffer<float>* b :
           {&layer.mean1, &layer.rstd1, &layer.mean2, &layer.rstd2, &layer.q, &layer.k, &layer.v,
            &layer.att, &layer.lse, &layer.h})
        release(*b);
      release(layer.mlp_pre);
      release(layer.mlp_up);
      for (Linear& lin : layer.linears) release(lin.x);
    }
    for (DeviceBuffer<float>* b : {&norm_out_, &final_mean_, &final_rstd_, &grad_, &dnorm_, &datt_,
                                   &dq_, &dk_, &dv_, &delta_, &row_loss_, &ce_lse_})
      release(*b);
    for (DeviceBuffer<T>* b : {&proj_out_, &y_, &dx_, &head_in_, &logits_}) release(*b);
    for (DeviceBuffer<T>& b : gy_) release(b);

    for (std::size_t i = 0; i <= layers_.size(); ++i) residual_.push_back(allocate<float>(M * d));
    for (Layer& layer : layers_) {
      for (DeviceBuffer<float>* b : {&layer.mean1, &layer.rstd1, &layer.mean2, &layer.rstd2})
        *b = allocate<float>(M);
      layer.q = allocate<float>(M * qdim);
      layer.k = allocate<float>(M * kvdim);
      layer.v = allocate<float>(M * kvdim);
      layer.att = allocate<float>(M * qdim);
      layer.lse = allocate<float>(M * H);
      layer.h = allocate<float>(M * d);
      layer.mlp_pre = allocate<T>(M * ff);
      if (spec_shape_.arch == DeviceArch::Llama) layer.mlp_up = allocate<T>(M * ff);
      for (Linear& lin : layer.linears) lin.x = allocate<T>(M * lin.x_ld());
    }
    norm_out_ = allocate<float>(M * d);
    final_mean_ = allocate<float>(M);
    final_rstd_ = allocate<float>(M);
    proj_out_ = allocate<T>(M * (qdim + 2 * kvdim));
    y_ = allocate<T>(M * d);
    if constexpr (!std::is_same_v<T, float>) head_in_ = allocate<T>(M * d);
    logits_ = allocate<T>(M * spec_shape_.vocab);
    grad_ = allocate<float>(M * d);
    dnorm_ = allocate<float>(M * d);
    dx_ = allocate<T>(M * std::max({d, ff, qdim}));
    datt_ = allocate<float>(M * qdim);
    dq_ = allocate<float>(M * qdim);
    dk_ = allocate<float>(M * kvdim);
    dv_ = allocate<float>(M * kvdim);
    delta_ = allocate<float>(M * H);
    row_loss_ = allocate<float>(M);
    ce_lse_ = allocate<float>(M);
    if (loss_.size() == 0) {
      loss_ = allocate<float>(1);
      count_ = allocate<float>(1);
    }
    // One gradient buffer per projection role, wide enough for that role's largest rank.
    gy_.clear();
    const Layer& first = layers_.front();
    for (std::size_t role = 0; role < first.linears.size(); ++role)
      gy_.push_back(allocate<T>(M * (first.linears[role].out + role_rank_[role])));
    ids_ = DeviceBuffer<std::int64_t>(M);
    targets_ = DeviceBuffer<std::int64_t>(M);
    visible_ = DeviceBuffer<std::uint8_t>(M);
    if (spec_shape_.arch == DeviceArch::Llama) {
      // Rotary tables as the CPU op builds them (float angle, std::cos/std::sin), positions 0..T−1.
      const auto half = static_cast<std::int64_t>(rope_inverse_frequencies_.size());
      std::vector<float> cs(static_cast<std::size_t>(seq * half)), sn(cs.size());
      for (std::int64_t t = 0; t < seq; ++t)
        for (std::int64_t i = 0; i < half; ++i) {
          const float angle = static_cast<float>(t) * rope_inverse_frequencies_[std::size_t(i)];
          cs[static_cast<std::size_t>(t * half + i)] = std::cos(angle);
          sn[static_cast<std::size_t>(t * half + i)] = std::sin(angle);
        }
      rope_cos_ = DeviceBuffer<float>(seq * half);
      rope_sin_ = DeviceBuffer<float>(seq * half);
      rope_cos_.upload(cs);
      rope_sin_.upload(sn);
    }
  }

  template <class U>
  void release(DeviceBuffer<U>& b) {
    bytes_ -= b.bytes();
    b = DeviceBuffer<U>();
  }

  // Token ids, targets (labels shifted by one, −100 ignored) and key visibility, as the CPU
  // decoder derives them from a Batch.
  void prepare_batch(const DeviceBatch& b) {
    const std::int64_t n = b.batch * b.seq;
    if (b.batch <= 0 || b.seq <= 0 || static_cast<std::int64_t>(b.input_ids.size()) != n)
      throw ShapeError("CUDA decoder: input_ids has " + std::to_string(b.input_ids.size()) +
                       " entries, expected batch·seq = " + std::to_string(n));
    if (!b.attention_mask.empty() && static_cast<std::int64_t>(b.attention_mask.size()) != n)
      throw ShapeError("CUDA decoder: attention_mask size != batch·seq");
    if (!b.labels.empty() && static_cast<std::int64_t>(b.labels.size()) != n)
      throw ShapeError("CUDA decoder: labels size != batch·seq");
    if (spec_shape_.arch == DeviceArch::Gpt2 && b.seq > spec_shape_.max_positions)
      throw ShapeError("CUDA decoder: sequence of " + std::to_string(b.seq) +
                       " positions exceeds " + std::to_string(spec_shape_.max_positions));
    const std::int64_t V = spec_shape_.vocab;
    for (std::int64_t id : b.input_ids)
      if (id < 0 || id >= V)
        throw ShapeError("CUDA decoder: token id " + std::to_string(id) + " outside [0, " +
                         std::to_string(V) + ")");
    ensure_shape(b.batch, b.seq);
    std::vector<std::int64_t> targets(static_cast<std::size_t>(n), kIgnoreIndex);
    for (std::int64_t r = 0; r < b.batch; ++r)
      for (std::int64_t t = 0; t + 1 < b.seq; ++t) {
        const auto i = static_cast<std::size_t>(r * b.seq + t + 1);
        std::int64_t label;
        if (!b.labels.empty())
          label = b.labels[i];
        else
          label = (!b.attention_mask.empty() && b.attention_mask[i] == 0) ? kIgnoreIndex
                                                                          : b.input_ids[i];
        if (label != kIgnoreIndex && (label < 0 || label >= V))
          throw ShapeError("CUDA decoder: label " + std::to_string(label) + " outside [0, " +
                           std::to_string(V) + ")");
        targets[static_cast<std::size_t>(r * b.seq + t)] = label;
      }
    ids_.upload(b.input_ids);
    targets_.upload(targets);
    has_mask_ = !b.attention_mask.empty();
    if (has_mask_) {
      std::vector<std::uint8_t> visible(static_cast<std::size_t>(n));
      for (std::size_t i = 0; i < visible.size(); ++i) visible[i] = b.attention_mask[i] != 0;
      visible_.upload(visible);
    }
  }

  // --- building blocks -------------------------------------------------------------------

  void norm_forward(const float* x, const float* w, const float* b, float* y, float* mean,
                    float* rstd) {
    const std::int64_t M = rows_, d = spec_shape_.hidden;
    if (spec_shape_.arch == DeviceArch::Gpt2)
      layer_norm_forward(x, w, b, spec_shape_.eps, y, mean, rstd, M, d);
    else
      rms_norm_forward(x, w, spec_shape_.eps, y, rstd, M, d);
  }

  // dx (= or += with accumulate) from g; the norm's own parameters are frozen: no dw, db.
  void norm_backward(const float* g, const float* x, const float* w, const float* mean,
                     const float* rstd, float* dx, bool accumulate) {
    const std::int64_t M = rows_, d = spec_shape_.hidden;
    if (spec_shape_.arch == DeviceArch::Gpt2)
      layer_norm_backward(g, x, w, mean, rstd, dx, accumulate, nullptr, nullptr, M, d);
    else
      rms_norm_backward(g, x, w, rstd, dx, accumulate, nullptr, M, d);
  }

  // y [M, N] = x Wᵀ (+ s (x Aᵀ) Bᵀ), x in lin.x (ld x_ld). The bias is added by the consumer.
  void linear_forward(Linear& lin, T* y) {
    if (lin.rank > 0) {
      lin.dims.tokens = rows_;
      lora_linear_forward(blas_, lin.dims, lin.x.data(), lin.w.data(), y);
    } else {
      gemm(blas_, false, true, rows_, lin.out, lin.in, 1.f, lin.x.data(), lin.x_ld(), lin.w.data(),
           lin.in, 0.f, y, lin.out);
    }
  }

  // From gy (ld gy_ld, dy in the first N columns): dx [M, K] (= or += with beta 1; skipped when
  // null), and for an adapted projection dA, dB +=. No gradient for W or the bias: frozen.
  void linear_backward(Linear& lin, T* gy, T* dx, float dx_beta) {
    if (lin.rank > 0) {
      lin.dims.tokens = rows_;
      lora_linear_backward(blas_, lin.dims, lin.x.data(), lin.w.data(), gy, lin.scale, dx, dx_beta,
                           lin.da.data(), lin.db.data());
    } else if (dx) {
      gemm(blas_, false, false, rows_, lin.in, lin.out, 1.f, gy, lin.gy_ld(), lin.w.data(), lin.in,
           dx_beta, dx, lin.in);
    }
  }

  // Where a projection's dx lands when a fp32 consumer reads it: fp32 buffers directly for
  // T = float; the T scratch (converted afterwards by to_fp32) for bf16.
  T* dx_target(float* fp32_destination) {
    if constexpr (std::is_same_v<T, float>)
      return fp32_destination;
    else
      return dx_.data();
  }
  void to_fp32(float* fp32_destination, std::int64_t cols) {
    if constexpr (!std::is_same_v<T, float>)
      detail::copy_rows(dx_.data(), cols, fp32_destination, cols, rows_, cols);
    else
      static_cast<void>(fp32_destination), static_cast<void>(cols);
  }

  const T* head_weight() const {
    return spec_shape_.tied ? token_embedding_.data() : lm_head_.data();
  }
  const T* head_input() {
    if constexpr (std::is_same_v<T, float>) {
      return norm_out_.data();
    } else {
      detail::copy_rows(norm_out_.data(), spec_shape_.hidden, head_in_.data(), spec_shape_.hidden,
                        rows_, spec_shape_.hidden);
      return head_in_.data();
    }
  }

  AttentionDims attention_dims() const {
    AttentionDims a;
    a.batch = batch_;
    a.queries = seq_;
    a.keys = seq_;
    a.heads = spec_shape_.heads;
    a.kv_heads = spec_shape_.kv_heads;
    a.head_dim = spec_shape_.head_dim;
    a.causal = true;
    a.query_offset = 0;
    return a;
  }
  const std::uint8_t* key_visible() const { return has_mask_ ? visible_.data() : nullptr; }

  void heads_forward(const T* src, std::int64_t src_ld, const float* bias, bool rotate,
                     std::int64_t heads, float* dst) {
    const std::int64_t D = spec_shape_.head_dim;
    const std::int64_t work = rows_ * heads * (rotate ? D / 2 : D);
    detail::heads_forward_kernel<<<detail::elementwise_blocks(work), 256>>>(
        src, src_ld, bias, rotate ? rope_cos_.data() : nullptr, rotate ? rope_sin_.data() : nullptr,
        seq_, rows_, heads, D, dst);
    PEFT_CUDA_CHECK_LAUNCH("heads_forward_kernel");
  }
  void heads_backward(const float* g, bool rotate, std::int64_t heads, T* dst,
                      std::int64_t dst_ld) {
    const std::int64_t D = spec_shape_.head_dim;
    const std::int64_t work = rows_ * heads * (rotate ? D / 2 : D);
    detail::heads_backward_kernel<<<detail::elementwise_blocks(work), 256>>>(
        g, rotate ? rope_cos_.data() : nullptr, rotate ? rope_sin_.data() : nullptr, seq_, rows_,
        heads, D, dst, dst_ld);
    PEFT_CUDA_CHECK_LAUNCH("heads_backward_kernel");
  }

  void residual_add(const float* x, const T* y, const float* bias, float* out) {
    const std::int64_t n = rows_ * spec_shape_.hidden;
    detail::residual_add_kernel<<<detail::elementwise_blocks(n), 256>>>(x, y, bias, out, rows_,
                                                                        spec_shape_.hidden);
    PEFT_CUDA_CHECK_LAUNCH("residual_add_kernel");
  }

  // The norm output (norm_out_, fp32) into each listed projection's x_aug.
  void scatter_norm_output(Layer& layer, std::initializer_list<int> roles) {
    const std::int64_t d = spec_shape_.hidden;
    for (int role : roles) {
      Linear& lin = layer.linears[static_cast<std::size_t>(role)];
      detail::copy_rows(norm_out_.data(), d, lin.x.data(), lin.x_ld(), rows_, d);
    }
  }

  // --- one block ---------------------------------------------------------------------------

  void block_forward(std::size_t l) {
    Layer& L = layers_[l];
    const bool gpt2 = spec_shape_.arch == DeviceArch::Gpt2;
    const std::int64_t M = rows_, qdim = spec_shape_.heads * spec_shape_.head_dim;
    const std::int64_t kvdim = spec_shape_.kv_heads * spec_shape_.head_dim;
    const std::int64_t ff = spec_shape_.intermediate;
    const float* x = residual_[l].data();

    // Attention.
    norm_forward(x, L.norm1_w.data(), L.norm1_b.data(), norm_out_.data(), L.mean1.data(),
                 L.rstd1.data());
    if (gpt2) {
      Linear& qkv = L.linears[kQkv];
      scatter_norm_output(L, {kQkv});
      linear_forward(qkv, proj_out_.data());
      const std::int64_t ld = qdim + 2 * kvdim;
      const float* bias = qkv.bias_ptr();
      heads_forward(proj_out_.data(), ld, bias, false, spec_shape_.heads, L.q.data());
      heads_forward(proj_out_.data() + qdim, ld, bias ? bias + qdim : nullptr, false,
                    spec_shape_.kv_heads, L.k.data());
      heads_forward(proj_out_.data() + qdim + kvdim, ld, bias ? bias + qdim + kvdim : nullptr,
                    false, spec_shape_.kv_heads, L.v.data());
    } else {
      scatter_norm_output(L, {kQ, kK, kV});
      T* q_out = proj_out_.data();
      T* k_out = q_out + M * qdim;
      T* v_out = k_out + M * kvdim;
      linear_forward(L.linears[kQ], q_out);
      linear_forward(L.linears[kK], k_out);
      linear_forward(L.linears[kV], v_out);
      heads_forward(q_out, qdim, L.linears[kQ].bias_ptr(), true, spec_shape_.heads, L.q.data());
      heads_forward(k_out, kvdim, L.linears[kK].bias_ptr(), true, spec_shape_.kv_heads, L.k.data());
      heads_forward(v_out, kvdim, L.linears[kV].bias_ptr(), false, spec_shape_.kv_heads,
                    L.v.data());
    }
    attention_forward(attention_dims(), L.q.data(), L.k.data(), L.v.data(), key_visible(),
                      L.att.data(), L.lse.data());
    Linear& out = L.linears[gpt2 ? int(kAttnOut) : int(kO)];
    detail::copy_rows(L.att.data(), qdim, out.x.data(), out.x_ld(), M, qdim);
    linear_forward(out, y_.data());
    residual_add(x, y_.data(), out.bias_ptr(), L.h.data());

    // MLP.
    norm_forward(L.h.data(), L.norm2_w.data(), L.norm2_b.data(), norm_out_.data(), L.mean2.data(),
                 L.rstd2.data());
    Linear& down = L.linears[gpt2 ? int(kFc2) : int(kDown)];
    if (gpt2) {
      Linear& fc = L.linears[kFc];
      scatter_norm_output(L, {kFc});
      linear_forward(fc, L.mlp_pre.data());
      detail::gelu_forward_kernel<<<detail::elementwise_blocks(M * ff), 256>>>(
          L.mlp_pre.data(), fc.bias_ptr(), down.x.data(), down.x_ld(), M, ff);
      PEFT_CUDA_CHECK_LAUNCH("gelu_forward_kernel");
    } else {
      scatter_norm_output(L, {kGate, kUp});
      linear_forward(L.linears[kGate], L.mlp_pre.data());
      linear_forward(L.linears[kUp], L.mlp_up.data());
      detail::swiglu_forward_kernel<<<detail::elementwise_blocks(M * ff), 256>>>(
          L.mlp_pre.data(), L.mlp_up.data(), L.linears[kGate].bias_ptr(), L.linears[kUp].bias_ptr(),
          down.x.data(), down.x_ld(), M, ff);
      PEFT_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
    }
    linear_forward(down, y_.data());
    residual_add(L.h.data(), y_.data(), down.bias_ptr(), residual_[l + 1].data());
  }

  // grad_ holds d loss / d (block l's output) on entry and d loss / d (its input) on exit
  // (block 0 stops early: nothing upstream of it trains).
  void block_backward(std::size_t l) {
    Layer& L = layers_[l];
    const bool gpt2 = spec_shape_.arch == DeviceArch::Gpt2;
    const std::int64_t M = rows_, d = spec_shape_.hidden;
    const std::int64_t qdim = spec_shape_.heads * spec_shape_.head_dim;
    const std::int64_t kvdim = spec_shape_.kv_heads * spec_shape_.head_dim;
    const std::int64_t ff = spec_shape_.intermediate;
    auto gy = [&](int role) { return gy_[static_cast<std::size_t>(role)].data(); };

    // MLP: out = h + down(mlp(norm2(h))).
    const int down_role = gpt2 ? int(kFc2) : int(kDown);
    Linear& down = L.linears[static_cast<std::size_t>(down_role)];
    detail::copy_rows(grad_.data(), d, gy(down_role), down.gy_ld(), M, d);
    linear_backward(down, gy(down_role), dx_.data(), 0.f);  // d(mlp hidden) [M, ff]
    if (gpt2) {
      Linear& fc = L.linears[kFc];
      detail::gelu_backward_kernel<<<detail::elementwise_blocks(M * ff), 256>>>(
          dx_.data(), L.mlp_pre.data(), fc.bias_ptr(), gy(kFc), fc.gy_ld(), M, ff);
      PEFT_CUDA_CHECK_LAUNCH("gelu_backward_kernel");
      linear_backward(fc, gy(kFc), dx_target(dnorm_.data()), 0.f);
    } else {
      Linear& gate = L.linears[kGate];
      Linear& up = L.linears[kUp];
      detail::swiglu_backward_kernel<<<detail::elementwise_blocks(M * ff), 256>>>(
          dx_.data(), L.mlp_pre.data(), L.mlp_up.data(), gate.bias_ptr(), up.bias_ptr(), gy(kGate),
          gate.gy_ld(), gy(kUp), up.gy_ld(), M, ff);
      PEFT_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
      linear_backward(gate, gy(kGate), dx_target(dnorm_.data()), 0.f);
      linear_backward(up, gy(kUp), dx_target(dnorm_.data()), 1.f);
    }
    to_fp32(dnorm_.data(), d);
    norm_backward(dnorm_.data(), L.h.data(), L.norm2_w.data(), L.mean2.data(), L.rstd2.data(),
                  grad_.data(), true);  // grad_ = d loss / d h

    // Attention: h = x + out(attention(rope(q, k), v)).
    const int out_role = gpt2 ? int(kAttnOut) : int(kO);
    Linear& out = L.linears[static_cast<std::size_t>(out_role)];
    detail::copy_rows(grad_.data(), d, gy(out_role), out.gy_ld(), M, d);
    linear_backward(out, gy(out_role), dx_target(datt_.data()), 0.f);
    to_fp32(datt_.data(), qdim);
    attention_backward(attention_dims(), L.q.data(), L.k.data(), L.v.data(), key_visible(),
                       L.att.data(), L.lse.data(), datt_.data(), delta_.data(), dq_.data(),
                       dk_.data(), dv_.data(), false);
    // Block 0's input gradient would only reach the frozen embeddings: not formed.
    T* dx = l > 0 ? dx_target(dnorm_.data()) : nullptr;
    if (gpt2) {
      Linear& qkv = L.linears[kQkv];
      T* g = gy(kQkv);
      heads_backward(dq_.data(), false, spec_shape_.heads, g, qkv.gy_ld());
      heads_backward(dk_.data(), false, spec_shape_.kv_heads, g + qdim, qkv.gy_ld());
      heads_backward(dv_.data(), false, spec_shape_.kv_heads, g + qdim + kvdim, qkv.gy_ld());
      linear_backward(qkv, g, dx, 0.f);
    } else {
      heads_backward(dq_.data(), true, spec_shape_.heads, gy(kQ), L.linears[kQ].gy_ld());
      heads_backward(dk_.data(), true, spec_shape_.kv_heads, gy(kK), L.linears[kK].gy_ld());
      heads_backward(dv_.data(), false, spec_shape_.kv_heads, gy(kV), L.linears[kV].gy_ld());
      linear_backward(L.linears[kQ], gy(kQ), dx, 0.f);
      linear_backward(L.linears[kK], gy(kK), dx, 1.f);
      linear_backward(L.linears[kV], gy(kV), dx, 1.f);
    }
    if (l == 0) return;
    to_fp32(dnorm_.data(), d);
    norm_backward(dnorm_.data(), residual_[l].data(), L.norm1_w.data(), L.mean1.data(),
                  L.rstd1.data(), grad_.data(), true);  // grad_ = d loss / d x
  }

  std::vector<NamedHostTensor> lora_tensors(bool gradients) const {
    std::vector<NamedHostTensor> out;
    for (const Layer& layer : layers_)
      for (const Linear& lin : layer.linears)
        if (lin.rank > 0) {
          out.push_back({lin.a_name, (gradients ? lin.da : lin.a).download()});
          out.push_back({lin.b_name, (gradients ? lin.db : lin.b).download()});
        }
    return out;
  }

  static std::vector<float> to_float_host(const std::vector<T>& v) {
    if constexpr (std::is_same_v<T, float>) {
      return v;
    } else {
      std::vector<float> out(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
      return out;
    }
  }

  ModelShape spec_shape_;
  Cublas blas_;
  std::size_t bytes_ = 0;
  std::vector<float> rope_inverse_frequencies_;
  std::vector<std::int64_t> role_rank_;  // largest padded rank per projection role

  DeviceBuffer<T> token_embedding_, position_embedding_, lm_head_;
  DeviceBuffer<float> final_norm_w_, final_norm_b_;
  std::vector<Layer> layers_;

  std::int64_t batch_ = 0, seq_ = 0, rows_ = 0;
  bool has_mask_ = false, forward_done_ = false;
  DeviceBuffer<std::int64_t> ids_, targets_;
  DeviceBuffer<std::uint8_t> visible_;
  DeviceBuffer<float> rope_cos_, rope_sin_;
  std::vector<DeviceBuffer<float>> residual_;  // block inputs, then the last block's output
  DeviceBuffer<float> norm_out_, final_mean_, final_rstd_;
  DeviceBuffer<T> proj_out_, y_, head_in_, logits_;
  DeviceBuffer<float> row_loss_, ce_lse_, loss_, count_, dloss_;
  DeviceBuffer<float> grad_, dnorm_, datt_, dq_, dk_, dv_, delta_;
  DeviceBuffer<T> dx_;
  std::vector<DeviceBuffer<T>> gy_;  // per projection role
  std::unique_ptr<MultiTensorAdamW> optimizer_;
};

}  // namespace peft::cuda
