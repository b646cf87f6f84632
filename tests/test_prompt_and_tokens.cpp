// LLaMA-Adapter (adaption prompts: gated prompt attention in the top layers, the decoder's
// adapt_attention hook) and trainable tokens (rows of the token embedding, the decoder's
// token_embedding hook). For each, on both tiny models: the model's finite-difference gradients
// in double, the start at the base model (a zero gate; rows equal to the embedding's), save →
// load → the same logits, counts from shapes equal to the attached tensors; trainable tokens'
// merge → unmerge; LLaMA-Adapter under the key/value cache; the configs' errors; the
// reference's counts (tests/data/golden_methods/counts.json) and cases (golden_methods).
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <peft/commands/count.hpp>
#include <peft/methods/additive/llama_adapter.hpp>
#include <peft/methods/selective/trainable_tokens.hpp>
#include <peft/peft.hpp>
#include <peft/testing/golden.hpp>
#include <peft/testing/gradcheck.hpp>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_prompt_and_tokens {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::Tape;
using peft::Tensor;
using peft::Var;
using test_support::max_abs_diff;
using test_support::padded_batch;
using test_support::perturb_adapter;
using test_support::tiny_config;

struct LlamaAdapterCase {
  using Policy = peft::LlamaAdapter;
  static constexpr const char* name = "adaption_prompt";
  static constexpr int start = 0;  // the gate starts at zero
  static peft::AdaptionPromptConfig config() {
    peft::AdaptionPromptConfig c;
    c.adapter_len = 3;
    c.adapter_layers = 1;  // the top layer only
    return c;
  }
};
struct TrainableTokensCase {
  using Policy = peft::TrainableTokens;
  static constexpr const char* name = "trainable_tokens";
  static constexpr int start = 0;  // the rows start as the table's
  static peft::TrainableTokensConfig config() {
    peft::TrainableTokensConfig c;
    c.token_indices = {5, 0, 8, 11};  // 11: in no sequence of the batch
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;
#define PT_CASES(Arch) Case<Arch, LlamaAdapterCase>, Case<Arch, TrainableTokensCase>
#define ALL_CASES PT_CASES(peft::arch::Gpt2), PT_CASES(peft::arch::Llama)

using test_support::case_name;
using test_support::make_model;
using test_support::ModelOf;
namespace checks = test_support::method_checks;

// This file's methods only: the golden harness and the count instantiated for two methods.
using Mine = peft::MethodRegistry<peft::LlamaAdapter, peft::TrainableTokens>;

}  // namespace

TEST_CASE_TEMPLATE("prompt and tokens: analytic gradients match finite differences", C, ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("prompt and tokens: the adapted model starts at the base model", C, ALL_CASES) {
  checks::starts_at_base<C>();
  INFO(case_name<C>());
  auto model = make_model<C, double>(21);  // and the adapter, once moved, changes the model
  Decoder<typename C::Arch, peft::NoPeft, double> base(tiny_config<typename C::Arch>(), {}, 21);
  perturb_adapter(model, 4);
  CHECK(max_abs_diff(model.logits(padded_batch()), base.logits(padded_batch())) > 1e-3);
}

TEST_CASE_TEMPLATE("prompt and tokens: save, load, same logits; counts from shapes", C, ALL_CASES) {
  checks::save_load_and_count<C>("prompt_and_tokens");
}

TEST_CASE_TEMPLATE("trainable tokens: merge writes the rows, unmerge restores the table", Arch,
                   peft::arch::Gpt2, peft::arch::Llama) {
  Decoder<Arch, peft::TrainableTokens, double> model(tiny_config<Arch>(),
                                                     TrainableTokensCase::config(), 5);
  perturb_adapter(model, 5);
  const Batch batch = padded_batch();
  const Tensor<double> adapted = model.logits(batch);
  Tensor<double> table;
  for (auto& p : model.base_parameters())
    if (p.name.ends_with("wte.weight") || p.name.ends_with("embed_tokens.weight"))
      table = p.var.value();
  REQUIRE(table.numel() > 0);
  model.merge();
  CHECK(max_abs_diff(model.logits(batch), adapted) < 1e-12);
  model.unmerge();
  CHECK(max_abs_diff(model.logits(batch), adapted) < 1e-12);
  for (auto& p : model.base_parameters())
    if (p.name.ends_with("wte.weight") || p.name.ends_with("embed_tokens.weight"))
      CHECK(max_abs_diff(p.var.value(), table) == 0.0);
}

TEST_CASE("trainable tokens: GPT-2's tied head sees the rows, and its file holds them twice") {
  Decoder<peft::arch::Gpt2, peft::TrainableTokens, double> model(test_support::tiny_gpt2(),
                                                                 TrainableTokensCase::config(), 6);
  perturb_adapter(model, 6);
  const auto params = model.adapter().parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "base_model.model.transformer.wte.trainable_tokens_delta");
  CHECK(params[1].name == "base_model.model.lm_head.trainable_tokens_delta");
  CHECK(!params[1].var.requires_grad());
  CHECK(max_abs_diff(params[0].var.value(), params[1].var.value()) == 0.0);
  // Token 11 is in no sequence: its row reaches the logits only through the tied head.
  Tape<double> tape;
  auto out = model.forward(tape, padded_batch());
  tape.backward(out.loss);
  const Tensor<double>& g = params[0].var.grad();
  double row11 = 0;
  for (std::int64_t j = 0; j < g.dim(1); ++j) row11 += std::abs(g[3 * g.dim(1) + j]);
  CHECK(row11 > 0);
}

TEST_CASE("LLaMA-Adapter: the key/value cache gives the full forward's logits") {
  auto config = LlamaAdapterCase::config();
  config.adapter_layers = 2;
  Decoder<peft::arch::Llama, peft::LlamaAdapter, double> model(test_support::tiny_llama(), config,
                                                               9);
  perturb_adapter(model, 9);
  Batch full;
  full.batch = 1;
  full.seq = 6;
  full.input_ids = {1, 5, 7, 2, 9, 3};
  Batch head = full, next = full;
  head.seq = 5;
  head.input_ids.resize(5);
  next.seq = 1;
  next.input_ids = {3};
  const Tensor<double> logits = model.logits(full);  // [1, 6, V]
  Decoder<peft::arch::Llama, peft::LlamaAdapter, double>::KvCache cache;
  const Tensor<double> first = model.forward_cached(head, cache);
  const Tensor<double> second = model.forward_cached(next, cache);
  const std::int64_t V = logits.dim(2);
  double err = 0;
  for (std::int64_t j = 0; j < V; ++j) {
    err = std::max(err, std::abs(first[j] - logits[4 * V + j]));
    err = std::max(err, std::abs(second[j] - logits[5 * V + j]));
  }
  CHECK(err < 1e-12);
}

TEST_CASE("prompt and tokens: configs that do not fit the model are refused") {
  using Llama = Decoder<peft::arch::Llama, peft::LlamaAdapter, double>;
  auto a = LlamaAdapterCase::config();
  a.adapter_layers = 3;
  CHECK_THROWS_WITH_AS(Llama(test_support::tiny_llama(), a, 1),
                       doctest::Contains("'adapter_layers': expected 1 ..= 2"), peft::ConfigError);
  a = LlamaAdapterCase::config();
  a.target_modules = "attn";
  CHECK_THROWS_WITH_AS(Llama(test_support::tiny_llama(), a, 1),
                       doctest::Contains("'target_modules': expected \"self_attn\""),
                       peft::ConfigError);
  using Tokens = Decoder<peft::arch::Gpt2, peft::TrainableTokens, double>;
  auto t = TrainableTokensCase::config();
  t.token_indices = {3, 12};
  CHECK_THROWS_WITH_AS(Tokens(test_support::tiny_gpt2(), t, 1),
                       doctest::Contains("below the vocabulary size 12, found 12"),
                       peft::ConfigError);
  t.token_indices = {3, 4, 3};
  CHECK_THROWS_WITH_AS(Tokens(test_support::tiny_gpt2(), t, 1),
                       doctest::Contains("distinct indices"), peft::ConfigError);
  t.token_indices = {};
  CHECK_THROWS_WITH_AS(Tokens(test_support::tiny_gpt2(), t, 1),
                       doctest::Contains("at least one token index"), peft::ConfigError);
  // The field's own check, when read from a file.
  nlohmann::json j = {{"peft_type", "TRAINABLE_TOKENS"}, {"token_indices", {1, -2}}};
  CHECK_THROWS_AS(peft::TrainableTokensConfig::from_json(j, "adapter_config.json"),
                  peft::ConfigError);
  // Written as the reference writes it.
  const auto written = TrainableTokensCase::config().to_json(test_support::tiny_llama());
  CHECK(written["target_modules"] == "model.embed_tokens");
  CHECK(LlamaAdapterCase::config().to_json(test_support::tiny_gpt2())["target_modules"] == "attn");
}

TEST_CASE("prompt and tokens: the reference's counts and cases") {
  const auto rows = peft::io::load_json(std::filesystem::path(PEFT_TEST_DATA_DIR) /
                                        "golden_methods" / "counts.json");
  int mine = 0;
  for (const auto& row : rows) {
    const std::string type = row["adapter_config"]["peft_type"].get<std::string>();
    if (type != "ADAPTION_PROMPT" && type != "TRAINABLE_TOKENS") continue;
    INFO(row["model"].get<std::string>() << " " << type);
    const auto [trainable, all] = peft::commands::count_from_configs<Mine>(
        row["model_config"], "model_config", row["adapter_config"], "adapter_config");
    CHECK(peft::trainable_parameters_line(trainable, all) == row["line"].get<std::string>());
    ++mine;
  }
  CHECK(mine == 3);
  const auto dir = std::filesystem::path(PEFT_TEST_DATA_DIR) / "golden_methods";
  for (const char* c : {"llama_adaption_prompt", "gpt2_adaption_prompt", "llama_trainable_tokens",
                        "gpt2_trainable_tokens"}) {
    peft::testing::GoldenReport report;
    INFO(c);
    CHECK(peft::testing::run_golden_case_throwing<Mine>(dir / c, report));
    INFO(report.line());
    CHECK(report.passed);
    CHECK(report.checks.size() >= 6);
  }
}

#undef PT_CASES
#undef ALL_CASES
}  // namespace test_prompt_and_tokens
