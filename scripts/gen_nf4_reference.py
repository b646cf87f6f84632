#!/usr/bin/env python3
"""Writes tests/data/nf4/nf4_reference.safetensors: NF4 (QLoRA 4-bit NormalFloat, blocks of 64,
double quantization) as the reference stack computes it on the CPU, for tests/test_nf4.cpp.

Generated with (pip, in a virtual environment outside the checkout, CPU, 1 thread):
    bitsandbytes 0.50.2, torch 2.15.0, safetensors 0.8.0, numpy 2.4.6, Python 3.11
    python3 -m venv /work/venv-nf4 && /work/venv-nf4/bin/pip install torch bitsandbytes safetensors numpy
    /work/venv-nf4/bin/python scripts/gen_nf4_reference.py

The reference calls are bitsandbytes.functional.quantize_4bit(A, blocksize=64,
compress_statistics=True, quant_type="nf4") and dequantize_4bit(packed, state); with 0.50.2 on
the CPU these dispatch to backends/default/ops.py (quantize_4bit: torch ops) and
backends/cpu/ops.py (quantize_blockwise for the nested absmax, dequantize_blockwise,
dequantize_4bit: libbitsandbytes_cpu). Every tensor is stored as the library computed it.

Layout (per case C): C.shape I64; C.input F32 (BF16 for the bf16 case); C.codes, C.absmax_codes:
byte strings stored as I64 words (8 bytes each, little-endian, zero padded: the reader supports no
U8, and raw_bytes() gives the bytes back unchanged); C.absmax F32 (first-level absmax, from the
same call with compress_statistics=False); C.nested_absmax F32 (state2.absmax); C.offset F32[1];
C.dequant F32 (dequantize_4bit of the nested state, fp32 output). Also "nf4_code" F32[16] and
"dynamic_code" F32[256] (state.code, state2.code). "blockwise8.*": one direct
quantize_blockwise(blocksize=256) call on midpoint/tie inputs (input, codes, absmax, dequant).
"""
import os
import sys

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F
from safetensors.torch import save_file

torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "nf4",
                   "nf4_reference.safetensors")
tensors = {}


def bytes_as_i64(byte_tensor):
    raw = byte_tensor.contiguous().view(torch.uint8).flatten().numpy().tobytes()
    raw += b"\0" * ((-len(raw)) % 8)
    return torch.from_numpy(np.frombuffer(raw, dtype="<i8").copy())


def add_case(name, A):
    packed, state = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, plain = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type="nf4")
    packed_f, _ = F.quantize_4bit(A.float(), blocksize=64, compress_statistics=True,
                                  quant_type="nf4")
    assert torch.equal(packed, packed_f), "bf16 and its fp32 copy quantize differently"
    assert state.blocksize == 64 and state.state2.blocksize == 256 and state.nested
    assert packed.dtype == torch.uint8 and state.absmax.dtype == torch.uint8
    state.dtype = torch.float32  # dequantize to fp32 whatever the input dtype
    dequant = F.dequantize_4bit(packed, state)
    tensors[name + ".shape"] = torch.tensor(list(A.shape), dtype=torch.int64)
    tensors[name + ".input"] = A.contiguous()
    tensors[name + ".codes"] = bytes_as_i64(packed)
    tensors[name + ".absmax"] = plain.absmax.float().contiguous()
    tensors[name + ".absmax_codes"] = bytes_as_i64(state.absmax)
    tensors[name + ".nested_absmax"] = state.state2.absmax.float().contiguous()
    tensors[name + ".offset"] = state.offset.reshape(1).float()
    tensors[name + ".dequant"] = dequant.float().contiguous()
    tensors["nf4_code"] = state.code.float().contiguous()
    tensors["dynamic_code"] = state.state2.code.float().contiguous()
    mean64 = np.float32(np.mean(plain.absmax.double().numpy()))
    print(f"{name}: shape {list(A.shape)}, {plain.absmax.numel()} absmax blocks, torch mean "
          f"{state.offset.item()!r}, float64 mean {float(mean64)!r}", file=sys.stderr)


def nf4_midpoints():
    code = F.get_4bit_type("nf4", device="cpu")
    return (code[:-1] + code[1:]) / 2


g = torch.Generator().manual_seed(20260514)
# Ordinary weights: several 64-blocks per row, under one nested 256-block.
add_case("random", torch.randn(48, 128, generator=g) * 0.02)
# More than 256 absmax blocks (two nested blocks, the second a tail), bf16 input.
add_case("bf16", (torch.randn(33, 512, generator=g) * 0.05).to(torch.bfloat16))
# A tail 64-block of 5 values and an odd element count (the last byte's low nibble is padding).
add_case("tail", torch.randn(7, 19, generator=g))

# Adversarial 64-blocks, one per row.
rows = []
mid = nf4_midpoints()
rows.append(torch.full((64,), 0.5))                                  # all equal
rows.append(torch.full((64,), -3.0))                                 # all equal, negative
rows.append(torch.zeros(64))                                         # all zero: absmax 0
big = torch.randn(64, generator=g) * 1e-3
big[17] = 1e30
rows.append(big)                                                     # one huge value
huge = torch.randn(64, generator=g)
huge[3] = -3.0e38
rows.append(huge)                                                    # 1/absmax is subnormal
rows.append(torch.randn(64, generator=g) * 1e-40)                    # subnormals only
sub = torch.randn(64, generator=g) * 1e-39
sub[0] = 1.0
rows.append(sub)                                                     # subnormals beside 1
ties = torch.cat([mid, -mid, torch.tensor([1.0, -1.0]), mid * 0.5, mid * -0.5, torch.tensor([0.0, -0.0])])
assert ties.numel() == 64
rows.append(ties)                                               # exact NF4 midpoints
signs = torch.tensor([(-1.0) ** i * (i + 1) for i in range(64)])
rows.append(signs)                                                   # +-absmax and signs
rows.append(-torch.linspace(0, 2, 64))                               # absmax from a negative
adv = torch.stack(rows)
add_case("adversarial", adv)
# Tail block of zeros: bitsandbytes clamps a tail absmax to 1e-38 but not a full block's.
add_case("zero_tail", torch.cat([torch.randn(64, generator=g), torch.zeros(10)]))
# Whole tensors whose absmax are all equal: absmax - mean is exactly 0 (nested absmax 0).
add_case("all_zero", torch.zeros(2, 64))
add_case("all_equal", torch.full((4, 64), 0.25))

# The nested 8-bit quantizer alone, on inputs at the dynamic map's midpoints (ties).
dyn = F.create_dynamic_map()
dmid = (dyn[:-1] + dyn[1:]) / 2
b8 = torch.cat([torch.tensor([1.0]), dmid[:255], dmid.flip(0)[:255] * -1.0, dyn[1:-1]])
b8 = b8[: 256 * 3]
q8, s8 = F.quantize_blockwise(b8, blocksize=256)
tensors["blockwise8.input"] = b8.contiguous()
tensors["blockwise8.codes"] = bytes_as_i64(q8)
tensors["blockwise8.absmax"] = s8.absmax.float().contiguous()
tensors["blockwise8.dequant"] = F.dequantize_blockwise(q8, s8).float().contiguous()

save_file({k: v.contiguous() for k, v in tensors.items()}, OUT,
          metadata={"generator": "scripts/gen_nf4_reference.py",
                    "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)
