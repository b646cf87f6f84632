#pragma once
// All ops: forward/backward pairs over Var (see autograd.hpp). To write one: peft/core/op.hpp.
#include "peft/core/op.hpp"
#include "peft/core/ops/attention.hpp"
#include "peft/core/ops/elementwise.hpp"
#include "peft/core/ops/linear_algebra.hpp"
#include "peft/core/ops/loss.hpp"
#include "peft/core/ops/low_rank.hpp"
#include "peft/core/ops/normalization.hpp"
#include "peft/core/ops/reparameterized.hpp"
#include "peft/core/ops/shape.hpp"
#include "peft/core/ops/slice.hpp"
#include "peft/core/ops/sparse.hpp"
#include "peft/core/ops/instantiations.hpp"
