// Named adapters on one model (Decoder::add_adapter, set_adapter, delete_adapter,
// DisableAdapterScope; methods/named_adapters.hpp) and mixed-adapter batches
// (Batch::adapter_names, nn/projection.hpp's grouped_projection; generate_batch).
#include <doctest/doctest.h>

#include "scratch_dir.hpp"

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <peft/peft.hpp>
#include <random>

#include "tiny_models.hpp"

// Named per file: the unity build compiles several test files as one translation unit.
namespace test_named_adapters {

using peft::Batch;
using peft::Decoder;
using peft::Tape;
using peft::Tensor;
using test_support::tiny_config;

std::filesystem::path scratch_dir(const std::string& purpose) {
  return test_support::scratch_dir("named_adapters", purpose);
}

peft::LoraConfig lora_config(int r = 2) {
  peft::LoraConfig c;
  c.r = r;
  c.lora_alpha = 4;
  c.targets = peft::TargetRules::from_json(
      {{"target_modules", {"c_attn", "c_fc", "q_proj", "v_proj", "down_proj"}}}, "test");
  return c;
}

template <class Model>
void perturb(typename Model::Adapter& adapter, std::uint64_t seed, double amplitude = 0.5) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-amplitude, amplitude);
  for (auto& p : adapter.parameters())
    if (p.var.requires_grad())
      for (std::int64_t i = 0; i < p.var.value().numel(); ++i)
        p.var.value()[i] += static_cast<typename Model::Scalar>(u(rng));
}

/// Every tensor of an adapter, copied (to compare bit for bit later).
template <class State>
std::vector<std::vector<double>> snapshot(State& adapter) {
  std::vector<std::vector<double>> out;
  for (const auto& p : adapter.parameters()) {
    const auto values = p.var.value().to_vector();
    out.emplace_back(values.begin(), values.end());
  }
  return out;
}

bool same_bits(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() ||
        std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(double)) != 0)
      return false;
  return true;
}

Batch rows_batch(const std::vector<std::vector<std::int64_t>>& rows) {
  Batch b;
  b.batch = static_cast<std::int64_t>(rows.size());
  b.seq = static_cast<std::int64_t>(rows.front().size());
  for (const auto& r : rows) b.input_ids.insert(b.input_ids.end(), r.begin(), r.end());
  return b;
}

double max_relative_difference(const double* a, const double* b, std::int64_t n) {
  double worst = 0;
  for (std::int64_t i = 0; i < n; ++i)
    worst = std::max(worst, std::abs(a[i] - b[i]) / (1 + std::abs(b[i])));
  return worst;
}

/// Logits of one row alone with its adapter (set_adapter; the base under DisableAdapterScope).
template <class Model>
Tensor<double> alone(Model& model, const std::vector<std::int64_t>& ids, const std::string& name) {
  const std::string active = model.active_adapter();
  Tensor<double> out;
  if (name == peft::kBaseAdapterName) {
    peft::DisableAdapterScope<Model> base(model);
    out = model.logits(rows_batch({ids}));
  } else {
    model.set_adapter(name);
    out = model.logits(rows_batch({ids}));
  }
  model.set_adapter(active);
  return out;
}

template <class Arch>
struct LoraCase {
  using Model = Decoder<Arch, peft::LoRA, double>;
  static peft::LoraConfig config() { return lora_config(); }
};
template <class Arch>
struct Ia3Case {  // output and input scales: each group computes its own projection
  using Model = Decoder<Arch, peft::IA3, double>;
  static peft::Ia3Config config() { return {}; }
};
template <class Arch>
struct ComposeCase {  // LoRA and IA3 on one module (v_proj / c_attn), one adapter of both
  using Model = Decoder<Arch, peft::Compose<peft::LoRA, peft::IA3>, double>;
  static typename Model::AdapterPolicy::Config config() { return {lora_config(), peft::Ia3Config{}}; }
};

#define NAMED_CASES                                                                 \
  LoraCase<peft::arch::Gpt2>, LoraCase<peft::arch::Llama>, Ia3Case<peft::arch::Gpt2>, \
      Ia3Case<peft::arch::Llama>, ComposeCase<peft::arch::Gpt2>

TEST_CASE_TEMPLATE("named adapters: add, set, list, disable and delete", C, NAMED_CASES) {
  using Model = typename C::Model;
  Model model(tiny_config<typename Model::Architecture>(), C::config(), 7);
  perturb<Model>(model.adapter(), 1);
  CHECK(model.adapter_names() == std::vector<std::string>{"default"});
  CHECK(model.active_adapter() == "default");
  model.add_adapter("french", C::config(), 3);
  perturb<Model>(model.adapter("french"), 2);
  model.add_adapter("zero", C::config(), 4);  // untrained: the base model's product
  CHECK(model.adapter_names() == std::vector<std::string>{"default", "french", "zero"});
  CHECK(model.active_adapter() == "default");  // adding does not activate (as the reference)

  const Batch batch = test_support::padded_batch();
  const Tensor<double> with_default = model.logits(batch);
  model.set_adapter("french");
  CHECK(model.active_adapter() == "french");
  const Tensor<double> with_french = model.logits(batch);
  CHECK(max_relative_difference(with_default.data(), with_french.data(), with_default.numel()) >
        1e-3);
  model.set_adapter("zero");
  const Tensor<double> with_zero = model.logits(batch);
  Tensor<double> base;
  {
    peft::DisableAdapterScope<Model> off(model);
    CHECK(model.adapters_disabled());
    base = model.logits(batch);
  }
  CHECK_FALSE(model.adapters_disabled());
  // An untrained adapter is the identity (LoRA's B = 0, IA3's scales 1): the base, to rounding.
  CHECK(max_relative_difference(with_zero.data(), base.data(), base.numel()) < 1e-14);
  model.set_adapter("default");
  const Tensor<double> again = model.logits(batch);
  CHECK(std::memcmp(again.data(), with_default.data(), sizeof(double) * again.numel()) == 0);

  // trainable_parameters() and adapter() follow the active adapter.
  model.set_adapter("french");
  const auto trainable = model.trainable_parameters();
  const auto french = model.adapter("french").parameters();
  REQUIRE(trainable.size() == french.size());
  for (std::size_t i = 0; i < french.size(); ++i)
    CHECK(trainable[i].var.value().data() == french[i].var.value().data());

  model.delete_adapter("french");  // the active one: the first remaining becomes active
  CHECK(model.adapter_names() == std::vector<std::string>{"default", "zero"});
  CHECK(model.active_adapter() == "default");
  model.delete_adapter("zero");
  CHECK(model.active_adapter() == "default");
  const Tensor<double> after = model.logits(batch);
  CHECK(std::memcmp(after.data(), with_default.data(), sizeof(double) * after.numel()) == 0);
}

TEST_CASE("named adapters: set, disable, delete and training one leave the others bit-identical") {
  using Model = Decoder<peft::arch::Gpt2, peft::LoRA, double>;
  Model model(test_support::tiny_gpt2(), lora_config(), 5);
  perturb<Model>(model.adapter(), 1);
  model.add_adapter("b", lora_config(), 2);
  perturb<Model>(model.adapter("b"), 2);
  model.add_adapter("c", lora_config(3), 3);
  const auto a_before = snapshot(model.adapter("default"));
  const auto c_before = snapshot(model.adapter("c"));
  // Train "b" for a few steps: only its tensors move.
  model.set_adapter("b");
  const auto b_before = snapshot(model.adapter("b"));
  peft::AdamW<double> optimizer(model.trainable_parameters(), {.lr = 1e-2});
  for (int step = 0; step < 3; ++step) {
    Tape<double> tape;
    for (auto& p : model.trainable_parameters()) p.var.zero_grad();
    auto out = model.forward(tape, test_support::padded_batch());
    tape.backward(out.loss);
    optimizer.step();
  }
  CHECK_FALSE(same_bits(snapshot(model.adapter("b")), b_before));
  {
    peft::DisableAdapterScope<Model> off(model);
    (void)model.logits(test_support::padded_batch());
  }
  model.set_adapter("c");
  model.delete_adapter("b");
  CHECK(same_bits(snapshot(model.adapter("default")), a_before));
  CHECK(same_bits(snapshot(model.adapter("c")), c_before));
}

TEST_CASE("named adapters: bad names, unknown adapters and merged adapters are clear errors") {
  using Model = Decoder<peft::arch::Gpt2, peft::LoRA, double>;
  Model model(test_support::tiny_gpt2(), lora_config(), 5);
  perturb<Model>(model.adapter(), 1);
  for (const std::string& bad :
       std::vector<std::string>{"", "default", "__base__", "a/b", ".", "..", "x\ny"})
    CHECK_THROWS_AS(model.add_adapter(bad, lora_config()), peft::ConfigError);
  CHECK(model.adapter_names().size() == 1);
  CHECK_THROWS_WITH_AS(model.set_adapter("nope"),
                       "no adapter named 'nope' (the model has 'default')", peft::ConfigError);
  CHECK_THROWS_AS(model.delete_adapter("default"), peft::ConfigError);  // the only one
  model.add_adapter("b", lora_config());
  model.merge();
  CHECK_THROWS_AS(model.set_adapter("b"), peft::ConfigError);
  Batch mixed = test_support::padded_batch();
  mixed.adapter_names = {"b", "default"};
  CHECK_THROWS_AS(model.logits(mixed), peft::ConfigError);
  model.unmerge();
  model.set_adapter("b");
  mixed.adapter_names = {"b"};  // one name for two rows
  CHECK_THROWS_AS(model.logits(mixed), peft::ShapeError);
  mixed.adapter_names = {"b", "missing"};
  CHECK_THROWS_AS(model.logits(mixed), peft::ConfigError);
}

TEST_CASE("named adapters: a method that changes the sequence refuses mixed batches") {
  peft::PrefixTuningConfig c;
  c.num_virtual_tokens = 2;
  Decoder<peft::arch::Gpt2, peft::PrefixTuning, double> model(test_support::tiny_gpt2(), c, 1);
  model.add_adapter("b", c, 2);
  Batch mixed = test_support::padded_batch();
  mixed.adapter_names = {"b", "default"};
  CHECK_THROWS_AS(model.logits(mixed), peft::ConfigError);
  // Named adapters themselves work for it.
  const Tensor<double> a = model.logits(test_support::padded_batch());
  model.set_adapter("b");
  const Tensor<double> b = model.logits(test_support::padded_batch());
  CHECK(max_relative_difference(a.data(), b.data(), a.numel()) > 0);
}

TEST_CASE_TEMPLATE("mixed batches: every row gets what it gets alone with its adapter", C,
                   NAMED_CASES) {
  using Model = typename C::Model;
  Model model(tiny_config<typename Model::Architecture>(), C::config(), 9);
  perturb<Model>(model.adapter(), 1);
  model.add_adapter("b", C::config(), 2);
  perturb<Model>(model.adapter("b"), 2);
  model.add_adapter("c", C::config(), 3);
  perturb<Model>(model.adapter("c"), 3);
  const std::vector<std::vector<std::int64_t>> rows = {
      {1, 5, 7, 2, 9}, {3, 3, 8, 1, 0}, {4, 6, 6, 2, 1}, {2, 9, 0, 5, 5}, {7, 1, 1, 3, 8}};
  const std::vector<std::string> names = {"b", "default", "__base__", "b", "c"};
  Batch mixed = rows_batch(rows);
  mixed.adapter_names = names;
  const Tensor<double> together = model.logits(mixed);
  const std::int64_t per_row = together.numel() / static_cast<std::int64_t>(rows.size());
  double worst = 0;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const Tensor<double> one = alone(model, rows[r], names[r]);
    REQUIRE(one.numel() == per_row);
    worst = std::max(worst, max_relative_difference(
                                together.data() + static_cast<std::int64_t>(r) * per_row,
                                one.data(), per_row));
  }
  // Rounding only: the grouped path adds a LoRA term after the product, the single-adapter
  // path fuses it into the product (so the sums run in another order).
  CHECK(worst < 1e-13);
  CHECK(model.active_adapter() == "default");

  // The key/value cache with a mixed batch: each step's rows as alone.
  typename Model::KvCache cache;
  const Tensor<double> prefill = model.forward_cached(mixed, cache);
  Batch next = rows_batch({{4}, {4}, {4}, {4}, {4}});
  next.adapter_names = names;
  const Tensor<double> step = model.forward_cached(next, cache);
  const std::int64_t V = model.config().vocab_size;
  worst = 0;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    std::vector<std::int64_t> context = rows[r];
    context.push_back(4);
    const Tensor<double> one = alone(model, context, names[r]);
    worst = std::max(worst, max_relative_difference(step.data() + static_cast<std::int64_t>(r) * V,
                                                    one.data() + (one.numel() - V), V));
  }
  CHECK(worst < 1e-13);
}

TEST_CASE("mixed batches: the loss's gradients reach each row's adapter (finite differences)") {
  using Model = Decoder<peft::arch::Gpt2, peft::LoRA, double>;
  Model model(test_support::tiny_gpt2(), lora_config(), 9);
  perturb<Model>(model.adapter(), 1);
  model.add_adapter("b", lora_config(), 2);
  perturb<Model>(model.adapter("b"), 2);
  Batch mixed = rows_batch({{1, 5, 7, 2}, {3, 3, 8, 1}, {4, 6, 6, 2}});
  mixed.adapter_names = {"b", "__base__", "default"};
  auto loss = [&] {
    Tape<double> tape(false);
    return model.forward(tape, mixed).loss.value()[0];
  };
  Tape<double> tape;
  for (const std::string name : {"default", "b"})
    for (auto& p : model.adapter(name).parameters()) p.var.zero_grad();
  auto out = model.forward(tape, mixed);
  tape.backward(out.loss);
  for (const std::string name : {"default", "b"}) {
    CAPTURE(name);
    for (auto& p : model.adapter(name).parameters()) {
      for (std::int64_t i = 0; i < p.var.value().numel(); i += 3) {
        double& w = p.var.value()[i];
        const double saved = w, h = 1e-6;
        w = saved + h;
        const double up = loss();
        w = saved - h;
        const double down = loss();
        w = saved;
        CHECK(p.var.grad()[i] == doctest::Approx((up - down) / (2 * h)).epsilon(1e-6));
      }
    }
  }
}

TEST_CASE("mixed batches: a checkpointed block's re-run sees the adapters its forward saw") {
  // Backward re-runs checkpointed blocks after forward() returned: with the row groups, the
  // active adapter and DisableAdapterScope of the forward, not of the moment of backward.
  using Model = Decoder<peft::arch::Llama, peft::LoRA, double>;
  Model model(test_support::tiny_llama(), lora_config(), 9);
  perturb<Model>(model.adapter(), 1);
  model.add_adapter("b", lora_config(), 2);
  perturb<Model>(model.adapter("b"), 2);
  Batch mixed = rows_batch({{1, 5, 7, 2}, {3, 3, 8, 1}, {4, 6, 6, 2}});
  mixed.adapter_names = {"b", "__base__", "default"};
  auto gradients = [&](bool checkpoint) {
    model.set_activation_checkpointing(checkpoint);
    std::vector<std::vector<double>> out;
    for (const std::string name : {"default", "b"})
      for (auto& p : model.adapter(name).parameters()) p.var.zero_grad();
    Tape<double> tape;
    auto result = model.forward(tape, mixed);
    model.set_adapter("b");  // changed between forward and backward: must not matter
    tape.backward(result.loss);
    model.set_adapter("default");
    for (const std::string name : {"default", "b"})
      for (auto& p : model.adapter(name).parameters()) out.push_back(p.var.grad().to_vector());
    return out;
  };
  const auto plain = gradients(false), checkpointed = gradients(true);
  REQUIRE(plain.size() == checkpointed.size());
  double worst = 0;
  for (std::size_t i = 0; i < plain.size(); ++i)
    worst = std::max(worst, max_relative_difference(checkpointed[i].data(), plain[i].data(),
                                                    static_cast<std::int64_t>(plain[i].size())));
  CHECK(worst < 1e-12);
  model.set_activation_checkpointing(false);
}

TEST_CASE("generate_batch: each row's tokens are those of generate() alone with its adapter") {
  using Model = Decoder<peft::arch::Llama, peft::LoRA, double>;
  Model model(test_support::tiny_llama(), lora_config(), 9);
  perturb<Model>(model.adapter(), 1, 1.0);
  model.add_adapter("b", lora_config(), 2);
  perturb<Model>(model.adapter("b"), 2, 1.0);
  const std::vector<std::vector<std::int64_t>> prompts = {{1, 5, 7}, {3, 3, 8}, {1, 5, 7}};
  const std::vector<std::string> names = {"b", "__base__", "default"};
  for (const double temperature : {0.0, 0.9}) {
    CAPTURE(temperature);
    peft::GenerateOptions o;
    o.max_new_tokens = 12;
    o.temperature = temperature;
    o.seed = 4;
    o.stop_tokens = {11};
    for (const bool cache : {true, false}) {
      o.use_cache = cache;
      const auto together = peft::generate_batch(model, prompts, names, o);
      REQUIRE(together.size() == prompts.size());
      for (std::size_t r = 0; r < prompts.size(); ++r) {
        std::vector<std::int64_t> expected;
        if (names[r] == "__base__") {
          peft::DisableAdapterScope<Model> off(model);
          expected = peft::generate(model, prompts[r], o);
        } else {
          model.set_adapter(names[r]);
          expected = peft::generate(model, prompts[r], o);
          model.set_adapter("default");
        }
        CHECK(together[r] == expected);
      }
    }
  }
  CHECK_THROWS_AS(peft::generate_batch(model, {{1, 2}, {1, 2, 3}}, {}), peft::ConfigError);
  CHECK_THROWS_AS(peft::generate_batch(model, {{1, 2}}, {"b", "b"}), peft::ConfigError);
}

TEST_CASE("named adapters: saved in the reference layout, each loads back bit for bit") {
  using Model = Decoder<peft::arch::Gpt2, peft::LoRA, float>;  // files hold F32
  Model model(test_support::tiny_gpt2(), lora_config(), 5);
  perturb<Model>(model.adapter(), 1);
  model.add_adapter("french", lora_config(3), 2);
  perturb<Model>(model.adapter("french"), 2);
  const auto dir = scratch_dir("save");
  peft::save_adapters(model, dir);
  CHECK(std::filesystem::exists(dir / "adapter_config.json"));
  CHECK(std::filesystem::exists(dir / "adapter_model.safetensors"));
  CHECK(std::filesystem::exists(dir / "french" / "adapter_config.json"));
  CHECK(peft::io::load_json(dir / "french" / "adapter_config.json")["r"] == 3);
  // Saving the default again keeps the other adapter's sub-folder.
  peft::save_adapters(model, dir, "default");
  CHECK(std::filesystem::exists(dir / "french" / "adapter_model.safetensors"));

  Model fresh(test_support::tiny_gpt2(), lora_config(), 5);
  peft::load_adapter(fresh, dir / "french", "french");
  CHECK(same_bits(snapshot(fresh.adapter("french")), snapshot(model.adapter("french"))));
  CHECK(fresh.active_adapter() == "default");
  model.set_adapter("french");
  fresh.set_adapter("french");
  const Tensor<float> a = model.logits(test_support::padded_batch());
  const Tensor<float> b = fresh.logits(test_support::padded_batch());
  CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * a.numel()) == 0);

  // A folder that does not load leaves the model as it was.
  const auto broken = scratch_dir("broken");
  std::filesystem::copy(dir / "french", broken / "x");
  std::ofstream(broken / "x" / "adapter_model.safetensors", std::ios::trunc) << "not a file";
  CHECK_THROWS_AS(peft::load_adapter(fresh, broken / "x", "spanish"), peft::FileError);
  CHECK(fresh.adapter_names() == std::vector<std::string>{"default", "french"});
  std::ofstream(broken / "x" / "adapter_config.json", std::ios::trunc)
      << R"({"peft_type": "IA3", "target_modules": ["c_attn"]})";
  CHECK_THROWS_AS(peft::load_adapter(fresh, broken / "x", "spanish"), peft::ConfigError);
  CHECK_THROWS_AS(peft::save_adapters(model, dir, "nope"), peft::ConfigError);
  std::filesystem::remove_all(dir);
  std::filesystem::remove_all(broken);
}

TEST_CASE("named adapters: a composite's named adapters save and load in the composite layout") {
  using Model = Decoder<peft::arch::Gpt2, peft::Compose<peft::LoRA, peft::IA3>, float>;
  const typename Model::AdapterPolicy::Config config{lora_config(), peft::Ia3Config{}};
  Model model(test_support::tiny_gpt2(), config, 5);
  model.add_adapter("two", config, 2);
  perturb<Model>(model.adapter("two"), 2);
  const auto dir = scratch_dir("compose");
  peft::save_adapters(model, dir);
  Model fresh(test_support::tiny_gpt2(), config, 5);
  peft::load_adapter(fresh, dir / "two", "two");
  CHECK(same_bits(snapshot(fresh.adapter("two")), snapshot(model.adapter("two"))));
  std::filesystem::remove_all(dir);
}

}  // namespace test_named_adapters
