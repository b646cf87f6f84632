// Weighted merging of LoRA adapters (include/peft/methods/reparameterized/weighted_merge.hpp):
// every combination type against an independent, element-by-element computation of the
// reference's formulas (peft's add_weighted_adapter and utils/merge_utils.py), the edge cases
// (rank mismatch, density 0 and 1, all-negative weights, ties in the sign election, DARE with
// given masks), the errors, and the reference cases of tests/data/weighted_merge
// (scripts/gen_merge_cases.py).
#include <doctest/doctest.h>

#include "scratch_dir.hpp"

#include <Eigen/SVD>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <peft/io/parse_text.hpp>
#include <peft/methods/reparameterized/weighted_merge.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../cli/commands.hpp"

namespace test_weighted_merge {

using peft::merge::Combination;
using peft::merge::LoraAdapter;
using peft::merge::LoraFactors;
using peft::merge::MajoritySign;
using peft::merge::Matrix;
using peft::merge::WeightedMergeOptions;

std::filesystem::path scratch_dir(const std::string& purpose) {
  return test_support::scratch_dir("weighted_merge", purpose);
}

Matrix random_matrix(std::int64_t rows, std::int64_t cols, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  Matrix m(rows, cols);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

/// An in-memory adapter: modules "m0" [out 6, in 5] and, unless `only_m0`, "m1" [out 4, in 7].
LoraAdapter make_adapter(int r, double alpha, std::uint64_t seed, bool only_m0 = false) {
  std::mt19937_64 rng(seed);
  LoraAdapter a;
  a.source = "adapter" + std::to_string(seed);
  a.r = r;
  a.config = {{"peft_type", "LORA"},
              {"r", r},
              {"lora_alpha", alpha},
              {"rank_pattern", {}},
              {"alpha_pattern", {}}};
  a.config["target_modules"] =
      only_m0 ? std::vector<std::string>{"m0"} : std::vector<std::string>{"m0", "m1"};
  a.modules["m0"] = LoraFactors{random_matrix(r, 5, rng), random_matrix(6, r, rng), alpha / r};
  if (!only_m0)
    a.modules["m1"] = LoraFactors{random_matrix(r, 7, rng), random_matrix(4, r, rng), alpha / r};
  return a;
}

double max_abs_diff(const Matrix& a, const Matrix& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

// ---------------------------------------------------------------------------------------------
// The formulas, element by element (no helper of the library is used).

Matrix plain_magnitude_prune(const Matrix& t, double density) {
  if (density >= 1) return t;
  const std::size_t n = static_cast<std::size_t>(t.size());
  const std::size_t k = static_cast<std::size_t>(density * static_cast<double>(n));
  std::vector<std::pair<double, std::size_t>> by_size;
  for (std::size_t i = 0; i < n; ++i) by_size.emplace_back(-std::fabs(t.data()[i]), i);
  std::sort(by_size.begin(), by_size.end());
  Matrix out = Matrix::Zero(t.rows(), t.cols());
  for (std::size_t i = 0; i < k; ++i) out.data()[by_size[i].second] = t.data()[by_size[i].second];
  return out;
}

double sign_of(double x) { return x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0); }

/// Σ w_i t_i, or TIES's disjoint mean with the sign elected over the unweighted t_i.
Matrix plain_combine(const std::vector<Matrix>& t, const std::vector<double>& w, bool ties,
                     bool frequency) {
  Matrix out = Matrix::Zero(t[0].rows(), t[0].cols());
  for (std::int64_t e = 0; e < out.size(); ++e) {
    if (!ties) {
      for (std::size_t i = 0; i < t.size(); ++i) out.data()[e] += w[i] * t[i].data()[e];
      continue;
    }
    double votes = 0;
    for (const Matrix& ti : t) votes += frequency ? sign_of(ti.data()[e]) : ti.data()[e];
    const double elected = votes >= 0 ? 1 : -1;
    double sum = 0;
    int count = 0;
    for (std::size_t i = 0; i < t.size(); ++i)
      if (sign_of(t[i].data()[e]) == elected) {
        sum += w[i] * t[i].data()[e];
        ++count;
      }
    out.data()[e] = sum / std::max(count, 1);
  }
  return out;
}

Matrix product(const LoraFactors& f) { return f.B * f.A; }

/// svd_clamp's bound: the q-quantile (linear interpolation) of B's and A's entries together.
double plain_clamp_bound(const LoraFactors& f, double q) {
  std::vector<double> all(f.B.data(), f.B.data() + f.B.size());
  all.insert(all.end(), f.A.data(), f.A.data() + f.A.size());
  std::sort(all.begin(), all.end());
  const double position = q * static_cast<double>(all.size() - 1);
  const auto lo = static_cast<std::size_t>(position);
  const std::size_t up = std::min(lo + 1, all.size() - 1);
  return all[lo] + (position - static_cast<double>(lo)) * (all[up] - all[lo]);
}

/// Best rank-k approximation of m (Jacobi SVD, another algorithm than the library's).
Matrix rank_k(const Matrix& m, int k) {
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(m, Eigen::ComputeFullU | Eigen::ComputeFullV);
  Matrix out = Matrix::Zero(m.rows(), m.cols());
  for (int i = 0; i < k; ++i)
    out += svd.singularValues()(i) * svd.matrixU().col(i) * svd.matrixV().col(i).transpose();
  return out;
}

WeightedMergeOptions options(Combination c, std::optional<double> density = std::nullopt) {
  WeightedMergeOptions o;
  o.combination = c;
  o.density = density;
  return o;
}

// ---------------------------------------------------------------------------------------------

TEST_CASE("weighted merge: linear combines the factors with signed square-root weights") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 1), make_adapter(3, 12, 2)};
  const std::vector<double> w = {0.7, -0.4};
  const LoraAdapter out = peft::merge::add_weighted_adapter(in, w, options(Combination::Linear));
  CHECK(out.r == 3);
  CHECK(out.config["r"] == 3);
  CHECK(out.config["lora_alpha"] == 3);
  for (const char* m : {"m0", "m1"}) {
    std::vector<Matrix> As, Bs;
    std::vector<double> wa, wb;
    for (std::size_t i = 0; i < in.size(); ++i) {
      const LoraFactors& f = in[i].modules.at(m);
      As.push_back(f.A);
      Bs.push_back(f.B);
      const double ws = w[i] * f.scaling;
      wb.push_back(std::sqrt(std::fabs(ws)));
      wa.push_back(sign_of(ws) * std::sqrt(std::fabs(ws)));
    }
    CHECK(max_abs_diff(out.modules.at(m).A, plain_combine(As, wa, false, false)) < 1e-13);
    CHECK(max_abs_diff(out.modules.at(m).B, plain_combine(Bs, wb, false, false)) < 1e-13);
  }
}

TEST_CASE("weighted merge: one adapter with a negative weight negates its update exactly") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 3)};
  // One adapter: every combination becomes linear, as in the reference.
  const LoraAdapter out = peft::merge::add_weighted_adapter(in, {-1.0}, options(Combination::Svd));
  for (const auto& [m, f] : in[0].modules)
    CHECK(max_abs_diff(product(out.modules.at(m)), -f.scaling * product(f)) < 1e-13);
}

TEST_CASE("weighted merge: cat stacks w·s·A and B, exactly the weighted sum of the updates") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 4), make_adapter(2, 4, 5, true),
                                       make_adapter(4, 4, 6)};
  const std::vector<double> w = {0.5, -0.3, 0.2};
  const LoraAdapter out = peft::merge::add_weighted_adapter(in, w, options(Combination::Cat));
  CHECK(out.r == 9);
  for (const char* m : {"m0", "m1"}) {
    Matrix expected = Matrix::Zero(in[0].modules.at(m).B.rows(), in[0].modules.at(m).A.cols());
    for (std::size_t i = 0; i < in.size(); ++i)
      if (in[i].modules.count(m))
        expected += w[i] * in[i].modules.at(m).scaling * product(in[i].modules.at(m));
    const LoraFactors& f = out.modules.at(m);
    CHECK(f.A.rows() == 9);
    CHECK(f.B.cols() == 9);
    CHECK(max_abs_diff(product(f), expected) < 1e-12);
  }
  // m1 lacks the second adapter: its rows come after the others' and stay zero at the end.
  const LoraFactors& m1 = out.modules.at("m1");
  CHECK(max_abs_diff(m1.A.topRows(3),
                     0.5 * in[0].modules.at("m1").scaling * in[0].modules.at("m1").A) == 0);
  CHECK(max_abs_diff(m1.B.middleCols(3, 4), in[2].modules.at("m1").B) == 0);
  CHECK(m1.A.bottomRows(2).cwiseAbs().maxCoeff() == 0);
}

TEST_CASE("weighted merge: svd keeps the best rank-k approximation of Σ w_i s_i B_i A_i") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 7), make_adapter(2, 4, 8)};
  const std::vector<double> w = {0.6, -0.9};
  for (int k : {1, 3, 4}) {
    WeightedMergeOptions o = options(Combination::Svd);
    o.svd_rank = k;
    const LoraAdapter out = peft::merge::add_weighted_adapter(in, w, o);
    for (const char* m : {"m0", "m1"}) {
      Matrix delta = Matrix::Zero(in[0].modules.at(m).B.rows(), in[0].modules.at(m).A.cols());
      for (std::size_t i = 0; i < in.size(); ++i)
        delta += w[i] * in[i].modules.at(m).scaling * product(in[i].modules.at(m));
      const LoraFactors& f = out.modules.at(m);
      CHECK(f.A.rows() == k);
      CHECK(max_abs_diff(product(f), rank_k(delta, k)) < 1e-12);
      // A's rows are orthonormal (they are right singular vectors).
      CHECK(max_abs_diff(f.A * f.A.transpose(), Matrix::Identity(k, k)) < 1e-12);
    }
  }
  // Default rank: the largest input rank.
  CHECK(peft::merge::add_weighted_adapter(in, w, options(Combination::Svd)).r == 3);
}

TEST_CASE("weighted merge: svd_clamp clamps both factors at the quantile of their entries") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 9), make_adapter(3, 3, 10)};
  WeightedMergeOptions o = options(Combination::Svd);
  o.svd_rank = 2;
  const LoraAdapter plain = peft::merge::add_weighted_adapter(in, {0.5, 0.5}, o);
  o.svd_clamp = 0.8;
  const LoraAdapter clamped = peft::merge::add_weighted_adapter(in, {0.5, 0.5}, o);
  for (const char* m : {"m0", "m1"}) {
    const LoraFactors& p = plain.modules.at(m);
    const double hi = plain_clamp_bound(p, 0.8);
    const Matrix A = p.A.cwiseMin(hi).cwiseMax(-hi), B = p.B.cwiseMin(hi).cwiseMax(-hi);
    CHECK(max_abs_diff(clamped.modules.at(m).A, A) == 0);
    CHECK(max_abs_diff(clamped.modules.at(m).B, B) == 0);
  }
}

TEST_CASE("weighted merge: ties and magnitude_prune at densities 0, 0.3, 0.5 and 1") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 11), make_adapter(3, 12, 12),
                                       make_adapter(3, 3, 13)};
  for (const std::vector<double>& w :
       {std::vector<double>{0.7, 0.3, 0.5}, std::vector<double>{-0.5, -1.0, -0.25}}) {
    for (double density : {0.0, 0.3, 0.5, 1.0}) {
      for (Combination c : {Combination::Ties, Combination::MagnitudePrune}) {
        for (MajoritySign sign : {MajoritySign::Total, MajoritySign::Frequency}) {
          CAPTURE(density);
          CAPTURE(peft::merge::combination_name(c));
          WeightedMergeOptions o = options(c, density);
          o.majority_sign = sign;
          const LoraAdapter out = peft::merge::add_weighted_adapter(in, w, o);
          for (const char* m : {"m0", "m1"}) {
            std::vector<Matrix> As, Bs;
            std::vector<double> wa, wb;
            for (std::size_t i = 0; i < in.size(); ++i) {
              const LoraFactors& f = in[i].modules.at(m);
              As.push_back(plain_magnitude_prune(f.A, density));
              Bs.push_back(plain_magnitude_prune(f.B, density));
              const double ws = w[i] * f.scaling;
              wb.push_back(std::sqrt(std::fabs(ws)));
              wa.push_back(sign_of(ws) * wb.back());
            }
            const bool ties = c == Combination::Ties;
            const bool frequency = sign == MajoritySign::Frequency;
            CHECK(max_abs_diff(out.modules.at(m).A, plain_combine(As, wa, ties, frequency)) <
                  1e-13);
            CHECK(max_abs_diff(out.modules.at(m).B, plain_combine(Bs, wb, ties, frequency)) <
                  1e-13);
          }
          if (density == 0) CHECK(out.modules.at("m0").A.cwiseAbs().maxCoeff() == 0);
        }
      }
    }
  }
}

TEST_CASE("weighted merge: the sign election counts a zero sum as positive") {
  // Two adapters whose A entries are +x and -x: the votes sum to 0 in every element, the
  // elected sign is +, and only the positive entries are averaged.
  LoraAdapter a = make_adapter(2, 2, 14, true), b = a;
  b.source = "negated";
  b.modules.at("m0").A = -a.modules.at("m0").A;
  for (MajoritySign sign : {MajoritySign::Total, MajoritySign::Frequency}) {
    WeightedMergeOptions o = options(Combination::Ties, 1.0);
    o.majority_sign = sign;
    const LoraAdapter out = peft::merge::add_weighted_adapter({a, b}, {1.0, 1.0}, o);
    const Matrix& A = a.modules.at("m0").A;
    const Matrix positive = A.cwiseMax(0) + (-A).cwiseMax(0);  // |A|: the + entry of each pair
    CHECK(max_abs_diff(out.modules.at("m0").A, positive) < 1e-15);
  }
}

TEST_CASE("weighted merge: DARE drops with the given masks and rescales by 1 / density") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 15), make_adapter(3, 12, 16)};
  const std::vector<double> w = {0.6, 0.8};
  for (double density : {0.0, 0.4, 1.0}) {
    for (Combination c : {Combination::DareLinear, Combination::DareTies,
                          Combination::DareLinearSvd, Combination::DareTiesSvd}) {
      CAPTURE(density);
      CAPTURE(peft::merge::combination_name(c));
      std::vector<std::string> asked;
      WeightedMergeOptions o = options(c, density);
      // Keep every entry whose flat index plus the adapter is even.
      o.keep_mask = [&](const peft::merge::KeepMaskRequest& q) {
        asked.push_back(std::string(q.module) + "." + std::string(q.tensor) + "." +
                        std::to_string(q.adapter));
        Matrix keep(q.rows, q.cols);
        for (std::int64_t i = 0; i < keep.size(); ++i)
          keep.data()[i] = (i + static_cast<std::int64_t>(q.adapter)) % 2 == 0 ? 1 : 0;
        return keep;
      };
      auto dropped = [&](const Matrix& t, std::size_t adapter) {
        if (density >= 1) return t;
        Matrix out = Matrix::Zero(t.rows(), t.cols());
        if (density == 0) return out;
        for (std::int64_t i = 0; i < t.size(); ++i)
          if ((i + static_cast<std::int64_t>(adapter)) % 2 == 0)
            out.data()[i] = t.data()[i] / density;
        return out;
      };
      const LoraAdapter out = peft::merge::add_weighted_adapter(in, w, o);
      const bool ties = c == Combination::DareTies || c == Combination::DareTiesSvd;
      const bool svd = peft::merge::is_svd(c);
      for (const char* m : {"m0", "m1"}) {
        if (svd) {
          std::vector<Matrix> deltas;
          for (std::size_t i = 0; i < in.size(); ++i)
            deltas.push_back(
                dropped(in[i].modules.at(m).scaling * product(in[i].modules.at(m)), i));
          const Matrix delta = plain_combine(deltas, w, ties, false);
          CHECK(max_abs_diff(product(out.modules.at(m)), rank_k(delta, 3)) < 1e-12);
        } else {
          std::vector<Matrix> As, Bs;
          std::vector<double> wa, wb;
          for (std::size_t i = 0; i < in.size(); ++i) {
            const LoraFactors& f = in[i].modules.at(m);
            As.push_back(dropped(f.A, i));
            Bs.push_back(dropped(f.B, i));
            wa.push_back(std::sqrt(w[i] * f.scaling));
            wb.push_back(wa.back());
          }
          CHECK(max_abs_diff(out.modules.at(m).A, plain_combine(As, wa, ties, false)) < 1e-13);
          CHECK(max_abs_diff(out.modules.at(m).B, plain_combine(Bs, wb, ties, false)) < 1e-13);
        }
      }
      // The masks are asked in the documented order.
      const std::vector<std::string> order =
          svd ? std::vector<std::string>{"m0.delta.0", "m0.delta.1", "m1.delta.0", "m1.delta.1"}
              : std::vector<std::string>{"m0.lora_A.0", "m0.lora_A.1", "m0.lora_B.0",
                                         "m0.lora_B.1", "m1.lora_A.0", "m1.lora_A.1",
                                         "m1.lora_B.0", "m1.lora_B.1"};
      CHECK(asked == order);
    }
  }
}

TEST_CASE("weighted merge: DARE's own draws are seeded") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 17), make_adapter(3, 12, 18)};
  WeightedMergeOptions o = options(Combination::DareTies, 0.5);
  o.seed = 7;
  const LoraAdapter first = peft::merge::add_weighted_adapter(in, {0.5, 0.5}, o);
  const LoraAdapter again = peft::merge::add_weighted_adapter(in, {0.5, 0.5}, o);
  o.seed = 8;
  const LoraAdapter other = peft::merge::add_weighted_adapter(in, {0.5, 0.5}, o);
  CHECK(max_abs_diff(first.modules.at("m0").A, again.modules.at("m0").A) == 0);
  CHECK(max_abs_diff(first.modules.at("m0").A, other.modules.at("m0").A) > 0);
  // About half of the entries survive in each adapter's A (18 entries, 3 modules' worth).
  const Matrix& A = first.modules.at("m1").A;
  const auto kept = (A.array() != 0).count();
  CHECK(kept > 0);
  CHECK(kept < A.size());
}

TEST_CASE("weighted merge: bad input is an error before any work") {
  const LoraAdapter r3 = make_adapter(3, 6, 19), r2 = make_adapter(2, 4, 20);
  using peft::merge::add_weighted_adapter;
  CHECK_THROWS_WITH_AS(add_weighted_adapter({r3, r3}, {1.0}, options(Combination::Linear)),
                       doctest::Contains("2 adapters but 1 weights"), peft::ConfigError);
  CHECK_THROWS_WITH_AS(add_weighted_adapter({r3, r2}, {1.0, 1.0}, options(Combination::Linear)),
                       doctest::Contains("needs adapters of one rank"), peft::ConfigError);
  CHECK_THROWS_WITH_AS(add_weighted_adapter({r3, r3}, {1.0, 1.0}, options(Combination::Ties)),
                       doctest::Contains("needs a density"), peft::ConfigError);
  CHECK_THROWS_WITH_AS(add_weighted_adapter({r3, r3}, {1.0, 1.0}, options(Combination::Ties, 1.5)),
                       doctest::Contains("density: expected a number in [0, 1]"),
                       peft::ConfigError);
  CHECK_THROWS_WITH_AS(add_weighted_adapter({r3, r3}, {1.0, 1.0}, options(Combination::Svd, 0.5)),
                       doctest::Contains("does not prune"), peft::ConfigError);
  CHECK_THROWS_WITH_AS(
      add_weighted_adapter({r3, r3}, {1.0, std::nan("")}, options(Combination::Cat)),
      doctest::Contains("weight 2 is not finite"), peft::ConfigError);
  WeightedMergeOptions too_high = options(Combination::Svd);
  too_high.svd_rank = 5;  // m1 is [4, 7]: rank at most 4
  CHECK_THROWS_WITH_AS(add_weighted_adapter({r3, r2}, {1.0, 1.0}, too_high),
                       doctest::Contains("svd rank 5 is above the rank 4"), peft::ShapeError);
  LoraAdapter other_base = make_adapter(3, 6, 21);
  other_base.modules.at("m1").A = Matrix::Ones(3, 9);  // in 9 instead of 7
  CHECK_THROWS_WITH_AS(
      add_weighted_adapter({r3, other_base}, {1.0, 1.0}, options(Combination::Cat)),
      doctest::Contains("adapters of different base models"), peft::ShapeError);
  CHECK_THROWS_WITH_AS(peft::merge::parse_combination("ties_linear"),
                       doctest::Contains("expected one of linear, cat, svd"), peft::ConfigError);
  CHECK_THROWS_AS(peft::merge::parse_majority_sign("sum"), peft::ConfigError);

  // Another method's folder (LoHa) and a DoRA one are refused when read.
  const auto dir = scratch_dir("methods");
  std::filesystem::create_directories(dir / "loha");
  std::ofstream(dir / "loha" / "adapter_config.json")
      << R"({"peft_type": "LOHA", "r": 4, "alpha": 4, "target_modules": ["c_attn"]})";
  CHECK_THROWS_WITH_AS(peft::merge::read_lora_adapter(dir / "loha"),
                       doctest::Contains("peft_type 'LOHA', expected 'LORA'"), peft::ConfigError);
  std::filesystem::remove_all(dir);
}

TEST_CASE("weighted merge: a saved merged adapter reads back as written (F32)") {
  const std::vector<LoraAdapter> in = {make_adapter(3, 6, 22), make_adapter(2, 4, 23, true)};
  const LoraAdapter out =
      peft::merge::add_weighted_adapter(in, {0.5, 0.5}, options(Combination::Cat));
  const auto dir = scratch_dir("save");
  // A config the strict reader accepts: target_modules united, r = lora_alpha = 5.
  LoraAdapter to_save = out;
  peft::merge::save_lora_adapter(dir / "merged", to_save);
  const LoraAdapter back = peft::merge::read_lora_adapter(dir / "merged");
  CHECK(back.r == 5);
  CHECK(back.config["target_modules"] == nlohmann::json({"m0", "m1"}));
  for (const auto& [m, f] : out.modules) {
    CHECK(max_abs_diff(back.modules.at(m).A, f.A.cast<float>().cast<double>()) == 0);
    CHECK(max_abs_diff(back.modules.at(m).B, f.B.cast<float>().cast<double>()) == 0);
    CHECK(back.modules.at(m).scaling == 1.0);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("weighted merge: the reference cases (tests/data/weighted_merge)") {
  const std::filesystem::path root = std::filesystem::path(PEFT_TEST_DATA_DIR) / "weighted_merge";
  int cases = 0;
  for (const auto& entry : std::filesystem::directory_iterator(root)) {
    if (!std::filesystem::exists(entry.path() / "case.json")) continue;
    ++cases;
    const std::string name = entry.path().filename().string();
    CAPTURE(name);
    const nlohmann::json c = peft::io::load_json(entry.path() / "case.json");
    std::vector<LoraAdapter> in;
    for (const auto& a : c["adapters"])
      in.push_back(peft::merge::read_lora_adapter(root / "adapters" / a.get<std::string>()));
    WeightedMergeOptions o;
    o.combination = peft::merge::parse_combination(c["combination_type"].get<std::string>());
    if (!c["svd_rank"].is_null()) o.svd_rank = c["svd_rank"].get<int>();
    if (!c["svd_clamp"].is_null()) o.svd_clamp = c["svd_clamp"].get<double>();
    if (!c["density"].is_null()) o.density = c["density"].get<double>();
    if (!c["majority_sign_method"].is_null())
      o.majority_sign =
          peft::merge::parse_majority_sign(c["majority_sign_method"].get<std::string>());
    const LoraAdapter out =
        peft::merge::add_weighted_adapter(in, c["weights"].get<std::vector<double>>(), o);
    const LoraAdapter expected = peft::merge::read_lora_adapter(entry.path() / "expected");
    CHECK(out.r == expected.r);
    for (const char* key : {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"})
      CHECK(out.config[key] == expected.config[key]);
    auto as_set = [](const nlohmann::json& j) {
      return j.is_string() ? std::set<std::string>{j.get<std::string>()}
                           : j.get<std::set<std::string>>();
    };
    CHECK(as_set(out.config["target_modules"]) == as_set(expected.config["target_modules"]));
    REQUIRE(out.modules.size() == expected.modules.size());
    const bool svd = peft::merge::is_svd(o.combination) && in.size() > 1;
    for (const auto& entry : expected.modules) {
      // Named references, not a structured binding: clang 14 cannot capture those (CAPTURE).
      const std::string& m = entry.first;
      const LoraFactors& f = entry.second;
      CAPTURE(m);
      REQUIRE(out.modules.count(m));
      const LoraFactors& g = out.modules.at(m);
      if (svd && o.svd_clamp) {
        // The clamp's quantile is of signed entries, so it depends on the sign the SVD routine
        // gives each singular pair (LAPACK's there, a fixed rule here). Check the clamp's
        // formula on the reference's signs: the unclamped pairs, flipped to the reference's
        // signs, clamped at the quantile of their entries, give the reference's factors.
        WeightedMergeOptions unclamped = o;
        unclamped.svd_clamp.reset();
        LoraFactors p = peft::merge::add_weighted_adapter(
                            in, c["weights"].get<std::vector<double>>(), unclamped)
                            .modules.at(m);
        for (std::int64_t k = 0; k < p.A.rows(); ++k)
          if (p.A.row(k).dot(f.A.row(k)) < 0) {
            p.A.row(k) *= -1;
            p.B.col(k) *= -1;
          }
        const double hi = plain_clamp_bound(p, *o.svd_clamp);
        CHECK(max_abs_diff(p.A.cwiseMin(hi).cwiseMax(-hi), f.A) < 1e-12);
        CHECK(max_abs_diff(p.B.cwiseMin(hi).cwiseMax(-hi), f.B) < 1e-12);
      } else if (svd) {
        // Singular vectors are unique up to sign: compare the update, and |factors| of the
        // pairs with a non-zero singular value (the others span a null space of any basis).
        const double scale = std::max(product(f).cwiseAbs().maxCoeff(), 1e-300);
        CHECK(max_abs_diff(product(g), product(f)) / scale < 1e-10);
        const double largest = f.B.col(0).norm();
        for (std::int64_t k = 0; k < f.A.rows(); ++k)
          if (f.B.col(k).norm() > 1e-8 * largest)
            CHECK(max_abs_diff(g.A.row(k).cwiseAbs(), f.A.row(k).cwiseAbs()) < 1e-9);
      } else {
        CHECK(max_abs_diff(g.A, f.A) < 1e-12);
        CHECK(max_abs_diff(g.B, f.B) < 1e-12);
      }
    }
  }
  CHECK(cases == 19);
}

TEST_CASE("peft merge: writes the merged adapter; bad flags are usage errors") {
  const std::filesystem::path root = std::filesystem::path(PEFT_TEST_DATA_DIR) / "weighted_merge";
  const auto dir = scratch_dir("cli");
  const std::string a = (root / "adapters" / "a").string(), b = (root / "adapters" / "b").string();
  std::ostringstream out, err;
  REQUIRE(peft::cli::run_merge({"--adapters", a + "," + b, "--weights", "0.7,0.3", "--combination",
                                "ties", "--density", "0.5", "--out", (dir / "merged").string()},
                               out, err) == 0);
  CHECK(out.str().find("merged 2 adapters (ties)") != std::string::npos);
  const LoraAdapter written = peft::merge::read_lora_adapter(dir / "merged");
  const LoraAdapter expected = peft::merge::read_lora_adapter(root / "ties" / "expected");
  for (const auto& [m, f] : expected.modules) {
    CHECK(max_abs_diff(written.modules.at(m).A, f.A.cast<float>().cast<double>()) == 0);
    CHECK(max_abs_diff(written.modules.at(m).B, f.B.cast<float>().cast<double>()) == 0);
  }
  const std::string merged = (dir / "again").string();
  using peft::io::ArgumentError;
  CHECK_THROWS_WITH_AS(
      peft::cli::run_merge({"--adapters", a + "," + b, "--weights", "1", "--out", merged}, out,
                           err),
      doctest::Contains("1 weights for 2 adapters"), ArgumentError);
  CHECK_THROWS_WITH_AS(
      peft::cli::run_merge({"--adapters", a + "," + b, "--weights", "1,x", "--out", merged}, out,
                           err),
      doctest::Contains("--weights item 2"), ArgumentError);
  CHECK_THROWS_WITH_AS(
      peft::cli::run_merge(
          {"--adapters", a + "," + b, "--weights", "1,1", "--combination", "mean", "--out", merged},
          out, err),
      doctest::Contains("--combination: combination type: expected one of"), ArgumentError);
  CHECK_THROWS_WITH_AS(
      peft::cli::run_merge(
          {"--adapters", a + "," + b, "--weights", "1,1", "--density", "2", "--out", merged}, out,
          err),
      doctest::Contains("--density: expected a finite number in [0, 1]"), ArgumentError);
  CHECK_THROWS_AS(peft::cli::run_merge({"--adapters", a, "--weights", "1"}, out, err),
                  ArgumentError);
  CHECK(!std::filesystem::exists(merged));
  std::filesystem::remove_all(dir);
}

}  // namespace test_weighted_merge
