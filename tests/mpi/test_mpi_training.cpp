// The data-parallel trainer over MPI, as separate processes: run by ctest as
// `mpirun -np 2 peft_mpi_tests` (tests/CMakeLists.txt, label mpi). Every rank runs every case;
// a case that fails on any rank fails the job.
//   - MpiCommunicator: in-place sums, the same bits on every rank;
//   - 2 ranks with global batch G train what one process trains with batch G (fp32: within the
//     tolerance of docs/distributed.md; every rank holds the same bits);
//   - a checkpoint written by the 2 ranks resumes on one rank (and on both) and continues the
//     uninterrupted trajectory.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "peft/data/tasks.hpp"
#include "peft/distributed/mpi.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/trainer.hpp"
#include "../tiny_models.hpp"

namespace {

namespace fs = std::filesystem;
using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;

peft::MpiSession* session = nullptr;

peft::ModelConfig tiny_config() { return test_support::task_model("gpt2", 2, 48); }

peft::LoraConfig tiny_lora() {
  peft::LoraConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.targets.target_modules.names = {"c_attn", "c_fc"};
  return c;
}

const peft::data::TaskMixture& mixture() { return test_support::task_mixture(); }

peft::TrainerOptions options(std::int64_t steps) {
  peft::TrainerOptions o;
  o.max_steps = steps;
  o.adamw.lr = 5e-3;
  o.grad_accumulation = 2;
  o.clip_norm = 1.0;
  o.eval_at_start = false;
  o.seed = 3;
  return o;
}

std::vector<float> trained(Model& m) {
  std::vector<float> out;
  for (auto& p : m.trainable_parameters())
    for (float x : p.var.value().values()) out.push_back(x);
  return out;
}

/// Trains a fresh model (`group`: the ranks, or this process alone), optionally resumed.
std::vector<float> train(const peft::TrainerOptions& o, const peft::ProcessGroup& group,
                         std::vector<double>* losses = nullptr, const fs::path& resume = {}) {
  Model model(tiny_config(), tiny_lora(), 9);
  peft::TrainerOptions mine = o;
  mine.process_group = group;
  peft::Trainer<Model> trainer(
      model, mine, [](std::mt19937_64& rng) { return mixture().train_batch(rng, 6); });
  if (!resume.empty()) trainer.resume(resume);
  const peft::TrainResult r = trainer.run();
  REQUIRE_MESSAGE(r.reason == peft::StopReason::Completed, r.message);
  if (losses != nullptr) *losses = r.losses;
  return trained(model);
}

/// Rank 0's values on every rank (the others contribute zeros: x + 0 is x, exactly).
std::vector<float> from_rank_zero(std::vector<float> v) {
  peft::ProcessGroup world = session->world();
  if (world.rank() != 0) std::fill(v.begin(), v.end(), 0.0f);
  world.all_reduce_sum(std::span<float>(v));
  return v;
}

/// ||a − b|| / ||b||.
double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff2 = 0, norm2 = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    diff2 += d * d;
    norm2 += double(b[i]) * double(b[i]);
  }
  return std::sqrt(diff2 / norm2);
}

// fp32 (docs/distributed.md, "How exact"): the ranks' summed gradients differ from the one
// process's in the order of additions; AdamW passes that on, most in the entries whose gradient
// is near its epsilon, so the adapter is compared by its norm, the losses value by value.
constexpr double kTolerance = 1e-4, kLossTolerance = 1e-5;

}  // namespace

TEST_CASE("mpi: sums in place, the same bits on every rank") {
  peft::ProcessGroup world = session->world();
  REQUIRE(world.size() >= 2);
  std::vector<float> x = {1.0f / float(world.rank() + 3), float(world.rank()), 1e-7f};
  std::vector<double> y = {1.0 / (world.rank() + 3)};
  world.all_reduce_sum(std::span<float>(x));
  world.all_reduce_sum(std::span<double>(y));
  float expected = 0, expected_rank_sum = 0;
  double expected_y = 0;
  for (int r = 0; r < world.size(); ++r) {
    expected += 1.0f / float(r + 3);
    expected_rank_sum += float(r);
    expected_y += 1.0 / (r + 3);
  }
  CHECK(x[0] == doctest::Approx(expected).epsilon(1e-6));
  CHECK(x[1] == expected_rank_sum);
  CHECK(x[2] == doctest::Approx(1e-7 * world.size()).epsilon(1e-6));
  CHECK(y[0] == doctest::Approx(expected_y).epsilon(1e-15));
  CHECK(from_rank_zero(x) == x);  // every rank has rank 0's bits
  world.barrier();
}

TEST_CASE("mpi: 2 ranks train what one process trains with the same global batch") {
  peft::ProcessGroup world = session->world();
  std::vector<double> losses_dp, losses_one;
  const std::vector<float> dp = train(options(8), world, &losses_dp);
  const std::vector<float> one = train(options(8), peft::ProcessGroup(), &losses_one);
  CHECK(from_rank_zero(dp) == dp);
  CHECK(relative_difference(dp, one) <= kTolerance);
  REQUIRE(losses_dp.size() == losses_one.size());
  for (std::size_t i = 0; i < losses_dp.size(); ++i)
    CHECK(losses_dp[i] == doctest::Approx(losses_one[i]).epsilon(kLossTolerance));
}

TEST_CASE("mpi: a 2-rank checkpoint resumes on one rank and on both") {
  peft::ProcessGroup world = session->world();
  // One folder for the job: rank 0's random name, sent to every rank.
  std::vector<double> name = {double(std::random_device{}() % 1000000000u)};
  if (world.rank() != 0) name[0] = 0;
  world.all_reduce_sum(std::span<double>(name));
  const fs::path dir = fs::temp_directory_path() /
                       ("peft_mpi_test_" + std::to_string(static_cast<long long>(name[0])));
  if (world.rank() == 0) fs::remove_all(dir);
  world.barrier();

  const std::vector<float> uninterrupted = train(options(8), peft::ProcessGroup());
  peft::TrainerOptions first = options(8);
  first.max_steps = 4;
  first.schedule.total_steps = 8;
  first.checkpoint_dir = dir;
  train(first, world);  // rank 0 writes the checkpoint of step 4; the ranks wait for it
  REQUIRE(peft::has_checkpoint(dir));

  const std::vector<float> on_both = train(options(8), world, nullptr, dir);
  CHECK(relative_difference(on_both, uninterrupted) <= kTolerance);
  if (world.rank() == 0) {
    const std::vector<float> on_one = train(options(8), peft::ProcessGroup(), nullptr, dir);
    CHECK(relative_difference(on_one, uninterrupted) <= kTolerance);
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

int main(int argc, char** argv) {
  peft::MpiSession mpi(&argc, &argv);
  session = &mpi;
  doctest::Context context(argc, argv);
  const int failed = context.run();
  // Every rank's verdict: the job fails if any rank's cases did.
  std::vector<double> any = {failed != 0 ? 1.0 : 0.0};
  mpi.world().all_reduce_sum(std::span<double>(any));
  session = nullptr;
  return any[0] > 0 ? 1 : 0;
}
