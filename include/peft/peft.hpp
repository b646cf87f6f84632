#pragma once
// The library's entry point: #include <peft/peft.hpp>.
//
//   core/      tensor, autograd tape, ops (forward/backward pairs)
//   nn/        model config, linear and norm modules, the decoder
//   arch/      architecture bundles: arch::Gpt2, arch::Llama
//   methods/   the PEFT policy concept and the methods of the four families
//   train/     optimizers, schedules, the trainer, checkpoints
//   data/      synthetic sequence tasks, byte-level text; generate.hpp: sampling
//   io/        safetensors, JSON, adapter files, base-model files
//
// Lean on purpose: what a program that builds, trains, saves and loads models needs, and nothing
// else (an empty program including it compiles in about 6 s of CPU, under 650 MB). Included
// explicitly by the code that needs them, and never from here:
//   peft/testing/gradcheck.hpp       finite-difference gradient checker (tests)
//   peft/testing/golden.hpp          golden-case runner (`peft parity`)
//   peft/experiment/search.hpp       the configuration search (`peft search`; ~35 s to compile)
//   peft/experiment/study.hpp        the study's engine (run_study_table: a program's own rows)
//   peft/experiment/training.hpp     the training options and base pretraining both share
//   peft/experiment/study_methods.hpp  the library's rows of the study (`peft study`, run_study)
//   peft/commands/                   count, generate and main<Registry>: the registry-dependent
//                                    commands as library functions (docs/cli.md)
//   peft/methods/reparameterized/weighted_merge.hpp  LoRA adapters merged into one (peft merge)
//   peft/io/parse_text.hpp           strict parsing of command-line values (the commands, the
//   study) peft/quant/nf4.hpp               NF4 storage (QLoRA's format; docs/quantization.md)
// A new header joins this list, not the umbrella, unless every user of the library needs it.
#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/core/autograd.hpp"
#include "peft/core/error.hpp"
#include "peft/core/ops.hpp"
#include "peft/core/tensor.hpp"
#include "peft/data/tasks.hpp"
#include "peft/data/text.hpp"
#include "peft/generate.hpp"
#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/model_file.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/additive/bottleneck_adapter.hpp"
#include "peft/methods/additive/ia3.hpp"
#include "peft/methods/additive/p_tuning.hpp"
#include "peft/methods/additive/prefix_tuning.hpp"
#include "peft/methods/additive/prompt_tuning.hpp"
#include "peft/methods/additive/ssf.hpp"
#include "peft/methods/hybrid/compose.hpp"
#include "peft/methods/hybrid/mam_adapter.hpp"
#include "peft/methods/hybrid/unipelt.hpp"
#include "peft/methods/named_adapters.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/registry.hpp"
#include "peft/methods/reparameterized/adalora.hpp"
#include "peft/methods/reparameterized/dora.hpp"
#include "peft/methods/reparameterized/dylora.hpp"
#include "peft/methods/reparameterized/loha.hpp"
#include "peft/methods/reparameterized/lokr.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/methods/reparameterized/vera.hpp"
#include "peft/methods/selective/bitfit.hpp"
#include "peft/methods/selective/diff_pruning.hpp"
#include "peft/methods/selective/fishmask.hpp"
#include "peft/methods/selective/ln_tuning.hpp"
#include "peft/methods/selective/masks.hpp"
#include "peft/methods/selective/structured.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/nn/modules.hpp"
#include "peft/nn/summary.hpp"
#include "peft/train/checkpoint.hpp"
#include "peft/train/optimizer.hpp"
#include "peft/train/schedule.hpp"
#include "peft/train/trainer.hpp"
