#pragma once
// Multi-head scaled dot-product attention (causal and key-padding masks, grouped-query heads)
// and the rotary position embedding (rotate-half form).
#include <cmath>
#include <cstdint>
#include <limits>

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

/// softmax(Q Kᵀ / √D + mask) V per head. q [B, T, H·D], k and v [B, S, KV·D]; out [B, T, H·D].
/// Masked scores are excluded from the softmax (as a score of the lowest finite float is); a
/// query that sees no key at all attends uniformly to all S keys, as that fill does.
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
  detail::check(spec.key_visible.empty() ||
                    static_cast<std::int64_t>(spec.key_visible.size()) == B * S,
                "attention", "key mask must have B·S entries");
  const T scale = T(1) / std::sqrt(T(D));
  Tensor<T> out(qs);
  Tensor<T> probs({B, H, Tq, S});  // kept for backward
  const std::uint8_t* visible = spec.key_visible.empty() ? nullptr : spec.key_visible.data();
  const bool causal = spec.causal;
  const std::int64_t offset = spec.query_offset;

  PEFT_PARALLEL_FOR
  for (std::int64_t bg = 0; bg < B * KV; ++bg) {
    const std::int64_t b = bg / KV, g = bg % KV;
    StridedMap kb(k.value().data() + b * S * KV * D + g * D, S, D, Eigen::OuterStride<>(KV * D));
    StridedMap vb(v.value().data() + b * S * KV * D + g * D, S, D, Eigen::OuterStride<>(KV * D));
    for (std::int64_t h = g * group; h < (g + 1) * group; ++h) {
      StridedMap qb(q.value().data() + b * Tq * H * D + h * D, Tq, D, Eigen::OuterStride<>(H * D));
      MatrixMap<T> p(probs.data() + (b * H + h) * Tq * S, Tq, S);
      p.noalias() = (qb * kb.transpose()) * scale;
      for (std::int64_t t = 0; t < Tq; ++t) {
        T* row = p.data() + t * S;
        T mx = -std::numeric_limits<T>::infinity();
        bool any = false;
        for (std::int64_t s = 0; s < S; ++s) {
          const bool seen = (!causal || s <= offset + t) && (!visible || visible[b * S + s]);
          if (seen) {
            mx = std::max(mx, row[s]);
            any = true;
          } else {
            row[s] = -std::numeric_limits<T>::infinity();
          }
        }
        T total = 0;
        for (std::int64_t s = 0; s < S; ++s) total += (row[s] = any ? std::exp(row[s] - mx) : T(1));
        for (std::int64_t s = 0; s < S; ++s) row[s] /= total;
      }
      MutableStridedMap ob(out.data() + b * Tq * H * D + h * D, Tq, D, Eigen::OuterStride<>(H * D));
      ob.noalias() = p * vb;
    }
  }
  Var<T> result = detail::make_output(tape, std::move(out), q, k, v);
  if (result.requires_grad()) {
    tape.record([q, k, v, result, probs = std::move(probs), B, Tq, S, H, KV, D, group,
                 scale]() mutable {
      const T* go = result.grad().data();
      T* gq = q.requires_grad() ? q.grad().data() : nullptr;
      T* gk = k.requires_grad() ? k.grad().data() : nullptr;
      T* gv = v.requires_grad() ? v.grad().data() : nullptr;
      PEFT_PARALLEL_FOR
      for (std::int64_t bg = 0; bg < B * KV; ++bg) {
        const std::int64_t b = bg / KV, g = bg % KV;
        const Eigen::OuterStride<> kv_stride(KV * D), q_stride(H * D);
        StridedMap kb(k.value().data() + b * S * KV * D + g * D, S, D, kv_stride);
        StridedMap vb(v.value().data() + b * S * KV * D + g * D, S, D, kv_stride);
        RowMatrix<T> dp(Tq, S);
        for (std::int64_t h = g * group; h < (g + 1) * group; ++h) {
          ConstMatrixMap<T> p(probs.data() + (b * H + h) * Tq * S, Tq, S);
          StridedMap dob(go + b * Tq * H * D + h * D, Tq, D, q_stride);
          if (gv) {
            MutableStridedMap gvb(gv + b * S * KV * D + g * D, S, D, kv_stride);
            gvb.noalias() += p.transpose() * dob;
          }
          if (!gq && !gk) continue;
          dp.noalias() = dob * vb.transpose();
          // dS = P ⊙ (dP − rowsum(dP ⊙ P)), then the 1/√D of the scores.
          for (std::int64_t t = 0; t < Tq; ++t) {
            const T dot = (dp.row(t).array() * p.row(t).array()).sum();
            dp.row(t) = (p.row(t).array() * (dp.row(t).array() - dot) * scale).matrix();
          }
          if (gq) {
            MutableStridedMap gqb(gq + b * Tq * H * D + h * D, Tq, D, q_stride);
            gqb.noalias() += dp * kb;
          }
          if (gk) {
            StridedMap qb(q.value().data() + b * Tq * H * D + h * D, Tq, D, q_stride);
            MutableStridedMap gkb(gk + b * S * KV * D + g * D, S, D, kv_stride);
            gkb.noalias() += dp.transpose() * qb;
          }
        }
      }
    });
  }
  return result;
}

namespace detail {
// cos and sin of position·θ^(−2i/D) for i < D/2. The reference computes the inverse
// frequencies and the angles in float32 whatever the model's dtype, then casts cos and sin to
// it; doing the same keeps float64 runs within rounding of the reference.
template <class T>
void rope_table(std::int64_t positions, std::int64_t offset, std::int64_t head_dim, double theta,
                std::vector<T>& cos_table, std::vector<T>& sin_table) {
  const std::int64_t half = head_dim / 2;
  cos_table.resize(static_cast<std::size_t>(positions * half));
  sin_table.resize(cos_table.size());
  for (std::int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float inv_freq =
        1.0f / static_cast<float>(std::pow(static_cast<float>(theta), exponent));
    for (std::int64_t t = 0; t < positions; ++t) {
      const float angle = static_cast<float>(offset + t) * inv_freq;
      cos_table[static_cast<std::size_t>(t * half + i)] = static_cast<T>(std::cos(angle));
      sin_table[static_cast<std::size_t>(t * half + i)] = static_cast<T>(std::sin(angle));
    }
  }
}

// Rotates every head of x [B, T, heads·D] in place; inverse = the transposed rotation.
template <class T>
void rope_apply(T* x, std::int64_t rows_bt, std::int64_t seq, std::int64_t heads,
                std::int64_t head_dim, const std::vector<T>& cs, const std::vector<T>& sn,
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
/// (x₁ cos − x₂ sin, x₂ cos + x₁ sin) at angle (offset + t)·θ^(−2i/D). x [B, T, heads·D].
template <class T>
Var<T> rope(Tape<T>& tape, const Var<T>& x, std::int64_t head_dim, double theta,
            std::int64_t position_offset = 0) {
  const Shape& xs = x.shape();
  detail::check(xs.size() == 3 && head_dim % 2 == 0 && xs[2] % head_dim == 0, "rope",
                "expects [B, T, heads·D] with even D; got " + shape_string(xs));
  const std::int64_t seq = xs[1], heads = xs[2] / head_dim, rows = xs[0] * xs[1];
  std::vector<T> cs, sn;
  detail::rope_table<T>(seq, position_offset, head_dim, theta, cs, sn);
  Tensor<T> out = x.value();
  detail::rope_apply(out.data(), rows, seq, heads, head_dim, cs, sn, false);
  Var<T> result = detail::make_output(tape, std::move(out), x);
  if (result.requires_grad()) {
    tape.record([x, result, rows, seq, heads, head_dim, cs = std::move(cs),
                 sn = std::move(sn)]() mutable {
      Tensor<T> g = result.grad();
      detail::rope_apply(g.data(), rows, seq, heads, head_dim, cs, sn, true);
      x.grad().vector() += g.vector();
    });
  }
  return result;
}

}  // namespace peft::ops
