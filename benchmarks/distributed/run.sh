#!/usr/bin/env bash
# The table of docs/distributed.md ("Measured"): LoRA, IA3 and full fine-tuning of a GPT-2
# 124M-shaped model, global batch 4 x 256, at 1, 2 and 4 ranks on this machine (loopback,
# shared memory; ranks beyond the cores oversubscribe them, one thread each when the ranks
# fill the cores).
#   benchmarks/distributed/run.sh BUILD_DIR [extra flags for the benchmark]
set -euo pipefail
build=${1:-build}
shift || true
bench="$build/bin/peft_bench_data_parallel"
[ -x "$bench" ] || { echo "run.sh: $bench not built (configure with MPI: -DPEFT_WITH_MPI=ON)" >&2; exit 2; }
cores=$(nproc)
mpirun=(mpirun --oversubscribe --bind-to none --allow-run-as-root --mca btl self,vader
        --mca btl_vader_single_copy_mechanism none)
lscpu | grep -E "Model name" | sed 's/  */ /g'
echo "cores: $cores"
for method in lora ia3 full; do
  for ranks in 1 2 4; do
    threads=$(( cores / ranks )); [ "$threads" -ge 1 ] || threads=1
    "${mpirun[@]}" -np "$ranks" "$bench" --method "$method" --threads "$threads" "$@"
  done
done
