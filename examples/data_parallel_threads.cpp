// Data-parallel fine-tuning with the ranks as threads of one process (peft::LocalGroup), so it
// runs without MPI: two ranks share every global batch of 8 by rows, sum the adapter's
// gradients, and end with the adapter one process trains on the same batches (to fp32 rounding).
// Over MPI the code is the same with `options.process_group = peft::MpiSession(&argc,
// &argv).world()` and `mpirun -np 2` (docs/distributed.md).
// Usage: example_data_parallel_threads GOLDEN_DIR   (GOLDEN_DIR/models/gpt2-tiny, gpt2_lora/)
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <peft/data/tasks.hpp>
#include <peft/peft.hpp>
#include <peft/train/trainer.hpp>
#include <thread>
#include <vector>

using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;

// One rank's run (group: the ranks; a default ProcessGroup is one process): its trained tensors.
std::vector<float> train(const std::filesystem::path& golden, const peft::ProcessGroup& group,
                         double* last_loss) {
  const std::filesystem::path config_file = golden / "gpt2_lora/adapter/adapter_config.json";
  const peft::LoraConfig config =
      peft::LoraConfig::from_json(peft::io::load_json(config_file), config_file.string());
  Model model = Model::load(golden / "models/gpt2-tiny", config, /*seed=*/0);
  const peft::data::TaskMixture task{
      {peft::data::TaskKind::Sort}, {.min_length = 2, .max_length = 6}, 0};
  peft::TrainerOptions options;
  options.max_steps = 20;
  options.adamw.lr = 1e-2;
  options.process_group = group;  // every rank: the same options, the same batch source
  peft::Trainer trainer(model, options,
                        [&](std::mt19937_64& rng) { return task.train_batch(rng, 8); });
  const peft::TrainResult result = trainer.run();
  if (last_loss != nullptr) *last_loss = result.losses.back();
  std::vector<float> out;
  for (auto& p : model.trainable_parameters())
    for (float x : p.var.value().values()) out.push_back(x);
  return out;
}

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: %s GOLDEN_DIR\n", argv[0]), 2;
  const std::filesystem::path golden = argv[1];

  double one_loss = 0;
  const std::vector<float> one = train(golden, peft::ProcessGroup(), &one_loss);

  const peft::LocalGroup group(2);
  std::vector<std::vector<float>> ranks(2);
  double rank0_loss = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      ranks[static_cast<std::size_t>(r)] = train(golden, group.member(r), r == 0 ? &rank0_loss : nullptr);
    });
  for (std::thread& t : threads) t.join();

  // fp32: the ranks' sums differ from one process's in the order of additions only (in double
  // the two agree to 1e-12). AdamW's step g / (|g| + eps) turns such rounding into differences
  // of up to lr · |dg| / eps in the entries whose gradient is near eps, so the adapter is compared
  // by its norm, and the losses (docs/distributed.md, "How exact").
  double diff2 = 0, norm2 = 0, worst = 0;
  for (std::size_t i = 0; i < one.size(); ++i) {
    const double d = double(ranks[0][i]) - double(one[i]);
    diff2 += d * d;
    norm2 += double(one[i]) * double(one[i]);
    worst = std::max(worst, std::abs(d));
  }
  const double relative_norm = std::sqrt(diff2 / norm2);
  const bool same_ranks = ranks[0] == ranks[1];
  std::printf("one process: last loss %.6f; two ranks: %.6f; ranks identical: %s; adapter "
              "difference %.2g of its norm, %.2g at most in an entry\n",
              one_loss, rank0_loss, same_ranks ? "yes" : "NO", relative_norm, worst);
  const bool same_loss = std::abs(rank0_loss - one_loss) <= 1e-5 * std::abs(one_loss);
  return same_ranks && same_loss && relative_norm <= 1e-3 ? 0 : 1;
}
