#pragma once
// Sizes checked before anything is allocated: a config.json (or a bench-step flag) that asks for
// more weights than this machine can hold is a one-line error naming the sizes, never a
// std::bad_alloc after minutes of allocation, and never an overflowed count.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <peft/core/error.hpp>
#include <peft/nn/config.hpp>
#include <string>

namespace peft::cli {

/// The base model's parameter count from its config, in long double: approximate where it is
/// huge, but never an overflow (every product of int64 sizes fits).
inline long double estimated_parameters(const ModelConfig& c) {
  const long double d = static_cast<long double>(c.hidden_size);
  const long double q =
      static_cast<long double>(c.num_heads) * static_cast<long double>(c.head_dim);
  const long double kv =
      static_cast<long double>(c.num_kv_heads) * static_cast<long double>(c.head_dim);
  const long double ff = static_cast<long double>(c.intermediate_size);
  const long double per_layer = d * (q + 2 * kv) + q * d + 3 * d * ff + 8 * d;
  const long double embeddings =
      static_cast<long double>(c.vocab_size) * d * (c.tie_word_embeddings ? 1 : 2);
  return embeddings + static_cast<long double>(c.max_positions) * d +
         static_cast<long double>(c.num_layers) * per_layer;
}

/// This machine's physical memory in bytes (0 where the system does not say).
inline long double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<long double>(pages) * static_cast<long double>(page)
                               : 0.0L;
}

/// "vocab_size 1000000000000, hidden_size 64, num_layers 2, intermediate_size 176".
inline std::string size_fields(const ModelConfig& c) {
  return "vocab_size " + std::to_string(c.vocab_size) + ", hidden_size " +
         std::to_string(c.hidden_size) + ", num_layers " + std::to_string(c.num_layers) +
         ", intermediate_size " + std::to_string(c.intermediate_size) + ", max_positions " +
         std::to_string(c.max_positions);
}

/// Throws when the base weights alone, `bytes_per_value` bytes each (4: float32, 8: float64),
/// would take more than this machine's physical memory. `source` names the config (its file).
inline void require_model_fits(const ModelConfig& c, const std::string& source,
                               int bytes_per_value) {
  const long double params = estimated_parameters(c);
  const long double bytes = params * bytes_per_value, memory = physical_memory_bytes();
  if (memory <= 0 || bytes <= memory) return;
  char what[160];
  std::snprintf(what, sizeof what,
                "about %.3Lg parameters, %.3Lg GB as %s, more than this machine's %.3Lg GB of "
                "memory",
                params, bytes / 1e9L, bytes_per_value == 8 ? "float64" : "float32", memory / 1e9L);
  throw ConfigError(source + ": the model is too large to build (" + size_fields(c) + "): " + what);
}

}  // namespace peft::cli
