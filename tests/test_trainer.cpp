// Tests for peft/train/{trainer,schedule,checkpoint}.hpp: schedules, determinism, resume equal
// to the uninterrupted run, NaN handling, early stopping, and a process killed while writing a
// checkpoint leaving the previous one loadable.
#include <doctest/doctest.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "peft/data/tasks.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/testing/gradcheck.hpp"
#include "peft/train/checkpoint.hpp"
#include "peft/train/schedule.hpp"
#include "peft/train/trainer.hpp"
#include "tiny_models.hpp"

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_trainer {

namespace {

namespace fs = std::filesystem;
using Model = peft::Decoder<peft::arch::Llama, peft::LoRA, float>;

peft::ModelConfig tiny_config() { return test_support::task_model("llama", 1); }

peft::LoraConfig tiny_lora() {
  peft::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.targets.target_modules.names = {"q_proj", "v_proj"};
  return c;
}

const peft::data::TaskMixture& mixture() { return test_support::task_mixture(); }

peft::TrainerOptions tiny_options(std::int64_t steps) {
  peft::TrainerOptions o;
  o.max_steps = steps;
  o.adamw.lr = 1e-2;
  o.grad_accumulation = 2;
  o.clip_norm = 0.5;  // small enough to clip: the resume test covers the clipped path
  o.schedule.kind = peft::LrSchedule::Kind::Cosine;
  o.schedule.warmup_steps = 2;
  o.eval_every = 3;
  o.seed = 7;
  return o;
}

struct Run {
  Model model{tiny_config(), tiny_lora(), 3};
  std::vector<peft::Batch> eval = mixture().eval_batches(5, 8, 8);
  std::unique_ptr<peft::Trainer<Model>> trainer;

  explicit Run(const peft::TrainerOptions& o) {
    trainer = std::make_unique<peft::Trainer<Model>>(
        model, o, [](std::mt19937_64& rng) { return mixture().train_batch(rng, 4); },
        [this](Model& m) { return peft::evaluate(m, eval); });
  }
};

fs::path fresh_dir(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("peft_test_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  return dir;
}

bool all_finite(Model& model) {
  for (auto& p : model.trainable_parameters())
    for (float x : p.var.value().values())
      if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace

TEST_CASE("learning-rate schedules: warm-up, then constant, linear or cosine decay") {
  peft::LrSchedule s;
  s.warmup_steps = 4;
  s.total_steps = 14;
  CHECK(s.factor(0) == doctest::Approx(0.25));
  CHECK(s.factor(3) == doctest::Approx(1.0));
  CHECK(s.factor(10) == doctest::Approx(1.0));  // constant
  s.kind = peft::LrSchedule::Kind::Linear;
  CHECK(s.factor(4) == doctest::Approx(1.0));
  CHECK(s.factor(9) == doctest::Approx(0.5));
  CHECK(s.factor(14) == doctest::Approx(0.0));
  CHECK(s.factor(20) == doctest::Approx(0.0));  // held at the end
  s.kind = peft::LrSchedule::Kind::Cosine;
  s.final_ratio = 0.1;
  CHECK(s.factor(9) == doctest::Approx(0.55));
  CHECK(s.factor(14) == doctest::Approx(0.1));
  CHECK(peft::LrSchedule::kind_from_name("cosine") == peft::LrSchedule::Kind::Cosine);
  CHECK_THROWS_AS(peft::LrSchedule::kind_from_name("step"), peft::ConfigError);
}

TEST_CASE("trainer: the same seed gives bit-identical losses; another seed does not") {
  Run a(tiny_options(6)), b(tiny_options(6));
  const peft::TrainResult ra = a.trainer->run(), rb = b.trainer->run();
  REQUIRE(ra.reason == peft::StopReason::Completed);
  REQUIRE(ra.losses.size() == 6);
  CHECK(ra.losses == rb.losses);  // exact, not approximate
  REQUIRE(ra.evals.size() == rb.evals.size());
  for (std::size_t i = 0; i < ra.evals.size(); ++i)
    CHECK(ra.evals[i].metrics.loss == rb.evals[i].metrics.loss);
  CHECK(ra.losses.back() < ra.losses.front());  // and it learns

  peft::TrainerOptions other = tiny_options(6);
  other.seed = 8;
  Run c(other);
  CHECK(c.trainer->run().losses != ra.losses);
}

TEST_CASE("trainer: a run resumed from a checkpoint continues exactly as the uninterrupted run") {
  const fs::path dir = fresh_dir("resume");
  peft::TrainerOptions full = tiny_options(8);
  Run uninterrupted(full);
  const peft::TrainResult expected = uninterrupted.trainer->run();

  // The interrupted run: same schedule length, stopped after 6 steps with a checkpoint.
  peft::TrainerOptions first = full;
  first.max_steps = 6;  // a multiple of eval_every: the stop adds no evaluation of its own
  first.schedule.total_steps = 8;
  first.checkpoint_dir = dir;
  Run part(first);
  const peft::TrainResult r1 = part.trainer->run();
  REQUIRE(r1.last_checkpoint_step == 6);
  REQUIRE(peft::has_checkpoint(dir));
  CHECK(fs::exists(dir / peft::kCheckpointSidecar));

  // A fresh process would build the model from scratch (different adapter init even) and resume.
  peft::TrainerOptions second = full;
  second.checkpoint_dir = dir;
  Run resumed(second);
  resumed.model.adapter().parameters()[0].var.value().fill(123.0f);  // overwritten by resume
  resumed.trainer->resume(dir);
  CHECK(resumed.trainer->step() == 6);
  const peft::TrainResult r2 = resumed.trainer->run();
  CHECK(r2.losses == expected.losses);
  REQUIRE(r2.evals.size() == expected.evals.size());
  for (std::size_t i = 0; i < r2.evals.size(); ++i) {
    CHECK(r2.evals[i].step == expected.evals[i].step);
    CHECK(r2.evals[i].metrics.loss == expected.evals[i].metrics.loss);
  }
  const auto pa = uninterrupted.model.trainable_parameters(),
             pb = resumed.model.trainable_parameters();
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i)
    CHECK(pa[i].var.value().values() == pb[i].var.value().values());
  fs::remove_all(dir);
}

TEST_CASE("trainer: a non-finite loss stops the run and keeps the last good checkpoint") {
  const fs::path dir = fresh_dir("nan");
  peft::TrainerOptions o = tiny_options(10);
  o.eval_every = 0;
  o.checkpoint_every = 2;
  o.checkpoint_dir = dir;
  Run run(o);
  run.trainer->on_step = [&](const peft::StepInfo& info) {
    if (info.step == 5)  // a parameter blows up after step 5 (as a too-high rate would do)
      run.model.adapter().parameters()[1].var.value()[0] = std::numeric_limits<float>::quiet_NaN();
  };
  const peft::TrainResult r = run.trainer->run();
  CHECK(r.reason == peft::StopReason::NonFinite);
  INFO(r.message);
  CHECK(r.message.find("NaN") != std::string::npos);
  CHECK(r.message.find("step 6") != std::string::npos);
  CHECK(r.last_checkpoint_step == 4);
  CHECK(run.trainer->step() == 4);  // restored to the checkpoint
  CHECK(all_finite(run.model));
  const nlohmann::json state = peft::read_checkpoint_state(dir);
  CHECK(state.at("step").get<std::int64_t>() == 4);
  fs::remove_all(dir);
}

TEST_CASE("trainer: no checkpoint configured, a NaN still stops cleanly with a message") {
  peft::TrainerOptions o = tiny_options(4);
  o.adamw.lr = std::numeric_limits<double>::infinity();  // the first update makes everything NaN
  o.schedule.warmup_steps = 0;
  Run run(o);
  const peft::TrainResult r = run.trainer->run();
  CHECK(r.reason == peft::StopReason::NonFinite);
  CHECK(r.steps == 1);
  CHECK(r.message.find("no checkpoint") != std::string::npos);
}

TEST_CASE("trainer: early stopping after `patience` evaluations without improvement") {
  peft::TrainerOptions o = tiny_options(50);
  o.eval_every = 1;
  o.early_stopping_patience = 3;
  Model model(tiny_config(), tiny_lora(), 3);
  peft::Trainer<Model> trainer(
      model, o, [](std::mt19937_64& rng) { return mixture().train_batch(rng, 2); },
      [](Model&) {
        peft::EvalMetrics m;
        m.loss = 1.0;  // never improves
        return m;
      });
  const peft::TrainResult r = trainer.run();
  CHECK(r.reason == peft::StopReason::EarlyStopped);
  CHECK(r.steps == 3);
}

TEST_CASE("trainer: k micro-batches of one batch give the gradient of that batch") {
  const peft::Batch fixed = [] {
    std::mt19937_64 rng(1);
    return mixture().train_batch(rng, 4);
  }();
  std::vector<peft::AlignedVector<float>> after;
  for (int accumulation : {1, 3}) {
    Model model(tiny_config(), tiny_lora(), 3);
    peft::TrainerOptions o = tiny_options(1);
    o.grad_accumulation = accumulation;
    o.clip_norm = 0;
    o.eval_at_start = false;
    peft::Trainer<Model> trainer(model, o, [&](std::mt19937_64&) { return fixed; });
    trainer.run();
    after.push_back(model.trainable_parameters()[0].var.value().values());
  }
  REQUIRE(after[0].size() == after[1].size());
  for (std::size_t i = 0; i < after[0].size(); ++i)
    CHECK(after[0][i] == doctest::Approx(after[1][i]).epsilon(1e-4));
}

TEST_CASE("checkpoint: a half-written temporary file is never read; the last checkpoint loads") {
  const fs::path dir = fresh_dir("partial");
  peft::TrainerOptions o = tiny_options(3);
  o.checkpoint_dir = dir;
  Run run(o);
  run.trainer->run();
  // A crash mid-write leaves the temporary file: truncated bytes, never renamed.
  {
    std::ifstream good(dir / peft::kCheckpointTensors, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(good)), std::istreambuf_iterator<char>());
    std::ofstream partial(dir / (std::string(peft::kCheckpointTensors) + ".tmp"), std::ios::binary);
    partial << bytes.substr(0, bytes.size() / 2);
  }
  Run again(tiny_options(3));
  again.trainer->resume(dir);
  CHECK(again.trainer->step() == 3);
  fs::remove_all(dir);
}

TEST_CASE("checkpoint: a process killed while writing checkpoints leaves a loadable one") {
  const fs::path dir = fresh_dir("killed");
  // Large tensors so a write takes long enough to be interrupted in the middle.
  std::vector<peft::NamedParameter<float>> params{
      {"big", peft::Var<float>(peft::Tensor<float>(peft::Shape{512, 1024}, 1.0f), true)}};
  peft::AdamW<float> optimizer(params, {});
  peft::save_checkpoint(dir, params, optimizer, {{"step", 1}});

  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // Writes checkpoint after checkpoint, each with its step in every element, until killed.
    for (int step = 2;; ++step) {
      params[0].var.value().fill(float(step));
      try {
        peft::save_checkpoint(dir, params, optimizer, {{"step", step}});
      } catch (...) {
        ::_exit(1);
      }
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(WIFSIGNALED(status));

  peft::AdamW<float> fresh_optimizer(params, {});
  params[0].var.value().fill(-1.0f);
  const nlohmann::json state = peft::load_checkpoint(dir, params, fresh_optimizer);
  const auto step = state.at("step").get<int>();
  CHECK(step >= 1);
  // Whole and consistent: every element holds the step the state names.
  const auto& values = params[0].var.value().values();
  CHECK(values.front() == float(step));
  CHECK(values.back() == float(step));
  fs::remove_all(dir);
}

TEST_CASE("checkpoint: a checkpoint of other tensors is refused with a clear error") {
  const fs::path dir = fresh_dir("mismatch");
  std::vector<peft::NamedParameter<float>> params{
      {"a", peft::Var<float>(peft::Tensor<float>(peft::Shape{2, 3}, 1.0f), true)}};
  peft::AdamW<float> optimizer(params, {});
  peft::save_checkpoint(dir, params, optimizer, {{"step", 1}});
  std::vector<peft::NamedParameter<float>> other{
      {"a", peft::Var<float>(peft::Tensor<float>(peft::Shape{3, 2}, 1.0f), true)}};
  peft::AdamW<float> other_optimizer(other, {});
  CHECK_THROWS_AS(peft::load_checkpoint(dir, other, other_optimizer), peft::FileError);
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------
// The policy of docs/tutorial-new-method.md, kept here so the tutorial's code is compiled and run.
namespace {

struct OutputShift {
  using family = peft::family::Additive;
  static constexpr std::string_view name = "output_shift";
  struct Config {
    static constexpr std::string_view peft_type = "OUTPUT_SHIFT";
    peft::TargetRules targets;
    static auto fields() { return peft::config_fields(peft::targets_field(&Config::targets)); }
  };
  static peft::SiteTensors site_tensors(const Config&, const peft::ModuleSite& m) {
    return {{"shift", {m.out_features}}};
  }
  template <class T>
  static void contribute(const Config&, peft::Projection<T>& p, const peft::SiteSlot<T>& s) {
    p.shift_output(s[0]);
  }
  template <class T>
  using State = peft::SiteState<OutputShift, T>;
};
static_assert(peft::PeftPolicy<OutputShift>);

}  // namespace

TEST_CASE("tutorial: OutputShift starts at the base, and its gradient is right") {
  peft::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 20, c.hidden_size = 8, c.num_layers = 1, c.num_heads = 2, c.num_kv_heads = 2;
  c.head_dim = 4, c.intermediate_size = 16, c.max_positions = 16;
  OutputShift::Config config;
  config.targets.target_modules.names = {"q_proj", "down_proj"};
  peft::Decoder<peft::arch::Llama, OutputShift, double> model(c, config, 1);
  peft::Decoder<peft::arch::Llama, peft::NoPeft, double> base(c, {}, 1);

  peft::Batch batch;
  batch.batch = 2, batch.seq = 5;
  for (int i = 0; i < 10; ++i) batch.input_ids.push_back((3 * i + 1) % 20);
  CHECK(model.logits(batch).values() == base.logits(batch).values());

  auto params = model.trainable_parameters();
  REQUIRE(params.size() == 2);
  for (auto& p : params) p.var.value() = peft::testing::random_tensor(p.var.shape(), 7);
  std::vector<peft::Var<double>> inputs;
  for (auto& p : params) inputs.push_back(p.var);
  const auto loss = [&](peft::Tape<double>& tape, std::vector<peft::Var<double>>&) {
    return model.forward(tape, batch).loss;
  };
  const peft::testing::GradCheckResult r = peft::testing::check_gradients(loss, inputs);
  CHECK_MESSAGE(r.ok, r.message);
}

TEST_CASE("tutorial: OutputShift counts, saves and loads through the contract alone") {
  peft::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 20, c.hidden_size = 8, c.num_layers = 2, c.num_heads = 2, c.num_kv_heads = 2;
  c.head_dim = 4, c.intermediate_size = 16, c.max_positions = 16;
  OutputShift::Config config;
  config.targets.target_modules.names = {"v_proj"};
  peft::Decoder<peft::arch::Llama, OutputShift, float> model(c, config, 1);
  const auto counted =
      peft::count_parameters<OutputShift>(c, peft::linear_shapes<peft::arch::Llama>(c), config);
  CHECK(counted.trainable == 2 * 8);
  CHECK(model.trainable_parameters().size() == 2);
  CHECK(model.trainable_parameters()[0].name ==
        "base_model.model.model.layers.0.self_attn.v_proj.shift");
  const nlohmann::json j = peft::config_to_json(config, c);
  CHECK(j["peft_type"] == "OUTPUT_SHIFT");
  CHECK(j["target_modules"] == nlohmann::json::array({"v_proj"}));
  CHECK(peft::method_accepts<OutputShift>(j));
  const auto back = peft::config_from_json<OutputShift::Config>(j, "written");
  CHECK(back.targets.target_modules.names == config.targets.target_modules.names);
  config.targets.target_modules.names = {"nothing_like_this"};
  CHECK_THROWS_WITH_AS((peft::Decoder<peft::arch::Llama, OutputShift, float>(c, config, 1)),
                       doctest::Contains("matched no module"), peft::ConfigError);
}

}  // namespace test_trainer
