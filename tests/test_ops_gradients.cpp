// Finite-difference gradient checks of every op, in double precision: one templated suite, one
// case type per op, each with its own inputs, step and tolerance.
#include <doctest/doctest.h>

#include <peft/peft.hpp>
#include <peft/testing/gradcheck.hpp>

// Named per file: the unity build (tests/CMakeLists.txt) compiles several test files as one
// translation unit, where their helpers must not meet.
namespace test_ops_gradients {

namespace {

using peft::Shape;
using peft::Tape;
using peft::Var;
using peft::testing::random_tensor;
using Inputs = std::vector<Var<double>>;

Var<double> input(const Shape& shape, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return Var<double>(random_tensor(shape, seed, lo, hi), true);
}

struct MatmulPlain {
  static constexpr const char* name = "matmul";
  static Inputs inputs() { return {input({3, 4}, 1), input({4, 5}, 2)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::matmul(t, x[0], x[1]); }
};
struct MatmulTransposed {
  static constexpr const char* name = "matmul transposes";
  static Inputs inputs() { return {input({4, 3}, 3), input({5, 4}, 4)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::matmul(t, x[0], x[1], true, true);
  }
};
struct MatmulTransA {
  static constexpr const char* name = "matmul trans_a";
  static Inputs inputs() { return {input({4, 3}, 5), input({4, 2}, 6)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::matmul(t, x[0], x[1], true, false);
  }
};
struct MatmulBatched {
  static constexpr const char* name = "matmul batched";
  static Inputs inputs() { return {input({2, 3, 4}, 7), input({2, 5, 4}, 8)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::matmul(t, x[0], x[1], false, true);
  }
};
struct MatmulBroadcastRhs {
  static constexpr const char* name = "matmul 3-D by 2-D";
  static Inputs inputs() { return {input({2, 3, 4}, 9), input({4, 3}, 10)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::matmul(t, x[0], x[1]); }
};
struct LinearOutIn {
  static constexpr const char* name = "linear [out, in] with bias";
  static Inputs inputs() { return {input({2, 3, 4}, 11), input({5, 4}, 12), input({5}, 13)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::linear(t, x[0], x[1], x[2], peft::ops::WeightLayout::OutIn);
  }
};
struct LinearInOut {
  static constexpr const char* name = "linear [in, out] without bias";
  static Inputs inputs() { return {input({3, 4}, 14), input({4, 6}, 15)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::linear(t, x[0], x[1], Var<double>{}, peft::ops::WeightLayout::InOut);
  }
};
struct LoraLinear {
  static constexpr const char* name = "lora_linear";
  static Inputs inputs() {
    return {input({5, 6}, 16), input({6, 7}, 17), input({7}, 18), input({2, 6}, 19),
            input({7, 2}, 20)};
  }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::lora_linear(t, x[0], x[1], x[2], peft::ops::WeightLayout::InOut, x[3], x[4],
                                  1.7);
  }
};
struct AddSame {
  static constexpr const char* name = "add";
  static Inputs inputs() { return {input({3, 4}, 21), input({3, 4}, 22)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::add(t, x[0], x[1]); }
};
struct AddBias {
  static constexpr const char* name = "add broadcast bias";
  static Inputs inputs() { return {input({2, 3, 4}, 23), input({4}, 24)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::add(t, x[0], x[1]); }
};
struct AddOverBatch {
  static constexpr const char* name = "add broadcast over batch";
  static Inputs inputs() { return {input({2, 3, 4}, 25), input({1, 3, 4}, 26)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::add(t, x[0], x[1]); }
};
struct MulSame {
  static constexpr const char* name = "mul";
  static Inputs inputs() { return {input({3, 4}, 27), input({3, 4}, 28)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::mul(t, x[0], x[1]); }
};
struct MulBroadcast {
  static constexpr const char* name = "mul broadcast";
  static Inputs inputs() { return {input({2, 3, 4}, 29), input({4}, 30)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::mul(t, x[0], x[1]); }
};
struct Scale {
  static constexpr const char* name = "scale";
  static Inputs inputs() { return {input({3, 4}, 31)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::scale(t, x[0], -2.5); }
};
struct Sum {
  static constexpr const char* name = "sum";
  static Inputs inputs() { return {input({3, 4}, 32)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::sum(t, x[0]); }
};
struct Gelu {
  static constexpr const char* name = "gelu_tanh";
  static Inputs inputs() { return {input({3, 5}, 33, -3, 3)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::gelu_tanh(t, x[0]); }
};
struct Silu {
  static constexpr const char* name = "silu";
  static Inputs inputs() { return {input({3, 5}, 34, -3, 3)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::silu(t, x[0]); }
};
struct Tanh {
  static constexpr const char* name = "tanh";
  static Inputs inputs() { return {input({3, 5}, 35, -2, 2)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::tanh(t, x[0]); }
};
struct Sigmoid {
  static constexpr const char* name = "sigmoid";
  static Inputs inputs() { return {input({3, 5}, 36, -3, 3)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::sigmoid(t, x[0]); }
};
struct Relu {
  static constexpr const char* name = "relu";
  // Kept away from the kink at 0, where the derivative is undefined.
  static Inputs inputs() {
    Var<double> v = input({3, 5}, 37, -2, 2);
    for (std::int64_t i = 0; i < v.value().numel(); ++i)
      if (std::abs(v.value()[i]) < 0.05) v.value()[i] = 0.3;
    return {v};
  }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::relu(t, x[0]); }
};
struct LayerNorm {
  static constexpr const char* name = "layer_norm";
  static Inputs inputs() { return {input({2, 3, 6}, 38), input({6}, 39), input({6}, 40)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::layer_norm(t, x[0], x[1], x[2], 1e-5);
  }
};
struct RmsNorm {
  static constexpr const char* name = "rms_norm";
  static Inputs inputs() { return {input({4, 6}, 41), input({6}, 42)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::rms_norm(t, x[0], x[1], 1e-6);
  }
};
struct Softmax {
  static constexpr const char* name = "softmax";
  static Inputs inputs() { return {input({3, 7}, 43, -3, 3)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) { return peft::ops::softmax(t, x[0]); }
};
struct AttentionCausalPadded {
  static constexpr const char* name = "attention causal + padding";
  static Inputs inputs() {
    return {input({2, 5, 8}, 44), input({2, 5, 8}, 45), input({2, 5, 8}, 46)};
  }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    peft::ops::AttentionSpec spec;
    spec.heads = 2;
    spec.kv_heads = 2;
    spec.head_dim = 4;
    spec.key_visible = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0};  // row 1 right-padded by 2
    return peft::ops::attention(t, x[0], x[1], x[2], spec);
  }
};
struct AttentionGroupedPrefix {
  static constexpr const char* name = "attention grouped-query with prefix";
  static Inputs inputs() {
    return {input({2, 3, 12}, 47), input({2, 5, 6}, 48), input({2, 5, 6}, 49)};
  }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    peft::ops::AttentionSpec spec;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.head_dim = 3;
    spec.query_offset = 2;  // 2 prefix keys before 3 real ones
    return peft::ops::attention(t, x[0], x[1], x[2], spec);
  }
};
struct Rope {
  static constexpr const char* name = "rope";
  static Inputs inputs() { return {input({2, 3, 8}, 50)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::rope(t, x[0], 4, 500.0, 3);
  }
};
struct Embedding {
  static constexpr const char* name = "embedding";
  static Inputs inputs() { return {input({5, 3}, 51)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::embedding(t, x[0], {4, 0, 4, 2});
  }
};
struct Concat {
  static constexpr const char* name = "concat";
  static Inputs inputs() { return {input({2, 1, 3}, 52), input({2, 2, 3}, 53)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::concat(t, {x[0], x[1]}, 1);
  }
};
struct Split {
  static constexpr const char* name = "split";
  static Inputs inputs() { return {input({2, 3, 6}, 54)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    auto parts = peft::ops::split(t, x[0], {1, 2, 3}, 2);
    // Weight the pieces differently so that each one's backward is exercised.
    return peft::ops::concat(
        t, {peft::ops::scale(t, parts[2], 2.0), parts[0], peft::ops::scale(t, parts[1], -1.0)}, 2);
  }
};
struct Reshape {
  static constexpr const char* name = "reshape";
  static Inputs inputs() { return {input({2, 6}, 55)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::reshape(t, x[0], Shape{3, 4});
  }
};
struct Transpose {
  static constexpr const char* name = "transpose";
  static Inputs inputs() { return {input({2, 3, 4}, 56)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::transpose(t, x[0], 0, 2);
  }
};
struct GatherRows {
  static constexpr const char* name = "gather_rows (a row twice, one left out)";
  static Inputs inputs() { return {input({4, 2, 3}, 58)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::gather_rows(t, x[0], {2, 0, 2});
  }
};
struct IndexAddRows {
  static constexpr const char* name = "index_add_rows (two parts, a row twice)";
  static Inputs inputs() {
    return {input({4, 2, 3}, 59), input({3, 2, 3}, 60), input({1, 2, 3}, 61)};
  }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::index_add_rows(t, x[0], {{3, 1, 3}, {0}}, {x[1], x[2]});
  }
};
struct GroupedLowRankAdd {
  static constexpr const char* name = "grouped_low_rank_add (two groups, ranks 2 and 1)";
  static Inputs inputs() {
    return {input({4, 2, 3}, 62), input({4, 2, 5}, 63), input({2, 5}, 64), input({3, 2}, 65),
            input({1, 5}, 66), input({3, 1}, 67)};
  }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::grouped_low_rank_add<double>(
        t, x[0], x[1], {{{2, 0}, x[2], x[3], 0.5}, {{3, 2}, x[4], x[5], -2.0}});
  }
};
struct CrossEntropy {
  static constexpr const char* name = "cross_entropy with ignore index";
  static Inputs inputs() { return {input({4, 6}, 57, -2, 2)}; }
  static Var<double> apply(Tape<double>& t, Inputs& x) {
    return peft::ops::cross_entropy(t, x[0], {3, -100, 0, 5});
  }
};

}  // namespace

TEST_CASE_TEMPLATE("op gradient matches finite differences (double)", Op, MatmulPlain,
                   MatmulTransposed, MatmulTransA, MatmulBatched, MatmulBroadcastRhs, LinearOutIn,
                   LinearInOut, LoraLinear, AddSame, AddBias, AddOverBatch, MulSame, MulBroadcast,
                   Scale, Sum, Gelu, Silu, Tanh, Sigmoid, Relu, LayerNorm, RmsNorm, Softmax,
                   AttentionCausalPadded, AttentionGroupedPrefix, Rope, Embedding, Concat, Split,
                   Reshape, Transpose, GatherRows, IndexAddRows, GroupedLowRankAdd,
                   CrossEntropy) {
  CAPTURE(Op::name);
  const peft::testing::GradCheckResult result = peft::testing::check_gradients(
      [](Tape<double>& tape, Inputs& x) { return Op::apply(tape, x); }, Op::inputs());
  INFO(result.message);
  CHECK(result.ok);
}

TEST_CASE("the gradient checker catches a wrong gradient") {
  // A deliberately wrong backward (factor 2) must fail: the checker is not vacuous.
  auto wrong = [](Tape<double>& tape, Inputs& x) {
    Var<double> y(x[0].value(), true);
    y.value().vector() *= 3.0;
    Var<double> in = x[0];
    tape.record([in, y]() mutable { in.grad().vector() += 2.0 * y.grad().vector(); });
    return y;
  };
  CHECK_FALSE(peft::testing::check_gradients(wrong, {input({2, 2}, 60)}).ok);
}

}  // namespace test_ops_gradients
