// AdapterDrop<PfeifferAdapter> (include/peft/methods/hybrid/adapter_drop.hpp): checked against
// the paper's definition (no reference implementation in HF peft).
#include <doctest/doctest.h>
#include <unistd.h>

#include <peft/methods/hybrid/adapter_drop.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <set>
#include <string>

#include "adapter_checks.hpp"

namespace test_adapter_drop {

using namespace test_support;
using Drop = peft::AdapterDrop<peft::PfeifferAdapter>;

inline peft::PfeifferAdapter::Config pfeiffer() {
  peft::PfeifferAdapter::Config c;
  c.bottleneck_size = 4;
  return c;
}
inline Drop::Config drop(int n, bool robust = false) {
  Drop::Config c;
  c.inner = pfeiffer();
  c.drop_layers = n;
  c.robust = robust;
  return c;
}

struct DropOne {
  using Policy = Drop;
  static constexpr const char* name = "adapter_drop n=1";
  static constexpr int start = 0;
  static Drop::Config config() { return drop(1); }
};
struct DropRobust {
  using Policy = Drop;
  static constexpr const char* name = "adapter_drop robust";
  static constexpr int start = 0;
  static Drop::Config config() { return drop(1, true); }
};
#define DROP_CASES                                                               \
  MethodCase<peft::arch::Gpt2, DropOne>, MethodCase<peft::arch::Llama, DropOne>, \
      MethodCase<peft::arch::Gpt2, DropRobust>, MethodCase<peft::arch::Llama, DropRobust>

TEST_CASE_TEMPLATE("AdapterDrop: analytic gradients match finite differences", C, DROP_CASES) {
  method_checks::gradients_match_finite_differences<C>();
}
TEST_CASE_TEMPLATE("AdapterDrop: starts at the base model", C, DROP_CASES) {
  method_checks::starts_at_base<C>();
}
TEST_CASE_TEMPLATE("AdapterDrop: save, load, same logits; counts from shapes", C, DROP_CASES) {
  method_checks::save_load_and_count<C>("adapter_drop");
}

template <class Arch>
void equals_pfeiffer_with_layers_removed() {
  using Base = peft::Decoder<Arch, peft::PfeifferAdapter, double>;
  using Model = peft::Decoder<Arch, Drop, double>;
  const peft::Batch batch = padded_batch();
  for (int n : {0, 1, 2}) {
    CAPTURE(n);
    peft::PfeifferAdapter::Config kept = pfeiffer();
    for (int l = n; l < 2; ++l) kept.layers_to_transform.push_back(l);
    if (n == 2) kept.layers_to_transform = {-1};
    Base base(tiny_config<Arch>(), n == 0 ? pfeiffer() : kept, 11);
    Model model(tiny_config<Arch>(), drop(n), 11);
    auto bp = base.adapter().parameters();
    auto mp = model.adapter().parameters();
    REQUIRE(bp.size() == mp.size());
    CHECK(mp.size() == std::size_t(4 * (2 - n)));  // down, up: weight and bias per layer kept
    for (auto& p : mp) {
      const bool lower = p.name.find(".0.") != std::string::npos;
      CHECK_FALSE((n >= 1 && lower));  // layers < n hold no tensor
    }
    perturb_adapter(base, 3);
    perturb_adapter(model, 3);
    CHECK(max_abs_diff(base.logits(batch), model.logits(batch)) == 0.0);
    if (mp.empty()) continue;
    peft::Tape<double> t1, t2;
    auto r1 = base.forward(t1, batch);
    auto r2 = model.forward(t2, batch);
    CHECK(r1.loss.value()[0] == r2.loss.value()[0]);
    t1.backward(r1.loss);
    t2.backward(r2.loss);
    for (std::size_t i = 0; i < mp.size(); ++i)
      CHECK(max_abs_diff(bp[i].var.grad(), mp[i].var.grad()) == 0.0);
  }
}
TEST_CASE("AdapterDrop: n = 0 is P; n > 0 is P without the adapters of layers < n") {
  equals_pfeiffer_with_layers_removed<peft::arch::Gpt2>();
  equals_pfeiffer_with_layers_removed<peft::arch::Llama>();
}

TEST_CASE("AdapterDrop: backward records nothing below layer n") {
  auto tape_size = [](int n) {
    peft::Decoder<peft::arch::Llama, Drop, double> m(tiny_llama(), drop(n), 11);
    peft::Tape<double> tape;
    auto r = m.forward(tape, padded_batch());
    return tape.size();
  };
  const std::size_t all = tape_size(0), upper = tape_size(1);
  CHECK(upper < all);
  CHECK(upper * 2 < all + 8);  // about half the layers' closures are gone
}

TEST_CASE(
    "AdapterDrop robust: steps draw n from the seeded generator; evaluation uses drop_layers") {
  auto draws = [](std::uint64_t seed) {
    peft::ModelConfig cfg = tiny_llama();
    cfg.num_layers = 6;
    peft::Decoder<peft::arch::Llama, Drop, double> m(cfg, drop(2, true), seed);
    std::vector<int> out;
    m.set_training(true);
    for (int step = 0; step < 24; ++step) {
      peft::Tape<double> tape;
      m.forward(tape, padded_batch());
      out.push_back(m.adapter().current_drop());
    }
    m.set_training(false);
    m.logits(padded_batch());
    CHECK(m.adapter().current_drop() == 2);
    return out;
  };
  const std::vector<int> a = draws(5), b = draws(5);
  CHECK(a == b);
  const std::set<int> distinct(a.begin(), a.end());
  CHECK(distinct.size() >= 3);
  for (int n : a) CHECK((n >= 0 && n <= 5));
  // every layer holds its adapter
  peft::Decoder<peft::arch::Llama, Drop, float> m(tiny_llama(), drop(1, true), 11);
  CHECK(m.adapter().parameters().size() == 8);
}

TEST_CASE("AdapterDrop robust: evaluation equals the fixed-n model on the same tensors") {
  peft::Decoder<peft::arch::Gpt2, Drop, double> robust(tiny_gpt2(), drop(1, true), 11);
  perturb_adapter(robust, 3);
  peft::Decoder<peft::arch::Gpt2, peft::PfeifferAdapter, double> full(tiny_gpt2(), pfeiffer(), 11);
  auto rp = robust.adapter().parameters();
  auto fp = full.adapter().parameters();
  REQUIRE(rp.size() == fp.size());
  for (std::size_t i = 0; i < rp.size(); ++i) fp[i].var.value() = rp[i].var.value();
  // full model with layer 0's adapter switched off: zero its up-projection
  for (auto& p : fp)
    if (p.name.find("h.0.") != std::string::npos && p.name.find(".up.") != std::string::npos)
      p.var.value().set_zero();
  CHECK(max_abs_diff(robust.logits(padded_batch()), full.logits(padded_batch())) == 0.0);
}

TEST_CASE("AdapterDrop: config validation names the field, the expected and the found") {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const std::string over =
      message([] { peft::Decoder<peft::arch::Llama, Drop, float> m(tiny_llama(), drop(3), 11); });
  CHECK(over.find("drop_layers expected <= num_layers 2, found 3") != std::string::npos);
  const std::string negative =
      message([] { peft::Decoder<peft::arch::Llama, Drop, float> m(tiny_llama(), drop(-1), 11); });
  CHECK(negative.find("drop_layers expected >= 0, found -1") != std::string::npos);
  nlohmann::json j = drop(1).to_json(tiny_llama());
  CHECK(j["peft_type"] == "ADAPTER_DROP");
  CHECK(j["adapter_drop_peft_type"] == "PFEIFFER_ADAPTER");
  // An unknown key is ignored, as by every config of the library (and the reference's
  // from_pretrained): files written by newer versions still load.
  j["no_such_field"] = 1;
  CHECK(Drop::Config::from_json(j, "cfg.json").drop_layers == 1);
  j.erase("no_such_field");
  j["drop_layers"] = -2;
  CHECK(message([&] { Drop::Config::from_json(j, "cfg.json"); }).find("cfg.json: drop_layers") !=
        std::string::npos);
}

}  // namespace test_adapter_drop
