#pragma once
// OLoRA (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"):
// a low-rank adapter initialised from the QR decomposition of W [out, in] = Q R (Householder,
// reduced): B = Q[:, :r] [out, r], A = R[:r, :] [r, in] (no square root of the scale, as the
// reference's olora_init), and the base keeps W − s B A, so the model's output is unchanged.
// Signs: Householder reflectors with β = −sign(α)‖x‖, as LAPACK's geqrf that torch.linalg.qr
// calls (so R's diagonal may be negative, as torch's). The reference computes in float32 (it
// refuses a float64 base); here in double. The reference's olora_init does not transpose for
// fan_in_fan_out (GPT-2's Conv1D), which breaks it there; this uses W [out, in] for every layout.
#include <Eigen/QR>
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/tensor.hpp"
#include "peft/nn/modules.hpp"

namespace peft::detail {

/// Writes A [r, in] = R_r and B [out, r] = Q_r from W's QR and subtracts s B A from W.
template <class T>
void olora_initialise(nn::Linear<T>& lin, Tensor<T>& a, Tensor<T>& b, T scale) {
  const RowMatrix<double> w = lin.weight_out_in().template cast<double>();
  const Eigen::Index r = a.dim(0), k = std::min(w.rows(), w.cols());
  if (r > k)
    throw ConfigError("OLoRA: rank " + std::to_string(r) +
                      " exceeds min(out, in) = " + std::to_string(k) + " of " + lin.name);
  Eigen::HouseholderQR<RowMatrix<double>> qr(w);
  const RowMatrix<double> q =
      qr.householderQ() * RowMatrix<double>::Identity(w.rows(), r);  // Q[:, :r]
  const RowMatrix<double> rr =
      qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>();  // R[:r, :]
  a.matrix() = rr.cast<T>();
  b.matrix() = q.cast<T>();
  const RowMatrix<T> delta = -scale * (b.matrix() * a.matrix());
  lin.add_to_weight(delta);
}

}  // namespace peft::detail
