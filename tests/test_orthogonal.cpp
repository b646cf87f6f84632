// The orthogonal family and the newer reparameterized methods: OFT (Neumann and exact Cayley,
// block_share, COFT), BOFT (butterfly factors), HRA (each reflection, Gram–Schmidt), MiSS (full and
// mini shards), C3A (block-circulant, through the FFT) and VB-LoRA (a shared vector bank). For
// every method: its ops' and its model's finite-difference gradients in double, merge → unmerge
// restores the base, save → load → the same logits, the start at the base model where the method
// promises it, counts from shapes equal to the attached tensors; the ops against their definitions
// (R orthogonal, the Neumann series against its sum, HRA's reflections against H built, the FFT
// product against the circulant matrix built, top-k mixing against its softmax).
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <numbers>
#include <peft/commands/count.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_orthogonal {

namespace {

using peft::Batch;
using peft::Decoder;
using peft::Tape;
using peft::Tensor;
using peft::Var;
using test_support::padded_batch;
using test_support::tiny_config;

using test_support::max_abs_diff;
using test_support::perturb_adapter;
peft::TargetRules targets() { return test_support::both_model_targets(); }

// exact_start: 0 = bit-exact, 1 = to rounding, 2 = not at the base (a random init).
struct OftCase {
  using Policy = peft::OFT;
  static constexpr const char* name = "oft neumann";
  static constexpr int start = 0;
  static peft::OftConfig config() {
    peft::OftConfig c;
    c.oft_block_size = 4;
    c.targets = targets();
    return c;
  }
};
struct OftExactCase {
  using Policy = peft::OFT;
  static constexpr const char* name = "oft exact cayley, r blocks";
  static constexpr int start = 0;
  static peft::OftConfig config() {
    peft::OftConfig c = OftCase::config();
    c.oft_block_size = 0;
    c.r = 2;
    c.use_cayley_neumann = false;
    return c;
  }
};
struct OftSharedCase {
  using Policy = peft::OFT;
  static constexpr const char* name = "oft block_share";
  static constexpr int start = 0;
  static peft::OftConfig config() {
    peft::OftConfig c = OftCase::config();
    c.block_share = true;
    c.num_cayley_neumann_terms = 3;
    return c;
  }
};
struct CoftCase {  // eps wide enough that the projection is idle in the gradient check
  using Policy = peft::OFT;
  static constexpr const char* name = "coft";
  static constexpr int start = 0;
  static peft::OftConfig config() {
    peft::OftConfig c = OftCase::config();
    c.coft = true;
    c.eps = 100;
    return c;
  }
};
struct HraCase {
  using Policy = peft::HRA;
  static constexpr const char* name = "hra";
  static constexpr int start = 1;  // paired reflections cancel to rounding
  static peft::HraConfig config() {
    peft::HraConfig c;
    c.r = 4;
    c.targets = targets();
    return c;
  }
};
struct HraGramSchmidtCase {
  using Policy = peft::HRA;
  static constexpr const char* name = "hra apply_GS";
  static constexpr int start = 2;  // paired columns have no Gram–Schmidt basis: a random init
  static peft::HraConfig config() {
    peft::HraConfig c = HraCase::config();
    c.r = 3;
    c.apply_GS = true;
    c.init_weights = false;
    return c;
  }
};
struct MissCase {
  using Policy = peft::MiSS;
  static constexpr const char* name = "miss (r = 3: a padded remainder)";
  static constexpr int start = 0;
  static peft::MissConfig config() {
    peft::MissConfig c;
    c.r = 3;
    c.targets = targets();
    return c;
  }
};
struct MissMiniCase {
  using Policy = peft::MiSS;
  static constexpr const char* name = "miss mini";
  static constexpr int start = 0;
  static peft::MissConfig config() {
    peft::MissConfig c = MissCase::config();
    c.r = 4;
    c.mini_r = 4;
    c.init = peft::MissConfig::Init::Mini;
    return c;
  }
};

struct BoftCase {
  using Policy = peft::BOFT;
  static constexpr const char* name = "boft, one factor";
  static constexpr int start = 0;
  static peft::BoftConfig config() {
    peft::BoftConfig c;
    c.boft_block_size = 4;
    c.targets = targets();
    return c;
  }
};
struct BoftButterflyCase {
  using Policy = peft::BOFT;
  static constexpr const char* name = "boft, two butterfly factors, random init";
  static constexpr int start = 2;  // init_weights false: R and s random (s scales the outputs)
  static peft::BoftConfig config() {
    peft::BoftConfig c;
    c.boft_block_size = 2;
    c.boft_n_butterfly_factor = 2;
    c.init_weights = false;
    c.targets = targets();
    return c;
  }
};
struct FourierFtCase {
  using Policy = peft::FourierFT;
  static constexpr const char* name = "fourierft";
  static constexpr int start = 2;  // the reference's default init: c ~ N(0, 1)
  static peft::FourierFtConfig config() {
    peft::FourierFtConfig c;
    c.n_frequency = 7;
    c.scaling = 20;
    c.targets = targets();
    return c;
  }
};
struct FourierFtZeroCase {
  using Policy = peft::FourierFT;
  static constexpr const char* name = "fourierft init_weights true";
  static constexpr int start = 0;
  static peft::FourierFtConfig config() {
    peft::FourierFtConfig c = FourierFtCase::config();
    c.init_weights = true;
    return c;
  }
};
struct C3aCase {
  using Policy = peft::C3A;
  static constexpr const char* name = "c3a";
  static constexpr int start = 2;  // the reference's default init (xavier_uniform) is not zero
  static peft::C3aConfig config() {
    peft::C3aConfig c;
    c.block_size = 4;
    c.targets = targets();
    return c;
  }
};
struct C3aZeroCase {
  using Policy = peft::C3A;
  static constexpr const char* name = "c3a init_weights true";
  static constexpr int start = 0;
  static peft::C3aConfig config() {
    peft::C3aConfig c = C3aCase::config();
    c.init = peft::C3aConfig::Init::Zeros;
    return c;
  }
};
struct VbloraCase {
  using Policy = peft::VBLoRA;
  static constexpr const char* name = "vblora";
  static constexpr int start = 2;  // random logits and bank: the update starts non-zero
  static peft::VbLoraConfig config() {
    peft::VbLoraConfig c;
    c.r = 2;
    c.num_vectors = 6;
    c.vector_length = 4;
    c.topk = 2;
    c.targets = targets();
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;

#define ORTHOGONAL_CASES(Arch)                                                                    \
  Case<Arch, OftCase>, Case<Arch, OftExactCase>, Case<Arch, OftSharedCase>, Case<Arch, CoftCase>, \
      Case<Arch, HraCase>, Case<Arch, HraGramSchmidtCase>, Case<Arch, MissCase>,                  \
      Case<Arch, MissMiniCase>, Case<Arch, C3aCase>, Case<Arch, C3aZeroCase>,                     \
      Case<Arch, VbloraCase>, Case<Arch, BoftCase>, Case<Arch, BoftButterflyCase>,                \
      Case<Arch, FourierFtCase>, Case<Arch, FourierFtZeroCase>
#define ALL_CASES ORTHOGONAL_CASES(peft::arch::Gpt2), ORTHOGONAL_CASES(peft::arch::Llama)

using test_support::case_name;
using test_support::make_model;
using test_support::ModelOf;
namespace checks = test_support::method_checks;

using Inputs = std::vector<Var<double>>;
Var<double> input(const peft::Shape& shape, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return Var<double>(peft::testing::random_tensor(shape, seed, lo, hi), true);
}
void check_op(const peft::testing::DoubleFunction& f, Inputs inputs) {
  peft::testing::GradCheckOptions options;
  options.rtol = 1e-6;
  options.atol = 1e-8;
  const auto result = peft::testing::check_gradients(f, std::move(inputs), options);
  INFO(result.message);
  CHECK(result.ok);
}

}  // namespace

TEST_CASE("orthogonal ops: analytic gradients match finite differences") {
  namespace ops = peft::ops;
  SUBCASE("skew_symmetric") {
    check_op([](Tape<double>& t, Inputs& x) { return ops::skew_symmetric(t, x[0], 4); },
             {input({2, 6}, 1)});
  }
  SUBCASE("cayley") {
    check_op(
        [](Tape<double>& t, Inputs& x) { return ops::cayley(t, ops::skew_symmetric(t, x[0], 3)); },
        {input({2, 3}, 2, -0.5, 0.5)});
    check_op([](Tape<double>& t, Inputs& x) { return ops::cayley(t, x[0]); },
             {input({2, 3, 3}, 3, -0.3, 0.3)});  // any invertible I + Q, not only skew ones
  }
  SUBCASE("cayley_neumann") {
    for (int terms : {2, 3, 5, 7})
      check_op(
          [terms](Tape<double>& t, Inputs& x) {
            return ops::cayley_neumann(t, ops::skew_symmetric(t, x[0], 3), terms);
          },
          {input({2, 3}, 4, -0.5, 0.5)});
  }
  SUBCASE("block_rotate") {
    check_op([](Tape<double>& t, Inputs& x) { return ops::block_rotate(t, x[0], x[1]); },
             {input({2, 3, 6}, 5), input({3, 2, 2}, 6)});
    check_op([](Tape<double>& t, Inputs& x) { return ops::block_rotate(t, x[0], x[1]); },
             {input({4, 6}, 7), input({1, 3, 3}, 8)});  // one block shared
  }
  SUBCASE("block_circular") {
    check_op([](Tape<double>& t, Inputs& x) { return ops::block_circular(t, x[0], x[1]); },
             {input({2, 3, 8}, 10), input({3, 2, 4}, 11)});
    check_op([](Tape<double>& t, Inputs& x) { return ops::block_circular(t, x[0], x[1]); },
             {input({4, 6}, 12), input({1, 2, 3}, 13)});  // an odd block
  }
  SUBCASE("topk_mix") {
    check_op([](Tape<double>& t, Inputs& x) { return ops::topk_mix(t, x[0], x[1], 3); },
             {input({2, 3, 5}, 14), input({5, 4}, 15)});
  }
  SUBCASE("gather_features") {
    check_op(
        [](Tape<double>& t, Inputs& x) {
          return ops::gather_features(t, x[0], {2, 0, 1, 1});
        },
        {input({2, 3}, 16)});
  }
  SUBCASE("normalize_columns") {
    check_op([](Tape<double>& t, Inputs& x) { return ops::normalize_columns(t, x[0]); },
             {input({5, 3}, 9)});
  }
}

TEST_CASE("orthogonal ops: their definitions") {
  namespace ops = peft::ops;
  Tape<double> tape(false);
  const Var<double> v(peft::testing::random_tensor({2, 6}, 1, -0.4, 0.4));
  const Var<double> q = ops::skew_symmetric(tape, v, 4);
  // The strict upper triangle in row-major order, its negative below, zero diagonal.
  CHECK(q.value()[0 * 4 + 1] == v.value()[0]);
  CHECK(q.value()[1 * 4 + 0] == -v.value()[0]);
  CHECK(q.value()[16 + 2 * 4 + 3] == v.value()[6 + 5]);
  CHECK(q.value()[16 + 3 * 4 + 3] == 0.0);
  // The exact transform is orthogonal, and (I − Q)(I + Q)⁻¹.
  const Tensor<double> r = ops::cayley(tape, q).value();
  for (int k = 0; k < 2; ++k) {
    Eigen::Map<const peft::RowMatrix<double>> rk(r.data() + 16 * k, 4, 4),
        qk(q.value().data() + 16 * k, 4, 4);
    const peft::RowMatrix<double> eye = peft::RowMatrix<double>::Identity(4, 4);
    CHECK((rk * rk.transpose() - eye).cwiseAbs().maxCoeff() < 1e-14);
    CHECK((rk * (eye + qk) - (eye - qk)).cwiseAbs().maxCoeff() < 1e-14);
    // The long series approaches (I + Q)(I − Q)⁻¹ (the exact transform's inverse).
    const Tensor<double> series = ops::cayley_neumann(tape, q, 60).value();
    Eigen::Map<const peft::RowMatrix<double>> sk(series.data() + 16 * k, 4, 4);
    CHECK((sk - (eye + qk) * (eye - qk).inverse()).cwiseAbs().maxCoeff() < 1e-10);  // ‖Q‖ < 1
    // Five terms, as the reference's loop adds them: I + 2Q + 2Q² + 2Q³ + Q⁴.
    const Tensor<double> five = ops::cayley_neumann(tape, q, 5).value();
    Eigen::Map<const peft::RowMatrix<double>> fk(five.data() + 16 * k, 4, 4);
    const peft::RowMatrix<double> q2 = qk * qk, q3 = q2 * qk;
    CHECK((fk - (eye + 2 * qk + 2 * q2 + 2 * q3 + q3 * qk)).cwiseAbs().maxCoeff() < 1e-14);
  }
}

TEST_CASE("FourierFT: torch.randperm's draw, and the update equal to the inverse 2-D DFT") {
  // torch.randperm(10, generator=torch.Generator().manual_seed(3)) and the first entries of
  // torch.randperm(1000, ...) (torch 2.15, CPU).
  CHECK(peft::FourierFT::torch_randperm(10, 3, 10) ==
        std::vector<std::int64_t>{6, 0, 3, 7, 8, 5, 1, 9, 2, 4});
  CHECK(peft::FourierFT::torch_randperm(1000, 3, 4) ==
        std::vector<std::int64_t>{986, 114, 871, 894});
  peft::FourierFtConfig c;
  c.n_frequency = 5;
  c.scaling = 3;
  c.random_loc_seed = 9;
  c.targets.target_modules.names = {"q_proj"};
  Decoder<peft::arch::Llama, peft::FourierFT, double> model(test_support::tiny_llama(), c, 2);
  const auto* q = model.linear_modules()[0];
  const auto params = model.adapter().parameters();
  REQUIRE(params.size() == 2);  // two layers' q_proj
  const Tensor<double>& spectrum = params[0].var.value();
  const std::int64_t out = q->out_features, in = q->in_features;
  const auto picks = peft::FourierFT::torch_randperm(out * in, 9, 5);
  // ΔW = Re(ifft2(S)) · scaling, S [out, in] zero but for the picks: the definition, term by term.
  peft::RowMatrix<double> expected = peft::RowMatrix<double>::Zero(out, in);
  for (int k = 0; k < 5; ++k)
    for (std::int64_t p = 0; p < out; ++p)
      for (std::int64_t t = 0; t < in; ++t)
        expected(p, t) += spectrum[k] * 3.0 / double(out * in) *
                          std::cos(2 * std::numbers::pi *
                                   (double(picks[k] / in * p) / double(out) +
                                    double(picks[k] % in * t) / double(in)));
  std::vector<Tensor<double>> before;
  for (auto* lin : model.linear_modules()) before.push_back(lin->weight.value());
  model.merge();
  const auto merged = model.linear_modules()[0]->weight.value().matrix() - before[0].matrix();
  CHECK((merged - expected).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE("block_circular equals the product with the block-circulant matrix built") {
  Tape<double> tape(false);
  const Var<double> x(peft::testing::random_tensor({3, 10}, 1));
  const Var<double> w(peft::testing::random_tensor({3, 2, 5}, 2));  // [m, n, b]: C [15, 10]
  const Tensor<double> y = peft::ops::block_circular(tape, x, w).value();
  peft::RowMatrix<double> c(15, 10);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 5; ++k)
        for (int t = 0; t < 5; ++t)
          c(i * 5 + k, j * 5 + t) = w.value()[(i * 2 + j) * 5 + (t - k + 5) % 5];
  CHECK((y.matrix() - x.value().matrix() * c.transpose()).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE("topk_mix: the softmax of the k largest logits over their bank rows") {
  Tape<double> tape(false);
  Tensor<double> l(peft::Shape{1, 4});
  l[0] = 0.5, l[1] = 2.0, l[2] = -1.0, l[3] = 1.0;
  const Var<double> bank(peft::testing::random_tensor({4, 3}, 3));
  const Tensor<double> y = peft::ops::topk_mix(tape, Var<double>(l), bank, 2).value();
  const double w1 = std::exp(2.0) / (std::exp(2.0) + std::exp(1.0)), w3 = 1 - w1;
  for (int c = 0; c < 3; ++c)
    CHECK(std::abs(y[c] - (w1 * bank.value()[3 + c] + w3 * bank.value()[9 + c])) < 1e-15);
}

TEST_CASE_TEMPLATE("orthogonal methods: analytic gradients match finite differences", C,
                   ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("orthogonal methods: merge and unmerge", C, ALL_CASES) {
  checks::merge_unmerge_unload<C>();
}

TEST_CASE_TEMPLATE("orthogonal methods: the adapted model starts at the base model", C, ALL_CASES) {
  checks::starts_at_base<C>();
}

TEST_CASE_TEMPLATE("orthogonal methods: save, load, same logits; counts from shapes", C,
                   ORTHOGONAL_CASES(peft::arch::Llama)) {
  checks::save_load_and_count<C>("orthogonal");
}

TEST_CASE("OFT: blocks from r or oft_block_size, moved to a divisor as the reference does") {
  peft::OftConfig c;
  c.oft_block_size = 32;
  CHECK(c.blocks_for(768) == std::pair<std::int64_t, std::int64_t>{24, 32});
  c.oft_block_size = 5;  // 8 % 5: the divisors 4 and 8 are 1 and 3 away
  CHECK(c.blocks_for(8) == std::pair<std::int64_t, std::int64_t>{2, 4});
  c.oft_block_size = 0;
  c.r = 3;  // 8 % 3: 2 and 4 are equally near; the lower wins
  CHECK(c.blocks_for(8) == std::pair<std::int64_t, std::int64_t>{2, 4});
  c.r = 16;  // above in: one block per feature
  CHECK(c.blocks_for(8) == std::pair<std::int64_t, std::int64_t>{8, 1});
  c.oft_block_size = 4;
  c.targets.target_modules.names = {"q_proj"};
  CHECK_THROWS_WITH_AS(c.validate("adapter_config.json"),
                       doctest::Contains("exactly one of r (16) and oft_block_size (4)"),
                       peft::ConfigError);
}

TEST_CASE("COFT: a block beyond eps/sqrt(n) is scaled back onto the ball at each forward") {
  peft::OftConfig c;
  c.oft_block_size = 4;
  c.coft = true;
  c.eps = 0.05;
  c.targets.target_modules.names = {"q_proj"};
  Decoder<peft::arch::Llama, peft::OFT, double> model(test_support::tiny_llama(), c, 3);
  perturb_adapter(model, 4, 0.5);
  model.logits(padded_batch());
  for (const auto& p : model.adapter().parameters()) {
    const Tensor<double>& w = p.var.value();
    const std::int64_t n = w.dim(0), m = w.dim(1);
    for (std::int64_t k = 0; k < n; ++k) {
      double sq = 0;
      for (std::int64_t t = 0; t < m; ++t) sq += 2 * w[k * m + t] * w[k * m + t];
      CHECK(std::sqrt(sq) <= 0.05 / std::sqrt(double(n)) * (1 + 1e-12));
    }
  }
}

TEST_CASE("HRA: the reflections applied to x equal the product with W H built") {
  peft::HraConfig c;
  c.r = 3;
  c.init_weights = false;
  c.targets.target_modules.names = {"q_proj"};
  for (bool gs : {false, true}) {
    c.apply_GS = gs;
    Decoder<peft::arch::Llama, peft::HRA, double> model(test_support::tiny_llama(), c, 5);
    const Tensor<double> adapted = model.logits(padded_batch());
    model.merge();  // W ← W H, built as the reference builds it
    CHECK(max_abs_diff(model.logits(padded_batch()), adapted) < 1e-12);
  }
}

TEST_CASE("MiSS: refuses init_weights \"bat\", r above in_features, mini_r not dividing out") {
  peft::MissConfig c;
  c.targets.target_modules.names = {"q_proj"};
  c.init = peft::MissConfig::Init::Bat;
  CHECK_THROWS_WITH_AS(c.validate("adapter_config.json"), doctest::Contains("\"bat\""),
                       peft::ConfigError);
  c.init = peft::MissConfig::Init::Zeros;
  c.r = 9;
  using Model = Decoder<peft::arch::Llama, peft::MiSS, double>;
  CHECK_THROWS_WITH_AS(Model(test_support::tiny_llama(), c, 1),
                       doctest::Contains("exceeds model.layers.0.self_attn.q_proj"),
                       peft::ConfigError);
  c.r = 2;
  c.mini_r = 3;
  c.init = peft::MissConfig::Init::Mini;
  CHECK_THROWS_WITH_AS(Model(test_support::tiny_llama(), c, 1),
                       doctest::Contains("mini_r (3) does not divide"), peft::ConfigError);
}

TEST_CASE("peft count: the reference's lines (tests/data/golden_methods/counts.json, every row)") {
  // Written by scripts/gen_method_cases.py from the reference's print_trainable_parameters on
  // the published shapes (the reference's OFT, HRA and MiSS refuse GPT-2's Conv1D layers).
  // A row's folders (X-LoRA's experts) are relative to counts.json, as an adapter_config.json's
  // are to its own folder: counts.json is the row's source.
  const auto counts = std::filesystem::path(PEFT_TEST_DATA_DIR) / "golden_methods" / "counts.json";
  const auto rows = peft::io::load_json(counts);
  REQUIRE(rows.size() >= 5);
  for (const auto& row : rows) {
    INFO(row["model"].get<std::string>() << " " << row["adapter_config"]["peft_type"].dump());
    const auto [trainable, all] = peft::commands::count_from_configs(
        row["model_config"], "model_config", row["adapter_config"], counts.string());
    CHECK(peft::trainable_parameters_line(trainable, all) == row["line"].get<std::string>());
  }
}

#undef ORTHOGONAL_CASES
#undef ALL_CASES
}  // namespace test_orthogonal
