#!/usr/bin/env python3
"""Writes tests/data/golden_methods/: reference cases, in the format of ../shared/golden (its
README), for the methods that joined after the first golden set (OFT, COFT, BOFT, HRA, MiSS, C3A,
VB-LoRA, FourierFT; LoRA-FA, RoAd, DeLoRA, RandLoRA, HiRA, GraLoRA, GLoRA, SHiRA, LLaMA-Adapter,
trainable tokens; X-LoRA, LoRA with the OLoRA initialisation), and the
reference's print_trainable_parameters lines for published model shapes.

Generated with (pip, in a virtual environment outside the checkout, CPU):
    python3 -m venv /work/venv && /work/venv/bin/pip install torch transformers peft safetensors
    /work/venv/bin/python scripts/gen_method_cases.py
The versions used are recorded in every case.json.

Layout:
    models/<name>/config.json, model.safetensors   tiny base models of other sizes than
        ../shared/golden's (so that a case checks the conventions, not one shape), F32
    <case>/case.json, adapter/, expected.safetensors   as ../shared/golden/README.md describes
    counts.json   [{"model": name, "model_config": config.json as transformers writes it,
                    "adapter_config": ..., "line": the reference's print_trainable_parameters}]

How a case is computed: the base model's F32 weights and the adapter's tensors (initialised by
the reference, then every trainable tensor moved by uniform noise of +-adapter_noise, so that an
adapter which starts at the identity still changes the logits) are rounded to float32 — what the
files hold — and everything after runs in float64 on the CPU in eval mode (no dropout): logits,
loss, d loss / d every trainable tensor, the merged model's logits where the reference's merge
reproduces its own forward (to 1e-6 of the logits' scale: C3A computes its term in float32;
else has_merged_logits is false and case.json says why),
and 4 steps of torch AdamW on the same batch (lr 1e-2, betas (0.9, 0.999), eps 1e-8,
weight_decay 0.01; LoRA-FA's cases: peft's LoraFAOptimizer, see LoraFaTraining, and case.json
names the policy in "peft_method"). `trained.<key>` is read after the 4th step, before the final
loss's forward. `--only CASE...` regenerates some cases (and every count row).
"""
import contextlib
import copy
import io
import json
import os
import shutil
import tempfile

import peft
import safetensors.torch
import torch
import transformers
from peft import BOFTConfig, C3AConfig, FourierFTConfig, HRAConfig, MissConfig, OFTConfig, VBLoRAConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                    "golden_methods")

MODELS = {
    "llama-small": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager")),
    "gpt2-small": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=80, n_positions=32, n_embd=24, n_layer=2, n_head=3, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")),
}

# case: (model, config class, config arguments, seed)
CASES = {
    "llama_oft": ("llama-small", OFTConfig,
                  dict(oft_block_size=8, r=0, target_modules=["q_proj", "v_proj", "down_proj"]), 31),
    "llama_oft_exact_shared": ("llama-small", OFTConfig,
                               dict(r=4, oft_block_size=0, use_cayley_neumann=False,
                                    block_share=True, target_modules=["q_proj", "o_proj"]), 32),
    "llama_coft": ("llama-small", OFTConfig,
                   dict(oft_block_size=4, r=0, coft=True, eps=0.05,
                        target_modules=["k_proj", "up_proj"]), 33),
    # oft_block_size 6 on q_proj (in 32) is moved to 4, as the reference moves it; down_proj
    # (in 48) keeps 6. The reference's OFT, HRA and MiSS refuse GPT-2's Conv1D layers, so there
    # are no GPT-2 cases (the library adapts them; tests/test_orthogonal.cpp checks them).
    "llama_oft_adjusted": ("llama-small", OFTConfig,
                           dict(oft_block_size=6, r=0, num_cayley_neumann_terms=7,
                                target_modules=["q_proj", "down_proj"]), 34),
    "llama_hra": ("llama-small", HRAConfig,
                  dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), 35),
    "llama_hra_gs": ("llama-small", HRAConfig,
                     dict(r=3, apply_GS=True, init_weights=False,
                          target_modules=["q_proj", "down_proj"]), 36),
    "llama_miss": ("llama-small", MissConfig,
                   dict(r=5, target_modules=["q_proj", "v_proj", "down_proj"]), 37),
    "llama_miss_mini": ("llama-small", MissConfig,
                        dict(r=4, mini_r=8, init_weights="mini",
                             target_modules=["q_proj", "v_proj"]), 38),
    # BOFT on a CPU runs one butterfly factor whatever the config says (its factors need the
    # reference's CUDA kernel), so its cases have one.
    "llama_boft": ("llama-small", BOFTConfig,
                   dict(boft_block_size=8, target_modules=["q_proj", "v_proj", "up_proj"]), 43),
    # Two butterfly factors, as the reference computes them with its CUDA kernel: the kernel
    # (a block-diagonal assembly) replaced by torch.block_diag on the CPU (cuda_butterflies).
    "llama_boft_butterfly": ("llama-small", BOFTConfig,
                             dict(boft_block_size=4, boft_n_butterfly_factor=3,
                                  target_modules=["q_proj", "down_proj"]), 45),
    "llama_boft_block_num": ("llama-small", BOFTConfig,
                             dict(boft_block_size=0, boft_block_num=4,
                                  target_modules=["k_proj", "down_proj"]), 44),
    # FourierFT draws its frequencies with torch.randperm (seeded), which the library
    # reproduces; the reference builds its update in float32.
    "llama_fourierft": ("llama-small", FourierFTConfig,
                        dict(n_frequency=40, scaling=150.0, random_loc_seed=5,
                             n_frequency_pattern={"down_proj": 64},
                             target_modules=["q_proj", "v_proj", "down_proj"]), 46),
    # (Not c_proj: at 30 frequencies some of its coefficients have a gradient of exactly 0 in
    # float64, where the reference's float32 update leaves rounding noise that AdamW turns into
    # a full step of lr: its trajectory there is noise, not FourierFT.)
    "gpt2_fourierft": ("gpt2-small", FourierFTConfig,
                       dict(n_frequency=30, scaling=100.0, target_modules=["c_attn", "c_fc"]),
                       47),
    # C3A computes its term in float32 even in a float64 model (the reference casts x and the
    # kernel), so these cases carry float32 rounding in that term. The reference's backward
    # (BlockCircularConvolution.backward, peft 0.21.2) returns a wrong gradient for the input
    # x (its kernel gradient is right; checked against autograd of the explicit product): the
    # case adapts only modules whose input gradient reaches no trainable tensor (q_proj and
    # v_proj of the last layer), so that every gradient it stores is the true one.
    "llama_c3a": ("llama-small", C3AConfig,
                  dict(block_size=8, block_size_pattern={"v_proj": 4}, init_weights=True,
                       layers_to_transform=[1], target_modules=["q_proj", "v_proj"]), 40),
    "llama_vblora": ("llama-small", VBLoRAConfig,
                     dict(r=3, num_vectors=12, vector_length=8, topk=3,
                          target_modules=["q_proj", "v_proj", "down_proj"]), 41),
    "gpt2_vblora": ("gpt2-small", VBLoRAConfig,
                    dict(r=2, num_vectors=10, vector_length=8, topk=2,
                         target_modules=["c_attn", "c_fc"]), 42),
    # --- cases of the second part (issue 20): add new entries below this line, seeds from 50
    # GraLoRA, GLoRA (h5). GLoRA: the reference refuses GPT-2's Conv1D; LLaMA has no biases, so
    # C, D and E are the zero buffers the reference saves (glora_C.zeros, ...).
    "llama_gralora": ("llama-small", peft.GraloraConfig,
                      dict(r=4, alpha=8, gralora_k=2,
                           target_modules=["q_proj", "v_proj", "down_proj"]), 90),
    "llama_gralora_hybrid": ("llama-small", peft.GraloraConfig,
                             dict(r=4, hybrid_r=2, alpha=12, gralora_k=4, init_weights=False,
                                  target_modules=["k_proj", "o_proj", "up_proj"]), 91),
    "gpt2_gralora": ("gpt2-small", peft.GraloraConfig,
                     dict(r=4, alpha=6, gralora_k=2, target_modules=["c_attn", "c_fc"]), 92),
    "llama_glora": ("llama-small", peft.GloraConfig,
                    dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), 93),
    "llama_glora_vector": ("llama-small", peft.GloraConfig,
                           dict(r=2, config_A_B="vector", init_weights=False,
                                target_modules=["k_proj", "up_proj"]), 94),
    "llama_glora_constant": ("llama-small", peft.GloraConfig,
                             dict(r=2, config_A_B="constant", init_weights=False,
                                  target_modules=["q_proj", "o_proj"]), 95),
    # RandLoRA, SHiRA, HiRA (h1). RandLoRA's bases and SHiRA's mask are drawn by the reference
    # with torch's generator (bf16 kaiming draws, torch.rand, torch.randperm) and saved in the
    # file; the library draws the same ones (tests/test_sparse_and_random.cpp compares them).
    # v_proj, down_proj and GPT-2's mlp.c_proj have out < in (the bases swap sides).
    "llama_randlora": ("llama-small", peft.RandLoraConfig,
                       dict(r=4, randlora_alpha=8, projection_prng_key=3,
                            target_modules=["q_proj", "v_proj", "down_proj"]), 50),
    "gpt2_randlora": ("gpt2-small", peft.RandLoraConfig,
                      dict(r=3, randlora_alpha=6, target_modules=["c_attn", "mlp.c_proj"]), 51),
    "llama_randlora_sparse": ("llama-small", peft.RandLoraConfig,
                              dict(r=5, randlora_alpha=10, sparse=True, projection_prng_key=7,
                                   target_modules=["k_proj", "o_proj", "up_proj"]), 52),
    "llama_randlora_very_sparse": ("llama-small", peft.RandLoraConfig,
                                   dict(r=8, randlora_alpha=8, very_sparse=True,
                                        target_modules=["q_proj", "gate_proj"]), 53),
    # SHiRA: random_seed null is torch's default seed. The reference refuses GPT-2's Conv1D.
    "llama_shira": ("llama-small", peft.ShiraConfig,
                    dict(r=2, target_modules=["q_proj", "v_proj"]), 54),
    "llama_shira_seeded": ("llama-small", peft.ShiraConfig,
                           dict(r=3, random_seed=42, target_modules=["k_proj", "down_proj"]), 55),
    "llama_hira": ("llama-small", peft.HiraConfig,
                   dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), 56),
    # HiRA's rank_pattern changes no rank in the reference (its dispatch passes config.r).
    "llama_hira_gaussian": ("llama-small", peft.HiraConfig,
                            dict(r=3, init_weights="gaussian", rank_pattern={"v_proj": 2},
                                 target_modules=["k_proj", "v_proj", "up_proj"]), 57),
    "gpt2_hira": ("gpt2-small", peft.HiraConfig,
                  dict(r=2, target_modules=["c_attn", "c_fc"]), 58),
    "llama_lora_fa": ("llama-small", peft.LoraConfig,
                      dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                      80),
    "gpt2_lora_fa": ("gpt2-small", peft.LoraConfig,
                     dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True), 81),
    # RoAd (h2): an output map; the reference refuses GPT-2's Conv1D (no GPT-2 case).
    "llama_road": ("llama-small", peft.RoadConfig,
                   dict(variant="road_1", group_size=8,
                        target_modules=["q_proj", "v_proj", "down_proj"]), 60),
    "llama_road_2": ("llama-small", peft.RoadConfig,
                     dict(variant="road_2", group_size=16,
                          target_modules=["k_proj", "o_proj", "up_proj"]), 61),
    "llama_road_4": ("llama-small", peft.RoadConfig,
                     dict(variant="road_4", group_size=4, init_weights=False,
                          target_modules=["q_proj", "v_proj"]), 62),
    # DeLoRA (h2): its base-weight column norms (delora_w_norm, a buffer) are in the file too.
    "llama_delora": ("llama-small", peft.DeloraConfig,
                     dict(r=2, delora_lambda=15, target_modules=["q_proj", "v_proj", "down_proj"]),
                     63),
    "llama_delora_pattern": ("llama-small", peft.DeloraConfig,
                             dict(r=3, delora_lambda=4, init_weights=False,
                                  rank_pattern={"v_proj": 2}, lambda_pattern={"up_proj": 7},
                                  target_modules=["k_proj", "v_proj", "up_proj"]), 64),
    # LLaMA-Adapter (h4): prompts in the top layer only; the gate is moved by the noise too.
    "llama_adaption_prompt": ("llama-small", peft.AdaptionPromptConfig,
                              dict(adapter_len=4, adapter_layers=1), 70),
    "gpt2_adaption_prompt": ("gpt2-small", peft.AdaptionPromptConfig,
                             dict(adapter_len=3, adapter_layers=2), 73),
    # OLoRA (h5): LoRA initialised from the QR of W (W rewritten to W - s B A at attach).
    "llama_olora": ("llama-small", peft.LoraConfig,
                    dict(r=4, lora_alpha=8, init_lora_weights="olora",
                         target_modules=["q_proj", "v_proj", "up_proj"]), 110),
    # Trainable tokens (h4): rows the batch uses and one it does not (llama 2, gpt2 70).
    "llama_trainable_tokens": ("llama-small", peft.TrainableTokensConfig,
                               dict(token_indices=[11, 40, 8, 2]), 71),
    "gpt2_trainable_tokens": ("gpt2-small", peft.TrainableTokensConfig,
                              dict(token_indices=[3, 26, 5, 70]), 72),
}
ADAPTER_NOISE = 0.05
BATCH, SEQ, PADDED = 2, 12, 3  # row 1 right-padded by PADDED tokens


def write_models():
    for name, build in MODELS.items():
        torch.manual_seed(7)
        model = build().float()
        folder = os.path.join(ROOT, "models", name)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        for extra in ("generation_config.json",):
            path = os.path.join(folder, extra)
            if os.path.exists(path):
                os.remove(path)


def load_model(name):
    folder = os.path.join(ROOT, "models", name)
    cls = LlamaForCausalLM if name.startswith("llama") else GPT2LMHeadModel
    model = cls.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    return model.double().eval()


def file_key(param_name):
    """A trainable parameter's key in adapter_model.safetensors: the adapter name removed; a
    tensor the whole model shares (VB-LoRA's bank, registered on the first adapted module) is
    saved once under base_model."""
    key = param_name.replace(".default.", ".").removesuffix(".default")
    if key.endswith(".vblora_vector_bank"):
        return "base_model.vblora_vector_bank"
    return key


def make_batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - PADDED:] = 0
    ids[1, SEQ - PADDED:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return ids, mask, labels


def trainables(model):
    return [(file_key(n), p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def cuda_butterflies():
    """BOFT's CUDA path on the CPU: the reference runs more than one butterfly factor only when
    its CUDA extension loads; its kernel assembles block-diagonal matrices, which torch.block_diag
    does the same (slower)."""
    import peft.tuners.boft.layer as boft_layer
    saved = boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag
    class BlockDiag:
        @staticmethod
        def apply(blocks):  # (N, D, H, H) -> (N, D*H, D*H)
            return torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])
    boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag = (lambda: True), BlockDiag
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag = saved


class LoraFaTraining:
    """LoRA-FA as the reference trains it: create_lorafa_optimizer freezes every lora_A and steps
    lora_B with LoraFAOptimizer (the projected gradient, AdamW in the Hugging Face form, its
    default eps 1e-6). Its grad_B projection runs under bf16 autocast where accelerate reports
    bf16; here it runs in float64 (the case's precision)."""
    peft_method = "lora_fa"
    optimizer_name = ("LoraFAOptimizer (peft.optimizers.lorafa: lora_A frozen, "
                      "g_B (A A^T + 1e-8 I)^+ / s^2, AdamW in the Hugging Face form)")
    eps = 1e-6

    @staticmethod
    def prepare(model):
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)

    @staticmethod
    def optimizer(model, config_kwargs):
        import peft.optimizers.lorafa as lorafa
        lorafa.is_bf16_available = lambda: False
        return lorafa.create_lorafa_optimizer(model, r=config_kwargs["r"],
                                              lora_alpha=config_kwargs["lora_alpha"], lr=1e-2,
                                              weight_decay=0.01)


# case -> how the reference trains it, where that is not torch's AdamW on every trainable tensor
SPECIAL_TRAINING = {"llama_lora_fa": LoraFaTraining, "gpt2_lora_fa": LoraFaTraining}


def generate_case(case, model_name, config_cls, kwargs, seed):
    with cuda_butterflies() if case == "llama_boft_butterfly" else contextlib.nullcontext():
        return generate_case_as_is(case, model_name, config_cls, kwargs, seed)


def generate_case_as_is(case, model_name, config_cls, kwargs, seed):
    torch.manual_seed(seed)
    if kwargs.get("init_lora_weights") == "olora":
        # The reference's olora_init refuses float64 weights: its QR runs on the F32 model (what
        # the file holds) and rewrites W there; then the whole model moves to float64.
        base = load_model(model_name).float()
        model = get_peft_model(base, config_cls(**kwargs)).double().eval()
    else:
        base = load_model(model_name)
        model = get_peft_model(base, config_cls(**kwargs)).eval()
    special = SPECIAL_TRAINING.get(case)
    if special:
        special.prepare(model)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in trainables(model):
            p.add_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * ADAPTER_NOISE)
            p.copy_(p.float().double())  # what the F32 file holds
    folder = os.path.join(ROOT, case)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "adapter"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            adapter_config = json.load(f)
        adapter_config["base_model_name_or_path"] = None  # not this machine's path
        if isinstance(adapter_config.get("target_modules"), list):  # a set: no stable order
            adapter_config["target_modules"].sort()
        with open(os.path.join(folder, "adapter", "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
        tensors = safetensors.torch.load_file(os.path.join(tmp, "adapter_model.safetensors"))
    # F32 as the F32 model holds them; integer tensors (SHiRA's int32 indices) as the reference
    # writes them
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, os.path.join(folder, "adapter",
                                                      "adapter_model.safetensors"))
    keys = [k for k, _ in trainables(model)]
    # Trainable tokens on a tied lm_head: the reference also saves the embedding's delta under
    # the head's key (a copy of one trainable tensor, no parameter of its own).
    tied = {k for k in tensors if k not in keys and k.endswith(".trainable_tokens_delta")
            and any(torch.equal(tensors[k], tensors[j]) for j in keys)}
    if special:  # frozen tensors of the adapter (LoRA-FA's A) are in the file too
        tied |= {k for k in tensors if k not in keys and ".lora_A." in k}
    # A buffer the reference saves with the adapter: DeLoRA's base column norms (delora_w_norm).
    tied |= {k for k in tensors if k not in keys and k.endswith(".delora_w_norm")}
    # GLoRA's paths set to none (and C, D, E where a module has no bias): zero buffers, saved.
    tied |= {k for k in tensors if k not in keys and ".glora_" in k and k.endswith(".zeros")}
    # RandLoRA's shared bases (once per module and under base_model) and SHiRA's mask indices
    # (int32, as the reference writes them)
    tied |= {k for k in tensors if k not in keys
             and k.endswith((".randlora_A", ".randlora_B", ".shira_indices"))}
    assert sorted(keys) == sorted(set(tensors) - tied), (case, keys, list(tensors))
    write_expected(case, folder, model, base, model_name, config_cls.__name__, seed, kwargs,
                   special)


def write_expected(case, folder, model, base, model_name, method, seed, kwargs, special=None):
    """expected.safetensors and case.json of a case whose adapter/ is written: the forward, the
    gradients, the merged logits where the reference merges, 4 AdamW steps."""
    keys = [k for k, _ in trainables(model)]
    vocab = base.config.vocab_size
    ids, mask, labels = make_batch(vocab, seed)
    expected = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    expected["logits"] = out.logits.detach()
    expected["loss"] = out.loss.detach().reshape(1)
    for k, p in trainables(model):
        expected["grad." + k] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)

    merged_note = None
    try:
        merged = copy.deepcopy(model).merge_and_unload()
        with torch.no_grad():
            merged_logits = merged(input_ids=ids, attention_mask=mask).logits
        scale = out.logits.abs().max().item()
        err = (merged_logits - out.logits).abs().max().item() / scale
        if err < 1e-6:  # a merge that differs is wrong by far more; C3A's runs in float32
            expected["merged_logits"] = merged_logits
        else:
            merged_note = f"the reference's merge does not reproduce its forward ({err:.2e})"
    except Exception as e:  # noqa: BLE001 (the reference refuses to merge this module type)
        merged_note = f"the reference's merge fails: {type(e).__name__}: {e}"[:300]

    params = [p for _, p in trainables(model)]
    if special:
        opt = special.optimizer(model, kwargs)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    for k, p in trainables(model):
        expected["trained." + k] = p.detach().clone()
    with torch.no_grad():
        losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    expected["train_losses"] = torch.tensor(losses, dtype=torch.float64)
    safetensors.torch.save_file(
        {k: (v if v.dtype == torch.long else v.float()).contiguous() for k, v in expected.items()},
        os.path.join(folder, "expected.safetensors"))

    trainable, total = model.get_nb_trainable_parameters()
    case_json = {
        "case": case,
        "model_dir": f"../models/{model_name}",
        "method": method,
        "seed": seed,
        "batch": BATCH,
        "seq": SEQ,
        "trainable_tensors": len(keys),
        "trainable_params": trainable,
        "all_params": total,
        "grad_keys_missing_from_adapter_file": [],
        "has_merged_logits": "merged_logits" in expected,
        "logits_shape": list(out.logits.shape),
        "right_padding_on_row0": 0,
        "loss": out.loss.item(),
        "adapter_noise": ADAPTER_NOISE,
        "computed_in": "float64 on CPU; stored as float32",
        "loss_definition": "the loss that the reference model returns for labels (labels "
                           "shifted by one inside the model; -100 ignored)",
        "train": {"optimizer": "AdamW (decoupled weight decay)", "lr": 0.01,
                  "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01, "steps": 4,
                  "train_losses": "loss before each step, then the loss after the last step",
                  "trained": "trainable tensors after the last step"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    if special:
        case_json["peft_method"] = special.peft_method  # this project's field: the policy's name
        case_json["train"]["optimizer"] = special.optimizer_name
        case_json["train"]["eps"] = special.eps
    if merged_note:
        case_json["merged_logits_note"] = merged_note
    with open(os.path.join(folder, "case.json"), "w") as f:
        json.dump(case_json, f, indent=1)
    print(f"{case}: loss {out.loss.item():.6f}, {trainable} trainable, merged: "
          f"{merged_note or 'yes'}")


# X-LoRA (h5): case -> (model, XLoraConfig arguments, the experts' LoraConfig arguments, seed).
# Each expert is a LoRA adapter the script writes first (reference-initialised, then noised like
# every case's tensors) into adapter/<n>/; the X-LoRA config names them {"n": "n"}, relative to
# its own folder. Only the classifier trains (use_trainable_adapters false, the default).
# LLaMA only: the reference cannot load experts into GPT-2 (its key rework,
# _load_adapter_into_lora_model, assumes a "model." body and reports transformer.h.* as
# unexpected keys), so it has no GPT-2 X-LoRA to compare with.
XLORA_CASES = {
    "llama_xlora": ("llama-small",
                    dict(xlora_depth=2, xlora_size=8, layerwise_scalings=True,
                         softmax_temperature=0.7, global_scaling_weight=1.3,
                         scaling_pass_value=0.4),
                    [dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"]),
                     dict(r=3, lora_alpha=7, target_modules=["v_proj", "down_proj"]),
                     dict(r=2, lora_alpha=4, target_modules=["q_proj"])], 80),
    # top-k without its softmax; scaling_pass_value 0 (the reference's default)
    "llama_xlora_topk": ("llama-small", dict(xlora_depth=1, top_k_lora=2),
                         [dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]),
                          dict(r=2, lora_alpha=3, target_modules=["k_proj"]),
                          dict(r=4, lora_alpha=8, target_modules=["up_proj", "o_proj"])], 81),
}


def noise_(named, g):
    with torch.no_grad():
        for _, p in named:
            p.add_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * ADAPTER_NOISE)
            p.copy_(p.float().double())  # what the F32 file holds


def write_lora_expert(folder, model_name, lora_kwargs, seed):
    """A LoRA adapter as the reference saves it (F32), its every tensor noised (B != 0)."""
    torch.manual_seed(seed)
    m = get_peft_model(load_model(model_name), peft.LoraConfig(**lora_kwargs)).eval()
    noise_(trainables(m), torch.Generator().manual_seed(seed + 1000))
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            config = json.load(f)
        tensors = safetensors.torch.load_file(os.path.join(tmp, "adapter_model.safetensors"))
    config["base_model_name_or_path"] = None
    config["target_modules"] = sorted(config["target_modules"])  # a set: no stable order
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    safetensors.torch.save_file({k: v.float().contiguous() for k, v in tensors.items()},
                                os.path.join(folder, "adapter_model.safetensors"))


def xlora_config_json(model, names):
    """The X-LoRA adapter_config.json, the experts named by their folders relative to it."""
    config = model.peft_config["default"].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set)
                                   else str(v)))
    config["adapters"] = {n: n for n in names}
    config["base_model_name_or_path"] = None
    config.pop("device", None)  # the machine's torch device
    return config


def generate_xlora_case(case, model_name, xlora_kwargs, experts, seed):
    folder = os.path.join(ROOT, case)
    shutil.rmtree(folder, ignore_errors=True)
    adapter = os.path.join(folder, "adapter")
    names = [str(n) for n in range(len(experts))]
    for n, lora_kwargs in zip(names, experts):
        write_lora_expert(os.path.join(adapter, n), model_name, lora_kwargs, seed + 10 * int(n))
    torch.manual_seed(seed)
    base = load_model(model_name)
    base.config.use_cache = False  # the reference refuses a cache
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                              adapters={n: os.path.join(adapter, n) for n in names},
                              **xlora_kwargs)
    model = get_peft_model(base, config).eval()
    noise_(trainables(model), torch.Generator().manual_seed(seed + 1000))
    keys = [k for k, _ in trainables(model)]
    assert keys and all(".internal_xlora_classifier." in k for k in keys), keys
    # The reference's save_pretrained splits the classifier over sub-folders; the file here holds
    # it under the parameter names, as the reference's load_state_dict expects them.
    safetensors.torch.save_file({k: p.detach().float().contiguous()
                                 for k, p in trainables(model)},
                                os.path.join(adapter, "adapter_model.safetensors"))
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(xlora_config_json(model, names), f, indent=2, sort_keys=True)
    write_expected(case, folder, model, base, model_name, "XLoraConfig", seed, xlora_kwargs)


PUBLISHED = {
    "gpt2-124m": lambda: GPT2Config(),
    "llama-7b": lambda: LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=32, max_position_embeddings=2048,
                                    rms_norm_eps=1e-6, tie_word_embeddings=False),
}
COUNTS = [
    ("llama-7b", OFTConfig, dict(oft_block_size=32, r=0, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", OFTConfig, dict(r=16, oft_block_size=0, block_share=True,
                                 target_modules=["q_proj", "v_proj"])),
    ("llama-7b", HRAConfig, dict(r=8, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", MissConfig, dict(r=64, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", MissConfig, dict(r=64, mini_r=64, init_weights="mini",
                                  target_modules=["q_proj", "v_proj"])),
    ("llama-7b", BOFTConfig, dict(boft_block_size=32, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", FourierFTConfig, dict(n_frequency=1000, target_modules=["q_proj", "v_proj"])),
    ("gpt2-124m", FourierFTConfig, dict(n_frequency=1000, target_modules=["c_attn"])),
    ("llama-7b", C3AConfig, dict(block_size=256, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", VBLoRAConfig, dict(r=4, num_vectors=256, vector_length=256, topk=2,
                                    target_modules=["q_proj", "v_proj"])),
    ("gpt2-124m", VBLoRAConfig, dict(r=4, num_vectors=256, vector_length=256, topk=2,
                                     target_modules=["c_attn"])),
    # --- counts of the second part (issue 20): add new rows below this line
    ("llama-7b", peft.GraloraConfig, dict(r=32, gralora_k=2, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", peft.GraloraConfig, dict(r=32, hybrid_r=8, gralora_k=4,
                                          target_modules=["q_proj", "v_proj"])),
    ("gpt2-124m", peft.GraloraConfig, dict(r=32, target_modules=["c_attn"])),
    ("llama-7b", peft.GloraConfig, dict(r=8, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", peft.GloraConfig, dict(r=4, config_A_B="vector", config_D_E="vector",
                                        target_modules=["q_proj", "v_proj"])),
    ("llama-7b", peft.RandLoraConfig, dict(r=32, target_modules=["q_proj", "v_proj"])),
    ("gpt2-124m", peft.RandLoraConfig, dict(r=32, target_modules=["c_attn"])),
    ("llama-7b", peft.ShiraConfig, dict(r=32, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", peft.HiraConfig, dict(r=32, target_modules=["q_proj", "v_proj"])),
    ("gpt2-124m", peft.HiraConfig, dict(r=8, target_modules=["c_attn"])),
    ("llama-7b", peft.RoadConfig, dict(variant="road_1", target_modules=["q_proj", "v_proj"])),
    ("llama-7b", peft.RoadConfig, dict(variant="road_4", group_size=128,
                                       target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama-7b", peft.DeloraConfig, dict(r=8, target_modules=["q_proj", "v_proj"])),
    ("llama-7b", peft.AdaptionPromptConfig, dict(adapter_len=10, adapter_layers=30)),
    ("llama-7b", peft.TrainableTokensConfig, dict(token_indices=[0, 1, 2, 3, 4, 5, 6, 7])),
    ("gpt2-124m", peft.TrainableTokensConfig, dict(token_indices=[50256, 0, 1, 2])),
]


def shira_count_mask(base_layer, r, **_):
    out_features, in_features = base_layer.weight.shape
    mask = torch.zeros(out_features * in_features)
    mask[: r * (out_features + in_features)] = 1
    return mask.view(out_features, in_features)


# X-LoRA's count rows: experts (LoRA configs) for the published shapes. Their folders keep the
# adapter_config.json only (committed under golden_methods/xlora_count_experts/): a count needs
# shapes, not values; the reference loads zero tensors written for the count, then removed.
# LLaMA only (see XLORA_CASES: the reference's X-LoRA does not load into GPT-2).
XLORA_COUNTS = [
    ("llama-7b", dict(xlora_depth=1),
     [dict(r=8, target_modules=["q_proj", "v_proj"]),
      dict(r=16, target_modules=["q_proj", "down_proj"]),
      dict(r=8, target_modules=["v_proj"])]),
]


def xlora_count_row(model_name, xlora_kwargs, experts):
    config = PUBLISHED[model_name]()
    config.use_cache = False
    cls = GPT2LMHeadModel if model_name.startswith("gpt2") else LlamaForCausalLM
    root = os.path.join(ROOT, "xlora_count_experts", model_name)
    shutil.rmtree(root, ignore_errors=True)
    names = [str(n) for n in range(len(experts))]
    for n, lora_kwargs in zip(names, experts):
        with torch.device("meta"):
            lora = get_peft_model(cls(config), peft.LoraConfig(**lora_kwargs))
        state = peft.get_peft_model_state_dict(lora)
        folder = os.path.join(root, n)
        lora.peft_config["default"].save_pretrained(folder)
        safetensors.torch.save_file({k: torch.zeros(v.shape) for k, v in state.items()},
                                    os.path.join(folder, "adapter_model.safetensors"))
    with torch.device("meta"):
        base = cls(config)
    model = get_peft_model(base, peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=config.hidden_size,
        adapters={n: os.path.join(root, n) for n in names}, **xlora_kwargs))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    adapter = xlora_config_json(model, names)
    adapter["adapters"] = {n: f"xlora_count_experts/{model_name}/{n}" for n in names}
    for n in names:
        os.remove(os.path.join(root, n, "adapter_model.safetensors"))
        path = os.path.join(root, n, "adapter_config.json")
        with open(path) as f:
            expert = json.load(f)
        expert["base_model_name_or_path"] = None
        expert["target_modules"] = sorted(expert["target_modules"])  # a set: no stable order
        with open(path, "w") as f:
            json.dump(expert, f, indent=2, sort_keys=True)
    return {"model": model_name, "model_config": config.to_dict(), "adapter_config": adapter,
            "line": printed.getvalue().strip()}


def write_counts():
    rows = []
    for model_name, config_cls, kwargs in COUNTS:
        config = PUBLISHED[model_name]()
        with torch.device("meta"):
            base = (GPT2LMHeadModel if model_name.startswith("gpt2") else LlamaForCausalLM)(config)
        adapter_config = config_cls(**kwargs)
        if config_cls is peft.ShiraConfig:
            # SHiRA's mask needs values (torch.where), which meta tensors lack; its count does
            # not depend on which entries it picks: a CPU mask of the same size.
            adapter_config.mask_fn = shira_count_mask
        model = get_peft_model(base, adapter_config)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            model.print_trainable_parameters()
        adapter = model.peft_config["default"].to_dict()
        adapter = json.loads(json.dumps(adapter, default=lambda v: sorted(v)
                                        if isinstance(v, set) else str(v)))
        rows.append({"model": model_name, "model_config": config.to_dict(),
                     "adapter_config": adapter, "line": printed.getvalue().strip()})
        print(f"{model_name} {config_cls.__name__}: {rows[-1]['line']}")
    for model_name, xlora_kwargs, experts in XLORA_COUNTS:
        rows.append(xlora_count_row(model_name, xlora_kwargs, experts))
        print(f"{model_name} XLoraConfig: {rows[-1]['line']}")
    with open(os.path.join(ROOT, "counts.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", metavar="CASE",
                        help="regenerate only these cases (and the counts); the models are "
                             "written only where missing")
    args = parser.parse_args()
    os.makedirs(ROOT, exist_ok=True)
    if args.only is None or not all(os.path.exists(os.path.join(ROOT, "models", m, "config.json"))
                                    for m in MODELS):
        write_models()
    unknown = sorted(set(args.only or []) - set(CASES) - set(XLORA_CASES))
    if unknown:
        raise SystemExit(f"unknown cases: {unknown}")
    for name, (model_name, cls, kwargs, seed) in CASES.items():
        if args.only is None or name in args.only:
            generate_case(name, model_name, cls, kwargs, seed)
    for name, (model_name, kwargs, experts, seed) in XLORA_CASES.items():
        if args.only is None or name in args.only:
            generate_xlora_case(name, model_name, kwargs, experts, seed)
    write_counts()
