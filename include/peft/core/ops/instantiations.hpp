#pragma once
// The ops' float and double instantiations, listed once.
//
// Why: every op is a function template of its element type; a translation unit that uses
// Decoder<..., float> instantiates and optimises every op and its Eigen kernels again (tens of
// seconds a TU at -O3). A program made of several TUs may compile them once instead:
//
//   - define PEFT_PRECOMPILED_OPS in every TU (the declarations below then say "instantiated
//     elsewhere": `extern template`), and
//   - compile, for T in float and double, one TU that defines PEFT_INSTANTIATE_OPS_FOR as T and
//     includes <peft/core/ops.hpp> (the definitions: `template`): the project's
//     src/precompiled_ops_float.cpp and src/precompiled_ops_double.cpp (two TUs, so that a
//     parallel build compiles them side by side).
//
// Without PEFT_PRECOMPILED_OPS (a user's program, by default) nothing changes: the header-only
// library instantiates what it uses. The list must name each op with its exact signature; an op
// missing here is simply instantiated implicitly (correct, only slower to compile).
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

// PEFT_FOR_EACH_OP(PREFIX, T): PREFIX is `template` or `extern template`.
#define PEFT_FOR_EACH_OP(PREFIX, T)                                                              \
  PREFIX void detail::gemm_serial<T>(const T*, std::int64_t, bool, const T*, std::int64_t, bool, \
                                     T*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, \
                                     T, bool);                                                   \
  PREFIX void detail::gemm_serial_sum<T>(std::initializer_list<detail::GemmTerm<T>>, T*,         \
                                         std::int64_t, std::int64_t, std::int64_t, T, bool);     \
  PREFIX void detail::gemm<T>(const T*, std::int64_t, bool, const T*, std::int64_t, bool, T*,    \
                              std::int64_t, std::int64_t, std::int64_t, std::int64_t, T, bool);  \
  PREFIX Var<T> attention<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&,              \
                             const AttentionSpec&);                                              \
  PREFIX Var<T> rope<T>(Tape<T>&, const Var<T>&, const std::vector<float>&, std::int64_t);       \
  PREFIX Var<T> rope<T>(Tape<T>&, const Var<T>&, std::int64_t, double, std::int64_t);            \
  PREFIX Var<T> add<T>(Tape<T>&, const Var<T>&, const Var<T>&);                                  \
  PREFIX Var<T> mul<T>(Tape<T>&, const Var<T>&, const Var<T>&);                                  \
  PREFIX Var<T> scale<T>(Tape<T>&, const Var<T>&, T);                                            \
  PREFIX Var<T> gelu_tanh<T>(Tape<T>&, const Var<T>&);                                           \
  PREFIX Var<T> silu<T>(Tape<T>&, const Var<T>&);                                                \
  PREFIX Var<T> tanh<T>(Tape<T>&, const Var<T>&);                                                \
  PREFIX Var<T> sigmoid<T>(Tape<T>&, const Var<T>&);                                             \
  PREFIX Var<T> relu<T>(Tape<T>&, const Var<T>&);                                                \
  PREFIX Var<T> sum<T>(Tape<T>&, const Var<T>&);                                                 \
  PREFIX Var<T> matmul<T>(Tape<T>&, const Var<T>&, const Var<T>&, bool, bool);                   \
  PREFIX Var<T> linear<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&, WeightLayout);  \
  PREFIX Var<T> cross_entropy<T>(Tape<T>&, const Var<T>&, const std::vector<std::int64_t>&);     \
  PREFIX LogitsAndLoss<T> linear_cross_entropy<T>(Tape<T>&, const Var<T>&, const Var<T>&,        \
                                                  const Var<T>&, WeightLayout,                   \
                                                  const std::vector<std::int64_t>&);             \
  PREFIX Var<T> lora_linear<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&,            \
                               WeightLayout, const Var<T>&, const Var<T>&, T);                   \
  PREFIX Var<T> layer_norm<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&, T);         \
  PREFIX Var<T> rms_norm<T>(Tape<T>&, const Var<T>&, const Var<T>&, T);                          \
  PREFIX Var<T> softmax<T>(Tape<T>&, const Var<T>&);                                             \
  PREFIX Var<T> dora_linear<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&,            \
                               WeightLayout, const Var<T>&, const Var<T>&, const Var<T>&,        \
                               const Tensor<T>&, T);                                             \
  PREFIX Var<T> vera_linear<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&,            \
                               WeightLayout, const Var<T>&, const Var<T>&, const Var<T>&,        \
                               const Var<T>&);                                                   \
  PREFIX Var<T> kronecker_linear<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&,       \
                                    WeightLayout, const Var<T>&, const Var<T>&, T);              \
  PREFIX Var<T> row_kron<T>(Tape<T>&, const Var<T>&, const Var<T>&);                             \
  PREFIX Var<T> orthogonality_penalty<T>(Tape<T>&, const Var<T>&, bool);                         \
  PREFIX Var<T> reshape<T>(Tape<T>&, const Var<T>&, Shape);                                      \
  PREFIX Var<T> transpose<T>(Tape<T>&, const Var<T>&, std::size_t, std::size_t);                 \
  PREFIX Var<T> concat<T>(Tape<T>&, const std::vector<Var<T>>&, std::size_t);                    \
  PREFIX std::vector<Var<T>> split<T>(Tape<T>&, const Var<T>&, const std::vector<std::int64_t>&, \
                                      std::size_t);                                              \
  PREFIX Var<T> embedding<T>(Tape<T>&, const Var<T>&, const std::vector<std::int64_t>&);         \
  PREFIX Var<T> slice<T>(Tape<T>&, const Var<T>&, std::size_t, std::int64_t, std::int64_t);      \
  PREFIX Var<T> gather_rows<T>(Tape<T>&, const Var<T>&, const std::vector<std::int64_t>&);      \
  PREFIX Var<T> index_add_rows<T>(Tape<T>&, const Var<T>&,                                       \
                                  const std::vector<std::vector<std::int64_t>>&,                \
                                  const std::vector<Var<T>>&);                                  \
  PREFIX Var<T> grouped_low_rank_add<T>(Tape<T>&, const Var<T>&, const Var<T>&,                 \
                                        const std::vector<LowRankGroup<T>>&);                   \
  PREFIX Var<T> delta_linear<T>(Tape<T>&, const Var<T>&, const Var<T>&, const Var<T>&,           \
                                WeightLayout, const WeightDelta<T>&, double);                    \
  PREFIX Var<T> hard_concrete_gate<T>(Tape<T>&, const Var<T>&, const Tensor<T>&, T, T, T);       \
  PREFIX Var<T> l0_penalty<T>(Tape<T>&, const std::vector<Var<T>>&, T, T, T, T, T);

#if defined(PEFT_INSTANTIATE_OPS_FOR)
namespace peft::ops {
PEFT_FOR_EACH_OP(template, PEFT_INSTANTIATE_OPS_FOR)
}  // namespace peft::ops
#elif defined(PEFT_PRECOMPILED_OPS)
namespace peft::ops {
PEFT_FOR_EACH_OP(extern template, float)
PEFT_FOR_EACH_OP(extern template, double)
}  // namespace peft::ops
#endif
