#!/usr/bin/env python3
"""Prints the one comparison table of the device check: this project's CUDA benchmarks
(Google Benchmark JSON, medians) beside the peer's figures (gpu_peer_bench.py JSON lines), as
ratios to each side's own base GEMM, measured in the same run on the same GPU, with the
issue-9 targets, and the GPT-2 124M training step (ours from `peft bench-step --device cuda`,
whose output device-check.sh collects in STEP.log). Usage:
device-compare.py BENCH.json PEER.jsonl [STEP.log] (any may be missing)."""
import json
import sys


def load_ours(path):
    """{(benchmark, variant, args): median microseconds}"""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"(no benchmark results: {e})")
        return {}
    medians = {}
    for b in data.get("benchmarks", []):
        if b.get("aggregate_name", "median") != "median" or b.get("error_occurred"):
            continue
        # "BM_X/variant/8192/min_time:0.100/repeats:5/manual_time" -> "BM_X/variant/8192"
        name = "/".join(part for part in b.get("run_name", b["name"]).split("/")
                        if ":" not in part and part != "manual_time")
        scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")]
        medians[name] = b["real_time"] * scale
    return medians


def load_peer(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    except (OSError, ValueError) as e:
        print(f"(no peer results: {e})")
    return rows


def load_steps(path):
    """{dtype: median ms} from `peft bench-step --device cuda` output: its header line names the
    dtype ("cuda bf16 on ..." / "cuda fp32 (no TF32) on ..."), its last line is
    "median_ms X min_ms Y peak_mem_mb Z"."""
    steps, dtype = {}, None
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("peft bench-step:"):
                    dtype = "bf16" if "cuda bf16" in line else "fp32" if "cuda fp32" in line else None
                elif line.startswith("median_ms") and dtype:
                    steps[dtype] = float(line.split()[1])
    except (OSError, ValueError, IndexError) as e:
        print(f"(no bench-step results: {e})")
    return steps


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "x":
        return f"{v:.3f}x"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.4f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    ours = load_ours(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
    peer = load_peer(sys.argv[2] if len(sys.argv) > 2 else "peer.jsonl")
    steps = load_steps(sys.argv[3]) if len(sys.argv) > 3 else {}

    def our(name):
        return ours.get(name)

    def peer_row(what, **match):
        for r in peer:
            if r.get("what") == what and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    rows = []  # (what, ours, peer, target, verdict)

    def add(what, mine, theirs, target=None, unit="x"):
        verdict = ""
        if target is not None and mine is not None:
            verdict = "PASS" if mine <= target else "MISS"
        rows.append((what, fmt(mine, unit), fmt(theirs, unit),
                     f"<= {target}x" if target is not None else "", verdict))

    for tokens, target_fwd in [(8192, 1.05), (512, 1.3)]:
        p = peer_row("lora linear bf16", M=tokens, K=4096, N=4096, r=16)
        base = our(f"BM_LoraLinear/base_fwd/{tokens}")
        add(f"LoRA fwd {tokens}x4096x4096 r16: base GEMM (us)", base,
            p and p["base_fwd_ms"] * 1e3, unit="us")
        add(f"LoRA fwd {tokens}: fused (ours) | unfused (peer) / base",
            ratio(our(f"BM_LoraLinear/fused_fwd/{tokens}"), base),
            p and p["lora_fwd_ms"] / p["base_fwd_ms"], target_fwd)
        add(f"LoRA fwd {tokens}: unfused three-product / base",
            ratio(our(f"BM_LoraLinear/unfused_fwd/{tokens}"), base),
            p and p["lora_fwd_ms"] / p["base_fwd_ms"])
        add(f"  of which h = x A^T alone / base",
            ratio(our(f"BM_LoraLinear/fused_fwd_shrink_only/{tokens}"), base), None)
        add(f"  of which the K+R deep product alone / base",
            ratio(our(f"BM_LoraLinear/fused_fwd_product_only/{tokens}"), base), None)
        base_fb = our(f"BM_LoraLinear/base_fwdbwd/{tokens}")
        add(f"LoRA fwd+bwd {tokens}: fused (ours) | unfused (peer) / base",
            ratio(our(f"BM_LoraLinear/fused_fwdbwd/{tokens}"), base_fb),
            p and p["lora_fwdbwd_ms"] / p["base_fwdbwd_ms"])
        add(f"LoRA fwd+bwd {tokens}: unfused three-product / base",
            ratio(our(f"BM_LoraLinear/unfused_fwdbwd/{tokens}"), base_fb),
            p and p["lora_fwdbwd_ms"] / p["base_fwdbwd_ms"])

    for rows_n, adapters, target in [(64, 64, 2.0), (1024, 32, None)]:
        p = peer_row("multi-lora bf16", M=rows_n, adapters=adapters)
        base = our(f"BM_MixedAdapter/base/{rows_n}/{adapters}")
        add(f"mixed {rows_n} req/{adapters} adapters: base GEMM (us)", base,
            p and p["base_ms"] * 1e3, unit="us")
        add(f"mixed {rows_n}/{adapters}: BGMV kernel (ours) | gathered bmm (peer) / base",
            ratio(our(f"BM_MixedAdapter/kernel/{rows_n}/{adapters}"), base),
            p and p["gathered_bmm_ms"] / p["base_ms"], target)
        add(f"mixed {rows_n}/{adapters}: per-adapter loop / base",
            ratio(our(f"BM_MixedAdapter/per_adapter_loop/{rows_n}/{adapters}"), base),
            p and p["loop_ms"] / p["base_ms"])

    for dtype in ["bf16", "fp32"]:
        p = peer_row("gpt2-124M train step", mode="lora", batch=8, seq=512, dtype=dtype)
        add(f"GPT-2 124M LoRA r8 step 8x512 {dtype} (ms)", steps.get(dtype), p and p["ms"],
            unit="ms")
    for r in peer:
        if r.get("what") == "gemm 8192^3":
            add(f"peer GEMM 8192^3 {r['dtype']} (TFLOP/s)", None, r["tflops"], unit="t")
        if r.get("what") == "d2d copy":
            add("peer copy (GB/s, read+write)", None, r["GBps_read_plus_write"], unit="g")
        if "failed" in str(r.get("what", "")):
            print(f"peer: {r['what']}: {r.get('err', '').strip().splitlines()[-1:]}")

    widths = [max(len(str(r[i])) for r in rows + [("what", "ours", "peer", "target", "")])
              for i in range(5)]
    header = ("what", "ours", "peer", "target", "")
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
    print("ratios: each side over its own base GEMM, same run, same GPU; GPT-2 step: "
          "median ms of a whole LoRA training step (ours: peft bench-step --device cuda)")


if __name__ == "__main__":
    main()
