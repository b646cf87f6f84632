#pragma once
// Synthetic sequence tasks, generated in code from a seed: copy, reverse, sort, modular
// arithmetic, key-value lookup and bracket matching. They are small enough that a tiny decoder
// learns them in minutes on a CPU, and different enough that a model pretrained on some of them
// has something left to learn on another: the setting the PEFT study compares methods in.
//
// Every task shares one vocabulary (TaskVocab), so a model pretrained on a mixture can be adapted
// to any other task without touching its embeddings. A sequence is
//   [BOS, TASK, prompt..., SEP, answer..., EOS, PAD...]
// with labels −100 everywhere except the answer and its EOS: the loss and the exact-match
// accuracy are measured on what the model must produce, never on the random prompt.
//
// Train and eval splits are disjoint by content: an example belongs to the eval split when a
// hash of its tokens falls in the eval bucket (about 1 in 8), so a task with few distinct
// problems (modular addition has 256) still evaluates on problems never trained on.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/nn/decoder.hpp"

namespace peft::data {

/// The token ids every synthetic task uses.
struct TaskVocab {
  static constexpr std::int64_t pad = 0;
  static constexpr std::int64_t bos = 1;
  static constexpr std::int64_t sep = 2;  ///< ends the prompt: the answer follows
  static constexpr std::int64_t eos = 3;
  static constexpr std::int64_t first_task = 4;  ///< one marker per TaskKind, 4..11
  static constexpr std::int64_t first_symbol = 12;
  static constexpr std::int64_t num_symbols = 16;  ///< the values, 12..27
  static constexpr std::int64_t open_round = 28, close_round = 29;
  static constexpr std::int64_t open_square = 30, close_square = 31;
  static constexpr std::int64_t plus = 32;
  static constexpr std::int64_t query = 33;
  static constexpr std::int64_t size = 40;  ///< vocabulary size (a few ids spare)

  static constexpr std::int64_t symbol(std::int64_t value) { return first_symbol + value; }
};

enum class TaskKind { Copy, Reverse, Sort, ModularSum, KeyValue, Brackets };

inline constexpr TaskKind kAllTasks[] = {TaskKind::Copy,     TaskKind::Reverse,
                                         TaskKind::Sort,     TaskKind::ModularSum,
                                         TaskKind::KeyValue, TaskKind::Brackets};

inline std::string_view task_name(TaskKind kind) {
  switch (kind) {
    case TaskKind::Copy:
      return "copy";
    case TaskKind::Reverse:
      return "reverse";
    case TaskKind::Sort:
      return "sort";
    case TaskKind::ModularSum:
      return "modsum";
    case TaskKind::KeyValue:
      return "lookup";
    case TaskKind::Brackets:
      return "brackets";
  }
  return "?";
}

/// "copy" → TaskKind::Copy; throws ConfigError naming the known tasks.
inline TaskKind task_from_name(std::string_view name) {
  for (TaskKind kind : kAllTasks)
    if (task_name(kind) == name) return kind;
  std::string known;
  for (TaskKind kind : kAllTasks)
    known += (known.empty() ? "" : ", ") + std::string(task_name(kind));
  throw ConfigError("unknown task '" + std::string(name) + "' (known: " + known + ")");
}

struct TaskOptions {
  int min_length = 3;  ///< list length for copy / reverse / sort, pairs for lookup
  int max_length = 8;
  int modulus = 16;      ///< modular sum: (a + b) mod modulus, operands below it (≤ num_symbols)
  int min_brackets = 2;  ///< bracket prefix length
  int max_brackets = 10;
};

/// One problem: what the model reads, what it must answer (EOS not included).
struct Example {
  TaskKind kind = TaskKind::Copy;
  std::vector<std::int64_t> prompt;
  std::vector<std::int64_t> answer;

  /// [BOS, TASK, prompt, SEP, answer, EOS]
  std::vector<std::int64_t> tokens() const {
    std::vector<std::int64_t> t{TaskVocab::bos, TaskVocab::first_task + static_cast<int>(kind)};
    t.insert(t.end(), prompt.begin(), prompt.end());
    t.push_back(TaskVocab::sep);
    t.insert(t.end(), answer.begin(), answer.end());
    t.push_back(TaskVocab::eos);
    return t;
  }
  /// Index in tokens() of the first answer token.
  std::size_t answer_begin() const { return prompt.size() + 3; }
};

/// The longest sequence (tokens) an example of `kind` can have under `options`.
inline std::int64_t max_sequence_length(TaskKind kind, const TaskOptions& o) {
  switch (kind) {
    case TaskKind::Copy:
    case TaskKind::Reverse:
    case TaskKind::Sort:
      return 4 + 2 * o.max_length;
    case TaskKind::ModularSum:
      return 4 + 3 + 1;
    case TaskKind::KeyValue:
      return 4 + 2 * o.max_length + 2 + 1;
    case TaskKind::Brackets:
      return 4 + o.max_brackets + o.max_brackets;
  }
  return 0;
}

namespace detail {

inline int uniform_int(std::mt19937_64& rng, int lo, int hi) {
  // Bounded by hand, not with std::uniform_int_distribution, whose algorithm differs between
  // standard libraries: the same seed must give the same data everywhere.
  const std::uint64_t span = static_cast<std::uint64_t>(hi - lo + 1);
  return lo + static_cast<int>(rng() % span);
}

inline Example generate_unchecked(TaskKind kind, std::mt19937_64& rng, const TaskOptions& o) {
  Example e;
  e.kind = kind;
  const auto random_symbols = [&](int n) {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = TaskVocab::symbol(uniform_int(rng, 0, TaskVocab::num_symbols - 1));
    return v;
  };
  switch (kind) {
    case TaskKind::Copy:
    case TaskKind::Reverse:
    case TaskKind::Sort: {
      e.prompt = random_symbols(uniform_int(rng, o.min_length, o.max_length));
      e.answer = e.prompt;
      if (kind == TaskKind::Reverse) std::reverse(e.answer.begin(), e.answer.end());
      if (kind == TaskKind::Sort) std::sort(e.answer.begin(), e.answer.end());
      break;
    }
    case TaskKind::ModularSum: {
      const int a = uniform_int(rng, 0, o.modulus - 1), b = uniform_int(rng, 0, o.modulus - 1);
      e.prompt = {TaskVocab::symbol(a), TaskVocab::plus, TaskVocab::symbol(b)};
      e.answer = {TaskVocab::symbol((a + b) % o.modulus)};
      break;
    }
    case TaskKind::KeyValue: {
      // Distinct keys (a partial shuffle of the symbols), random values, one queried key.
      const int pairs = std::min<int>(uniform_int(rng, o.min_length, o.max_length),
                                      static_cast<int>(TaskVocab::num_symbols));
      std::vector<std::int64_t> keys(TaskVocab::num_symbols);
      for (std::int64_t i = 0; i < TaskVocab::num_symbols; ++i)
        keys[static_cast<std::size_t>(i)] = i;
      for (int i = 0; i < pairs; ++i)
        std::swap(keys[static_cast<std::size_t>(i)],
                  keys[static_cast<std::size_t>(uniform_int(rng, i, TaskVocab::num_symbols - 1))]);
      const std::vector<std::int64_t> values = random_symbols(pairs);
      for (int i = 0; i < pairs; ++i) {
        e.prompt.push_back(TaskVocab::symbol(keys[static_cast<std::size_t>(i)]));
        e.prompt.push_back(values[static_cast<std::size_t>(i)]);
      }
      const int asked = uniform_int(rng, 0, pairs - 1);
      e.prompt.push_back(TaskVocab::query);
      e.prompt.push_back(TaskVocab::symbol(keys[static_cast<std::size_t>(asked)]));
      e.answer = {values[static_cast<std::size_t>(asked)]};
      break;
    }
    case TaskKind::Brackets: {
      // A prefix of a well-formed sequence of two bracket kinds; the answer closes it.
      const int n = uniform_int(rng, o.min_brackets, o.max_brackets);
      std::vector<std::int64_t> stack;
      for (int i = 0; i < n; ++i) {
        const bool must_open = stack.empty();
        const bool must_close = static_cast<int>(stack.size()) >= n - i;  // leave room to be open
        const bool open = must_open || (!must_close && uniform_int(rng, 0, 1) == 0);
        if (open) {
          const bool round = uniform_int(rng, 0, 1) == 0;
          e.prompt.push_back(round ? TaskVocab::open_round : TaskVocab::open_square);
          stack.push_back(round ? TaskVocab::close_round : TaskVocab::close_square);
        } else {
          e.prompt.push_back(stack.back());
          stack.pop_back();
        }
      }
      if (stack.empty()) {  // the walk closed everything: open one more so there is an answer
        e.prompt.push_back(TaskVocab::open_round);
        stack.push_back(TaskVocab::close_round);
      }
      e.answer.assign(stack.rbegin(), stack.rend());
      break;
    }
  }
  return e;
}

/// FNV-1a over the tokens, then a final avalanche (FNV's low bits depend only on the tokens'
/// low bits, which would put whole tasks in one split): decides the split of an example.
inline std::uint64_t example_hash(const Example& e) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::int64_t t : e.tokens()) {
    h ^= static_cast<std::uint64_t>(t);
    h *= 1099511628211ull;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

}  // namespace detail

enum class Split { Train, Eval };

/// An example of `kind` from `split` (the eval bucket is hash % 8 == 0).
inline Example generate_example(TaskKind kind, Split split, std::mt19937_64& rng,
                                const TaskOptions& options = {}) {
  if (options.min_length < 1 || options.max_length < options.min_length || options.modulus < 2 ||
      options.modulus > TaskVocab::num_symbols || options.min_brackets < 1 ||
      options.max_brackets < options.min_brackets)
    throw ConfigError("task options out of range (lengths ≥ 1, 2 ≤ modulus ≤ 16)");
  for (;;) {
    Example e = detail::generate_unchecked(kind, rng, options);
    const bool in_eval = detail::example_hash(e) % 8 == 0;
    if (in_eval == (split == Split::Eval)) return e;
  }
}

/// Right-pads examples into a Batch of `seq_len` columns with answer-only labels.
inline Batch make_batch(const std::vector<Example>& examples, std::int64_t seq_len) {
  Batch batch;
  batch.batch = static_cast<std::int64_t>(examples.size());
  batch.seq = seq_len;
  const auto n = static_cast<std::size_t>(batch.batch * seq_len);
  batch.input_ids.assign(n, TaskVocab::pad);
  batch.attention_mask.assign(n, 0);
  batch.labels.assign(n, ops::kIgnoreIndex);
  for (std::size_t b = 0; b < examples.size(); ++b) {
    const std::vector<std::int64_t> tokens = examples[b].tokens();
    if (static_cast<std::int64_t>(tokens.size()) > seq_len)
      throw ShapeError("task example of " + std::to_string(tokens.size()) +
                       " tokens does not fit a sequence of " + std::to_string(seq_len));
    const std::size_t row = b * static_cast<std::size_t>(seq_len);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      batch.input_ids[row + t] = tokens[t];
      batch.attention_mask[row + t] = 1;
      if (t >= examples[b].answer_begin()) batch.labels[row + t] = tokens[t];
    }
  }
  return batch;
}

/// A mixture of tasks (uniform over `tasks`) with fixed options and sequence length.
struct TaskMixture {
  std::vector<TaskKind> tasks;
  TaskOptions options;
  std::int64_t min_seq_len = 0;  ///< pad to at least this (to match another mixture's batches)

  /// Columns every batch of this mixture has: the longest possible example.
  std::int64_t seq_len() const {
    std::int64_t n = min_seq_len;
    for (TaskKind k : tasks) n = std::max(n, max_sequence_length(k, options));
    return n;
  }

  Example sample(Split split, std::mt19937_64& rng) const {
    if (tasks.empty()) throw ConfigError("task mixture is empty");
    const TaskKind kind = tasks[static_cast<std::size_t>(
        detail::uniform_int(rng, 0, static_cast<int>(tasks.size()) - 1))];
    return generate_example(kind, split, rng, options);
  }

  /// A training batch drawn with `rng` (the trainer's generator: its state is checkpointed).
  Batch train_batch(std::mt19937_64& rng, std::int64_t batch_size) const {
    std::vector<Example> examples;
    for (std::int64_t i = 0; i < batch_size; ++i) examples.push_back(sample(Split::Train, rng));
    return make_batch(examples, seq_len());
  }

  /// A fixed eval set: `count` examples from the eval split, in batches of `batch_size`.
  std::vector<Batch> eval_batches(std::uint64_t seed, std::int64_t count,
                                  std::int64_t batch_size) const {
    std::mt19937_64 rng(seed);
    std::vector<Batch> out;
    std::vector<Example> pending;
    for (std::int64_t i = 0; i < count; ++i) {
      pending.push_back(sample(Split::Eval, rng));
      if (static_cast<std::int64_t>(pending.size()) == batch_size || i + 1 == count) {
        out.push_back(make_batch(pending, seq_len()));
        pending.clear();
      }
    }
    return out;
  }
};

}  // namespace peft::data
