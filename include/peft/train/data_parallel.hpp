#pragma once
// Data-parallel training: the pieces the Trainer uses when TrainerOptions::process_group has
// more than one rank (docs/distributed.md).
//
//   process_group.hpp  Communicator (a transport's contract), ProcessGroup (any of them as one
//                  value type: what TrainerOptions holds), LocalGroup (ranks as threads); MPI's
//                  transport is distributed/mpi.hpp
//   shard_rows     rank r's rows of a global batch
//   count_targets  the positions the loss averages over (the weights of the ranks' shares)
//   GradientBuckets  the trainable gradients, packed into buckets and summed over the group
//
// How a step is split (Trainer::run): every rank draws the same global micro-batch from the same
// generator, takes its rows, and back-propagates its share of the global mean loss: its own mean
// loss weighted by n_r / n (its labelled positions over the batch's). Summing the ranks'
// gradients then gives the gradient of the global mean, the one a single process computes on the
// whole batch, up to the order of floating-point additions. Frozen weights are never reduced:
// each rank loads (or maps) its own copy; only trainable gradients and a few scalars travel.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/autograd.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/train/process_group.hpp"

namespace peft {

/// Rows [first, last) of a batch (every per-row field sliced alike).
inline Batch batch_rows(const Batch& batch, std::int64_t first, std::int64_t last) {
  if (first < 0 || last > batch.batch || first > last)
    throw ShapeError("batch_rows: rows [" + std::to_string(first) + ", " + std::to_string(last) +
                     ") of a batch of " + std::to_string(batch.batch));
  Batch out;
  out.batch = last - first;
  out.seq = batch.seq;
  const auto from = static_cast<std::ptrdiff_t>(first * batch.seq),
             to = static_cast<std::ptrdiff_t>(last * batch.seq);
  const auto slice = [&](const std::vector<std::int64_t>& v) {
    return v.empty() ? std::vector<std::int64_t>{}
                     : std::vector<std::int64_t>(v.begin() + from, v.begin() + to);
  };
  out.input_ids = slice(batch.input_ids);
  out.attention_mask = slice(batch.attention_mask);
  out.labels = slice(batch.labels);
  if (!batch.adapter_names.empty())
    out.adapter_names.assign(batch.adapter_names.begin() + static_cast<std::ptrdiff_t>(first),
                             batch.adapter_names.begin() + static_cast<std::ptrdiff_t>(last));
  return out;
}

/// Rank r's rows of a batch of `rows` over `size` ranks: [r·rows/size, (r+1)·rows/size), so that
/// shards differ by at most one row and their concatenation in rank order is the batch.
inline std::pair<std::int64_t, std::int64_t> shard_range(std::int64_t rows, int rank, int size) {
  return {rows * rank / size, rows * (rank + 1) / size};
}

inline Batch shard_rows(const Batch& batch, int rank, int size) {
  const auto [first, last] = shard_range(batch.batch, rank, size);
  return batch_rows(batch, first, last);
}

/// The positions the mean loss averages over (targets that are not −100; shifted_targets).
inline std::int64_t count_targets(const Batch& batch, std::int64_t virtual_tokens) {
  const std::vector<std::int64_t> t = shifted_targets(batch, virtual_tokens);
  return static_cast<std::int64_t>(
      std::count_if(t.begin(), t.end(), [](std::int64_t v) { return v != ops::kIgnoreIndex; }));
}

/// The trainable tensors' gradients summed over a process group, in buckets of at most
/// `bucket_bytes` (a tensor larger than a bucket is a bucket of its own): one packed
/// all_reduce_sum per bucket, then unpacked. A tensor that no rank has a gradient for this step
/// keeps none (as in one process, the optimizer then skips it); one that some rank has gets the
/// sum, zeros from the others. `extra` values (the step's loss, flags) go with the per-tensor
/// flags in a first, small reduction.
template <class T>
class GradientBuckets {
 public:
  static constexpr std::size_t kDefaultBucketBytes = std::size_t(25) << 20;  // as PyTorch's DDP

  GradientBuckets(const std::vector<NamedParameter<T>>& params,
                  std::size_t bucket_bytes = kDefaultBucketBytes)
      : params_(params) {
    const std::size_t per_bucket = std::max<std::size_t>(1, bucket_bytes / sizeof(T));
    std::size_t filled = 0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto n = static_cast<std::size_t>(params_[i].var.value().numel());
      if (buckets_.empty() || (filled > 0 && filled + n > per_bucket)) {
        buckets_.push_back({i, i});
        filled = 0;
      }
      buckets_.back().second = i + 1;
      filled += n;
      elements_ += n;
    }
  }

  /// Sums every gradient (and `extra`, in place) over the group. One process: nothing to do.
  /// First the per-tensor "has a gradient" flags with the extras (one small reduction), then
  /// the buckets, each written back as soon as it is summed.
  void all_reduce(ProcessGroup& group, std::span<T> extra) {
    if (group.single()) return;
    std::vector<T> head(params_.size() + extra.size());
    for (std::size_t i = 0; i < params_.size(); ++i) head[i] = params_[i].var.has_grad() ? 1 : 0;
    std::copy(extra.begin(), extra.end(), head.begin() + static_cast<std::ptrdiff_t>(params_.size()));
    group.all_reduce_sum(std::span<T>(head));
    std::copy(head.begin() + static_cast<std::ptrdiff_t>(params_.size()), head.end(), extra.begin());
    for (const auto& [first, last] : buckets_) {
      std::size_t n = 0;
      for (std::size_t i = first; i < last; ++i)
        if (head[i] > T(0)) n += static_cast<std::size_t>(params_[i].var.value().numel());
      if (n == 0) continue;  // no rank has a gradient for any tensor of the bucket
      buffer_.assign(n, T(0));
      std::size_t at = 0;
      for (std::size_t i = first; i < last; ++i) {
        if (!(head[i] > T(0))) continue;
        const auto len = static_cast<std::size_t>(params_[i].var.value().numel());
        if (params_[i].var.has_grad())
          std::memcpy(buffer_.data() + at, params_[i].var.grad().data(), len * sizeof(T));
        at += len;
      }
      group.all_reduce_sum(std::span<T>(buffer_));
      at = 0;
      for (std::size_t i = first; i < last; ++i) {
        if (!(head[i] > T(0))) continue;
        const auto len = static_cast<std::size_t>(params_[i].var.value().numel());
        std::memcpy(params_[i].var.grad().data(), buffer_.data() + at, len * sizeof(T));
        at += len;
      }
    }
  }

  /// Bytes one step's reduction sends into the group per rank (gradients, flags and extras):
  /// what a transport moves is a multiple of it (a ring all-reduce: 2·(N−1)/N of it).
  std::size_t bytes_per_step(std::size_t extras) const {
    return (elements_ + params_.size() + extras) * sizeof(T);
  }
  std::size_t buckets() const { return buckets_.size(); }
  std::size_t elements() const { return elements_; }

 private:
  std::vector<NamedParameter<T>> params_;
  std::vector<std::pair<std::size_t, std::size_t>> buckets_;  ///< [first, last) tensor indices
  std::vector<T> buffer_;
  std::size_t elements_ = 0;
};

}  // namespace peft
