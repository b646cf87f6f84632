// AdapterHub's methods that HF peft lacks: ReFT's interventions (LoReFT, NoReFT, DiReFT) on the
// residual stream at chosen positions, and Compacter's PHM bottleneck adapters. No reference
// cases: each is checked against its paper's formula computed directly on a small input (Φ(h)
// with R built from explicit Householder matrices, H = Σ A_i ⊗ (L_i R_i) built entry by entry),
// besides the finite-difference gradients of the whole tiny model in double, the start at the
// base model where the parameters say so, save → load → the same logits, counts from shapes
// equal to the attached tensors, and the positions the decoder hands the hook (right padding,
// generation with a key/value cache).
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <numbers>
#include <peft/commands/count.hpp>
#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>
#include <random>
#include <string>

#include "adapter_checks.hpp"
#include "tiny_models.hpp"

namespace test_reft_and_compacter {

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
using test_support::tiny_llama;
using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;

struct LoreftCase {
  using Policy = peft::LoReFT;
  static constexpr const char* name = "loreft";
  static Policy::Config config() {
    Policy::Config c;
    c.r = 2;
    c.prefix_positions = 2;
    c.suffix_positions = 2;
    return c;
  }
};
struct LoreftTiedCase {
  using Policy = peft::LoReFT;
  static constexpr const char* name = "loreft tied, layer 1";
  static Policy::Config config() {
    Policy::Config c;
    c.r = 3;
    c.prefix_positions = 1;
    c.suffix_positions = 2;
    c.tied_weights = true;
    c.layers = {1};
    return c;
  }
};
struct NoreftCase {
  using Policy = peft::NoReFT;
  static constexpr const char* name = "noreft";
  static Policy::Config config() {
    Policy::Config c;
    c.r = 2;
    c.suffix_positions = 1;
    return c;
  }
};
struct DireftCase {
  using Policy = peft::DiReFT;
  static constexpr const char* name = "direft";
  static Policy::Config config() {
    Policy::Config c;
    c.r = 2;
    c.prefix_positions = 0;
    c.suffix_positions = 3;
    return c;
  }
};
struct CompacterCase {
  using Policy = peft::Compacter;
  static constexpr const char* name = "compacter";
  static peft::CompacterConfig config() {
    peft::CompacterConfig c;
    c.bottleneck_size = 4;
    return c;  // phm_dim 4, phm_rank 1, after attention and MLP
  }
};
struct CompacterPlusPlusCase {
  using Policy = peft::Compacter;
  static constexpr const char* name = "compacter++ n=2 rank 2";
  static peft::CompacterConfig config() {
    peft::CompacterConfig c;
    c.bottleneck_size = 4;
    c.phm_dim = 2;
    c.phm_rank = 2;
    c.mh_adapter = false;
    c.activation = peft::detail::Activation::Relu;
    return c;
  }
};

template <class A, class M>
using Case = test_support::MethodCase<A, M>;

#define METHOD_CASES(Arch)                                                    \
  Case<Arch, LoreftCase>, Case<Arch, LoreftTiedCase>, Case<Arch, NoreftCase>, \
      Case<Arch, DireftCase>, Case<Arch, CompacterCase>, Case<Arch, CompacterPlusPlusCase>
#define ALL_CASES METHOD_CASES(peft::arch::Gpt2), METHOD_CASES(peft::arch::Llama)

using test_support::case_name;
using test_support::make_model;
using test_support::ModelOf;
namespace checks = test_support::method_checks;

Matrix as_matrix(const Tensor<double>& t) {
  const std::int64_t cols = t.shape().back(), rows = t.numel() / cols;
  Matrix m(rows, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) m(i, j) = t[i * cols + j];
  return m;
}

/// R from X by the Householder map, with every reflection built as a d×d matrix.
Matrix householder_r(const Matrix& x) {
  const auto r = x.rows(), d = x.cols();
  Matrix q = Matrix::Identity(d, d);
  for (Eigen::Index k = 0; k < r; ++k) {
    Eigen::VectorXd v = Eigen::VectorXd::Zero(d);
    v(k) = 1;
    for (Eigen::Index j = k + 1; j < d; ++j) v(j) = x(k, j);
    q = q * (Matrix::Identity(d, d) - 2 * v * v.transpose() / v.squaredNorm());
  }
  return q.leftCols(r).transpose();
}

/// Φ(h) of one unit, from the paper's formula.
template <class P>
Eigen::VectorXd phi(const typename P::template State<double>::Unit& unit,
                    const Eigen::VectorXd& h) {
  const Matrix w = as_matrix(unit.source.weight.value());
  const Eigen::VectorXd b = as_matrix(unit.source.bias.value()).transpose();
  const Matrix raw = as_matrix(unit.projection.value());
  const Matrix r = P::Config::orthogonality ? householder_r(raw) : raw;
  const Eigen::VectorXd s = P::Config::subtract_projection ? Eigen::VectorXd(w * h + b - r * h)
                                                           : Eigen::VectorXd(w * h + b);
  return h + r.transpose() * s;
}

}  // namespace

TEST_CASE_TEMPLATE("ReFT, Compacter: analytic gradients match finite differences", C, ALL_CASES) {
  checks::gradients_match_finite_differences<C>();
}

TEST_CASE_TEMPLATE("ReFT, Compacter: save, load, same logits; counts from shapes", C, ALL_CASES) {
  checks::save_load_and_count<C>("reft");
}

TEST_CASE_TEMPLATE("ReFT, Compacter: AdapterHub's init is not the base model; the identity is", C,
                   ALL_CASES) {
  INFO(case_name<C>());
  auto model = make_model<C, double>(21);
  Decoder<typename C::Arch, peft::NoPeft, double> base(tiny_config<typename C::Arch>(), {}, 21);
  const Batch batch = padded_batch();
  CHECK(max_abs_diff(model.logits(batch), base.logits(batch)) > 0.0);
  if constexpr (std::is_same_v<typename C::Policy, peft::Compacter>) {
    auto rule = model.adapter().rule();
    rule.value().fill(0.0);  // A = 0: H = 0 in every PHM layer
  } else {
    for (int l = 0; l < 2; ++l)
      for (const auto& unit : model.adapter().units(l)) {
        // W = R, b = 0 (W = 0 for DiReFT): Φ(h) = h
        Tape<double> tape(false);
        const Tensor<double> r =
            C::Policy::template State<double>::rotation(tape, unit.projection).value();
        auto w = unit.source.weight;
        if (C::Policy::Config::subtract_projection)
          w.value() = r;
        else
          w.value().fill(0.0);
        auto b = unit.source.bias;
        b.value().fill(0.0);
      }
  }
  const double diff = max_abs_diff(model.logits(batch), base.logits(batch));
  if (C::Policy::name == peft::LoReFT::name || C::Policy::name == peft::NoReFT::name)
    CHECK(diff < 1e-12);  // W h − R h rounds to zero, or nearly
  else
    CHECK(diff == 0.0);  // H = 0, or Rᵀ 0: exactly h
}

TEST_CASE_TEMPLATE("ReFT: a right-padded row is intervened on as the row alone", C,
                   METHOD_CASES(peft::arch::Llama)) {
  if constexpr (!std::is_same_v<typename C::Policy, peft::Compacter>) {
    INFO(case_name<C>());
    auto model = make_model<C, double>();
    perturb_adapter(model, 4);
    const Batch batch = padded_batch();  // row 1: 3 tokens, then 2 of padding
    Batch alone;
    alone.batch = 1;
    alone.seq = 3;
    alone.input_ids = {3, 3, 8};
    const Tensor<double> both = model.logits(batch), one = model.logits(alone);
    const std::int64_t V = model.config().vocab_size;
    double worst = 0;
    for (std::int64_t i = 0; i < 3 * V; ++i)
      worst = std::max(worst, std::abs(both[5 * V + i] - one[i]));
    CHECK(worst < 1e-12);
  }
}

TEST_CASE("ReFT: the key/value cache gives the full forward's logits (prefix positions)") {
  peft::LoReFT::Config c;
  c.r = 2;
  c.prefix_positions = 4;  // longer than the prompt: the steps continue the prefix
  Decoder<peft::arch::Llama, peft::LoReFT, double> model(tiny_llama(), c, 5);
  std::vector<std::int64_t> context = {1, 5, 7};
  auto row = [](const std::vector<std::int64_t>& ids) {
    Batch b;
    b.batch = 1;
    b.seq = static_cast<std::int64_t>(ids.size());
    b.input_ids = ids;
    return b;
  };
  decltype(model)::KvCache cache;
  Tensor<double> step = model.forward_cached(row(context), cache);
  const std::int64_t V = model.config().vocab_size;
  double worst = 0;
  for (int n = 0; n < 4; ++n) {
    const Tensor<double> full = model.logits(row(context));
    for (std::int64_t v = 0; v < V; ++v)
      worst = std::max(worst, std::abs(step[v] - full[(full.shape()[1] - 1) * V + v]));
    context.push_back(2 + n);
    step = model.forward_cached(row({2 + n}), cache);
  }
  CHECK(worst < 1e-12);
}

TEST_CASE_TEMPLATE("ReFT: Φ(h) at the chosen positions, the paper's formula", P, peft::LoReFT,
                   peft::NoReFT, peft::DiReFT) {
  typename P::Config c;
  c.r = 3;
  c.prefix_positions = 2;
  c.suffix_positions = 2;
  c.dropout = 0.5;
  typename P::template State<double> state(c);
  const peft::ModelConfig m = tiny_llama();
  std::mt19937_64 rng(8);
  peft::AttachContext<double> ctx{m, {}, rng, {}};
  state.attach(ctx);
  const auto& units = state.units(0);
  REQUIRE(units.size() == 2);
  if constexpr (P::Config::orthogonality) {  // R Rᵀ = I, and the ops' R equals the matrices'
    Tape<double> tape(false);
    const Matrix r =
        as_matrix(P::template State<double>::rotation(tape, units[0].projection).value());
    CHECK((r * r.transpose() - Matrix::Identity(3, 3)).norm() < 1e-14);
    CHECK((r - householder_r(as_matrix(units[0].projection.value()))).norm() < 1e-14);
  }
  // Rows of 6 positions: row 0 all tokens, row 1 tokens 0..2 (then padding); 3 tokens, prefix 2
  // and suffix 2 overlap at position 1, where the suffix's unit wins.
  const std::int64_t B = 2, Tn = 6, d = m.hidden_size;
  const Var<double> h(peft::testing::random_tensor({B, Tn, d}, 3, -1.0, 1.0));
  peft::TokenSpans spans{{0, 0}, {6, 3}, 0, nullptr};
  Tape<double> tape(false);
  const Tensor<double> out = state.after_block(tape, 0, h, spans).value();
  const Matrix hm = as_matrix(h.value()), om = as_matrix(out);
  const int expected_unit[2][6] = {{0, 0, -1, -1, 1, 1}, {0, 1, 1, -1, -1, -1}};
  double worst = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t) {
      const int u = expected_unit[b][t];
      const Eigen::VectorXd x = hm.row(b * Tn + t).transpose();
      const Eigen::VectorXd want = u < 0 ? x : phi<P>(units[static_cast<std::size_t>(u)], x);
      worst = std::max(worst, (om.row(b * Tn + t).transpose() - want).cwiseAbs().maxCoeff());
    }
  CHECK(worst < 1e-13);

  // A later generation step (past 1): position 0 of the step is the row's token 1, still in the
  // prefix; the suffix stays the prompt's.
  spans = {{0, 0}, {6, 3}, 1, nullptr};
  const Matrix later = as_matrix(state.after_block(tape, 0, h, spans).value());
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t) {
      const Eigen::VectorXd x = hm.row(b * Tn + t).transpose();
      const Eigen::VectorXd want = t == 0 ? phi<P>(units[0], x) : x;
      CHECK((later.row(b * Tn + t).transpose() - want).cwiseAbs().maxCoeff() < 1e-13);
    }

  // Dropout in training: Φ(h) ⊙ m / (1 − p) at the intervened positions, h elsewhere.
  std::mt19937_64 drops(1);
  spans = {{0, 0}, {6, 3}, 0, &drops};
  const Matrix dropped = as_matrix(state.after_block(tape, 0, h, spans).value());
  int zeros = 0, kept = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t) {
      const int u = expected_unit[b][t];
      const Eigen::VectorXd x = hm.row(b * Tn + t).transpose();
      const Eigen::VectorXd full = u < 0 ? x : phi<P>(units[static_cast<std::size_t>(u)], x);
      for (std::int64_t j = 0; j < d; ++j) {
        const double y = dropped(b * Tn + t, j);
        if (u < 0) {
          CHECK(y == x(j));
        } else if (y == 0.0) {
          ++zeros;
        } else {
          CHECK(std::abs(y - 2 * full(j)) < 1e-13);
          ++kept;
        }
      }
    }
  CHECK(zeros > 0);
  CHECK(kept > 0);
}

TEST_CASE("Compacter: H = Σ A_i ⊗ (L_i R_i), and the adapter h + U σ(D h) with it") {
  peft::CompacterConfig c;
  c.bottleneck_size = 4;
  c.phm_dim = 2;
  c.phm_rank = 2;
  c.phm_init_range = 0.5;
  peft::Compacter::State<double> state(c);
  const peft::ModelConfig m = tiny_llama();
  std::mt19937_64 rng(8);
  peft::AttachContext<double> ctx{m, {}, rng, {}};
  state.attach(ctx);
  const auto& module = *state.mlp_module(1);
  const Tensor<double>& a = state.rule().value();
  const std::int64_t n = 2, k = 2;
  auto built = [&](const peft::Compacter::PhmLayer<double>& layer) {
    const Tensor<double>&l = layer.left.value(), &r = layer.right.value();
    const std::int64_t p = l.dim(1), q = r.dim(2);
    Matrix h = Matrix::Zero(n * p, n * q);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t ai = 0; ai < n; ++ai)
        for (std::int64_t aj = 0; aj < n; ++aj)
          for (std::int64_t u = 0; u < p; ++u)
            for (std::int64_t v = 0; v < q; ++v) {
              double w = 0;  // (L_i R_i)[u, v]
              for (std::int64_t s = 0; s < k; ++s)
                w += l[(i * p + u) * k + s] * r[(i * k + s) * q + v];
              h(ai * p + u, aj * q + v) += a[(i * n + ai) * n + aj] * w;
            }
    return h;
  };
  Tape<double> tape(false);
  const Matrix hd = built(module.down), hu = built(module.up);
  CHECK((as_matrix(peft::Compacter::PhmLayer<double>::weight(tape, state.rule(), module.down.left,
                                                             module.down.right)
                       .value()) -
         hd)
            .norm() < 1e-14);
  const Var<double> x(peft::testing::random_tensor({2, 3, 8}, 5, -1.0, 1.0));
  const Var<double> bd(peft::testing::random_tensor({4}, 6, -1.0, 1.0));
  const Var<double> bu(peft::testing::random_tensor({8}, 7, -1.0, 1.0));
  auto down_bias = module.down.bias, up_bias = module.up.bias;
  down_bias.value() = bd.value();
  up_bias.value() = bu.value();
  const Matrix out = as_matrix(state.after_mlp(tape, 1, x, x).value());
  const Matrix xm = as_matrix(x.value());
  const Eigen::RowVectorXd bdm = as_matrix(bd.value()), bum = as_matrix(bu.value());
  double worst = 0;
  for (Eigen::Index row = 0; row < xm.rows(); ++row) {
    Eigen::RowVectorXd z = xm.row(row) * hd + bdm;
    for (Eigen::Index j = 0; j < z.size(); ++j) {
      const double v = z(j);
      z(j) =
          0.5 * v * (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (v + 0.044715 * v * v * v)));
    }
    worst = std::max(worst, (out.row(row) - (xm.row(row) + z * hu + bum)).cwiseAbs().maxCoeff());
  }
  CHECK(worst < 1e-13);
  CHECK_THROWS_AS(([] {
                    peft::CompacterConfig bad;
                    bad.bottleneck_size = 3;  // not a multiple of phm_dim 4
                    peft::Compacter::State<double> s(bad);
                    std::mt19937_64 g(1);
                    peft::AttachContext<double> cx{tiny_llama(), {}, g, {}};
                    s.attach(cx);
                  }()),
                  peft::ConfigError);
}

TEST_CASE("ReFT, Compacter: configs refused with the field named; counts on LLaMA-7B") {
  nlohmann::json j = {{"peft_type", "LOREFT"}, {"prefix_positions", 0}, {"suffix_positions", 0}};
  CHECK_THROWS_WITH_AS(peft::LoReFT::Config::from_json(j, "a.json"),
                       doctest::Contains("prefix_positions and suffix_positions"),
                       peft::ConfigError);
  j = {{"peft_type", "NOREFT"}, {"orthogonality", true}};
  CHECK_THROWS_WITH_AS(peft::NoReFT::Config::from_json(j, "a.json"),
                       doctest::Contains("orthogonality"), peft::ConfigError);
  j = {{"peft_type", "DIREFT"}, {"layers", {0, -1}}};
  CHECK_THROWS_WITH_AS(peft::DiReFT::Config::from_json(j, "a.json"), doctest::Contains("layers"),
                       peft::ConfigError);
  j = {{"peft_type", "LOREFT"}, {"layers", "all"}, {"r", 4}, {"prefix_positions", 3}};
  const auto rows = peft::io::load_json(std::filesystem::path(PEFT_TEST_DATA_DIR) /
                                        "golden_methods" / "counts.json");
  nlohmann::json llama;
  for (const auto& row : rows)
    if (row["model"] == "llama-7b") llama = row["model_config"];
  REQUIRE(!llama.is_null());
  // 32 blocks · 1 unit · (W [4, 4096] + b [4] + X [4, 4096]), counted by hand.
  CHECK(peft::commands::count_from_configs(llama, "llama", j, "loreft").first ==
        32 * (2 * 4 * 4096 + 4));
  j = {{"peft_type", "COMPACTER"}, {"reduction_factor", 32}};
  // A [4, 4, 4] + 64 sites · (down: L [4, 1024, 1] + R [4, 1, 32] + b [128];
  //                           up:   L [4, 32, 1] + R [4, 1, 1024] + b [4096])
  CHECK(peft::commands::count_from_configs(llama, "llama", j, "compacter").first ==
        64 + 64 * ((4096 + 128 + 128) + (128 + 4096 + 4096)));
}

#undef METHOD_CASES
#undef ALL_CASES
}  // namespace test_reft_and_compacter
