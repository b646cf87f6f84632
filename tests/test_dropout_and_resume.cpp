// The adapters' dropout (nn/projection.hpp, "DROPOUT"): in training mode LoRA's lora_dropout
// (and AdaLoRA's, DyLoRA's) drops the input of the low-rank path only, with inverted scaling
// and masks from the model's seeded dropout generator; evaluation and generation never drop;
// the Trainer turns training mode on for its steps and checkpoints the generator. And resume:
// the methods' running state (HasRunningState, methods/policy.hpp) travels in checkpoints, so
// that a resumed run equals the uninterrupted one (without it, each of the three cases below
// differs).
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <peft/generate.hpp>
#include <peft/testing/gradcheck.hpp>
#include <peft/train/trainer.hpp>
#include <random>

#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_dropout_and_resume {

namespace {

using peft::Batch;
using peft::Tape;
using peft::Var;

peft::TargetRules attention_targets() {
  peft::TargetRules t;
  t.target_modules.names = {"c_attn", "q_proj", "v_proj"};
  return t;
}

peft::LoraConfig lora(double dropout) {
  peft::LoraConfig c;
  c.r = 3;
  c.lora_alpha = 6;
  c.lora_dropout = dropout;
  c.targets = attention_targets();
  return c;
}

template <class Model>
void perturb(Model& model, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-0.3, 0.3);
  for (auto& p : model.adapter().parameters())
    for (std::int64_t i = 0; i < p.var.value().numel(); ++i)
      p.var.value()[i] += static_cast<typename Model::Scalar>(u(rng));
}

template <class Model>
std::vector<typename Model::Scalar> logits(Model& model, const Batch& batch) {
  Tape<typename Model::Scalar> tape(false);
  const auto out = model.forward(tape, batch, false);
  const auto& v = out.logits.value().values();
  return {v.begin(), v.end()};
}

double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

}  // namespace

TEST_CASE("dropout: a low-rank term's input is dropped with inverted scaling, the base is not") {
  // One projection by hand: y = x Wᵀ + b + s ((x ⊙ m / (1 − p)) Aᵀ) Bᵀ, m from the generator.
  peft::nn::Linear<double> module("m", 5, 4, peft::ops::WeightLayout::OutIn, true);
  std::mt19937_64 init(3);
  std::normal_distribution<double> n(0, 1);
  for (std::int64_t i = 0; i < module.weight.value().numel(); ++i)
    module.weight.value()[i] = n(init);
  Var<double> x(peft::Tensor<double>::zeros({6, 5}));
  for (std::int64_t i = 0; i < x.value().numel(); ++i) x.value()[i] = n(init);
  Var<double> a(peft::Tensor<double>::zeros({2, 5}), true),
      b(peft::Tensor<double>::zeros({4, 2}), true);
  for (std::int64_t i = 0; i < 10; ++i) a.value()[i] = n(init);
  for (std::int64_t i = 0; i < 8; ++i) b.value()[i] = n(init);
  const double p = 0.4, s = 1.5;

  std::mt19937_64 generator(99), replay(99);
  Tape<double> tape;
  peft::Projection<double> proj(tape, module, x, &generator);
  proj.add_low_rank(a, b, s, p);
  const Var<double> y = proj.compute();

  const peft::Tensor<double> mask = peft::Projection<double>::dropout_mask(x.shape(), p, replay);
  int dropped = 0;
  for (std::int64_t i = 0; i < mask.numel(); ++i) {
    CHECK((mask[i] == 0.0 || mask[i] == doctest::Approx(1.0 / (1.0 - p))));
    dropped += mask[i] == 0.0;
  }
  CHECK(dropped > 0);
  CHECK(dropped < mask.numel());
  Tape<double> manual_tape;
  peft::Projection<double>::Contribution term{
      peft::Projection<double>::Kind::LowRank, a, b, s, {}, {}, 0};
  const Var<double> x_dropped = peft::ops::mul(manual_tape, x, Var<double>(mask));
  const Var<double> expected =
      peft::ops::add(manual_tape, module.forward_base(manual_tape, x),
                     peft::Projection<double>::low_rank(manual_tape, x_dropped, term));
  CHECK(y.value().values() == expected.value().values());
  CHECK(generator == replay);  // one mask drawn, of x's size

  // In evaluation (no generator) the term sees x itself.
  Tape<double> eval_tape(false);
  peft::Projection<double> eval(eval_tape, module, x);
  eval.add_low_rank(a, b, s, p);
  Tape<double> plain_tape(false);
  peft::Projection<double> plain(plain_tape, module, x);
  plain.add_low_rank(a, b, s);
  CHECK(eval.compute().value().values() == plain.compute().value().values());
}

// The model-level contract of an adapter's dropout: nothing changes at initialisation (the
// update is zero, and the base input is never dropped), masks act in training mode only and
// differ per forward, the same generator state gives the same masks, evaluation and generate()
// are deterministic, and the mode is left as it was.
template <class Policy>
void check_training_dropout(
    const typename Policy::Config& config, const char* name,
    void (*prepare)(peft::Decoder<peft::arch::Gpt2, Policy, double>&) = nullptr) {
  const Batch batch = test_support::padded_batch();
  INFO(std::string(name));
  using Model = peft::Decoder<peft::arch::Gpt2, Policy, double>;
  Model model(test_support::tiny_gpt2(), config, 5);
  if (prepare) prepare(model);
  CHECK(!model.training());
  // At initialisation the adapter adds zero: dropping its input changes nothing, so the
  // training-mode logits are the base model's. (A dropout on the base input would not be.)
  const std::vector<double> eval0 = logits(model, batch);
  model.set_training(true);
  CHECK(max_diff(logits(model, batch), eval0) < 1e-12);
  model.set_training(false);
  perturb(model, 8);
  const std::vector<double> eval1 = logits(model, batch);
  CHECK(logits(model, batch) == eval1);  // evaluation is deterministic
  model.set_training(true);
  const std::mt19937_64 before = model.dropout_generator();
  const std::vector<double> train1 = logits(model, batch), train2 = logits(model, batch);
  CHECK(max_diff(train1, eval1) > 1e-6);   // masks act
  CHECK(max_diff(train1, train2) > 1e-6);  // a fresh mask each forward
  // The same generator state gives the same masks.
  Model twin(test_support::tiny_gpt2(), config, 5);
  if (prepare) prepare(twin);
  perturb(twin, 8);
  twin.set_training(true);
  twin.dropout_generator() = before;
  CHECK(logits(twin, batch) == train1);
  // generate() evaluates whatever the mode, and leaves the mode as it was.
  const std::vector<std::int64_t> a = peft::generate(model, {1, 2, 3}, {.max_new_tokens = 4});
  const std::vector<std::int64_t> b = peft::generate(model, {1, 2, 3}, {.max_new_tokens = 4});
  CHECK(a == b);
  CHECK(model.training());
  model.set_training(false);
  CHECK(logits(model, batch) == eval1);
}

TEST_CASE("dropout: LoRA, AdaLoRA, DyLoRA drop in training mode only, where the reference does") {
  check_training_dropout<peft::LoRA>(lora(0.3), "lora");
  peft::AdaLoraConfig ada;
  ada.init_r = 4;
  ada.target_r = 2;
  ada.lora_alpha = 5;
  ada.total_step = 12;
  ada.tinit = 2;
  ada.tfinal = 3;
  ada.lora_dropout = 0.3;
  ada.targets = attention_targets();
  check_training_dropout<peft::AdaLoRA>(ada, "adalora");
  peft::DyLoraConfig dy;
  dy.r = 4;
  dy.lora_alpha = 4;
  dy.lora_dropout = 0.3;
  dy.targets = attention_targets();
  check_training_dropout<peft::DyLoRA>(dy, "dylora");
}

TEST_CASE("dropout: LoHa and LoKr module and rank dropout, VeRA's input dropout") {
  peft::TargetRules gpt2_targets;
  gpt2_targets.target_modules.names = {"c_attn", "c_fc"};
  peft::LohaConfig loha;
  loha.options.r = 2;
  loha.options.alpha = 3;
  loha.options.rank_dropout = 0.3;
  loha.options.module_dropout = 0.2;
  loha.options.targets = gpt2_targets;
  check_training_dropout<peft::LoHa>(loha, "loha factored",
                                     [](auto& m) { m.adapter().set_factored(true); });
  check_training_dropout<peft::LoHa>(loha, "loha with dW built",
                                     [](auto& m) { m.adapter().set_factored(false); });
  peft::LokrConfig lokr;
  lokr.options.r = 4;
  lokr.options.alpha = 2;
  lokr.options.rank_dropout = 0.3;
  lokr.options.module_dropout = 0.2;
  lokr.rank_dropout_scale = true;
  lokr.options.targets = gpt2_targets;
  check_training_dropout<peft::LoKr>(lokr, "lokr");
  peft::VeraConfig vera;
  vera.r = 4;
  vera.vera_dropout = 0.3;
  vera.targets = gpt2_targets;
  check_training_dropout<peft::VeRA>(vera, "vera");
  peft::DoraConfig dora{lora(0.3)};
  check_training_dropout<peft::DoRA>(dora, "dora");

  // The draws: the module is kept when u > module_dropout, rows kept when u > rank_dropout and
  // rescaled to mean 1.
  peft::detail::LycorisOptions o;
  o.module_dropout = 0.5;
  o.rank_dropout = 0.25;
  std::mt19937_64 g(17);
  int skipped = 0;
  for (int i = 0; i < 4000; ++i) {
    const auto d = peft::detail::lycoris_dropout<double>(o, &g, 64, true);
    if (d.skip) {
      ++skipped;
      continue;
    }
    REQUIRE(d.rows.numel() == 64);
    double sum = 0;
    for (std::int64_t r = 0; r < 64; ++r) sum += d.rows[r];
    if (sum > 0) CHECK(sum / 64 == doctest::Approx(1.0));
  }
  CHECK(skipped > 1800);
  CHECK(skipped < 2200);
  std::mt19937_64 none(17);
  CHECK(!peft::detail::lycoris_dropout<double>(o, nullptr, 64, true).skip);  // evaluation
  o.module_dropout = 0;
  const auto unscaled = peft::detail::lycoris_dropout<double>(o, &none, 64, false);
  for (std::int64_t r = 0; r < 64; ++r) CHECK((unscaled.rows[r] == 0.0 || unscaled.rows[r] == 1.0));
}

TEST_CASE("dropout: the training paths compute the evaluation formula when nothing is dropped") {
  // A dropout of 1e-12 keeps every element (and rescales by 1 + 1e-12): the unfused training
  // path (DoRA's reference form, VeRA's and LoKr's updates from the library's ops, LoHa's row
  // scaling) must then give what the fused evaluation product gives.
  const Batch batch = test_support::padded_batch();
  const auto same = [&]<class Policy>(typename Policy::Config config, const char* name) {
    INFO(std::string(name));
    peft::Decoder<peft::arch::Gpt2, Policy, double> model(test_support::tiny_gpt2(), config, 5);
    perturb(model, 4);
    const std::vector<double> eval = logits(model, batch);
    model.set_training(true);
    CHECK(max_diff(logits(model, batch), eval) < 1e-9);
  };
  peft::DoraConfig dora{lora(1e-12)};
  same.operator()<peft::DoRA>(dora, "dora");
  peft::VeraConfig vera;
  vera.r = 4;
  vera.vera_dropout = 1e-12;
  vera.targets = attention_targets();
  same.operator()<peft::VeRA>(vera, "vera");
  peft::LokrConfig lokr;
  lokr.options.r = 2;
  lokr.options.rank_dropout = 1e-12;
  lokr.rank_dropout_scale = true;
  lokr.options.targets = attention_targets();
  same.operator()<peft::LoKr>(lokr, "lokr");
  peft::LohaConfig loha;
  loha.options.r = 2;
  loha.options.rank_dropout = 1e-12;
  loha.options.targets = attention_targets();
  same.operator()<peft::LoHa>(loha, "loha");
}

TEST_CASE("dropout: gradient checks of the training paths (double, masks fixed per evaluation)") {
  // A model's loss in training mode with a generator reset before every evaluation: the masks
  // are constants of the function, so finite differences apply.
  const Batch batch = test_support::padded_batch();
  const auto check = [&]<class Policy>(typename Policy::Config config, const char* name) {
    INFO(std::string(name));
    using Model = peft::Decoder<peft::arch::Gpt2, Policy, double>;
    Model model(test_support::tiny_gpt2(), config, 5);
    perturb(model, 3);
    model.set_training(true);
    std::vector<Var<double>> inputs;
    for (auto& p : model.adapter().parameters()) {
      // DoRA's row norm depends on A and B but is detached (as in the reference): finite
      // differences over A and B see a term the gradient leaves out by design, so DoRA is
      // checked over m (A and B reach the loss through the checked low-rank ops).
      if (std::is_same_v<Policy, peft::DoRA> && !p.name.ends_with("magnitude_vector")) continue;
      if (p.var.requires_grad()) inputs.push_back(p.var);
    }
    REQUIRE(!inputs.empty());
    const peft::testing::DoubleFunction f = [&](Tape<double>& tape, std::vector<Var<double>>&) {
      model.dropout_generator().seed(123);
      return model.forward(tape, batch).loss;
    };
    peft::testing::GradCheckOptions options;
    options.rtol = 1e-5;
    const auto result = peft::testing::check_gradients(f, inputs, options);
    CHECK_MESSAGE(result.ok, result.message);
  };
  peft::TargetRules t;
  t.target_modules.names = {"c_attn"};
  peft::LohaConfig loha;
  loha.options.r = 2;
  loha.options.rank_dropout = 0.4;
  loha.options.init_weights = false;
  loha.options.targets = t;
  check.operator()<peft::LoHa>(loha, "loha");
  peft::LokrConfig lokr;
  lokr.options.r = 2;
  lokr.options.rank_dropout = 0.4;
  lokr.options.init_weights = false;
  lokr.options.targets = t;
  check.operator()<peft::LoKr>(lokr, "lokr");
  peft::VeraConfig vera;
  vera.r = 4;
  vera.vera_dropout = 0.4;
  vera.targets = t;
  check.operator()<peft::VeRA>(vera, "vera");
  check.operator()<peft::LoRA>(lora(0.4), "lora");
  peft::DoraConfig dora{lora(0.4)};
  dora.targets = t;
  check.operator()<peft::DoRA>(dora, "dora");
}

TEST_CASE("dropout: training with lora_dropout differs from 0, is seeded, and resumes exactly") {
  using Model = peft::Decoder<peft::arch::Gpt2, peft::LoRA, float>;
  const peft::ModelConfig cfg = test_support::tiny_gpt2();
  const auto batches = [&](std::mt19937_64& rng) {
    Batch b;
    b.batch = 4;
    b.seq = 8;
    for (int i = 0; i < 32; ++i) b.input_ids.push_back(static_cast<std::int64_t>(rng() % 12));
    return b;
  };
  const auto run = [&](double dropout, std::int64_t steps, const std::filesystem::path& dir = {},
                       bool resume = false) {
    Model model(cfg, lora(dropout), 21);
    peft::TrainerOptions o;
    o.max_steps = steps;
    o.adamw.lr = 5e-2;
    o.seed = 4;
    o.checkpoint_dir = dir;
    o.checkpoint_every = 3;
    peft::Trainer trainer(model, o, batches);
    if (resume) trainer.resume(dir);
    const peft::TrainResult r = trainer.run();
    CHECK(!model.training());  // the trainer leaves the model in evaluation mode
    std::vector<float> weights;
    for (const auto& p : model.adapter().parameters())
      weights.insert(weights.end(), p.var.value().data(),
                     p.var.value().data() + p.var.value().numel());
    return std::pair{r.losses, weights};
  };
  const auto [loss_0, w_0] = run(0.0, 8);
  const auto [loss_a, w_a] = run(0.1, 8);
  const auto [loss_b, w_b] = run(0.1, 8);
  CHECK(loss_a != loss_0);
  CHECK(loss_a == loss_b);  // reproducible under the seed
  CHECK(w_a == w_b);

  // Stopped after its step-6 checkpoint, resumed: the uninterrupted run's weights and losses.
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("peft_test_dropout_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  (void)run(0.1, 6, dir);
  const auto [loss_r, w_r] = run(0.1, 8, dir, true);
  CHECK(loss_r == loss_a);
  CHECK(w_r == w_a);
  std::filesystem::remove_all(dir);
}

// Methods whose training updates values that their adapter file does not hold (HasRunningState):
// AdaLoRA's importance averages and allocation pattern, DyLoRA's rank generator, diff pruning's
// gate-noise generator. A run stopped at a checkpoint and resumed in a fresh process (a fresh
// model) ends where the uninterrupted run ends, weights and losses bit for bit.
namespace {

template <class Policy>
std::pair<std::vector<double>, std::vector<float>> train_tiny(const typename Policy::Config& config,
                                                              std::int64_t steps,
                                                              const std::filesystem::path& dir,
                                                              bool resume) {
  using Model = peft::Decoder<peft::arch::Llama, Policy, float>;
  Model model(test_support::tiny_llama(), config, 13);
  peft::TrainerOptions o;
  o.max_steps = steps;
  o.adamw.lr = 3e-2;
  o.seed = 6;
  o.checkpoint_dir = dir;
  o.checkpoint_every = 5;
  peft::Trainer trainer(model, o, [](std::mt19937_64& rng) {
    Batch b;
    b.batch = 3;
    b.seq = 6;
    for (int i = 0; i < 18; ++i) b.input_ids.push_back(static_cast<std::int64_t>(rng() % 12));
    return b;
  });
  if (resume) trainer.resume(dir);
  const peft::TrainResult r = trainer.run();
  std::vector<float> weights;
  for (const auto& p : model.adapter().parameters())
    weights.insert(weights.end(), p.var.value().data(),
                   p.var.value().data() + p.var.value().numel());
  return {r.losses, weights};
}

template <class Policy>
void check_resume(const typename Policy::Config& config, const char* name) {
  INFO(std::string(name));
  const std::filesystem::path root =
      std::filesystem::temp_directory_path() / ("peft_test_resume_" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  const auto whole = train_tiny<Policy>(config, 12, root / "whole", false);
  (void)train_tiny<Policy>(config, 5, root / "parts", false);  // stops after its step-5 checkpoint
  const auto resumed = train_tiny<Policy>(config, 12, root / "parts", true);
  CHECK(resumed.first == whole.first);
  CHECK(resumed.second == whole.second);
  std::filesystem::remove_all(root);
}

peft::TargetRules llama_attention() {
  peft::TargetRules t;
  t.target_modules.names = {"q_proj", "v_proj"};
  return t;
}

}  // namespace

TEST_CASE("resume: AdaLoRA, DyLoRA and diff pruning carry their running state in checkpoints") {
  peft::AdaLoraConfig ada;
  ada.init_r = 8;
  ada.target_r = 2;
  ada.lora_alpha = 5;
  ada.total_step = 12;
  ada.tinit = 2;  // the budget phase runs from step 2 to 9: across the step-5 checkpoint
  ada.tfinal = 3;
  ada.deltaT = 1;
  ada.lora_dropout = 0.1;
  ada.targets.target_modules.names = {"q_proj", "k_proj",  "v_proj",
                                      "o_proj", "up_proj", "down_proj"};
  check_resume<peft::AdaLoRA>(ada, "adalora");

  peft::DyLoraConfig dy;
  dy.r = 4;
  dy.lora_alpha = 4;
  dy.targets = llama_attention();
  check_resume<peft::DyLoRA>(dy, "dylora");

  peft::DiffPruningConfig diff;
  diff.budget.density = 0.1;
  check_resume<peft::DiffPruning>(diff, "diff pruning (dense phase)");

  // The state itself is not trivial at a checkpoint: AdaLoRA has allocated, DyLoRA has drawn.
  peft::Decoder<peft::arch::Llama, peft::DyLoRA, float> model(test_support::tiny_llama(), dy, 13);
  const nlohmann::json before = model.adapter().running_state();
  (void)model.adapter().sample_rank();
  CHECK(model.adapter().running_state() != before);
  model.adapter().restore_running_state(before);
  CHECK(model.adapter().running_state() == before);
  CHECK_THROWS_AS(
      model.adapter().restore_running_state({{"rank_generator", "garbage"}, {"rank", 1}}),
      peft::FileError);
  CHECK_THROWS_AS(model.adapter().restore_running_state(
                      {{"rank_generator", before["rank_generator"]}, {"rank", 99}}),
                  peft::FileError);
}

}  // namespace test_dropout_and_resume
