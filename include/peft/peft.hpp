#pragma once
// The one public entry point of the peft library: #include <peft/peft.hpp>.
//
//   core/      tensor, autograd tape, ops (forward/backward pairs)
//   nn/        model config, linear and norm modules, the decoder
//   arch/      architecture bundles: arch::Gpt2, arch::Llama
//   methods/   the PEFT policy concept and the methods of the four families
//   train/     optimizers
//   io/        safetensors, JSON, adapter files
//   testing/   finite-difference gradient checker, golden-case runner
#include "peft/core/autograd.hpp"
#include "peft/core/error.hpp"
#include "peft/core/ops.hpp"
#include "peft/core/tensor.hpp"
#include "peft/arch/gpt2.hpp"
#include "peft/arch/llama.hpp"
#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/methods/policy.hpp"
#include "peft/methods/registry.hpp"
#include "peft/methods/reparameterized/lora.hpp"
#include "peft/methods/target_modules.hpp"
#include "peft/nn/config.hpp"
#include "peft/nn/decoder.hpp"
#include "peft/nn/model_shapes.hpp"
#include "peft/nn/modules.hpp"
#include "peft/testing/golden.hpp"
#include "peft/testing/gradcheck.hpp"
#include "peft/train/optimizer.hpp"
