#pragma once
// A model's modules described from its config alone, allocating no weights: what `peft count`
// needs to count a 7B model in microseconds. The order of linear_shapes() is the decoder's site
// order (tests check that the two agree).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/core/error.hpp"
#include "peft/nn/config.hpp"

namespace peft {

struct LinearShape {
  std::string name;  ///< module path, as nn::Linear::name
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  int layer = -1;  ///< -1 for the output head
  bool bias = false;
};

template <class Arch>
std::vector<LinearShape> linear_shapes(const ModelConfig& c) {
  std::vector<LinearShape> out;
  const std::int64_t d = c.hidden_size, kv = c.kv_dim(), qd = c.num_heads * c.head_dim;
  const std::int64_t ff = c.intermediate_size;
  for (int i = 0; i < static_cast<int>(c.num_layers); ++i) {
    if constexpr (Arch::fused_qkv) {
      out.push_back({Arch::qkv(i), d, qd + 2 * kv, i, c.attention_bias});
    } else {
      out.push_back({Arch::q(i), d, qd, i, c.attention_bias});
      out.push_back({Arch::k(i), d, kv, i, c.attention_bias});
      out.push_back({Arch::v(i), d, kv, i, c.attention_bias});
    }
    out.push_back({Arch::attention_out(i), qd, d, i, c.attention_bias});
    if constexpr (Arch::gated_mlp) {
      out.push_back({Arch::gate(i), d, ff, i, c.mlp_bias});
      out.push_back({Arch::up(i), d, ff, i, c.mlp_bias});
      out.push_back({Arch::down(i), ff, d, i, c.mlp_bias});
    } else {
      out.push_back({Arch::mlp_in(i), d, ff, i, c.mlp_bias});
      out.push_back({Arch::mlp_out(i), ff, d, i, c.mlp_bias});
    }
  }
  if (!c.tie_word_embeddings) out.push_back({Arch::lm_head(), d, c.vocab_size, -1, false});
  return out;
}

/// Parameters of the base model as the reference counts them (a tied head counted once).
template <class Arch>
std::int64_t base_parameter_count(const ModelConfig& c) {
  std::int64_t n = c.vocab_size * c.hidden_size;
  if constexpr (Arch::learned_positions) n += c.max_positions * c.hidden_size;
  for (const LinearShape& l : linear_shapes<Arch>(c))
    n += l.in_features * l.out_features + (l.bias ? l.out_features : 0);
  const std::int64_t norm =
      Arch::learned_positions ? 2 * c.hidden_size : c.hidden_size;  // scale (+ shift)
  n += (2 * c.num_layers + 1) * norm;
  return n;
}

/// One base tensor a config implies: its reference name and shape (as Decoder::base_parameters
/// lists them, in the same order; tests check that the two agree).
struct BaseTensorShape {
  std::string name;
  std::vector<std::int64_t> shape;
};

/// Every base tensor of a model of `c`, from the config alone (no weight allocated), so that a
/// checkpoint's header can be checked against the config before the model is built.
template <class Arch>
std::vector<BaseTensorShape> base_tensor_shapes(const ModelConfig& c) {
  constexpr bool layer_norm =
      std::is_same_v<typename Arch::template Norm<float>, nn::LayerNorm<float>>;
  const std::int64_t d = c.hidden_size;
  std::vector<BaseTensorShape> out;
  const auto norm = [&](const std::string& prefix) {
    out.push_back({prefix + ".weight", {d}});
    if (layer_norm) out.push_back({prefix + ".bias", {d}});
  };
  const auto linear = [&](const LinearShape& l) {
    const bool out_in = l.layer < 0 || Arch::layout == ops::WeightLayout::OutIn;
    out.push_back(
        {l.name + ".weight", out_in ? std::vector<std::int64_t>{l.out_features, l.in_features}
                                    : std::vector<std::int64_t>{l.in_features, l.out_features}});
    if (l.bias) out.push_back({l.name + ".bias", {l.out_features}});
  };
  out.push_back({Arch::token_embedding() + ".weight", {c.vocab_size, d}});
  if constexpr (Arch::learned_positions)
    out.push_back({Arch::position_embedding() + ".weight", {c.max_positions, d}});
  const std::vector<LinearShape> linears = linear_shapes<Arch>(c);
  std::size_t next = 0;
  for (int i = 0; i < static_cast<int>(c.num_layers); ++i) {
    norm(Arch::attention_norm(i));
    for (; next < linears.size() && linears[next].layer == i; ++next) linear(linears[next]);
    norm(Arch::mlp_norm(i));
  }
  norm(Arch::final_norm());
  for (; next < linears.size(); ++next) linear(linears[next]);  // the untied head
  return out;
}

/// Memory one decoder layer costs beyond its weights (module objects, names, bookkeeping): a
/// generous estimate, so that a config of 10^9 tiny layers is refused like one of huge layers.
inline constexpr double kDecoderBytesPerLayer = 4096;

/// The memory a model of `c` would take for its base weights alone (element size
/// `element_bytes`) plus kDecoderBytesPerLayer per layer, computed in floating point so that
/// no product of hostile sizes can overflow.
template <class Arch>
double base_weight_bytes(const ModelConfig& c, std::size_t element_bytes) {
  const double d = static_cast<double>(c.hidden_size), V = static_cast<double>(c.vocab_size);
  const double L = static_cast<double>(c.num_layers), ff = static_cast<double>(c.intermediate_size);
  const double qd = static_cast<double>(c.num_heads) * static_cast<double>(c.head_dim);
  const double kv = static_cast<double>(c.num_kv_heads) * static_cast<double>(c.head_dim);
  double per_layer = d * (qd + 2 * kv) + qd * d + (Arch::gated_mlp ? 3 : 2) * d * ff + 4 * d;
  if (c.attention_bias) per_layer += qd + 2 * kv + d;
  if (c.mlp_bias) per_layer += (Arch::gated_mlp ? 2 : 1) * ff + d;
  double total = V * d + L * per_layer + 2 * d;
  if (Arch::learned_positions) total += static_cast<double>(c.max_positions) * d;
  if (!c.tie_word_embeddings) total += V * d;
  return total * static_cast<double>(element_bytes) + L * kDecoderBytesPerLayer;
}

/// The bound check_plausible_size applies: this machine's physical memory (sysconf), or 1 TiB
/// where the system does not say.
inline double plausible_model_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return 1024.0 * 1024.0 * 1024.0 * 1024.0;
  return static_cast<double>(pages) * static_cast<double>(page_size);
}

/// Refuses, before anything is allocated, a config whose base weights alone would not fit in
/// this machine's memory (base_weight_bytes against plausible_model_bytes): a hostile or
/// mistyped config.json (vocab_size 10^12, 10^9 layers) must be a one-line ConfigError naming
/// the sizes, not minutes of allocation ending in std::bad_alloc or the OOM killer.
template <class Arch>
void check_plausible_size(const ModelConfig& c, const std::string& source,
                          std::size_t element_bytes) {
  const double needed = base_weight_bytes<Arch>(c, element_bytes);
  const double limit = plausible_model_bytes();
  if (needed <= limit) return;
  char figures[160];
  std::snprintf(figures, sizeof figures, "%.3g GiB, more than this machine's %.3g GiB of memory",
                needed / (1024.0 * 1024.0 * 1024.0), limit / (1024.0 * 1024.0 * 1024.0));
  throw ConfigError(source + ": a model of vocab_size " + std::to_string(c.vocab_size) +
                    ", hidden size " + std::to_string(c.hidden_size) + ", " +
                    std::to_string(c.num_layers) + " layers and intermediate size " +
                    std::to_string(c.intermediate_size) + " needs " + figures +
                    " for its base weights alone");
}

/// What a method adds, from shapes alone.
struct ParameterCount {
  std::int64_t trainable = 0;  ///< trainable adapter parameters
  std::int64_t frozen = 0;     ///< adapter parameters that are not trained but count in "all"
};

}  // namespace peft
