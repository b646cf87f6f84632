#pragma once
// Multi-head scaled dot-product attention (causal and key-padding masks, grouped-query heads)
// and the rotary position embedding (rotate-half form).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "peft/core/ops/common.hpp"

namespace peft::ops {

struct AttentionSpec {
  std::int64_t heads = 1;     ///< query heads H
  std::int64_t kv_heads = 1;  ///< key/value heads KV; KV divides H; kv head j serves query heads
                              ///< j·H/KV … (j+1)·H/KV − 1
  std::int64_t head_dim = 1;  ///< D
  bool causal = true;
  /// Absolute position of query 0 on the key axis: query t sees keys s <= query_offset + t.
  /// 0 for plain self-attention; S − T when P prefix keys precede the T real ones.
  std::int64_t query_offset = 0;
  /// [B · S], 1 = key visible, 0 = masked (padding). Empty: every key visible.
  std::vector<std::uint8_t> key_visible;
};

namespace detail {
// Query rows per tile of the attention products. With a causal mask a tile of queries needs
// only the keys up to its last query, so tiling skips most of the masked half of Q Kᵀ and P V.
inline constexpr std::int64_t kAttentionTile = 32;

// The geometry shared by attention's forward and backward for one batch row b.
struct AttentionRows {
  std::int64_t S = 0, Tq = 0, offset = 0;
  bool causal = true;
  const std::uint8_t* visible = nullptr;  // [S] of this batch row, or null
  std::int64_t first_visible = 0;         // the first visible key (S when none is)

  // Whether query t sees key s.
  bool sees(std::int64_t t, std::int64_t s) const {
    return (!causal || s <= offset + t) && (!visible || visible[s]);
  }
  // Whether query t sees any key at all (else it attends uniformly to all S keys).
  bool sees_any(std::int64_t t) const {
    return first_visible < S && (!causal || first_visible <= offset + t);
  }
  // Keys [0, end) that can matter to queries [t0, t1).
  std::int64_t key_end(std::int64_t t0, std::int64_t t1) const {
    if (!sees_any(t0)) return S;  // a uniform row reads every key
    return causal ? std::min(S, offset + t1) : S;
  }
};

// Fills p [rows, end] (row stride S) with the attention probabilities of queries t0 … from the
// scaled scores already in p; masked entries become 0. A row that sees no key gets 1/S on
// every key. With `lse` null, lse_out[i] receives each row's log-sum-exp (+inf for a uniform
// row); otherwise lse holds them (backward) and p = exp(score − lse).
template <class T>
void attention_probabilities(T* p, std::int64_t rows, std::int64_t end, std::int64_t stride,
                             std::int64_t t0, const AttentionRows& g, const T* lse, T* lse_out) {
  using RowArray = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t t = t0 + i;
    T* row = p + i * stride;
    if (!g.sees_any(t)) {
      std::fill_n(row, end, T(1) / T(g.S));
      if (lse_out) lse_out[i] = std::numeric_limits<T>::infinity();
      continue;
    }
    // Causally visible keys are a prefix [0, last); the padding mask may hide some inside it.
    const std::int64_t last = g.causal ? std::min(end, g.offset + t + 1) : end;
    if (g.visible)
      for (std::int64_t s = 0; s < last; ++s)
        if (!g.visible[s]) row[s] = -std::numeric_limits<T>::infinity();
    RowArray seen(row, last);
    T l;
    if (lse) {
      l = lse[i];
    } else {
      const T mx = seen.maxCoeff();
      l = mx + std::log((seen - mx).exp().sum());
      lse_out[i] = l;
    }
    seen = (seen - l).exp();
    std::fill(row + last, row + end, T(0));
  }
}
}  // namespace detail

/// softmax(Q Kᵀ / √D + mask) V per head. q [B, T, H·D], k and v [B, S, KV·D]; out [B, T, H·D].
/// Masked scores are excluded from the softmax (as a score of the lowest finite float is); a
/// query that sees no key at all attends uniformly to all S keys, as that fill does.
/// Backward keeps only each row's log-sum-exp [B, H, T] and recomputes the probabilities tile
/// by tile, instead of storing them [B, H, T, S].
template <class T>
Var<T> attention(Tape<T>& tape, const Var<T>& q, const Var<T>& k, const Var<T>& v,
                 const AttentionSpec& spec) {
  using StridedMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
  using MutableStridedMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
  const Shape& qs = q.shape();
  const Shape& ks = k.shape();
  const std::int64_t H = spec.heads, KV = spec.kv_heads, D = spec.head_dim;
  detail::check(qs.size() == 3 && ks.size() == 3 && v.shape() == ks, "attention",
                "expects q [B, T, H·D] and k, v [B, S, KV·D]; got " + shape_string(qs) + ", " +
                    shape_string(ks) + ", " + shape_string(v.shape()));
  detail::check(KV > 0 && H % KV == 0, "attention", "kv_heads must divide heads");
  detail::check(qs[2] == H * D && ks[2] == KV * D && ks[0] == qs[0], "attention",
                "head sizes do not match q " + shape_string(qs) + ", k " + shape_string(ks));
  const std::int64_t B = qs[0], Tq = qs[1], S = ks[1], group = H / KV;
  detail::check(
      spec.key_visible.empty() || static_cast<std::int64_t>(spec.key_visible.size()) == B * S,
      "attention", "key mask must have B·S entries");
  const T scale = T(1) / std::sqrt(T(D));
  std::vector<detail::AttentionRows> geometry(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    detail::AttentionRows& g = geometry[static_cast<std::size_t>(b)];
    g.S = S;
    g.Tq = Tq;
    g.offset = spec.query_offset;
    g.causal = spec.causal;
    g.visible = spec.key_visible.empty() ? nullptr : spec.key_visible.data() + b * S;
    g.first_visible = 0;
    if (g.visible)
      while (g.first_visible < S && !g.visible[g.first_visible]) ++g.first_visible;
  }
  const std::int64_t tile = detail::kAttentionTile;
  Tensor<T> out(qs);
  AlignedVector<T> lse(static_cast<std::size_t>(B * H * Tq));  // kept for backward

  PEFT_PARALLEL_FOR
  for (std::int64_t bh = 0; bh < B * H; ++bh) {
    const std::int64_t b = bh / H, h = bh % H, kvh = h / group;
    const detail::AttentionRows& g = geometry[static_cast<std::size_t>(b)];
    const Eigen::OuterStride<> kv_stride(KV * D), q_stride(H * D);
    RowMatrix<T> p(std::min(tile, Tq), S);
    for (std::int64_t t0 = 0; t0 < Tq; t0 += tile) {
      const std::int64_t rows = std::min(tile, Tq - t0), end = g.key_end(t0, t0 + rows);
      StridedMap qb(q.value().data() + (b * Tq + t0) * H * D + h * D, rows, D, q_stride);
      StridedMap kb(k.value().data() + b * S * KV * D + kvh * D, end, D, kv_stride);
      StridedMap vb(v.value().data() + b * S * KV * D + kvh * D, end, D, kv_stride);
      MutableStridedMap pb(p.data(), rows, end, Eigen::OuterStride<>(S));
      pb.noalias() = (qb * kb.transpose()) * scale;
      detail::attention_probabilities(p.data(), rows, end, S, t0, g, static_cast<const T*>(nullptr),
                                      lse.data() + (b * H + h) * Tq + t0);
      MutableStridedMap ob(out.data() + (b * Tq + t0) * H * D + h * D, rows, D, q_stride);
      ob.noalias() = pb * vb;
    }
  }
  Var<T> result = detail::make_output(tape, std::move(out), q, k, v);
  if (result.requires_grad()) {
    // The closure owns its copy of the key mask: the spec may be gone by the time it runs.
    tape.record([q, k, v, result, lse = std::move(lse), geometry = std::move(geometry),
                 key_visible = spec.key_visible, B, Tq, S, H, KV, D, group, scale, tile]() mutable {
      if (!key_visible.empty())
        for (std::int64_t b = 0; b < B; ++b)
          geometry[static_cast<std::size_t>(b)].visible = key_visible.data() + b * S;
      const T* go = result.grad().data();
      T* gq = q.requires_grad() ? q.grad().data() : nullptr;
      T* gk = k.requires_grad() ? k.grad().data() : nullptr;
      T* gv = v.requires_grad() ? v.grad().data() : nullptr;
      PEFT_PARALLEL_FOR
      for (std::int64_t bg = 0; bg < B * KV; ++bg) {
        // One task per key/value head: it alone accumulates that head's dK and dV.
        const std::int64_t b = bg / KV, kvh = bg % KV;
        const detail::AttentionRows& g = geometry[static_cast<std::size_t>(b)];
        const Eigen::OuterStride<> kv_stride(KV * D), q_stride(H * D), p_stride(S);
        RowMatrix<T> p(std::min(tile, Tq), S), dp(std::min(tile, Tq), S);
        for (std::int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          for (std::int64_t t0 = 0; t0 < Tq; t0 += tile) {
            const std::int64_t rows = std::min(tile, Tq - t0), end = g.key_end(t0, t0 + rows);
            const T* row_lse = lse.data() + (b * H + h) * Tq + t0;
            StridedMap qb(q.value().data() + (b * Tq + t0) * H * D + h * D, rows, D, q_stride);
            StridedMap kb(k.value().data() + b * S * KV * D + kvh * D, end, D, kv_stride);
            StridedMap vb(v.value().data() + b * S * KV * D + kvh * D, end, D, kv_stride);
            StridedMap dob(go + (b * Tq + t0) * H * D + h * D, rows, D, q_stride);
            MutableStridedMap pb(p.data(), rows, end, p_stride);
            pb.noalias() = (qb * kb.transpose()) * scale;
            detail::attention_probabilities(p.data(), rows, end, S, t0, g, row_lse,
                                            static_cast<T*>(nullptr));
            if (gv) {
              MutableStridedMap gvb(gv + b * S * KV * D + kvh * D, end, D, kv_stride);
              gvb.noalias() += pb.transpose() * dob;
            }
            if (!gq && !gk) continue;
            MutableStridedMap dpb(dp.data(), rows, end, p_stride);
            dpb.noalias() = dob * vb.transpose();
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √D. A uniform row keeps its gradient, as with the
            // reference's additive mask (scores + lowest float still move with q·k).
            for (std::int64_t i = 0; i < rows; ++i) {
              const T dot = (dpb.row(i).array() * pb.row(i).array()).sum();
              dpb.row(i) = (pb.row(i).array() * (dpb.row(i).array() - dot) * scale).matrix();
            }
            if (gq) {
              MutableStridedMap gqb(gq + (b * Tq + t0) * H * D + h * D, rows, D, q_stride);
              gqb.noalias() += dpb * kb;
            }
            if (gk) {
              MutableStridedMap gkb(gk + b * S * KV * D + kvh * D, end, D, kv_stride);
              gkb.noalias() += dpb.transpose() * qb;
            }
          }
        }
      }
    });
  }
  return result;
}

namespace detail {
// cos and sin of (offset + t)·inv_freq[i] for i < D/2. The reference computes the inverse
// frequencies and the angles in float32 whatever the model's dtype, then casts cos and sin to
// it; doing the same keeps float64 runs within rounding of the reference.
template <class T>
void rope_table(std::int64_t positions, std::int64_t offset, const std::vector<float>& inv_freq,
                AlignedVector<T>& cos_table, AlignedVector<T>& sin_table) {
  const auto half = static_cast<std::int64_t>(inv_freq.size());
  cos_table.resize(static_cast<std::size_t>(positions * half));
  sin_table.resize(cos_table.size());
  for (std::int64_t i = 0; i < half; ++i) {
    for (std::int64_t t = 0; t < positions; ++t) {
      const float angle = static_cast<float>(offset + t) * inv_freq[static_cast<std::size_t>(i)];
      cos_table[static_cast<std::size_t>(t * half + i)] = static_cast<T>(std::cos(angle));
      sin_table[static_cast<std::size_t>(t * half + i)] = static_cast<T>(std::sin(angle));
    }
  }
}

// θ^(−2i/D), i < D/2, in float32 (unscaled rotary frequencies).
inline std::vector<float> rope_default_frequencies(std::int64_t head_dim, double theta) {
  std::vector<float> inv(static_cast<std::size_t>(head_dim / 2));
  for (std::size_t i = 0; i < inv.size(); ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / static_cast<float>(std::pow(static_cast<float>(theta), exponent));
  }
  return inv;
}

// Rotates every head of x [B, T, heads·D] in place; inverse = the transposed rotation.
template <class T>
void rope_apply(T* x, std::int64_t rows_bt, std::int64_t seq, std::int64_t heads,
                std::int64_t head_dim, const AlignedVector<T>& cs, const AlignedVector<T>& sn,
                bool inverse) {
  const std::int64_t half = head_dim / 2;
  for (std::int64_t r = 0; r < rows_bt; ++r) {
    const std::int64_t t = r % seq;
    for (std::int64_t h = 0; h < heads; ++h) {
      T* xh = x + (r * heads + h) * head_dim;
      for (std::int64_t i = 0; i < half; ++i) {
        const T c = cs[static_cast<std::size_t>(t * half + i)];
        const T s = inverse ? -sn[static_cast<std::size_t>(t * half + i)]
                            : sn[static_cast<std::size_t>(t * half + i)];
        const T x1 = xh[i], x2 = xh[i + half];
        xh[i] = x1 * c - x2 * s;
        xh[i + half] = x2 * c + x1 * s;
      }
    }
  }
}
}  // namespace detail

/// Rotary embedding, rotate-half form: each head's first and second halves (x₁, x₂) become
/// (x₁ cos − x₂ sin, x₂ cos + x₁ sin) at angle (offset + t)·inv_freq[i], i < D/2, D =
/// 2·inv_freq.size(). x [B, T, heads·D]. Scaled variants (linear, llama3) pass their scaled
/// frequencies (peft::rope_inverse_frequencies of a ModelConfig).
template <class T>
Var<T> rope(Tape<T>& tape, const Var<T>& x, const std::vector<float>& inverse_frequencies,
            std::int64_t position_offset = 0) {
  const Shape& xs = x.shape();
  const auto head_dim = static_cast<std::int64_t>(2 * inverse_frequencies.size());
  detail::check(xs.size() == 3 && head_dim > 0 && xs[2] % head_dim == 0, "rope",
                "expects [B, T, heads·D] with D = 2·frequencies; got " + shape_string(xs));
  const std::int64_t seq = xs[1], heads = xs[2] / head_dim, rows = xs[0] * xs[1];
  AlignedVector<T> cs, sn;
  detail::rope_table<T>(seq, position_offset, inverse_frequencies, cs, sn);
  Tensor<T> out = x.value();
  detail::rope_apply(out.data(), rows, seq, heads, head_dim, cs, sn, false);
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad()) {
    tape.record(
        [x, result, rows, seq, heads, head_dim, cs = std::move(cs), sn = std::move(sn)]() mutable {
          Tensor<T> g = result.grad();
          detail::rope_apply(g.data(), rows, seq, heads, head_dim, cs, sn, true);
          x.grad().vector() += g.vector();
        });
  }
  return result;
}

/// Rotary embedding with the unscaled frequencies θ^(−2i/D).
template <class T>
Var<T> rope(Tape<T>& tape, const Var<T>& x, std::int64_t head_dim, double theta,
            std::int64_t position_offset = 0) {
  detail::check(head_dim % 2 == 0 && head_dim > 0, "rope", "head_dim must be even");
  return rope(tape, x, detail::rope_default_frequencies(head_dim, theta), position_offset);
}

}  // namespace peft::ops
