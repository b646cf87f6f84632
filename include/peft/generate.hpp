#pragma once
// Text generation for the causal decoders: greedy, temperature, top-k and top-p (nucleus)
// sampling, stop tokens.
//
// With a key/value cache (Decoder::forward_cached; the default): the prompt is run once (the
// prefill, with the prefix's keys and the virtual tokens), then each new token costs one
// position. Without (use_cache false, or a model without forward_cached), each new token
// recomputes the forward pass over the whole context. Both give the same tokens: the cached
// logits are the full forward's up to rounding (tests/test_additive.cpp, "key/value cache").
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/nn/decoder.hpp"

namespace peft {

struct GenerateOptions {
  /// The most tokens one call generates: 65,536 tokens are already hours of CPU for a model
  /// with a long window (each token's attention reads the whole context, and past the window
  /// every token re-runs it); a larger request is a typo or an attack, refused before any work.
  static constexpr std::int64_t kMaxNewTokens = 65536;

  std::int64_t max_new_tokens = 32;  ///< in [0, kMaxNewTokens]
  double temperature = 0.0;  ///< 0: greedy (argmax); otherwise sample softmax(logits / temperature)
  int top_k = 0;             ///< sample among the k most likely tokens only; 0: all
  /// Nucleus sampling (Holtzman et al., 2019), after top-k and the temperature, as
  /// transformers' TopPLogitsWarper: the least likely tokens whose probabilities sum to at most
  /// 1 − top_p are dropped, the most likely token never. 1: off. In (0, 1].
  double top_p = 1.0;
  std::uint64_t seed = 0;                  ///< the sampler's generator
  std::optional<std::int64_t> stop_token;  ///< stop after emitting it (it is returned)
  std::vector<std::int64_t> stop_tokens;   ///< more of them: stop after emitting any
  bool use_cache = true;  ///< the key/value cache, where the model has one (forward_cached)
};

namespace detail {
/// Throws when a row of logits holds a NaN or an infinity: a token picked from such a row is
/// noise (greedy decoding of an all-NaN row returns token 0 every time), never a result.
template <class T>
void require_finite_logits(const T* logits, std::int64_t vocab, std::int64_t step) {
  for (std::int64_t v = 0; v < vocab; ++v)
    if (!std::isfinite(double(logits[v])))
      throw Error("generate: the logits of new token " + std::to_string(step + 1) +
                  " are not finite (logit of token id " + std::to_string(v) + " is " +
                  (std::isnan(double(logits[v])) ? "NaN" : (logits[v] > 0 ? "+Inf" : "-Inf")) +
                  "): the model's weights or the adapter's scaling (e.g. lora_alpha) overflow");
}

/// The model's key/value cache type, where it has one.
template <class Model>
struct CacheOfModel {
  using type = int;
};
template <class Model>
requires requires { typename Model::KvCache; }
struct CacheOfModel<Model> {
  using type = typename Model::KvCache;
};
template <class Model>
using CacheOf = typename CacheOfModel<Model>::type;

/// A uniform double in [0, 1) from 53 random bits: the same on every standard library.
inline double uniform01(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

/// The tokens a sampling step draws from, most likely first, and their probabilities (summing
/// to 1): the top_k most likely (ties to the lower id), softmax(logits / temperature) over them,
/// then top_p's nucleus, renormalised. Needs temperature > 0.
template <class T>
std::pair<std::vector<std::int64_t>, std::vector<double>> sampling_distribution(
    const T* logits, std::int64_t vocab, const GenerateOptions& o) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(vocab));
  for (std::int64_t v = 0; v < vocab; ++v) order[static_cast<std::size_t>(v)] = v;
  const auto more_likely = [&](std::int64_t a, std::int64_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const auto k =
      static_cast<std::size_t>(o.top_k > 0 ? std::min<std::int64_t>(o.top_k, vocab) : vocab);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
                    more_likely);
  order.resize(k);
  const double mx = double(logits[order[0]]);
  std::vector<double> p(k);
  double total = 0;
  for (std::size_t i = 0; i < k; ++i)
    total += p[i] = std::exp((double(logits[order[i]]) - mx) / o.temperature);
  for (double& x : p) x /= total;
  if (o.top_p < 1) {
    // From the least likely up: drop while the dropped mass stays ≤ 1 − top_p.
    double tail = 0;
    std::size_t keep = k;
    while (keep > 1 && tail + p[keep - 1] <= 1 - o.top_p) tail += p[--keep];
    order.resize(keep);
    p.resize(keep);
    for (double& x : p) x /= 1 - tail;
  }
  return {std::move(order), std::move(p)};
}

/// Picks the next token from one row of logits.
template <class T>
std::int64_t pick_token(const T* logits, std::int64_t vocab, const GenerateOptions& o,
                        std::mt19937_64& rng) {
  if (o.temperature <= 0) {
    // Ties go to the lower id, so greedy decoding is deterministic.
    std::int64_t best = 0;
    for (std::int64_t v = 1; v < vocab; ++v)
      if (logits[v] > logits[best]) best = v;
    return best;
  }
  const auto [tokens, p] = sampling_distribution(logits, vocab, o);
  double u = uniform01(rng);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    u -= p[i];
    if (u < 0) return tokens[i];
  }
  return tokens.back();
}
}  // namespace detail

namespace detail {
template <class Model>
void check_generate_request(const Model& model, const std::vector<std::int64_t>& prompt,
                            const GenerateOptions& options) {
  if (prompt.empty()) throw ConfigError("generate: the prompt is empty (give at least one token)");
  const std::int64_t vocab = model.config().vocab_size;
  for (std::int64_t t : prompt)
    if (t < 0 || t >= vocab)
      throw ConfigError("generate: prompt token " + std::to_string(t) +
                        " outside the vocabulary [0, " + std::to_string(vocab) + ")");
  if (options.top_k < 0)
    throw ConfigError("generate: top_k: expected an integer ≥ 0, found " +
                      std::to_string(options.top_k));
  if (options.max_new_tokens < 0 || options.max_new_tokens > GenerateOptions::kMaxNewTokens)
    throw ConfigError("generate: max_new_tokens: expected an integer in [0, " +
                      std::to_string(GenerateOptions::kMaxNewTokens) + "], found " +
                      std::to_string(options.max_new_tokens));
  if (!(options.top_p > 0 && options.top_p <= 1))
    throw ConfigError("generate: top_p: expected a number in (0, 1] (1: off), found " +
                      std::to_string(options.top_p));
  for (std::int64_t t : options.stop_tokens)
    if (t < 0 || t >= vocab)
      throw ConfigError("generate: stop token " + std::to_string(t) +
                        " outside the vocabulary [0, " + std::to_string(vocab) + ")");
  if (!std::isfinite(options.temperature) || options.temperature < 0)
    throw ConfigError("generate: temperature: expected a finite number ≥ 0 (0: greedy), found " +
                      std::to_string(options.temperature));
}
}  // namespace detail

/// Continues several prompts of one length together, one row of a batch each. `adapter_names`
/// (one per row, or empty: the active adapter for every row) names each row's adapter as
/// Batch::adapter_names does (kBaseAdapterName: the base model), so that one batch serves
/// requests for different adapters. Each row's tokens are those generate() gives its prompt alone
/// with its adapter: sampling draws from a generator of its own per row, seeded `seed` as alone;
/// a row ends at a stop token (the others go on) and the call when every row has ended. Returns
/// the new tokens of each row. The rows must have one length (the cached decoder takes no
/// padding mask).
template <class Model>
std::vector<std::vector<std::int64_t>> generate_batch(
    Model& model, const std::vector<std::vector<std::int64_t>>& prompts,
    const std::vector<std::string>& adapter_names = {}, const GenerateOptions& options = {}) {
  using T = typename Model::Scalar;
  const EvaluationScope<Model> no_dropout(model);
  if (prompts.empty()) throw ConfigError("generate: no prompt (give at least one row)");
  for (const std::vector<std::int64_t>& prompt : prompts) {
    detail::check_generate_request(model, prompt, options);
    if (prompt.size() != prompts.front().size())
      throw ConfigError("generate: the prompts have " + std::to_string(prompts.front().size()) +
                        " and " + std::to_string(prompt.size()) +
                        " tokens; rows generated together need one length");
  }
  const auto rows = static_cast<std::int64_t>(prompts.size());
  if (!adapter_names.empty() && adapter_names.size() != prompts.size())
    throw ConfigError("generate: " + std::to_string(adapter_names.size()) +
                      " adapter names for " + std::to_string(rows) + " prompts (one per row)");
  const std::int64_t vocab = model.config().vocab_size;
  std::vector<std::mt19937_64> rng(prompts.size(), std::mt19937_64(options.seed));
  std::vector<std::vector<std::int64_t>> contexts = prompts, generated(prompts.size());
  std::vector<bool> ended(prompts.size(), false);
  // Room left for the policy's virtual / prefix tokens is the policy's business: the decoder
  // throws a clear error if they do not fit.
  const std::int64_t window = model.config().max_positions;
  constexpr bool has_cache = requires(detail::CacheOf<Model> & c, const Batch& b) {
    model.forward_cached(b, c);
  };
  // The batch of each row's last `length` tokens of context.
  auto batch_of = [&](std::size_t length) {
    Batch batch;
    batch.batch = rows;
    batch.seq = static_cast<std::int64_t>(length);
    for (const std::vector<std::int64_t>& c : contexts)
      batch.input_ids.insert(batch.input_ids.end(), c.end() - static_cast<std::ptrdiff_t>(length),
                             c.end());
    batch.adapter_names = adapter_names;
    return batch;
  };
  [[maybe_unused]] detail::CacheOf<Model> cache{};
  Tensor<T> logits;
  for (std::int64_t n = 0; n < options.max_new_tokens; ++n) {
    bool slid = false;
    if (static_cast<std::int64_t>(contexts.front().size()) > window) {
      for (std::vector<std::int64_t>& c : contexts) c.erase(c.begin(), c.end() - window);
      slid = true;
    }
    const std::size_t length = contexts.front().size();
    std::int64_t row_stride = 0;  // elements between rows' last-position logits
    const T* first_row = nullptr;
    if constexpr (has_cache) {
      if (options.use_cache) {
        // Past the window the context slides, every position moves, and the cache is rebuilt
        // from the new context: the uncached path's cost, for its result.
        if (slid || cache.empty()) {
          cache.clear();
          logits = model.forward_cached(batch_of(length), cache);
        } else {
          logits = model.forward_cached(batch_of(1), cache);
        }
        first_row = logits.data();
        row_stride = vocab;
      }
    }
    if (!first_row) {
      Tape<T> tape(false);
      logits = model.forward(tape, batch_of(length), false).logits.value();
      row_stride = logits.shape()[1] * vocab;
      first_row = logits.data() + (logits.shape()[1] - 1) * vocab;
    }
    bool all_ended = true;
    for (std::size_t r = 0; r < prompts.size(); ++r) {
      // An ended row still rides in the batch (one length for all); its tokens are not kept.
      const T* row = first_row + static_cast<std::int64_t>(r) * row_stride;
      std::int64_t token = contexts[r].back();
      if (!ended[r]) {
        detail::require_finite_logits(row, vocab, n);
        token = detail::pick_token(row, vocab, options, rng[r]);
        generated[r].push_back(token);
        ended[r] = (options.stop_token && token == *options.stop_token) ||
                   std::find(options.stop_tokens.begin(), options.stop_tokens.end(), token) !=
                       options.stop_tokens.end();
      }
      contexts[r].push_back(token);
      all_ended = all_ended && ended[r];
    }
    if (all_ended) break;
  }
  return generated;
}

/// Continues `prompt` (token ids) by up to max_new_tokens tokens; returns the new tokens only.
/// The context is cut from the left to the model's max_positions.
template <class Model>
std::vector<std::int64_t> generate(Model& model, std::vector<std::int64_t> prompt,
                                   const GenerateOptions& options = {}) {
  return std::move(generate_batch(model, {std::move(prompt)}, {}, options).front());
}

}  // namespace peft
