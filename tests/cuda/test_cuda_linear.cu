// CUDA products and PEFT kernels against double-precision CPU references: cuBLAS wrappers, the
// fused LoRA linear (forward, backward), mixed-adapter batches, DoRA's weight norm.
// Sizes are awkward on purpose (not multiples of any tile); inputs random and never zero;
// outputs poisoned with NaN before each run.
#include "cuda_test_support.cuh"
#include "peft/backend/cuda/dora.cuh"
#include "peft/backend/cuda/gemm.cuh"
#include "peft/backend/cuda/lora_linear.cuh"
#include "peft/backend/cuda/mixed_adapter.cuh"

using namespace peft_cuda_test;
namespace pc = peft::cuda;

namespace {

// Row-major reference: C [m, n] = op(A) op(B).
std::vector<double> reference_gemm(const std::vector<float>& a, bool trans_a,
                                   const std::vector<float>& b, bool trans_b, std::int64_t m,
                                   std::int64_t n, std::int64_t k) {
  std::vector<double> c(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (std::int64_t p = 0; p < k; ++p)
        acc += double(trans_a ? a[p * m + i] : a[i * k + p]) *
               double(trans_b ? b[j * k + p] : b[p * n + j]);
      c[i * n + j] = acc;
    }
  return c;
}

}  // namespace

PEFT_CUDA_CASE("cuda gemm: fp32 (no TF32) and bf16 with fp32 accumulation, every transpose") {
  std::mt19937 rng(fresh_seed());
  pc::Cublas blas;
  const std::int64_t m = 67, n = 45, k = 131;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const auto a = random_values(rng, m * k), b = random_values(rng, k * n);
      const auto c0 = random_values(rng, m * n);
      const std::int64_t lda = ta ? m : k, ldb = tb ? k : n;
      {  // fp32, beta = 1: C = A B + C0
        auto da = device_copy(a), db = device_copy(b), dc = device_copy(c0);
        pc::gemm(blas, ta, tb, m, n, k, 1.f, da.data(), lda, db.data(), ldb, 1.f, dc.data(), n);
        auto ref = reference_gemm(a, ta, b, tb, m, n, k);
        for (std::size_t i = 0; i < ref.size(); ++i) ref[i] += c0[i];
        CHECK(relative_error(dc.download(), ref) < 1e-6);
      }
      {  // bf16 operands, fp32 and bf16 results
        const auto a16 = to_bf16(a), b16 = to_bf16(b);
        auto da = device_copy(a16), db = device_copy(b16);
        DeviceBuffer<float> c32(m * n);
        DeviceBuffer<bf16> c16(m * n);
        c32.poison();
        c16.poison();
        pc::gemm(blas, ta, tb, m, n, k, 0.5f, da.data(), lda, db.data(), ldb, 0.f, c32.data(), n);
        pc::gemm(blas, ta, tb, m, n, k, 0.5f, da.data(), lda, db.data(), ldb, 0.f, c16.data(), n);
        auto ref = reference_gemm(round_bf16(a), ta, round_bf16(b), tb, m, n, k);
        for (double& v : ref) v *= 0.5;
        CHECK(relative_error(c32.download(), ref) < 1e-5);
        CHECK(relative_error(c16.download(), ref) < 8e-3);
      }
    }
}

namespace {

struct LoraCase {
  std::int64_t m, k, n, r;
  float scale;
};

struct LoraReference {
  std::vector<double> y, dx, da, db;
};

// y = x Wᵀ + s (x Aᵀ) Bᵀ; dx = gy W + s (gy B) A; dA += s (gy B)ᵀ x; dB += s gyᵀ (x Aᵀ).
LoraReference reference_lora(const LoraCase& c, const std::vector<float>& x,
                             const std::vector<float>& w, const std::vector<float>& a,
                             const std::vector<float>& b, const std::vector<float>& gy,
                             const std::vector<float>& da0, const std::vector<float>& db0) {
  const auto h = reference_gemm(x, false, a, true, c.m, c.r, c.k);     // [M, r]
  const auto gb = reference_gemm(gy, false, b, false, c.m, c.r, c.n);  // [M, r]
  LoraReference ref;
  ref.y = reference_gemm(x, false, w, true, c.m, c.n, c.k);
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.n; ++j) {
      double acc = 0;
      for (std::int64_t p = 0; p < c.r; ++p) acc += h[i * c.r + p] * b[j * c.r + p];
      ref.y[i * c.n + j] += c.scale * acc;
    }
  ref.dx = reference_gemm(gy, false, w, false, c.m, c.k, c.n);
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.k; ++j) {
      double acc = 0;
      for (std::int64_t p = 0; p < c.r; ++p) acc += gb[i * c.r + p] * a[p * c.k + j];
      ref.dx[i * c.k + j] += c.scale * acc;
    }
  ref.da.assign(da0.begin(), da0.end());
  for (std::int64_t p = 0; p < c.r; ++p)
    for (std::int64_t j = 0; j < c.k; ++j) {
      double acc = 0;
      for (std::int64_t i = 0; i < c.m; ++i) acc += gb[i * c.r + p] * x[i * c.k + j];
      ref.da[p * c.k + j] += c.scale * acc;
    }
  ref.db.assign(db0.begin(), db0.end());
  for (std::int64_t j = 0; j < c.n; ++j)
    for (std::int64_t p = 0; p < c.r; ++p) {
      double acc = 0;
      for (std::int64_t i = 0; i < c.m; ++i) acc += gy[i * c.n + j] * h[i * c.r + p];
      ref.db[j * c.r + p] += c.scale * acc;
    }
  return ref;
}

// Places rows of `values` [rows, cols] in a [rows, ld] buffer; the spare columns get NaN, which
// the op must overwrite before it reads them.
template <class T>
std::vector<T> padded(const std::vector<T>& values, std::int64_t rows, std::int64_t cols,
                      std::int64_t ld) {
  std::vector<T> out(static_cast<std::size_t>(rows * ld));
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < ld; ++j)
      out[i * ld + j] =
          j < cols ? values[i * cols + j] : T(std::numeric_limits<float>::quiet_NaN());
  return out;
}

template <class T>
void check_lora_linear(const LoraCase& c, double tolerance) {
  std::mt19937 rng(fresh_seed());
  pc::Cublas blas;
  const pc::LoraLinearDims d{c.m, c.k, c.n, c.r};
  // Scaled so that the low-rank term is as large as the base term: a wrong or missing low-rank
  // path cannot hide under the tolerance.
  auto x = random_values(rng, c.m * c.k), w = random_values(rng, c.n * c.k);
  const auto a = random_values(rng, c.r * c.k), b = random_values(rng, c.n * c.r);
  auto gy = random_values(rng, c.m * c.n);
  const auto da0 = random_values(rng, c.r * c.k), db0 = random_values(rng, c.n * c.r);
  if constexpr (std::is_same_v<T, bf16>) {
    x = round_bf16(x);
    w = round_bf16(w);
    gy = round_bf16(gy);
  }
  auto to_t = [](const std::vector<float>& v) {
    if constexpr (std::is_same_v<T, bf16>)
      return to_bf16(v);
    else
      return v;
  };
  auto dw = device_copy(to_t(w));
  auto dx_aug = device_copy(padded(to_t(x), c.m, c.k, d.x_ld()));
  auto dgy_aug = device_copy(padded(to_t(gy), c.m, c.n, d.gy_ld()));
  auto da = device_copy(a), db = device_copy(b);
  auto dda = device_copy(da0), ddb = device_copy(db0);
  DeviceBuffer<T> w_aug(d.w_rows() * d.w_ld()), y(c.m * c.n), dx(c.m * c.k);
  w_aug.poison();
  y.poison();
  dx.poison();
  pc::lora_pack_base(d, dw.data(), w_aug.data());
  pc::lora_pack_adapter(d, da.data(), db.data(), c.scale, w_aug.data());
  pc::lora_linear_forward(blas, d, dx_aug.data(), w_aug.data(), y.data());
  pc::lora_linear_backward(blas, d, dx_aug.data(), w_aug.data(), dgy_aug.data(), c.scale, dx.data(),
                           0.f, dda.data(), ddb.data());
  sync();
  const auto ref = reference_lora(c, x, w, a, b, gy, da0, db0);
  CHECK(relative_error(y.download(), ref.y) < tolerance);
  CHECK(relative_error(dx.download(), ref.dx) < tolerance);
  CHECK(relative_error(dda.download(), ref.da) < tolerance);
  CHECK(relative_error(ddb.download(), ref.db) < tolerance);
  // x itself is left as it was.
  const auto x_after = dx_aug.download();
  bool x_kept = true;
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.k; ++j)
      x_kept = x_kept && float(x_after[i * d.x_ld() + j]) == x[i * c.k + j];
  CHECK(x_kept);
}

}  // namespace

PEFT_CUDA_CASE("cuda lora_linear fp32: forward and backward against the CPU reference") {
  check_lora_linear<float>({333, 203, 157, 5, 1.7f}, 1e-5);
  check_lora_linear<float>({1, 17, 9, 1, 0.5f}, 1e-5);
}

PEFT_CUDA_CASE("cuda lora_linear bf16: bf16 operands, fp32 accumulation and adapter") {
  check_lora_linear<bf16>({333, 264, 200, 12, 2.f}, 1.5e-2);
  check_lora_linear<bf16>({77, 203, 157, 16, 0.25f}, 1.5e-2);
}

namespace {

template <class T>
void check_mixed_adapter(const pc::MixedAdapterDims& d, double tolerance) {
  std::mt19937 rng(fresh_seed());
  pc::Cublas blas;
  const float scale = 1.3f;
  auto x = random_values(rng, d.rows * d.in), w = random_values(rng, d.out * d.in);
  auto a = random_values(rng, d.adapters * d.rank * d.in);
  auto b = random_values(rng, d.adapters * d.out * d.rank);
  if constexpr (std::is_same_v<T, bf16>) {
    x = round_bf16(x);
    w = round_bf16(w);
    a = round_bf16(a);
    b = round_bf16(b);
  }
  std::vector<std::int32_t> index(static_cast<std::size_t>(d.rows));
  std::uniform_int_distribution<int> pick(-1, static_cast<int>(d.adapters) - 1);  // −1: none
  for (auto& i : index) i = pick(rng);
  auto to_t = [](const std::vector<float>& v) {
    if constexpr (std::is_same_v<T, bf16>)
      return to_bf16(v);
    else
      return v;
  };
  auto dx = device_copy(to_t(x)), dw = device_copy(to_t(w));
  auto da = device_copy(to_t(a)), db = device_copy(to_t(b));
  auto di = device_copy(index);
  DeviceBuffer<float> h(d.rows * d.rank);
  DeviceBuffer<T> y(d.rows * d.out);
  h.poison();
  y.poison();
  pc::mixed_adapter_linear(blas, nullptr, d, dx.data(), dw.data(), da.data(), db.data(), di.data(),
                           scale, h.data(), y.data());
  sync();
  auto ref = reference_gemm(x, false, w, true, d.rows, d.out, d.in);
  for (std::int64_t i = 0; i < d.rows; ++i) {
    if (index[i] < 0) continue;
    const float* ai = a.data() + index[i] * d.rank * d.in;
    const float* bi = b.data() + index[i] * d.out * d.rank;
    std::vector<double> hi(static_cast<std::size_t>(d.rank));
    for (std::int64_t p = 0; p < d.rank; ++p)
      for (std::int64_t j = 0; j < d.in; ++j) hi[p] += double(ai[p * d.in + j]) * x[i * d.in + j];
    for (std::int64_t n = 0; n < d.out; ++n) {
      double acc = 0;
      for (std::int64_t p = 0; p < d.rank; ++p) acc += bi[n * d.rank + p] * hi[p];
      ref[i * d.out + n] += scale * acc;
    }
  }
  CHECK(relative_error(y.download(), ref) < tolerance);
}

}  // namespace

PEFT_CUDA_CASE("cuda mixed-adapter batch: each row its own adapter (vector and scalar paths)") {
  check_mixed_adapter<bf16>({77, 264, 200, 16, 5}, 8e-3);  // 16-byte loads
  check_mixed_adapter<bf16>({31, 203, 157, 5, 3}, 8e-3);   // element loads
  check_mixed_adapter<float>({45, 204, 130, 4, 7}, 1e-5);
  check_mixed_adapter<float>({13, 203, 157, 3, 2}, 1e-5);
}

namespace {

template <class TW>
void check_dora_norm(std::int64_t out, std::int64_t in, std::int64_t r, double tolerance) {
  std::mt19937 rng(fresh_seed());
  const float scale = 0.8f;
  auto w = random_values(rng, out * in);
  if constexpr (std::is_same_v<TW, bf16>) w = round_bf16(w);
  const auto a = random_values(rng, r * in), b = random_values(rng, out * r);
  auto dw = [&] {
    if constexpr (std::is_same_v<TW, bf16>)
      return device_copy(to_bf16(w));
    else
      return device_copy(w);
  }();
  auto da = device_copy(a), db = device_copy(b);
  DeviceBuffer<float> norm(out);
  norm.poison();
  pc::dora_weight_norm(dw.data(), da.data(), db.data(), scale, norm.data(), out, in, r);
  sync();
  std::vector<double> ref(static_cast<std::size_t>(out));
  for (std::int64_t o = 0; o < out; ++o) {
    double sq = 0;
    for (std::int64_t i = 0; i < in; ++i) {
      double v = w[o * in + i];
      for (std::int64_t p = 0; p < r; ++p) v += double(scale) * b[o * r + p] * a[p * in + i];
      sq += v * v;
    }
    ref[o] = std::sqrt(sq);
  }
  CHECK(relative_error(norm.download(), ref) < tolerance);
}

}  // namespace

PEFT_CUDA_CASE("cuda DoRA weight norm: ‖W + s B A‖ per row, the update never formed") {
  check_dora_norm<float>(77, 203, 5, 1e-5);
  check_dora_norm<bf16>(13, 1000, 16, 1e-5);  // W already bf16: only fp32 rounding remains
}
