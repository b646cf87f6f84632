// Tests for peft/data/{tasks,text}.hpp, peft/generate.hpp and the trainer's evaluate().
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "peft/data/tasks.hpp"
#include "peft/data/text.hpp"
#include "peft/generate.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/trainer.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_data {

namespace {

using peft::data::TaskKind;
using peft::data::TaskVocab;

std::vector<std::int64_t> values_of(const std::vector<std::int64_t>& symbols) {
  std::vector<std::int64_t> v;
  for (std::int64_t s : symbols) v.push_back(s - TaskVocab::first_symbol);
  return v;
}

peft::ModelConfig tiny_model(std::int64_t vocab) {
  peft::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = vocab;
  c.hidden_size = 16;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 32;
  c.max_positions = 24;
  c.attention_bias = c.mlp_bias = false;
  return c;
}

}  // namespace

TEST_CASE("tasks: every answer is what its task says") {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200; ++i) {
    for (TaskKind kind : peft::data::kAllTasks) {
      const peft::data::Example e =
          peft::data::generate_example(kind, peft::data::Split::Train, rng);
      const std::vector<std::int64_t> tokens = e.tokens();
      REQUIRE(tokens.size() <= std::size_t(peft::data::max_sequence_length(kind, {})));
      CHECK(tokens[0] == TaskVocab::bos);
      CHECK(tokens[1] == TaskVocab::first_task + static_cast<int>(kind));
      CHECK(tokens[e.answer_begin() - 1] == TaskVocab::sep);
      CHECK(tokens.back() == TaskVocab::eos);
      std::vector<std::int64_t> expected = e.prompt;
      switch (kind) {
        case TaskKind::Copy:
          break;
        case TaskKind::Reverse:
          std::reverse(expected.begin(), expected.end());
          break;
        case TaskKind::Sort:
          std::sort(expected.begin(), expected.end());
          break;
        case TaskKind::ModularSum: {
          const auto v = values_of({e.prompt[0], e.prompt[2]});
          expected = {TaskVocab::symbol((v[0] + v[1]) % 16)};
          break;
        }
        case TaskKind::KeyValue: {
          const std::int64_t asked = e.prompt.back();
          expected.clear();
          for (std::size_t k = 0; k + 2 < e.prompt.size(); k += 2)
            if (e.prompt[k] == asked) expected = {e.prompt[k + 1]};
          break;
        }
        case TaskKind::Brackets: {
          // prompt + answer is balanced and the answer only closes.
          std::vector<std::int64_t> stack;
          bool ok = true;
          std::vector<std::int64_t> all = e.prompt;
          all.insert(all.end(), e.answer.begin(), e.answer.end());
          for (std::int64_t t : all) {
            if (t == TaskVocab::open_round)
              stack.push_back(TaskVocab::close_round);
            else if (t == TaskVocab::open_square)
              stack.push_back(TaskVocab::close_square);
            else if (stack.empty() || stack.back() != t)
              ok = false;
            else
              stack.pop_back();
          }
          CHECK(ok);
          CHECK(stack.empty());
          expected = e.answer;
          break;
        }
      }
      CHECK(e.answer == expected);
    }
  }
}

TEST_CASE("tasks: seeded, and the train and eval splits never share an example") {
  const peft::data::TaskMixture mix{{TaskKind::ModularSum, TaskKind::Copy}, {}, 0};
  std::mt19937_64 a(5), b(5);
  CHECK(mix.train_batch(a, 8).input_ids == mix.train_batch(b, 8).input_ids);
  std::set<std::vector<std::int64_t>> train, eval;
  std::mt19937_64 rng(2);
  for (int i = 0; i < 2000; ++i) train.insert(mix.sample(peft::data::Split::Train, rng).tokens());
  for (int i = 0; i < 300; ++i) eval.insert(mix.sample(peft::data::Split::Eval, rng).tokens());
  for (const auto& e : eval) CHECK(train.count(e) == 0);
  CHECK(eval.size() > 20);
  CHECK_THROWS_AS(peft::data::task_from_name("divide"), peft::ConfigError);
  CHECK(peft::data::task_from_name("brackets") == TaskKind::Brackets);
}

TEST_CASE("tasks: batches pad right and label only the answer and its EOS") {
  peft::data::Example e{TaskKind::Copy,
                        {TaskVocab::symbol(1), TaskVocab::symbol(2)},
                        {TaskVocab::symbol(1), TaskVocab::symbol(2)}};
  const peft::Batch b = peft::data::make_batch({e}, 10);
  CHECK(b.batch == 1);
  CHECK(b.seq == 10);
  const std::vector<std::int64_t> ignore = {-100, -100, -100, -100, -100};
  CHECK(std::vector<std::int64_t>(b.labels.begin(), b.labels.begin() + 5) == ignore);
  CHECK(b.labels[5] == TaskVocab::symbol(1));
  CHECK(b.labels[6] == TaskVocab::symbol(2));
  CHECK(b.labels[7] == TaskVocab::eos);
  CHECK(b.labels[8] == -100);
  CHECK(b.attention_mask[7] == 1);
  CHECK(b.attention_mask[8] == 0);
  CHECK_THROWS_AS(peft::data::make_batch({e}, 4), peft::ShapeError);
}

TEST_CASE("text: byte corpus with a held-out tail") {
  std::vector<std::uint8_t> bytes;
  for (int i = 0; i < 1000; ++i) bytes.push_back(static_cast<std::uint8_t>('a' + i % 26));
  const peft::data::ByteCorpus corpus(bytes, 16, 0.1);
  CHECK(corpus.train_bytes() == 900);
  CHECK(corpus.eval_bytes() == 100);
  std::mt19937_64 rng(3);
  const peft::Batch b = corpus.train_batch(rng, 4);
  CHECK(b.batch == 4);
  CHECK(b.seq == 16);
  CHECK(b.labels.empty());
  const std::vector<peft::Batch> eval = corpus.eval_batches(100, 4);
  std::int64_t windows = 0;
  for (const peft::Batch& e : eval) windows += e.batch;
  CHECK(windows == 6);  // (100 − 1) / 15 windows overlapping by one byte
  CHECK(eval[0].input_ids[0] == 'a' + 900 % 26);  // starts at the tail
  CHECK_THROWS_AS(peft::data::ByteCorpus(std::vector<std::uint8_t>(20, 'x'), 16),
                  peft::ConfigError);

  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / ("peft_test_text_" + std::to_string(::getpid()));
  { std::ofstream(file) << std::string(bytes.begin(), bytes.end()); }
  CHECK(peft::data::ByteCorpus::from_file(file, 16).train_bytes() == 900);
  std::filesystem::remove(file);
  CHECK_THROWS_AS(peft::data::read_bytes(file), peft::FileError);
}

TEST_CASE("evaluate: loss and accuracy over labelled positions only") {
  peft::Decoder<peft::arch::Llama, peft::NoPeft, float> model(tiny_model(TaskVocab::size), {}, 1);
  const peft::data::TaskMixture mix{{TaskKind::Copy}, {1, 3, 16, 2, 4}, 0};
  const std::vector<peft::Batch> batches = mix.eval_batches(1, 6, 4);
  const peft::EvalMetrics m = peft::evaluate(model, batches);
  std::int64_t labels = 0;
  for (const peft::Batch& b : batches)
    for (std::size_t i = 0; i < b.labels.size(); ++i)
      labels += b.labels[i] != -100 && i % b.seq != 0;
  CHECK(m.tokens == labels);
  CHECK(m.sequences == 6);
  // A random model: about log(vocab) per token, and the loss agrees with the training forward.
  peft::Tape<float> tape(false);
  const double forward_loss = model.forward(tape, batches[0]).loss.value()[0];
  CHECK(peft::evaluate(model, {batches[0]}).loss == doctest::Approx(forward_loss).epsilon(1e-4));
  CHECK(m.token_accuracy >= 0);
  CHECK(m.exact_match <= m.token_accuracy + 1e-12);
}

TEST_CASE("generate: greedy is deterministic; sampling is seeded; top-k 1 is greedy") {
  peft::Decoder<peft::arch::Llama, peft::NoPeft, float> model(tiny_model(32), {}, 4);
  const std::vector<std::int64_t> prompt{1, 2, 3};
  peft::GenerateOptions greedy;
  greedy.max_new_tokens = 6;
  const auto g1 = peft::generate(model, prompt, greedy), g2 = peft::generate(model, prompt, greedy);
  CHECK(g1.size() == 6);
  CHECK(g1 == g2);
  // Greedy picks the argmax of the logits of the last position.
  const peft::Tensor<float> logits = model.logits([&] {
    peft::Batch b;
    b.batch = 1;
    b.seq = 3;
    b.input_ids = prompt;
    return b;
  }());
  const float* last = logits.data() + 2 * 32;
  CHECK(g1[0] == std::max_element(last, last + 32) - last);

  peft::GenerateOptions sample;
  sample.max_new_tokens = 30;  // past max_positions: the context slides
  sample.temperature = 1.5;
  sample.seed = 9;
  CHECK(peft::generate(model, prompt, sample) == peft::generate(model, prompt, sample));
  sample.seed = 10;
  peft::GenerateOptions other = sample;
  other.seed = 11;
  CHECK(peft::generate(model, prompt, sample) != peft::generate(model, prompt, other));
  peft::GenerateOptions top1 = sample;
  top1.top_k = 1;
  top1.max_new_tokens = 6;
  CHECK(peft::generate(model, prompt, top1) == g1);

  peft::GenerateOptions stop = greedy;
  stop.stop_token = g1[1];
  CHECK(peft::generate(model, prompt, stop).size() <= 2);
  peft::GenerateOptions stops = greedy;
  stops.stop_tokens = {g1[2], g1[1]};
  CHECK(peft::generate(model, prompt, stops).size() <= 2);
  // A nucleus smaller than the top token's probability leaves that token alone: greedy.
  peft::GenerateOptions nucleus = sample;
  nucleus.top_p = 1e-9;
  nucleus.max_new_tokens = 6;
  CHECK(peft::generate(model, prompt, nucleus) == g1);
  nucleus.top_p = 0;
  CHECK_THROWS_AS(peft::generate(model, prompt, nucleus), peft::ConfigError);
  stops.stop_tokens = {32};
  CHECK_THROWS_AS(peft::generate(model, prompt, stops), peft::ConfigError);
  CHECK_THROWS_AS(peft::generate(model, {}, greedy), peft::ConfigError);
  CHECK_THROWS_AS(peft::generate(model, {99}, greedy), peft::ConfigError);
}

TEST_CASE("generate: top-k, temperature and top-p as transformers' warpers compose them") {
  // Logits of 6 tokens; transformers applies temperature, then top-k, then top-p
  // (TopPLogitsWarper: sort ascending, drop where the inclusive cumulative probability is
  // ≤ 1 − top_p, keep at least one), then samples softmax of what is left.
  const std::vector<double> logits = {1.0, 3.0, -2.0, 2.5, 3.0, 0.0};
  for (double temperature : {0.5, 1.0, 2.0})
    for (int top_k : {0, 4})
      for (double top_p : {1.0, 0.9, 0.6, 0.3, 1e-6}) {
        CAPTURE(temperature);
        CAPTURE(top_k);
        CAPTURE(top_p);
        peft::GenerateOptions o;
        o.temperature = temperature;
        o.top_k = top_k;
        o.top_p = top_p;
        const auto [tokens, p] = peft::detail::sampling_distribution(logits.data(), 6, o);
        // Independent: every token's probability after the three warpers, then those > 0.
        std::vector<std::pair<double, std::int64_t>> ranked;  // (-logit, id): most likely first
        for (std::int64_t v = 0; v < 6; ++v) ranked.emplace_back(-logits[v], v);
        std::sort(ranked.begin(), ranked.end());
        const std::size_t k = top_k > 0 ? static_cast<std::size_t>(top_k) : ranked.size();
        ranked.resize(k);
        std::vector<double> q;
        double z = 0;
        for (const auto& r : ranked) z += std::exp(-r.first / temperature);
        for (const auto& r : ranked) q.push_back(std::exp(-r.first / temperature) / z);
        std::size_t kept = k;
        double cumulative = 0;  // ascending: from the least likely
        for (std::size_t i = k; i-- > 1;) {
          cumulative += q[i];
          if (cumulative <= 1 - top_p)
            kept = i;
          else
            break;
        }
        REQUIRE(tokens.size() == kept);
        double mass = 0;
        for (std::size_t i = 0; i < kept; ++i) mass += q[i];
        for (std::size_t i = 0; i < kept; ++i) {
          CHECK(tokens[i] == ranked[i].second);
          CHECK(p[i] == doctest::Approx(q[i] / mass).epsilon(1e-12));
        }
      }
}

}  // namespace test_data
