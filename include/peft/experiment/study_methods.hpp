#pragma once
// The library's methods in the study: study_methods(), the table `peft study` runs, and
// run_study(args, out, err, extra_rows), the study of those methods and any more rows (an
// outside project's methods: `entry<MyMethod>(lr, make_config)`, without editing the library).
// The engine is experiment/study.hpp; a program that studies only its own methods calls its
// run_study_table with them and does not include this header (every row here is a model type
// to compile).
#include <string>
#include <vector>

#include "peft/experiment/study.hpp"

namespace peft::experiment {

/// Every method the study compares, after the base (`none`) and full fine-tuning (`full`).
/// Learning rates are per method, tuned once on the default tasks study (docs/study.md): the
/// fewer and the more constrained a method's parameters, the higher its rate.
inline std::vector<MethodEntry> study_methods() {
  using Steps = std::int64_t;
  using Model = const ModelConfig&;
  const TargetRules attention = modules({"q_proj", "k_proj", "v_proj", "o_proj"});
  std::vector<MethodEntry> m;
  // --- reparameterized: rank 2 on the four attention projections (under 2% of the base),
  // α = 2r. (Rank 2 on q, k, v, o beat rank 4 on q, v at the same count on the tasks study.)
  m.push_back(entry<LoRA>(1e-2, [=](Model, Steps) {
    LoraConfig c;
    c.r = 2;
    c.lora_alpha = 4;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<LoraFA>(1e-2, [=](Model, Steps) {  // rank 2, A frozen: half LoRA's count
    LoraConfig c;
    c.r = 2;
    c.lora_alpha = 4;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<DoRA>(1e-2, [=](Model, Steps) {
    DoraConfig c;
    c.r = 2;
    c.lora_alpha = 4;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<AdaLoRA>(3e-2, [=](Model, Steps steps) {
    AdaLoraConfig c;
    c.init_r = 3;  // starts above LoRA's rank, prunes to it
    c.target_r = 2;
    c.r = 2;
    c.lora_alpha = 4;
    c.targets = attention;
    c.total_step = static_cast<int>(steps);
    c.tinit = static_cast<int>(steps / 10);
    c.tfinal = static_cast<int>(steps / 5);
    c.deltaT = 5;
    return c;
  }));
  m.push_back(entry<DyLoRA>(1e-2, [=](Model, Steps) {
    DyLoraConfig c;
    c.r = 2;
    c.lora_alpha = 4;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<VeRA>(5e-2, [=](Model, Steps) {
    VeraConfig c;
    c.r = 64;  // shared frozen projections: rank is cheap, only λ_d [r] and λ_b [out] train
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<LoHa>(3e-2, [=](Model, Steps) {
    LohaConfig c;
    c.options.r = 1;  // two rank-1 factors: as many parameters as LoRA r = 2
    c.options.alpha = 2;
    c.options.targets = attention;
    return c;
  }));
  m.push_back(entry<LoKr>(3e-2, [=](Model, Steps) {
    LokrConfig c;
    c.options.r = 2;
    c.options.alpha = 4;
    c.options.targets = attention;
    return c;
  }));
  // --- orthogonal and shard sharing: about LoRA r = 2's count on the same projections
  m.push_back(entry<OFT>(3e-2, [=](Model, Steps) {
    OftConfig c;
    c.oft_block_size = 8;  // in/8 blocks of 8·7/2 skew entries each
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<BOFT>(3e-2, [=](Model, Steps) {
    BoftConfig c;
    c.boft_block_size = 4;  // in/4 blocks of 4 × 4, and the output scale
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<HRA>(1e-2, [=](Model, Steps) {
    HraConfig c;
    c.r = 4;  // 4 reflections of [in]
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<MiSS>(1e-2, [=](Model, Steps) {
    MissConfig c;
    c.r = 4;  // one [4, out] shard
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<C3A>(1e-1, [=](Model, Steps) {  // its update carries 1/in: a higher rate
    C3aConfig c;
    c.block_size = 16;  // (out · in)/16 kernel entries: LoRA r = 2's count at width 64
    c.init = C3aConfig::Init::Zeros;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<VBLoRA>(1e-2, [=](Model, Steps) {
    VbLoraConfig c;  // rank 2 from one bank of 8 vectors of 4
    c.r = 2;
    c.num_vectors = 8;
    c.vector_length = 4;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<FourierFT>(1e-1, [=](Model, Steps) {
    FourierFtConfig c;  // 64 spectral coefficients a projection, started at zero
    c.n_frequency = 64;
    c.init_weights = true;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<RoAd>(1e-2, [=](Model, Steps) {
    RoadConfig c;  // road_4: 2·out angles and 2·out scales, LoRA r = 2's count at width 64
    c.variant = RoadConfig::Variant::Road4;
    c.group_size = 16;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<DeLoRA>(1e-2, [=](Model, Steps) {
    DeloraConfig c;  // rank 2 and one boundary λ: LoRA r = 2's count plus 1
    c.r = 2;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<RandLoRA>(1e-2, [=](Model, Steps) {
    RandLoraConfig c;  // r = 32: 2 shared bases at width 64, 2·(32 + 64) diagonals a module
    c.r = 32;
    c.randlora_alpha = 64;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<HiRA>(3e-2, [=](Model, Steps) {
    HiraConfig c;  // rank 2 modulating W₀: LoRA r = 2's count; the update carries W₀'s scale
    c.r = 2;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<GraLoRA>(1e-2, [=](Model, Steps) {
    GraloraConfig c;  // r = 2 in 2 × 2 blocks of rank 1: LoRA r = 2's count
    c.r = 2;
    c.alpha = 4;
    c.gralora_k = 2;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<GLoRA>(1e-2, [=](Model, Steps) {
    GloraConfig c;  // A, B of rank 1: LoRA r = 2's count (+ in + 3 a module with a bias: C, D, E)
    c.r = 1;
    c.targets = attention;
    return c;
  }));
  // --- additive
  m.push_back(entry<IA3>(5e-2, [](Model, Steps) { return Ia3Config{}; }));  // k, v, down
  m.push_back(entry<PrefixTuning>(3e-2, [](Model, Steps) {
    PrefixTuningConfig c;
    c.num_virtual_tokens = 8;
    return c;
  }));
  m.push_back(entry<PromptTuning>(5e-2, [](Model, Steps) {
    PromptTuningConfig c;
    c.num_virtual_tokens = 8;
    return c;
  }));
  m.push_back(entry<PTuning>(1e-2, [](Model, Steps) {
    PTuningConfig c;
    c.num_virtual_tokens = 8;
    return c;
  }));
  m.push_back(entry<SerialAdapter>(1e-2, [](Model, Steps) {
    SerialAdapter::Config c;
    c.bottleneck_size = 8;
    return c;
  }));
  m.push_back(entry<PfeifferAdapter>(1e-2, [](Model, Steps) {
    PfeifferAdapter::Config c;
    c.bottleneck_size = 8;
    return c;
  }));
  m.push_back(entry<ParallelAdapter>(1e-2, [](Model, Steps) {
    ParallelAdapter::Config c;
    c.bottleneck_size = 8;
    return c;
  }));
  m.push_back(entry<SSF>(3e-2, [](Model, Steps) { return SsfConfig{}; }));  // all-linear
  m.push_back(entry<LoReFT>(1e-2, [](Model, Steps) {
    LoReFT::Config c;  // rank 4 at the first 3 and last 3 tokens of every block
    c.r = 4;
    c.suffix_positions = 3;
    return c;
  }));
  m.push_back(entry<NoReFT>(1e-2, [](Model, Steps) {
    NoReFT::Config c;
    c.r = 4;
    c.suffix_positions = 3;
    return c;
  }));
  m.push_back(entry<DiReFT>(1e-2, [](Model, Steps) {
    DiReFT::Config c;
    c.r = 4;
    c.suffix_positions = 3;
    return c;
  }));
  m.push_back(entry<Compacter>(1e-2, [](Model, Steps) {
    CompacterConfig c;  // width 8, n = 4, after attention and MLP
    c.bottleneck_size = 8;
    return c;
  }));
  m.push_back(entry<LlamaAdapter>(1e-2, [](Model model, Steps) {
    AdaptionPromptConfig c;  // 8 gated prompts in every layer
    c.adapter_len = 8;
    c.adapter_layers = model.num_layers;
    return c;
  }));
  // --- selective: about 2% of the projection weights where a budget applies
  m.push_back(entry<BitFit>(3e-2, [](Model, Steps) { return BitFitConfig{}; }));
  m.push_back(entry<LNTuning>(3e-2, [](Model, Steps) { return LnTuningConfig{}; }));
  m.push_back(entry<TrainableTokens>(3e-2, [](Model model, Steps) {
    TrainableTokensConfig c;  // the first 16 rows of the vocabulary
    for (std::int64_t i = 0; i < std::min<std::int64_t>(16, model.vocab_size); ++i)
      c.token_indices.push_back(i);
    return c;
  }));
  m.push_back(entry<FishMask>(1e-2, [](Model, Steps) {
    FishMaskConfig c;
    c.budget.density = 0.02;
    return c;
  }));
  m.push_back(entry<UnstructuredMask>(1e-2, [](Model, Steps) {
    UnstructuredMaskConfig c;
    c.budget.density = 0.02;
    return c;
  }));
  m.push_back(entry<StructuredMask>(1e-2, [](Model, Steps) {
    StructuredMaskConfig c;  // the highest-scoring row of each projection
    return c;
  }));
  m.push_back(entry<SHiRA>(1e-2, [=](Model, Steps) {
    ShiraConfig c;  // r (in + out) random entries: LoRA r = 2's count on q, k, v, o
    c.r = 2;
    c.targets = attention;
    return c;
  }));
  m.push_back(entry<DiffPruning>(1e-2, [](Model, Steps) {
    DiffPruningConfig c;
    c.budget.density = 0.02;
    return c;
  }));
  // --- hybrid: the compositions with names, at the study's sizes
  m.push_back(entry<UniPELT>(1e-2, [](Model model, Steps) {
    return unipelt_config(model,
                          {.lora_r = 2, .lora_alpha = 4, .prefix_tokens = 8, .adapter_width = 8});
  }));
  m.push_back(entry<MAMAdapter>(1e-2, [](Model, Steps) {
    return mam_config({.prefix_tokens = 8, .adapter_width = 8, .scaling = 4.0});
  }));
  // AdapterFusion over two frozen Pfeiffer adapters of width 8 drawn from seeds (the study has
  // no trained task adapters): only the fusion's Q, K, V train, at AdapterHub's dynamic defaults.
  m.push_back(entry<AdapterFusion>(1e-3, [](Model, Steps) {
    AdapterFusion::Config c;
    for (std::int64_t seed : {1, 2}) {
      AdapterFusion::Config::Member member;
      member.config.bottleneck_size = 8;
      member.seed = seed;
      c.adapters.push_back(member);
    }
    return c;
  }));
  // AdapterDrop: the Pfeiffer row's adapter (width 8) without the lower half of the layers.
  m.push_back(entry<AdapterDrop<PfeifferAdapter>>(1e-2, [](Model model, Steps) {
    AdapterDrop<PfeifferAdapter>::Config c;
    c.inner.bottleneck_size = 8;
    c.drop_layers = static_cast<int>(model.num_layers / 2);
    return c;
  }));
  // X-LoRA over three rank-2 LoRA experts on the attention projections, drawn from the seed (no
  // trained experts here): only the classifier (depth 2, width 16, one scaling per layer) trains.
  m.push_back(entry<XLoRA>(1e-2, [=](Model model, Steps) {
    XLoRA::Config c;
    c.hidden_size = static_cast<int>(model.hidden_size);
    for (int n = 0; n < 3; ++n) {
      LoraConfig e;
      e.r = 2;
      e.lora_alpha = 4;
      e.targets = attention;
      c.experts.push_back(e);
      c.adapters[std::to_string(n)] = "";
    }
    c.xlora_depth = 2;
    c.xlora_size = 16;
    c.layerwise_scalings = true;
    c.xlora_dropout_p = 0.0;
    return c;
  }));
  return m;
}

/// `peft study ARGS`: the library's methods, then `extra` rows. Returns the exit status (2: bad
/// arguments).
inline int run_study(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
                     std::vector<MethodEntry> extra = {}) {
  std::vector<MethodEntry> table = study_methods();
  for (MethodEntry& e : extra) table.push_back(std::move(e));
  return run_study_table(args, out, err, std::move(table));
}

}  // namespace peft::experiment
