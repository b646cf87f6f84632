#pragma once
// PiSSA (Meng et al., 2024): a low-rank adapter initialised from the top-r singular triplets
// of W [out, in] = U S Vᵀ: A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)), and the base keeps
// W − s B A, so the model's output is unchanged. Its own header: the SVD (Eigen/SVD) is only
// compiled where a method initialises this way.
#include <Eigen/SVD>
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/tensor.hpp"
#include "peft/nn/modules.hpp"

namespace peft::detail {

/// Writes A [r, in] and B [out, r] from W's singular vectors and subtracts s B A from W.
template <class T>
void pissa_initialise(nn::Linear<T>& lin, Tensor<T>& a, Tensor<T>& b, T scale) {
  const RowMatrix<double> w = lin.weight_out_in().template cast<double>();
  Eigen::BDCSVD<RowMatrix<double>> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::Index r = a.dim(0);
  if (r > svd.singularValues().size())
    throw ConfigError("PiSSA: rank " + std::to_string(r) + " exceeds the rank of " + lin.name);
  const Eigen::VectorXd root = (svd.singularValues().head(r) / double(scale)).cwiseSqrt();
  const RowMatrix<double> av = root.asDiagonal() * svd.matrixV().leftCols(r).transpose();
  const RowMatrix<double> bv = svd.matrixU().leftCols(r) * root.asDiagonal();
  a.matrix() = av.cast<T>();
  b.matrix() = bv.cast<T>();
  const RowMatrix<T> delta = -scale * (b.matrix() * a.matrix());
  lin.add_to_weight(delta);
}

}  // namespace peft::detail

// Compiled once for the project's executables (include/peft/core/ops/instantiations.hpp).
#if defined(PEFT_INSTANTIATE_OPS_FOR)
namespace peft::detail {
template void pissa_initialise<PEFT_INSTANTIATE_OPS_FOR>(nn::Linear<PEFT_INSTANTIATE_OPS_FOR>&,
                                                         Tensor<PEFT_INSTANTIATE_OPS_FOR>&,
                                                         Tensor<PEFT_INSTANTIATE_OPS_FOR>&,
                                                         PEFT_INSTANTIATE_OPS_FOR);
}  // namespace peft::detail
#elif defined(PEFT_PRECOMPILED_OPS)
namespace peft::detail {
extern template void pissa_initialise<float>(nn::Linear<float>&, Tensor<float>&, Tensor<float>&,
                                             float);
extern template void pissa_initialise<double>(nn::Linear<double>&, Tensor<double>&, Tensor<double>&,
                                              double);
}  // namespace peft::detail
#endif
