#!/usr/bin/env bash
# `mpirun -np 2 peft train` on loopback (docs/distributed.md), registered by tests/CMakeLists.txt:
#   mpi_train.sh PEFT COMPARE_ADAPTERS GOLDEN_DIR WORK_DIR MPIRUN [MPIRUN_FLAGS...]
# 1. Two ranks with global batch 4 train the adapter one process trains with batch 4, within
#    the fp32 tolerance of docs/distributed.md ("How exact").
# 2. A two-rank run stopped at step 20 of 40 (--stop-at) resumes on one rank and ends where the
#    uninterrupted one-process run ends, within the same tolerance. (A SIGKILLed run resumes
#    exactly as a stopped one: tests/train_kill_resume.sh.)
# 3. One rank killed with SIGKILL mid-step ends the job within 30 s, non-zero, with a message
#    naming the lost rank.
# 4. A global batch of fewer rows than ranks is a clear error on the ranks, and the job ends.
set -euo pipefail
peft=$1 compare=$2 golden=$3 work=$4
shift 4
mpirun=("$@")
rm -rf "$work"
mkdir -p "$work"
for i in $(seq 1 200); do echo "Line $i: the quick brown fox jumps over the lazy dog."; done >"$work/train.txt"
args=("$golden/models/gpt2-tiny" --adapter-config "$golden/gpt2_lora/adapter/adapter_config.json"
      --data "$work/train.txt" --seq-len 32 --batch 4 --lr 1e-2 --threads 1 --no-progress)
# fp32, the norm of the adapter's difference (docs/distributed.md, "How exact").
tolerance=1e-4

# 1. one process, then two ranks
"$peft" train "${args[@]}" --steps 40 --checkpoint-every 10 --out "$work/one" >"$work/one.log"
"${mpirun[@]}" -np 2 "$peft" train "${args[@]}" --steps 40 --checkpoint-every 10 \
  --out "$work/two" >"$work/two.log" 2>&1 || { cat "$work/two.log"; exit 1; }
grep -q "data parallel: 2 ranks" "$work/two.log" || { cat "$work/two.log"; echo "not 2 ranks"; exit 1; }
# Only rank 0 printed: one completion line.
[ "$(grep -c '^completed 40 steps' "$work/two.log")" = 1 ] || { cat "$work/two.log"; exit 1; }
"$compare" "$work/one/adapter/adapter_model.safetensors" \
  "$work/two/adapter/adapter_model.safetensors" "$tolerance"
echo "two ranks = one process"

# 2. two ranks stop at step 20 (--stop-at: a checkpoint, as when a job's time is up); one rank
#    resumes and ends where the uninterrupted one-process run of test 1 ended
"${mpirun[@]}" -np 2 "$peft" train "${args[@]}" --steps 40 --checkpoint-every 10 --stop-at 20 \
  --out "$work/stopped" >"$work/stopped.log" 2>&1 || { cat "$work/stopped.log"; exit 1; }
grep -q "stopped at step 20 of 40" "$work/stopped.log" || { cat "$work/stopped.log"; exit 1; }
"$peft" train "${args[@]}" --steps 40 --checkpoint-every 10 --out "$work/stopped" --resume \
  >"$work/resumed.log"
grep -q "resuming at step 20 of 40" "$work/resumed.log" || { cat "$work/resumed.log"; exit 1; }
"$compare" "$work/one/adapter/adapter_model.safetensors" \
  "$work/stopped/adapter/adapter_model.safetensors" "$tolerance"
echo "resumed on one rank = one process"

# 3. rank 1 killed mid-run
"${mpirun[@]}" -np 2 "$peft" train "${args[@]}" --steps 100000 --checkpoint-every 100000 \
  --out "$work/killed" >"$work/killed.log" 2>&1 &
pid=$!
victim=""
for _ in $(seq 1 3000); do
  # rank 1 of this job: its command line names the folder, its environment the rank (read from
  # /proc: procps is not on every machine)
  for d in /proc/[0-9]*; do
    if tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -q -- "--out $work/killed" &&
       tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1'; then
      victim=${d#/proc/}
    fi
  done
  [ -n "$victim" ] && grep -q "data parallel" "$work/killed.log" 2>/dev/null && break
  sleep 0.01
done
[ -n "$victim" ] || { echo "rank 1 not found"; kill -9 "$pid"; exit 1; }
sleep 1  # mid-run: the ranks are stepping
kill -9 "$victim"
start=$(date +%s)
status=0
for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then
  echo "the job did not end within 30 s of losing rank 1"; kill -9 "$pid"; exit 1
fi
wait "$pid" || status=$?
elapsed=$(( $(date +%s) - start ))
cat "$work/killed.log" | tail -5
[ "$status" -ne 0 ] || { echo "the job exited 0 after losing a rank"; exit 1; }
grep -qE "rank 1 .*(signal 9|Killed)" "$work/killed.log" || { echo "no message names rank 1"; exit 1; }
echo "rank 1 killed: the job ended in ${elapsed} s with status $status"

# 4. a global batch smaller than the ranks: a clear error naming the rank, every rank ends
status=0
"${mpirun[@]}" -np 2 "$peft" train "${args[@]}" --batch 1 --steps 5 --out "$work/small" \
  >"$work/small.log" 2>&1 || status=$?
[ "$status" -ne 0 ] || { cat "$work/small.log"; echo "batch 1 over 2 ranks exited 0"; exit 1; }
grep -q "peft train (rank [01] of 2): error: .*a micro-batch of 1 rows cannot be shared by 2 ranks" \
  "$work/small.log" || { cat "$work/small.log"; exit 1; }
echo "batch 1 over 2 ranks: a clear error, status $status"
echo "mpi-train ok"
