#!/usr/bin/env bash
# The one device check for the CUDA backend (issue 9), run on the lent GPU machine from the
# repository root, with .device-carry/ carried along (scripts/prepare-device-carry.sh fills it):
#   bash scripts/device-check.sh
# Phases, each timed and bounded, each run even when an earlier one failed: environment,
# configure, build (CUDA tests, CUDA benchmarks; the peft CLI in the background), CUDA tests,
# CUDA benchmarks, the peer (PyTorch + peft) benchmark, then with the CLI: parity on the GPU and
# the GPT-2 124M LoRA step (bf16, fp32); then one comparison table and a summary. The whole run
# stays under DEADLINE_S seconds (default 450). Logs go to $OUT (at most 8 files, as the device
# tool returns them).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
carry="$root/.device-carry"
out="${OUT:-/tmp/peft-device-out}"
build="${PEFT_DEVICE_BUILD:-/tmp/peft-device-build}"
deadline_s="${DEADLINE_S:-450}"
jobs="${JOBS:-16}"
mkdir -p "$out"
log="$out/device-check.log"      # environment, configure, tests, parity
build_log="$out/build.log"      # the CUDA targets
cli_log="$out/build-cli.log"    # the CLI
step_log="$out/bench-step.log"  # peft bench-step --device cuda
bench_json="$out/bench.json"
peer_jsonl="$out/peer.jsonl"
peer_log="$out/peer.log"
summary="$out/summary.txt"
: >"$log"
: >"$build_log"
: >"$cli_log"
: >"$step_log"
start_s=$SECONDS
declare -a phase_lines=()

remaining() { echo $((deadline_s - (SECONDS - start_s))); }

# phase <name> <cap seconds> <log file> <command...>: runs the command under a timeout of
# min(cap, time left), appending to the log, and records status and duration.
phase() {
  local name="$1" cap="$2" file="$3"
  shift 3
  local left
  left=$(remaining)
  local limit=$((cap < left - 5 ? cap : left - 5))
  if ((limit <= 0)); then
    phase_lines+=("$(printf '%-12s SKIPPED   (no time left)' "$name")")
    echo "== $name: skipped, no time left" | tee -a "$file"
    return 124
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$file"
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" >>"$file" 2>&1
  rc=$?
  local status="ok"
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT"
  elif ((rc != 0)); then
    status="FAILED"
  fi
  phase_lines+=("$(printf '%-12s %-8s rc=%-4s %4ss' "$name" "$status" "$rc" $((SECONDS - t0)))")
  echo "== $name: $status (rc $rc, $((SECONDS - t0))s)" | tee -a "$file"
  return $rc
}

# --- environment -------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  g++ --version 2>&1 | head -1
  cmake --version 2>&1 | head -1
  ninja --version 2>&1
  python3 -c 'import torch, peft; print("torch", torch.__version__, "peft", peft.__version__)' 2>&1
} >>"$log" 2>&1
head -12 "$log"

if [[ ! -d "$carry/cmake" ]]; then
  echo "device-check: $carry/cmake missing: run scripts/prepare-device-carry.sh and carry it" \
    | tee -a "$log"
fi
export LD_LIBRARY_PATH="$carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"
golden="$carry/golden"

# --- configure and build -------------------------------------------------------------------------
phase configure 120 "$log" cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DPEFT_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DPEFT_BUILD_TESTS=ON -DPEFT_BUILD_BENCHMARKS=ON -DPEFT_BUILD_EXAMPLES=OFF \
  -DPEFT_BUILD_CLI=ON -DPEFT_GOLDEN_DIR="$golden" \
  -DEigen3_DIR="$carry/cmake/Eigen3" -Ddoctest_DIR="$carry/cmake/doctest" \
  -Dnlohmann_json_DIR="$carry/cmake/nlohmann_json" -Dbenchmark_DIR="$carry/cmake/benchmark" \
  -DEIGEN3_INCLUDE_DIR="$carry/include/eigen3"

phase build-cuda 240 "$build_log" cmake --build "$build" -j "$jobs" \
  --target peft_cuda_tests peft_cuda_bench
grep -E "error|warning" "$build_log" | head -20
# The CLI is one large host-compiled translation unit (minutes): it builds in the background, at
# low priority and on few cores, while the GPU phases run; parity-cuda and bench-step wait for
# it. (After build-cuda, not beside it: two builds in one build folder would race.)
cli_rc_file="$build/cli-build.rc"
rm -f "$cli_rc_file"
cli_start=$SECONDS
(
  nice -n 10 timeout --kill-after=5 "$(($(remaining) - 60 > 10 ? $(remaining) - 60 : 10))" \
    cmake --build "$build" -j 4 --target peft_cli >>"$cli_log" 2>&1
  echo $? >"$cli_rc_file"
) &
cli_pid=$!
# --- run -------------------------------------------------------------------------------------
phase cuda-tests 90 "$log" "$build/bin/peft_cuda_tests" --duration=true
tests_line="$(grep -E '^\[doctest\] test cases' "$log" | tail -1)"

phase cuda-bench 150 "$log" "$build/bin/peft_cuda_bench" --benchmark_out="$bench_json" \
  --benchmark_out_format=json

if [[ -f "$carry/peers/gpu_peer_bench.py" ]]; then
  phase peer-bench 200 "$peer_log" env PYTHONUNBUFFERED=1 python3 "$carry/peers/gpu_peer_bench.py" \
    "$peer_jsonl"
else
  phase_lines+=("peer-bench   SKIPPED   (no .device-carry/peers)")
fi

# --- the CLI on the GPU: parity, the GPT-2 124M step ------------------------------------------
# Waits for the background CLI build (bounded by the time left, less what the phases after need).
wait_cli() {
  while kill -0 "$cli_pid" 2>/dev/null; do
    if (($(remaining) < 50)); then
      kill -- "$cli_pid" 2>/dev/null
      return 124
    fi
    sleep 2
  done
  wait "$cli_pid" 2>/dev/null
  [[ -f "$cli_rc_file" ]] && return "$(cat "$cli_rc_file")"
  return 1
}
wait_cli
cli_rc=$?
phase_lines+=("$(printf '%-12s %-8s rc=%-4s %4ss (background)' build-cli \
  "$( ((cli_rc == 0)) && echo ok || echo FAILED)" "$cli_rc" $((SECONDS - cli_start)))")
grep -E "error|warning" "$cli_log" | head -20
if ((cli_rc == 0)) && [[ -x "$build/bin/peft" ]]; then
  cases=()
  for c in "$golden"/*/case.json; do cases+=("$(dirname "$c")"); done
  phase parity-cuda 60 "$log" "$build/bin/peft" parity --device cuda "${cases[@]}"
  # The peer's flags: GPT-2 124M, LoRA r 8 alpha 16 on qkv, proj, fc, fc2, batch 8 x seq 512.
  step_flags=(--layers 12 --d 768 --heads 12 --vocab 50257 --seq 512 --batch 8 --rank 8
    --targets qkv,proj,fc,fc2 --warmup 3 --steps 10)
  phase step-bf16 60 "$step_log" "$build/bin/peft" bench-step --device cuda --dtype bf16 \
    "${step_flags[@]}"
  phase step-fp32 60 "$step_log" "$build/bin/peft" bench-step --device cuda --dtype fp32 \
    "${step_flags[@]}"
else
  phase_lines+=("parity-cuda  SKIPPED   (no CLI: see build-cli.log)")
  phase_lines+=("step-bf16    SKIPPED   (no CLI)")
fi

# --- report ----------------------------------------------------------------------------------
{
  echo
  gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)"
  echo "=== peft CUDA device check: ${gpu:-no GPU seen}"
  python3 "$root/scripts/device-compare.py" "$bench_json" "$peer_jsonl" "$step_log" 2>&1
  echo
  echo "CUDA tests: ${tests_line:-no result}"
  grep -E "ERROR|FAILED|CHECK\(" "$log" | grep -v "^==" | head -12
  echo "parity on CUDA: $(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped' "$log" | tail -1)"
  grep -E "^(FAIL|SKIP) " "$log" | head -12
  grep -E "^(peft bench-step|median_ms|bench-step: error)" "$step_log" | head -6
  echo
  echo "phases (total $((SECONDS - start_s))s of ${deadline_s}s):"
  printf '  %s\n' "${phase_lines[@]}"
  echo "logs: $out"
} | tee "$summary"
