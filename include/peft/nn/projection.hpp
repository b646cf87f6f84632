#pragma once
// Projection<T>: one projection site's product, y = x Wᵀ + b, and what PEFT methods contribute
// to it — described as data, so that several methods can adapt the same module and the decoder
// (or a device) can fuse the contributions into the product.
//
// WHAT A METHOD MAY CONTRIBUTE (from its `adapt(Projection<T>&)` hook; methods/policy.hpp)
//   scale_input(s)          x ← x ⊙ s, s [in] (IA3 on feed-forward modules)
//   map_input(f)            x ← f(tape, x), [..., in] → [..., in] (the orthogonal family: OFT's
//                           block rotation, HRA's reflections: W R x without forming W R)
//   add_low_rank(A, B, s)   y += s · (x Aᵀ) Bᵀ, A [r, in], B [out, r] (LoRA and its family;
//                           fused into the base product: y and dx are written once)
//   add_delta(f)            y += f(tape, x) (a general delta, [..., out]: LoHa, LoKr, sparse
//                           diffs)
//   replace_product(f)      x Wᵀ + b ← f(tape, module, x), where the method truly is a
//                           replacement (DoRA's magnitude-normalised product); at most one
//   scale_output(l)         y ← y ⊙ l, l [out] (IA3)
//   shift_output(β)         y ← y + β, β [out] (SSF)
//   map_output(f)           y ← f(tape, y)
// ORDER (defined, whatever the methods): every input scale and input map (in the order given),
// then the product (the replacement or x Wᵀ + b) plus every low-rank term and delta, then every
// output stage in the order given. Compose gives its components the same Projection in component
// order, so `Compose<LoRA, IA3>` on v_proj computes (x Wᵀ + b + s B A x) ⊙ l.
// An empty Projection computes module.forward_base(x): a site no method adapts costs nothing.
//
// WRAPPING (gates): a wrapper (hybrid/unipelt.hpp's Gated) hands the inner method a fresh
// Projection on the same input, reads its `contributions()` without computing them, and re-emits
// each, gated, into the outer Projection — without knowing which method made them.
//
// HOW LATER FORMATS AND DEVICES PLUG IN (designed in, not built yet)
//   - Frozen weights in another storage format (bf16, NF4; built): forward_base() runs the
//     module's product on its storage (core/frozen_weight.hpp); the contributions above do not
//     change. Methods that read W read the dequantized view (weight_out_in()); a replacement
//     that needs the dense tensor asks for dense_weight(), a clear error for bf16/NF4.
//   - Named adapters and mixed batches (built): the decoder holds several states by name
//     (Decoder::add_adapter) and, for a batch whose rows name their adapters, hands each group
//     of rows its own Projection (grouped_projection below).
//   - Devices: compute() is the only place that runs the product; a CUDA specialisation fuses
//     the low-rank terms into its GEMM as the CPU one does.
//
// DROPOUT (training mode; built): a low-rank term or a delta may carry an input dropout p
// (add_low_rank(A, B, s, p), add_delta(f, p): LoRA's lora_dropout and its family's). When the
// decoder is in training mode it hands the Projection its dropout generator, and compute() gives
// each such term its own x ⊙ m / (1 − p), m ~ Bernoulli(1 − p) per element, drawn in contribution
// order: the reference's nn.Dropout on the adapter's input, while the base product keeps the
// undropped x. A term with an active dropout is not fused into the base product. In evaluation
// (no generator) the terms see x itself.
#include <functional>
#include <random>
#include <utility>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/core/ops.hpp"
#include "peft/nn/modules.hpp"

namespace peft {

template <class T>
class Projection {
 public:
  using Function = std::function<Var<T>(Tape<T>&, const Var<T>&)>;
  using Product = std::function<Var<T>(Tape<T>&, const nn::Linear<T>&, const Var<T>&)>;

  enum class Kind {
    InputScale,
    InputMap,
    LowRank,
    Delta,
    Replace,
    OutputScale,
    OutputShift,
    OutputMap
  };
  struct Contribution {
    Kind kind;
    Var<T> a;  ///< InputScale, OutputScale, OutputShift: the vector; LowRank: A [r, in]
    Var<T> b;  ///< LowRank: B [out, r]
    T scale = T(1);
    Function function;   ///< Delta: x → Δy; InputMap: x → x'; OutputMap: y → y'
    Product product;     ///< Replace
    double dropout = 0;  ///< LowRank, Delta: the input's dropout probability in training
  };

  /// `dropout`: the decoder's dropout generator in training mode, null in evaluation.
  Projection(Tape<T>& tape, const nn::Linear<T>& module, Var<T> x,
             std::mt19937_64* dropout = nullptr)
      : tape_(&tape), module_(&module), x_(std::move(x)), dropout_(dropout) {}

  Tape<T>& tape() const { return *tape_; }
  const nn::Linear<T>& module() const { return *module_; }
  /// The projection's input as the decoder gave it (before input scales).
  const Var<T>& input() const { return x_; }

  /// The dropout generator (training mode) or null: a wrapper hands it to inner Projections.
  std::mt19937_64* dropout_generator() const { return dropout_; }

  void scale_input(Var<T> s) { push({Kind::InputScale, std::move(s), {}, T(1), {}, {}}); }
  void map_input(Function f) { push({Kind::InputMap, {}, {}, T(1), std::move(f), {}}); }
  void add_low_rank(Var<T> a, Var<T> b, T scale, double dropout = 0) {
    push({Kind::LowRank, std::move(a), std::move(b), scale, {}, {}, dropout});
  }
  void add_delta(Function f, double dropout = 0) {
    push({Kind::Delta, {}, {}, T(1), std::move(f), {}, dropout});
  }
  void replace_product(Product f) {
    for (const Contribution& c : contributions_)
      if (c.kind == Kind::Replace)
        throw ConfigError(module_->name +
                          ": two methods replace this module's product (at most one may)");
    push({Kind::Replace, {}, {}, T(1), {}, std::move(f)});
  }
  void scale_output(Var<T> l) { push({Kind::OutputScale, std::move(l), {}, T(1), {}, {}}); }
  void shift_output(Var<T> beta) { push({Kind::OutputShift, std::move(beta), {}, T(1), {}, {}}); }
  void map_output(Function f) { push({Kind::OutputMap, {}, {}, T(1), std::move(f), {}}); }
  void add(Contribution c) { push(std::move(c)); }

  const std::vector<Contribution>& contributions() const { return contributions_; }
  bool empty() const { return contributions_.empty(); }

  /// The product with every contribution, in the order documented above.
  Var<T> compute() const {
    Tape<T>& tape = *tape_;
    const nn::Linear<T>& m = *module_;
    if (contributions_.empty()) return m.forward_base(tape, x_);
    Var<T> x = x_;
    for (const Contribution& c : contributions_) {
      if (c.kind == Kind::InputScale) x = ops::mul(tape, x, flat(tape, c.a, m.in_features));
      if (c.kind == Kind::InputMap) x = c.function(tape, x);
    }
    const Contribution* replace = nullptr;
    const Contribution* fused = nullptr;  // the first low-rank term rides in the base product
    for (const Contribution& c : contributions_) {
      if (c.kind == Kind::Replace) replace = &c;
      if (c.kind == Kind::LowRank && !fused && !drops(c)) fused = &c;
    }
    if (replace) fused = nullptr;
    Var<T> y;
    if (replace)
      y = replace->product(tape, m, x);
    else if (fused && m.frozen)  // a bf16/NF4 base: the term rides in the frozen product
      y = ops::frozen_lora_linear(tape, x, m.frozen, m.bias, fused->a, fused->b, fused->scale);
    else if (fused)
      y = ops::lora_linear(tape, x, m.weight, m.bias, m.layout, fused->a, fused->b, fused->scale);
    else
      y = m.forward_base(tape, x);
    for (const Contribution& c : contributions_) {
      if (&c == fused) continue;
      if (c.kind != Kind::LowRank && c.kind != Kind::Delta) continue;
      const Var<T> input = drops(c) ? dropped(tape, x, c.dropout, *dropout_) : x;
      y = ops::add(tape, y,
                   c.kind == Kind::LowRank ? low_rank(tape, input, c) : c.function(tape, input));
    }
    for (const Contribution& c : contributions_) {
      if (c.kind == Kind::OutputScale) y = ops::mul(tape, y, flat(tape, c.a, m.out_features));
      if (c.kind == Kind::OutputShift) y = ops::add(tape, y, flat(tape, c.a, m.out_features));
      if (c.kind == Kind::OutputMap) y = c.function(tape, y);
    }
    return y;
  }

  /// True when every contribution is a low-rank term or a delta (y += ...): the product is
  /// then x Wᵀ + b plus additive_terms(), which a mixed-adapter batch computes once for all
  /// rows and adds each group's terms to (RowGroups below).
  bool additive_only() const {
    for (const Contribution& c : contributions_)
      if (c.kind != Kind::LowRank && c.kind != Kind::Delta) return false;
    return true;
  }
  /// True when every contribution is a low-rank term without an active dropout: a mixed
  /// batch then adds every group's terms in one grouped product (ops::grouped_low_rank_add).
  bool low_rank_only() const {
    for (const Contribution& c : contributions_)
      if (c.kind != Kind::LowRank || drops(c)) return false;
    return true;
  }
  /// The sum of the low-rank terms and deltas on the input (each with its dropout in training),
  /// without the product; undefined when there is none.
  Var<T> additive_terms() const {
    Tape<T>& tape = *tape_;
    Var<T> sum;
    for (const Contribution& c : contributions_) {
      if (c.kind != Kind::LowRank && c.kind != Kind::Delta) continue;
      const Var<T> input = drops(c) ? dropped(tape, x_, c.dropout, *dropout_) : x_;
      Var<T> term = c.kind == Kind::LowRank ? low_rank(tape, input, c) : c.function(tape, input);
      sum = sum ? ops::add(tape, sum, term) : term;
    }
    return sum;
  }

  /// s · (x Aᵀ) Bᵀ on its own (a gate wrapping a low-rank term needs the term alone).
  static Var<T> low_rank(Tape<T>& tape, const Var<T>& x, const Contribution& c) {
    // The scale on the narrow [..., r] product: one pass over r columns, not over out.
    Var<T> h =
        ops::scale(tape, ops::linear(tape, x, c.a, Var<T>{}, ops::WeightLayout::OutIn), c.scale);
    return ops::linear(tape, h, c.b, Var<T>{}, ops::WeightLayout::OutIn);
  }

  /// x ⊙ m / (1 − p) with m ~ Bernoulli(1 − p) per element, drawn from `rng` in element order
  /// (inverted dropout, as torch's nn.Dropout in training mode). The mask is a constant of the
  /// tape: the gradient reaching x is dy ⊙ m / (1 − p).
  static Var<T> dropped(Tape<T>& tape, const Var<T>& x, double p, std::mt19937_64& rng) {
    return ops::mul(tape, x, Var<T>(dropout_mask(x.shape(), p, rng)));
  }
  static Tensor<T> dropout_mask(const Shape& shape, double p, std::mt19937_64& rng) {
    Tensor<T> mask = Tensor<T>::zeros(shape);
    const T keep = static_cast<T>(1.0 / (1.0 - p));
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    for (std::int64_t i = 0; i < mask.numel(); ++i)
      mask.data()[i] = uniform(rng) >= p ? keep : T(0);
    return mask;
  }

  /// A vector contribution [n] (or [n, 1], [1, n]) as [n], which broadcasts over the rows.
  static Var<T> flat(Tape<T>& tape, const Var<T>& v, std::int64_t n) {
    if (v.value().rank() == 1) return v;
    return ops::reshape(tape, v, Shape{n});
  }

 private:
  void push(Contribution c) { contributions_.push_back(std::move(c)); }
  bool drops(const Contribution& c) const { return dropout_ && c.dropout > 0; }

  Tape<T>* tape_;
  const nn::Linear<T>* module_;
  Var<T> x_;
  std::mt19937_64* dropout_ = nullptr;
  std::vector<Contribution> contributions_;
};

/// A mixed-adapter batch's rows, grouped by the adapter each names (Batch::adapter_names): the
/// group's adapter state (null: the base model alone) and its rows (indices of the first axis).
template <class State>
struct RowGroup {
  State* state = nullptr;
  std::vector<std::int64_t> rows;
};

/// One projection site's product for a mixed-adapter batch x [B, ...]: every row gets what it
/// would get alone with its group's adapter. When every group only adds low-rank terms (the LoRA
/// family), the product x Wᵀ + b runs once over all B rows and one op adds each group's terms at
/// its rows (ops::grouped_low_rank_add: the grouped product of Punica/S-LoRA on the CPU, two
/// small products per group). When the groups only add (deltas too, or a dropout in training),
/// each group's terms are computed on its gathered rows and added back at them. Otherwise (input
/// or output scales, input maps, a replacement) each group computes its whole projection on its own
/// rows. `adapt(state, projection)` asks a state for its contributions.
template <class T, class State, class Adapt>
Var<T> grouped_projection(Tape<T>& tape, const nn::Linear<T>& module, const Var<T>& x,
                          const std::vector<RowGroup<State>>& groups, std::mt19937_64* dropout,
                          Adapt&& adapt) {
  if (groups.size() == 1) {  // every row with one adapter (or none): the ordinary product
    Projection<T> p(tape, module, x, dropout);
    if (groups.front().state) adapt(*groups.front().state, p);
    return p.compute();
  }
  // Each group's contributions (data: they do not depend on the input yet).
  std::vector<Projection<T>> parts;
  parts.reserve(groups.size());
  bool low_rank = true;
  for (const RowGroup<State>& g : groups) {
    parts.emplace_back(tape, module, x, dropout);
    if (g.state) adapt(*g.state, parts.back());
    low_rank = low_rank && parts.back().low_rank_only();
  }
  if (low_rank) {  // the LoRA family: one base product, one grouped op for every group's terms
    std::vector<ops::LowRankGroup<T>> terms;
    for (std::size_t i = 0; i < groups.size(); ++i)
      for (const auto& c : parts[i].contributions())
        terms.push_back({groups[i].rows, c.a, c.b, c.scale});
    Var<T> y = module.forward_base(tape, x);
    return terms.empty() ? y : ops::grouped_low_rank_add(tape, y, x, terms);
  }
  // Otherwise each group's contributions on its own rows (the same data, a gathered input).
  bool additive = true;
  for (std::size_t i = 0; i < groups.size(); ++i) {
    Projection<T> on_rows(tape, module, ops::gather_rows(tape, x, groups[i].rows), dropout);
    for (const auto& c : parts[i].contributions()) on_rows.add(c);
    parts[i] = std::move(on_rows);
    additive = additive && parts[i].additive_only();
  }
  std::vector<std::vector<std::int64_t>> rows;
  std::vector<Var<T>> terms;
  if (additive) {
    for (std::size_t i = 0; i < groups.size(); ++i)
      if (Var<T> t = parts[i].additive_terms()) {
        rows.push_back(groups[i].rows);
        terms.push_back(std::move(t));
      }
    Var<T> y = module.forward_base(tape, x);
    return terms.empty() ? y : ops::index_add_rows(tape, y, rows, terms);
  }
  for (std::size_t i = 0; i < groups.size(); ++i) {
    rows.push_back(groups[i].rows);
    terms.push_back(parts[i].compute());
  }
  Shape s = terms.front().shape();
  s[0] = x.shape()[0];
  return ops::index_add_rows(tape, Var<T>(Tensor<T>::zeros(s)), rows, terms);
}

}  // namespace peft
