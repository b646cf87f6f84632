// Tests for peft/train/data_parallel.hpp and the Trainer's data-parallel step, with the ranks as
// threads of this process (LocalGroup): N ranks with global batch G reproduce one process with
// batch G (losses, every trained tensor), for uneven shards, answer-only labels, virtual tokens,
// AdaLoRA's regularised loss and budget; a checkpoint of 2 ranks resumes on 1. The same over MPI,
// as separate processes, is tests/mpi/ (ctest -L mpi).
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "peft/data/tasks.hpp"
#include "peft/methods/additive/prompt_tuning.hpp"
#include "peft/methods/reparameterized/adalora.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/data_parallel.hpp"
#include "peft/train/trainer.hpp"
#include "tiny_models.hpp"
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace test_data_parallel {

namespace {

namespace fs = std::filesystem;

peft::ModelConfig tiny_config() { return test_support::task_model("llama", 2, 48); }

peft::LoraConfig tiny_lora() {
  peft::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.targets.target_modules.names = {"q_proj", "v_proj", "down_proj"};
  return c;
}

// Answer-only labels of different lengths: an unweighted mean of the ranks' losses would be wrong.
const peft::data::TaskMixture& mixture() { return test_support::task_mixture(); }

peft::TrainerOptions options(std::int64_t steps) {
  peft::TrainerOptions o;
  o.max_steps = steps;
  o.adamw.lr = 1e-2;
  o.adamw.weight_decay = 0.01;
  o.grad_accumulation = 2;
  o.clip_norm = 0.5;  // clipped: the global norm must be the one process's
  o.schedule.warmup_steps = 1;
  o.eval_at_start = false;
  o.seed = 11;
  return o;
}

template <class T>
struct RankResult {
  std::vector<double> losses;
  std::vector<std::vector<T>> tensors;  ///< every trainable tensor, in order
  std::size_t reduced_bytes = 0;
};

template <class Model>
RankResult<typename Model::Scalar> result_of(Model& model, const peft::TrainResult& r,
                                             std::size_t bytes) {
  RankResult<typename Model::Scalar> out;
  out.losses = r.losses;
  for (auto& p : model.trainable_parameters()) {
    const auto& v = p.var.value().values();
    out.tensors.emplace_back(v.begin(), v.end());
  }
  out.reduced_bytes = bytes;
  return out;
}

/// Trains `make()`'s model on `ranks` threads (ranks == 1: one process, no group), batches of
/// `rows` from the mixture; returns each rank's losses and trained tensors.
template <class MakeModel>
auto train_ranks(int ranks, peft::TrainerOptions o, MakeModel make, std::int64_t rows,
                 const fs::path& resume_from = {}) {
  using Model = std::remove_cvref_t<decltype(make())>;
  using T = typename Model::Scalar;
  std::vector<RankResult<T>> results(static_cast<std::size_t>(ranks));
  std::vector<std::string> errors(static_cast<std::size_t>(ranks));
  const peft::LocalGroup group(ranks);
  const auto body = [&](int rank) {
#if defined(_OPENMP)
    omp_set_num_threads(1);  // the same arithmetic in every thread and in the one process
#endif
    try {
      auto model = make();
      peft::TrainerOptions mine = o;
      if (ranks > 1) mine.process_group = group.member(rank);
      peft::Trainer<Model> trainer(
          model, mine, [rows](std::mt19937_64& rng) { return mixture().train_batch(rng, rows); });
      if (!resume_from.empty()) trainer.resume(resume_from);
      const peft::TrainResult r = trainer.run();
      if (r.reason != peft::StopReason::Completed) throw peft::Error(r.message);
      results[static_cast<std::size_t>(rank)] =
          result_of(model, r, trainer.reduced_bytes_per_step());
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back(body, r);
  for (std::thread& t : threads) t.join();
  for (const std::string& e : errors) REQUIRE_MESSAGE(e.empty(), e);
  return results;
}

/// max |a − b| / (1 + |b|) over every trained entry.
template <class T>
double max_relative_difference(const RankResult<T>& a, const RankResult<T>& b) {
  REQUIRE(a.tensors.size() == b.tensors.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    REQUIRE(a.tensors[i].size() == b.tensors[i].size());
    for (std::size_t j = 0; j < a.tensors[i].size(); ++j)
      worst = std::max(worst, std::abs(double(a.tensors[i][j]) - double(b.tensors[i][j])) /
                                  (1 + std::abs(double(b.tensors[i][j]))));
  }
  return worst;
}

/// ||a − b|| / ||b|| over every trained entry.
template <class T>
double relative_norm_difference(const RankResult<T>& a, const RankResult<T>& b) {
  double diff2 = 0, norm2 = 0;
  for (std::size_t i = 0; i < a.tensors.size(); ++i)
    for (std::size_t j = 0; j < a.tensors[i].size(); ++j) {
      const double d = double(a.tensors[i][j]) - double(b.tensors[i][j]);
      diff2 += d * d;
      norm2 += double(b.tensors[i][j]) * double(b.tensors[i][j]);
    }
  return std::sqrt(diff2 / norm2);
}

/// Every rank the same bits; rank 0 against one process: the losses within `tolerance`, and
/// every trained entry (`entrywise`, double) or the adapter's norm (fp32: AdamW turns rounding
/// into larger differences in the entries whose gradient is near its epsilon; "How exact" in
/// docs/distributed.md) within `tolerance`.
template <class T>
void check_same_run(const std::vector<RankResult<T>>& ranks, const RankResult<T>& one,
                    double tolerance, bool entrywise = true) {
  for (std::size_t r = 1; r < ranks.size(); ++r) {
    // Every rank holds the same bits: the ranks take the same step from the same sums.
    CHECK(ranks[r].losses == ranks[0].losses);
    CHECK(ranks[r].tensors == ranks[0].tensors);
  }
  REQUIRE(ranks[0].losses.size() == one.losses.size());
  for (std::size_t i = 0; i < one.losses.size(); ++i)
    CHECK(ranks[0].losses[i] == doctest::Approx(one.losses[i]).epsilon(tolerance));
  if (entrywise)
    CHECK(max_relative_difference(ranks[0], one) <= tolerance);
  else
    CHECK(relative_norm_difference(ranks[0], one) <= tolerance);
}

using LoraModel = peft::Decoder<peft::arch::Llama, peft::LoRA, double>;

}  // namespace

TEST_CASE("data parallel: shards, targets and the group's sums") {
  peft::Batch b;
  b.batch = 5;
  b.seq = 3;
  for (std::int64_t i = 0; i < 15; ++i) b.input_ids.push_back(i + 1);
  b.attention_mask = {1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1};
  // Three ranks: rows [0, 1), [1, 3), [3, 5); together the batch, in order.
  CHECK(peft::shard_range(5, 0, 3) == std::pair<std::int64_t, std::int64_t>{0, 1});
  CHECK(peft::shard_range(5, 1, 3) == std::pair<std::int64_t, std::int64_t>{1, 3});
  CHECK(peft::shard_range(5, 2, 3) == std::pair<std::int64_t, std::int64_t>{3, 5});
  const peft::Batch s = peft::shard_rows(b, 1, 3);
  CHECK(s.batch == 2);
  CHECK(s.input_ids == std::vector<std::int64_t>{4, 5, 6, 7, 8, 9});
  CHECK(s.attention_mask == std::vector<std::int64_t>{1, 1, 0, 1, 0, 0});
  CHECK(s.labels.empty());
  // Targets: tokens 1.. of each row that are not padding (2 + 1 + 0 + 2 + 2), and with virtual
  // tokens the first real token too (predicted from the last virtual one).
  CHECK(peft::count_targets(b, 0) == 7);
  CHECK(peft::count_targets(s, 0) == 1);
  CHECK(peft::count_targets(b, 4) == 7 + 5);
  CHECK_THROWS_AS(peft::batch_rows(b, 3, 6), peft::ShapeError);

  // The group's sums: rank order, the same bits on every rank, float and double.
  const int n = 3;
  const peft::LocalGroup group(n);
  std::vector<std::vector<float>> got(n);
  std::vector<double> totals(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      peft::ProcessGroup g = group.member(r);
      std::vector<float> x = {1e8f * float(r == 0), 1.0f, float(r)};
      g.all_reduce_sum(std::span<float>(x));
      std::vector<double> y = {0.5 * r};
      g.all_reduce_sum(std::span<double>(y));
      g.barrier();
      got[static_cast<std::size_t>(r)] = x;
      totals[static_cast<std::size_t>(r)] = y[0];
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r) {
    CHECK(got[static_cast<std::size_t>(r)] == std::vector<float>{(1e8f + 1.0f) + 1.0f, 3.0f, 3.0f});
    CHECK(totals[static_cast<std::size_t>(r)] == 1.5);
  }
  CHECK_THROWS_AS(group.member(3), peft::ConfigError);
  CHECK(peft::ProcessGroup().single());
}

TEST_CASE("data parallel: 2 and 3 ranks reproduce one process (LoRA, double, uneven shards)") {
  const auto make = [] { return LoraModel(tiny_config(), tiny_lora(), 5); };
  const peft::TrainerOptions o = options(5);
  const auto one = train_ranks(1, o, make, 5);
  // double: the ranks' sums differ from the one process's only in the order of additions, so
  // the trained tensors agree to about the rounding of double times the steps' growth of it.
  check_same_run(train_ranks(2, o, make, 5), one[0], 1e-11);
  check_same_run(train_ranks(3, o, make, 5), one[0], 1e-11);
  // Several buckets give the same sums as one.
  peft::TrainerOptions small = o;
  small.bucket_bytes = 64;
  const auto bucketed = train_ranks(2, small, make, 5);
  check_same_run(bucketed, one[0], 1e-11);
  // Bytes: every trainable entry, a flag per tensor and the two scalars, in double.
  std::size_t entries = 0;
  for (const auto& t : bucketed[0].tensors) entries += t.size();
  CHECK(bucketed[0].reduced_bytes == (entries + bucketed[0].tensors.size() + 2) * sizeof(double));
  CHECK(one[0].reduced_bytes == 0);
}

TEST_CASE("data parallel: float ranks agree with one process to fp32 rounding") {
  using Model = peft::Decoder<peft::arch::Llama, peft::LoRA, float>;
  const auto make = [] { return Model(tiny_config(), tiny_lora(), 5); };
  const peft::TrainerOptions o = options(5);
  const auto one = train_ranks(1, o, make, 4);
  // fp32: each step's gradient sums differ in rounding (2^-24 relative to their terms); AdamW
  // passes that on, most in the entries whose gradient is near its epsilon, so the adapter is
  // compared by its norm: 1e-4 (the losses: 1e-5).
  check_same_run(train_ranks(2, o, make, 4), one[0], 1e-4, /*entrywise=*/false);
}

TEST_CASE("data parallel: virtual tokens and AdaLoRA's regularised loss and budget") {
  SUBCASE("prompt tuning: each row's first token is a target too") {
    using Model = peft::Decoder<peft::arch::Llama, peft::PromptTuning, double>;
    peft::PromptTuningConfig c;
    c.num_virtual_tokens = 3;
    const auto make = [c] { return Model(tiny_config(), c, 5); };
    const auto one = train_ranks(1, options(4), make, 4);
    check_same_run(train_ranks(2, options(4), make, 4), one[0], 1e-11);
  }
  SUBCASE("AdaLoRA: orthogonality penalty in the loss, rank allocation from the summed grads") {
    using Model = peft::Decoder<peft::arch::Llama, peft::AdaLoRA, double>;
    peft::AdaLoraConfig c;
    c.init_r = 4;
    c.target_r = 2;
    c.lora_alpha = 4;
    c.tinit = 1;
    c.tfinal = 1;
    c.total_step = 6;
    c.targets.target_modules.names = {"q_proj", "v_proj"};
    const auto make = [c] { return Model(tiny_config(), c, 5); };
    const auto one = train_ranks(1, options(6), make, 4);
    check_same_run(train_ranks(2, options(6), make, 4), one[0], 1e-10);
  }
}

TEST_CASE("data parallel: a checkpoint written by 2 ranks resumes on 1 and on 3") {
  const fs::path dir = fs::temp_directory_path() /
                       ("peft_test_data_parallel_" + std::to_string(std::random_device{}()));
  fs::remove_all(dir);
  const auto make = [] { return LoraModel(tiny_config(), tiny_lora(), 5); };
  const peft::TrainerOptions full = options(6);
  const auto uninterrupted = train_ranks(1, full, make, 6);

  peft::TrainerOptions first = full;
  first.max_steps = 3;
  first.schedule.total_steps = 6;
  first.checkpoint_dir = dir;
  train_ranks(2, first, make, 6);  // rank 0 writes the checkpoint at step 3
  REQUIRE(peft::has_checkpoint(dir));

  peft::TrainerOptions second = full;
  const auto on_one = train_ranks(1, second, make, 6, dir);
  check_same_run(on_one, uninterrupted[0], 1e-11);
  const auto on_three = train_ranks(3, second, make, 6, dir);
  check_same_run(on_three, uninterrupted[0], 1e-11);
  fs::remove_all(dir);
}

TEST_CASE("data parallel: a batch with fewer rows than ranks is a clear error on every rank") {
  const auto make = [] { return LoraModel(tiny_config(), tiny_lora(), 5); };
  const peft::LocalGroup group(3);
  std::vector<std::string> errors(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      auto model = make();
      peft::TrainerOptions o = options(2);
      o.process_group = group.member(r);
      peft::Trainer<LoraModel> trainer(
          model, o, [](std::mt19937_64& rng) { return mixture().train_batch(rng, 2); });
      try {
        trainer.run();
      } catch (const peft::ConfigError& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const std::string& e : errors)
    CHECK(e.find("a micro-batch of 2 rows cannot be shared by 3 ranks") != std::string::npos);
}

}  // namespace test_data_parallel
