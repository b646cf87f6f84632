#pragma once
// MAM adapter ("mix-and-match", He et al., 2022, "Towards a Unified View of Parameter-Efficient
// Transfer Learning"): prefix tuning in attention plus a scaled parallel adapter on the MLP,
// the combination that paper's study of the design space (modified representation, insertion
// form, composition function) found best: MLP(x) + s · U σ(D x), beside the MLP, reading its
// input, with s = 4 and prefix keys/values in every layer (30 virtual tokens and width 512 in the
// paper, for models of hidden size 1024).
//
//   struct MAMAdapter : Compose<PrefixTuning, ParallelAdapter> {...};  // named "mam_adapter"
//
// Files, counting, merging: as Compose (the prefix and the adapter are not mergeable); the
// manifest is Compose's (peft_type "COMPOSE").
#include <string_view>

#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/prefix_tuning.hpp"
#include "peft/methods/hybrid/compose.hpp"

namespace peft {

/// A named composition: everything is Compose's, with the registry name "mam_adapter".
struct MAMAdapter : Compose<PrefixTuning, ParallelAdapter> {
  static constexpr std::string_view name = "mam_adapter", title = "MAM adapter";
  static constexpr std::string_view paper =
      "He et al., 2022, Towards a Unified View of Parameter-Efficient Transfer Learning";
  static constexpr std::string_view reference = "";  ///< peft_type in HF peft
};

struct MamSizes {
  std::int64_t prefix_tokens = 30;
  std::int64_t adapter_width = 512;
  double scaling = 4.0;
};

/// A MAM adapter config; the paper's sizes by default (scale them down for small models).
inline MAMAdapter::Config mam_config(const MamSizes& sizes = {}) {
  PrefixTuningConfig prefix;
  prefix.num_virtual_tokens = sizes.prefix_tokens;
  ParallelAdapter::Config adapter;
  adapter.bottleneck_size = sizes.adapter_width;
  adapter.scaling = sizes.scaling;
  return MAMAdapter::Config(prefix, adapter);
}

}  // namespace peft
