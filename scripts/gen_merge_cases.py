#!/usr/bin/env python3
"""Writes tests/data/weighted_merge/: reference cases for weighted merging of LoRA adapters
(peft's LoraModel.add_weighted_adapter), for tests/test_weighted_merge.cpp and `peft merge`.

Generated with (pip, in a virtual environment outside the checkout, CPU):
    torch 2.15.0, transformers 5.24.0, peft 0.21.2, safetensors, Python 3.11
    python3 -m venv /work/venv && /work/venv/bin/pip install torch transformers peft safetensors
    /work/venv/bin/python scripts/gen_merge_cases.py

Layout:
    adapters/<name>/adapter_config.json, adapter_model.safetensors
        three LoRA adapters of one tiny GPT-2 (n_embd 16, 2 layers), as peft writes them (F32):
        a: r 4, alpha 8, c_attn + c_proj; b: r 4, alpha 16 with rsLoRA, c_attn + c_fc;
        c: r 2, alpha 4, c_attn only. init_lora_weights=False, so that every B is non-zero.
    <case>/case.json      {"adapters": [...], "weights": [...], "combination_type": ...,
                           "svd_rank", "svd_clamp", "density", "majority_sign_method" (null: not
                           given)}
    <case>/expected/adapter_config.json, adapter_model.safetensors
        the merged adapter as peft saves it, computed in float64 from the F32 inputs and stored
        as F64.
DARE draws its masks with torch's generator, which no other program reproduces: its cases run
at density 1, where nothing is dropped (tests/test_weighted_merge.cpp checks other densities
against given masks).
"""
import json
import os
import shutil
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(1234)
torch.set_num_threads(1)
# add_weighted_adapter builds its weights with torch.tensor(list), in the default dtype: float64
# here, so that the whole merge runs in float64 (float32 weights would round 0.7 to 0.69999999).
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                   "weighted_merge")

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "b": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_fc"]),
    "c": dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
}

# name: (adapters, weights, combination_type, extra keyword arguments)
CASES = {
    "linear": (["a", "b"], [0.7, 0.3], "linear", {}),
    "linear_negative": (["a", "b"], [1.0, -0.5], "linear", {}),
    "single_adapter": (["a"], [2.0], "svd", {}),  # one adapter: the reference uses linear
    "cat": (["a", "b", "c"], [0.5, 0.3, 0.2], "cat", {}),
    "cat_negative": (["a", "c"], [-1.0, 0.5], "cat", {}),
    "svd": (["a", "b", "c"], [0.6, 0.4, -0.3], "svd", dict(svd_rank=6)),
    "svd_default_rank": (["a", "c"], [0.5, 0.5], "svd", {}),
    "svd_clamp": (["a", "b"], [0.5, 0.5], "svd", dict(svd_rank=4, svd_clamp=0.9)),
    "ties": (["a", "b"], [0.7, 0.3], "ties", dict(density=0.5)),
    "ties_frequency": (["a", "b"], [0.7, 0.3], "ties",
                       dict(density=0.3, majority_sign_method="frequency")),
    "ties_negative": (["a", "b"], [-0.5, -1.0], "ties", dict(density=0.6)),
    "ties_density_0": (["a", "b"], [0.5, 0.5], "ties", dict(density=0.0)),
    "ties_svd": (["a", "b", "c"], [1.0, 0.5, 0.5], "ties_svd", dict(density=0.5)),
    "magnitude_prune": (["a", "b"], [0.6, 0.4], "magnitude_prune", dict(density=0.4)),
    "magnitude_prune_svd": (["a", "b", "c"], [0.6, 0.4, 0.2], "magnitude_prune_svd",
                            dict(density=0.6, svd_rank=4)),
    "dare_linear_density_1": (["a", "b"], [0.7, 0.3], "dare_linear", dict(density=1.0)),
    "dare_ties_density_1": (["a", "b"], [0.7, -0.3], "dare_ties",
                            dict(density=1.0, majority_sign_method="frequency")),
    "dare_linear_svd_density_1": (["a", "c"], [0.7, 0.3], "dare_linear_svd", dict(density=1.0)),
    "dare_ties_svd_density_1": (["a", "b", "c"], [0.5, 0.3, 0.2], "dare_ties_svd",
                                dict(density=1.0, svd_rank=3)),
}


def tiny_gpt2():
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "adapters"))
    base = tiny_gpt2().eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    # The adapters: made in float32 and saved as peft saves them.
    torch.set_default_dtype(torch.float32)
    for name, options in ADAPTERS.items():
        model = tiny_gpt2()
        model.load_state_dict(base_state)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
        peft_model.save_pretrained(os.path.join(OUT, "adapters", name))
        os.remove(os.path.join(OUT, "adapters", name, "README.md"))  # peft's empty model card

    torch.set_default_dtype(torch.float64)
    for case, (names, weights, combination, extra) in CASES.items():
        model = tiny_gpt2()
        model.load_state_dict(base_state)
        model = model.to(torch.float64)
        peft_model = PeftModel.from_pretrained(model, os.path.join(OUT, "adapters", names[0]),
                                               adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(os.path.join(OUT, "adapters", name), adapter_name=name)
        peft_model = peft_model.to(torch.float64)
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination,
                                        **extra)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp, selected_adapters=["merged"])
            shutil.copytree(os.path.join(tmp, "merged"), os.path.join(OUT, case, "expected"))
        description = {
            "adapters": names,
            "weights": weights,
            "combination_type": combination,
            "svd_rank": extra.get("svd_rank"),
            "svd_clamp": extra.get("svd_clamp"),
            "density": extra.get("density"),
            "majority_sign_method": extra.get("majority_sign_method"),
        }
        with open(os.path.join(OUT, case, "case.json"), "w") as f:
            json.dump(description, f, indent=2)
            f.write("\n")
        print(case)


if __name__ == "__main__":
    main()
