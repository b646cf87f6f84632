// CUDA training ops against double-precision CPU references: LayerNorm, RMSNorm, bias +
// GELU/SiLU, cross-entropy, fused attention (causal, key padding, grouped-query, prefix
// offset), multi-tensor AdamW. Awkward sizes, random never-zero inputs, NaN-poisoned outputs.
#include "cuda_test_support.cuh"
#include "peft/backend/cuda/activations.cuh"
#include "peft/backend/cuda/adamw.cuh"
#include "peft/backend/cuda/attention.cuh"
#include "peft/backend/cuda/cross_entropy.cuh"
#include "peft/backend/cuda/norms.cuh"

using namespace peft_cuda_test;
namespace pc = peft::cuda;

namespace {

struct NormReference {
  std::vector<double> y, dx, dw, db;
};

// LayerNorm (layer = true) or RMSNorm, forward and backward, in double. dw, db start at dw0, db0.
NormReference reference_norm(bool layer, const std::vector<float>& x, const std::vector<float>& w,
                             const std::vector<float>& b, const std::vector<float>& g,
                             const std::vector<float>& dw0, const std::vector<float>& db0,
                             std::int64_t rows, std::int64_t d, double eps) {
  NormReference ref;
  ref.y.resize(x.size());
  ref.dx.resize(x.size());
  ref.dw.assign(dw0.begin(), dw0.end());
  ref.db.assign(db0.begin(), db0.end());
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * d;
    const float* gr = g.data() + r * d;
    double mean = 0, var = 0;
    if (layer) {
      for (std::int64_t c = 0; c < d; ++c) mean += xr[c];
      mean /= double(d);
    }
    for (std::int64_t c = 0; c < d; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    const double rstd = 1.0 / std::sqrt(var / double(d) + eps);
    double mean_gw = 0, mean_gwx = 0;
    for (std::int64_t c = 0; c < d; ++c) {
      const double xhat = (xr[c] - mean) * rstd;
      ref.y[r * d + c] = xhat * w[c] + (layer ? b[c] : 0.0);
      mean_gw += double(gr[c]) * w[c];
      mean_gwx += double(gr[c]) * w[c] * xhat;
      ref.dw[c] += double(gr[c]) * xhat;
      if (layer) ref.db[c] += gr[c];
    }
    mean_gw = layer ? mean_gw / double(d) : 0.0;
    mean_gwx /= double(d);
    for (std::int64_t c = 0; c < d; ++c) {
      const double xhat = (xr[c] - mean) * rstd;
      ref.dx[r * d + c] = rstd * (double(gr[c]) * w[c] - mean_gw - xhat * mean_gwx);
    }
  }
  return ref;
}

template <class T>
void check_norm(bool layer, std::int64_t rows, std::int64_t d, double tolerance) {
  CAPTURE(layer);
  CAPTURE(rows);
  CAPTURE(d);
  std::mt19937 rng(fresh_seed());
  const float eps = 1e-5f;
  auto x = random_values(rng, rows * d), g = random_values(rng, rows * d);
  // An offset, so that LayerNorm's mean matters.
  for (float& v : x) v += 0.5f;
  if constexpr (std::is_same_v<T, bf16>) {
    x = round_bf16(x);
    g = round_bf16(g);
  }
  const auto w = random_values(rng, d), b = random_values(rng, d);
  const auto dw0 = random_values(rng, d), db0 = random_values(rng, d);
  const auto ref = reference_norm(layer, x, w, b, g, dw0, db0, rows, d, eps);
  auto to_t = [](const std::vector<float>& v) {
    if constexpr (std::is_same_v<T, bf16>)
      return to_bf16(v);
    else
      return v;
  };
  auto dx_in = device_copy(to_t(x)), dg = device_copy(to_t(g));
  auto dw = device_copy(w), db = device_copy(b), ddw = device_copy(dw0), ddb = device_copy(db0);
  DeviceBuffer<T> y(rows * d), dx(rows * d);
  DeviceBuffer<float> mean(rows), rstd(rows);
  y.poison();
  dx.poison();
  mean.poison();
  rstd.poison();
  if (layer) {
    pc::layer_norm_forward(dx_in.data(), dw.data(), db.data(), eps, y.data(), mean.data(),
                           rstd.data(), rows, d);
    pc::layer_norm_backward(dg.data(), dx_in.data(), dw.data(), mean.data(), rstd.data(), dx.data(),
                            false, ddw.data(), ddb.data(), rows, d);
  } else {
    pc::rms_norm_forward(dx_in.data(), dw.data(), eps, y.data(), rstd.data(), rows, d);
    pc::rms_norm_backward(dg.data(), dx_in.data(), dw.data(), rstd.data(), dx.data(), false,
                          ddw.data(), rows, d);
  }
  sync();
  CHECK(relative_error(y.download(), ref.y) < tolerance);
  CHECK(relative_error(dx.download(), ref.dx) < tolerance);
  CHECK(relative_error(ddw.download(), ref.dw) < 1e-5);  // fp32 sums of the given inputs
  if (layer) CHECK(relative_error(ddb.download(), ref.db) < 1e-5);
}

}  // namespace

PEFT_CUDA_CASE("cuda LayerNorm and RMSNorm: forward and backward (dw, db accumulate)") {
  for (bool layer : {true, false}) {
    check_norm<float>(layer, 77, 203, 1e-5);
    check_norm<float>(layer, 130, 2, 1e-5);  // the smallest row a norm has
    check_norm<float>(layer, 3, 1000, 1e-5);
    check_norm<bf16>(layer, 77, 203, 1e-2);
  }
}

namespace {

double gelu_tanh(double z) {
  return 0.5 * z * (1 + std::tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)));
}
double silu(double z) { return z / (1 + std::exp(-z)); }

template <pc::Activation kAct>
void check_activation(std::int64_t rows, std::int64_t d, bool with_bias) {
  CAPTURE(rows);
  CAPTURE(d);
  CAPTURE(with_bias);
  std::mt19937 rng(fresh_seed());
  const auto x = random_values(rng, rows * d, 0.05f, 3.f), dy = random_values(rng, rows * d);
  const auto b = random_values(rng, d), db0 = random_values(rng, d);
  auto f = [](double z) { return kAct == pc::Activation::GeluTanh ? gelu_tanh(z) : silu(z); };
  std::vector<double> ref_y(x.size()), ref_dx(x.size()), ref_db(db0.begin(), db0.end());
  for (std::int64_t i = 0; i < rows * d; ++i) {
    const double z = x[i] + (with_bias ? b[i % d] : 0.0), h = 1e-5;
    ref_y[i] = f(z);
    const double grad = dy[i] * (f(z + h) - f(z - h)) / (2 * h);  // central difference
    ref_dx[i] = grad;
    ref_db[i % d] += grad;
  }
  auto dx_in = device_copy(x), ddy = device_copy(dy), dbias = device_copy(b);
  auto ddb = device_copy(db0);
  DeviceBuffer<float> y(rows * d), dx(rows * d);
  y.poison();
  dx.poison();
  const float* bias = with_bias ? dbias.data() : nullptr;
  pc::bias_activation_forward<kAct>(dx_in.data(), bias, y.data(), rows, d);
  pc::bias_activation_backward<kAct>(ddy.data(), dx_in.data(), bias, dx.data(), false, ddb.data(),
                                     rows, d);
  sync();
  CHECK(relative_error(y.download(), ref_y) < 1e-5);
  // The reference derivative is a finite difference: good to about 1e-8 relative.
  CHECK(relative_error(dx.download(), ref_dx) < 1e-5);
  CHECK(relative_error(ddb.download(), ref_db) < 1e-5);
  // In place: dx written over dy.
  pc::bias_activation_backward<kAct>(ddy.data(), dx_in.data(), bias, ddy.data(), false, nullptr,
                                     rows, d);
  sync();
  CHECK(relative_error(ddy.download(), ref_dx) < 1e-5);
}

}  // namespace

PEFT_CUDA_CASE("cuda bias + GELU (tanh) and bias + SiLU: forward and backward") {
  check_activation<pc::Activation::GeluTanh>(77, 203, true);
  check_activation<pc::Activation::GeluTanh>(5, 3001, false);
  check_activation<pc::Activation::Silu>(77, 203, true);
  check_activation<pc::Activation::Silu>(129, 65, false);
}

namespace {

template <class T>
void check_cross_entropy(std::int64_t rows, std::int64_t vocab, double ignore_fraction,
                         double tolerance) {
  CAPTURE(rows);
  CAPTURE(vocab);
  std::mt19937 rng(fresh_seed());
  auto logits = random_values(rng, rows * vocab, 0.1f, 4.f);
  if constexpr (std::is_same_v<T, bf16>) logits = round_bf16(logits);
  std::vector<std::int64_t> targets(static_cast<std::size_t>(rows));
  std::uniform_int_distribution<std::int64_t> pick(0, vocab - 1);
  std::bernoulli_distribution ignore(ignore_fraction);
  for (auto& t : targets) t = ignore(rng) ? pc::kIgnoreIndex : pick(rng);
  const float dloss = 0.7f;
  // Reference.
  double total = 0;
  std::int64_t count = 0;
  std::vector<double> lse(static_cast<std::size_t>(rows));
  for (std::int64_t n = 0; n < rows; ++n) {
    if (targets[n] == pc::kIgnoreIndex) continue;
    double mx = -1e300, sum = 0;
    for (std::int64_t v = 0; v < vocab; ++v) mx = std::max(mx, double(logits[n * vocab + v]));
    for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(logits[n * vocab + v] - mx);
    lse[n] = mx + std::log(sum);
    total += lse[n] - logits[n * vocab + targets[n]];
    ++count;
  }
  std::vector<double> ref_grad(logits.size(), 0.0);
  for (std::int64_t n = 0; n < rows; ++n) {
    if (targets[n] == pc::kIgnoreIndex) continue;
    for (std::int64_t v = 0; v < vocab; ++v)
      ref_grad[n * vocab + v] =
          dloss / double(count) * (std::exp(logits[n * vocab + v] - lse[n]) - (v == targets[n]));
  }
  auto to_t = [](const std::vector<float>& v) {
    if constexpr (std::is_same_v<T, bf16>)
      return to_bf16(v);
    else
      return v;
  };
  auto dlogits_in = device_copy(to_t(logits));
  auto dtargets = device_copy(targets);
  auto ddloss = device_copy(std::vector<float>{dloss});
  DeviceBuffer<float> row_loss(rows), dlse(rows), loss(1), dcount(1);
  DeviceBuffer<T> grad(rows * vocab);
  row_loss.poison();
  dlse.poison();
  loss.poison();
  dcount.poison();
  grad.poison();
  pc::cross_entropy_forward(dlogits_in.data(), dtargets.data(), rows, vocab, row_loss.data(),
                            dlse.data(), loss.data(), dcount.data());
  pc::cross_entropy_backward(dlogits_in.data(), dtargets.data(), rows, vocab, dlse.data(),
                             ddloss.data(), dcount.data(), grad.data(), false);
  sync();
  const float got_loss = loss.download()[0];
  if (count == 0) {
    CHECK(std::isnan(got_loss));
    return;
  }
  CHECK(relative_error(std::vector<float>{got_loss}, {total / double(count)}) < 1e-6);
  CHECK(dcount.download()[0] == float(count));
  CHECK(relative_error(grad.download(), ref_grad) < tolerance);
  // In place: the logits become their gradient.
  pc::cross_entropy_backward(dlogits_in.data(), dtargets.data(), rows, vocab, dlse.data(),
                             ddloss.data(), dcount.data(), dlogits_in.data(), false);
  sync();
  CHECK(relative_error(dlogits_in.download(), ref_grad) < tolerance);
}

}  // namespace

PEFT_CUDA_CASE("cuda cross-entropy: ignore −100, mean over counted rows, in-place backward") {
  check_cross_entropy<float>(37, 1003, 0.25, 1e-5);
  check_cross_entropy<float>(3, 50257, 0.0, 1e-5);
  check_cross_entropy<float>(9, 77, 1.0, 1e-5);  // none counted: NaN, as torch
  check_cross_entropy<bf16>(37, 1003, 0.25, 1e-2);
}

namespace {

struct AttentionReference {
  std::vector<double> out, dq, dk, dv;
};

// Straightforward attention in double with the CPU op's semantics, and its gradients.
AttentionReference reference_attention(const pc::AttentionDims& d, const std::vector<float>& q,
                                       const std::vector<float>& k, const std::vector<float>& v,
                                       const std::vector<std::uint8_t>& visible,
                                       const std::vector<float>& dout) {
  const std::int64_t B = d.batch, T = d.queries, S = d.keys, H = d.heads, KV = d.kv_heads,
                     D = d.head_dim, G = H / KV;
  const double scale = 1.0 / std::sqrt(double(D));
  AttentionReference ref;
  ref.out.assign(q.size(), 0.0);
  ref.dq.assign(q.size(), 0.0);
  ref.dk.assign(k.size(), 0.0);
  ref.dv.assign(v.size(), 0.0);
  auto qi = [&](std::int64_t b, std::int64_t t, std::int64_t h) {
    return ((b * T + t) * H + h) * D;
  };
  auto ki = [&](std::int64_t b, std::int64_t s, std::int64_t j) {
    return ((b * S + s) * KV + j) * D;
  };
  std::vector<double> p(static_cast<std::size_t>(S)), dp(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int64_t j = h / G;
        auto sees = [&](std::int64_t s) {
          return (!d.causal || s <= d.query_offset + t) && (visible.empty() || visible[b * S + s]);
        };
        bool any = false;
        for (std::int64_t s = 0; s < S; ++s) any = any || sees(s);
        double mx = -1e300;
        for (std::int64_t s = 0; s < S; ++s) {
          if (any && !sees(s)) continue;
          double dot = 0;
          for (std::int64_t c = 0; c < D; ++c)
            dot += double(q[qi(b, t, h) + c]) * k[ki(b, s, j) + c];
          p[s] = any ? dot * scale : 0.0;
          mx = std::max(mx, p[s]);
        }
        double sum = 0;
        for (std::int64_t s = 0; s < S; ++s) {
          p[s] = (any && !sees(s)) ? 0.0 : std::exp(p[s] - mx);
          sum += p[s];
        }
        for (std::int64_t s = 0; s < S; ++s) p[s] /= sum;
        double di = 0;
        for (std::int64_t c = 0; c < D; ++c) {
          double o = 0;
          for (std::int64_t s = 0; s < S; ++s) o += p[s] * v[ki(b, s, j) + c];
          ref.out[qi(b, t, h) + c] = o;
          di += o * dout[qi(b, t, h) + c];
        }
        for (std::int64_t s = 0; s < S; ++s) {
          dp[s] = 0;
          for (std::int64_t c = 0; c < D; ++c) {
            dp[s] += double(dout[qi(b, t, h) + c]) * v[ki(b, s, j) + c];
            ref.dv[ki(b, s, j) + c] += p[s] * dout[qi(b, t, h) + c];
          }
          const double ds = any ? p[s] * (dp[s] - di) : 0.0;  // uniform row: no q, k gradient
          for (std::int64_t c = 0; c < D; ++c) {
            ref.dq[qi(b, t, h) + c] += scale * ds * k[ki(b, s, j) + c];
            ref.dk[ki(b, s, j) + c] += scale * ds * q[qi(b, t, h) + c];
          }
        }
      }
  return ref;
}

void check_attention(const pc::AttentionDims& d, bool padding) {
  CAPTURE(d.queries);
  CAPTURE(d.keys);
  CAPTURE(d.heads);
  CAPTURE(d.kv_heads);
  CAPTURE(d.head_dim);
  CAPTURE(d.causal);
  CAPTURE(padding);
  std::mt19937 rng(fresh_seed());
  const std::int64_t qn = d.batch * d.queries * d.heads * d.head_dim;
  const std::int64_t kn = d.batch * d.keys * d.kv_heads * d.head_dim;
  const auto q = random_values(rng, qn, 0.1f, 1.5f), k = random_values(rng, kn, 0.1f, 1.5f);
  const auto v = random_values(rng, kn), dout = random_values(rng, qn);
  std::vector<std::uint8_t> visible;
  if (padding) {
    visible.assign(static_cast<std::size_t>(d.batch * d.keys), 1);
    std::bernoulli_distribution hide(0.2);
    for (auto& vis : visible) vis = hide(rng) ? 0 : 1;
    // Batch row 0: the first keys hidden, so that early causal queries see no key at all.
    for (std::int64_t s = 0; s < std::min<std::int64_t>(d.keys, d.query_offset + 5); ++s)
      visible[s] = 0;
    if (d.batch > 1)  // batch row 1: every key hidden (every query uniform)
      for (std::int64_t s = 0; s < d.keys; ++s) visible[d.keys + s] = 0;
  }
  const auto ref = reference_attention(d, q, k, v, visible, dout);
  auto dq_in = device_copy(q), dk_in = device_copy(k), dv_in = device_copy(v);
  auto ddout = device_copy(dout);
  DeviceBuffer<std::uint8_t> dvis(static_cast<std::int64_t>(visible.size()));
  if (padding) dvis.upload(visible);
  const std::uint8_t* vis = padding ? dvis.data() : nullptr;
  DeviceBuffer<float> out(qn), lse(d.batch * d.heads * d.queries),
      delta(d.batch * d.heads * d.queries);
  DeviceBuffer<float> dq(qn), dk(kn), dv(kn);
  for (auto* buffer : {&out, &lse, &delta, &dq, &dk, &dv}) buffer->poison();
  pc::attention_forward(d, dq_in.data(), dk_in.data(), dv_in.data(), vis, out.data(), lse.data());
  pc::attention_backward(d, dq_in.data(), dk_in.data(), dv_in.data(), vis, out.data(), lse.data(),
                         ddout.data(), delta.data(), dq.data(), dk.data(), dv.data(), false);
  sync();
  CHECK(relative_error(out.download(), ref.out) < 2e-5);
  CHECK(relative_error(dq.download(), ref.dq) < 2e-5);
  CHECK(relative_error(dk.download(), ref.dk) < 2e-5);
  CHECK(relative_error(dv.download(), ref.dv) < 2e-5);
}

}  // namespace

PEFT_CUDA_CASE("cuda fused attention: causal, key padding, grouped-query, prefix offset") {
  check_attention({2, 37, 37, 6, 2, 40, true, 0}, false);
  check_attention({3, 37, 37, 6, 2, 40, true, 0}, true);    // with rows that see nothing
  check_attention({2, 37, 45, 4, 4, 24, true, 8}, true);    // 8 prefix keys before 37 queries
  check_attention({2, 33, 50, 3, 1, 128, false, 0}, true);  // not causal, D = 128, one kv head
  check_attention({1, 70, 70, 2, 1, 7, true, 0}, false);
}

PEFT_CUDA_CASE("cuda multi-tensor AdamW: torch semantics over several steps and tensors") {
  std::mt19937 rng(fresh_seed());
  const pc::AdamWHyper hyper{3e-3, 0.9, 0.95, 1e-6, 0.1};
  const std::vector<std::int64_t> sizes = {1, 8191, 20001, 8192};
  std::vector<std::vector<float>> p, m, v;
  std::vector<DeviceBuffer<float>> dp, dg, dm, dv;
  std::vector<pc::AdamWTensor> list;
  for (std::int64_t n : sizes) {
    p.push_back(random_values(rng, n));
    m.push_back(std::vector<float>(static_cast<std::size_t>(n), 0.f));
    v.push_back(std::vector<float>(static_cast<std::size_t>(n), 0.f));
    dp.push_back(device_copy(p.back()));
    dg.emplace_back(n);
    dm.push_back(device_copy(m.back()));
    dv.push_back(device_copy(v.back()));
    list.push_back({dp.back().data(), dg.back().data(), dm.back().data(), dv.back().data(), n});
  }
  pc::MultiTensorAdamW optimizer(list, hyper);
  std::vector<std::vector<double>> rp, rm, rv;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    rp.emplace_back(p[i].begin(), p[i].end());
    rm.emplace_back(m[i].size(), 0.0);
    rv.emplace_back(v[i].size(), 0.0);
  }
  for (int step = 1; step <= 3; ++step) {
    const double bc1 = 1 - std::pow(hyper.beta1, step), bc2 = 1 - std::pow(hyper.beta2, step);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const auto g = random_values(rng, sizes[i]);
      dg[i].upload(g);
      for (std::size_t e = 0; e < g.size(); ++e) {
        rp[i][e] *= 1 - hyper.lr * hyper.weight_decay;
        rm[i][e] = hyper.beta1 * rm[i][e] + (1 - hyper.beta1) * g[e];
        rv[i][e] = hyper.beta2 * rv[i][e] + (1 - hyper.beta2) * double(g[e]) * g[e];
        rp[i][e] -= hyper.lr / bc1 * rm[i][e] / (std::sqrt(rv[i][e]) / std::sqrt(bc2) + hyper.eps);
      }
    }
    optimizer.step();
  }
  sync();
  CHECK(optimizer.step_count() == 3);
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    CAPTURE(sizes[i]);
    CHECK(relative_error(dp[i].download(), rp[i]) < 1e-6);
    CHECK(relative_error(dm[i].download(), rm[i]) < 1e-6);
    CHECK(relative_error(dv[i].download(), rv[i]) < 1e-6);
  }
}
