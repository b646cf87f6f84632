#!/usr/bin/env bash
# `peft train` killed with SIGKILL mid-run, then resumed, ends with the adapter an uninterrupted
# run writes, byte for byte (the data order is a function of the step, the trainer's state is in
# the checkpoint). Registered by tests/CMakeLists.txt:
#   train_kill_resume.sh PEFT_BINARY GOLDEN_DIR WORK_DIR
set -euo pipefail
peft=$1 golden=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
for i in $(seq 1 200); do echo "Line $i: the quick brown fox jumps over the lazy dog."; done >"$work/train.txt"
args=("$golden/models/gpt2-tiny" --adapter-config "$golden/gpt2_lora/adapter/adapter_config.json"
      --data "$work/train.txt" --seq-len 32 --batch 4 --steps 300 --lr 1e-2 --threads 1
      --checkpoint-every 10 --no-progress)

"$peft" train "${args[@]}" --out "$work/full" >/dev/null

# The same run, killed once a checkpoint past step 50 is on disk (at a random moment after it).
"$peft" train "${args[@]}" --out "$work/killed" >/dev/null &
pid=$!
for _ in $(seq 1 3000); do
  step=$(grep -aoE '"step": [0-9]+,' "$work/killed/checkpoint/checkpoint.json" 2>/dev/null | tail -1 | grep -oE '[0-9]+' || true)
  [ -n "$step" ] && [ "$step" -ge 50 ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.01
done
sleep "0.0$((RANDOM % 10))"
if kill -9 "$pid" 2>/dev/null; then
  wait "$pid" 2>/dev/null || true
  echo "killed at checkpoint step ${step:-?} or later"
else
  wait "$pid" || true
  echo "the run finished before the kill (a fast machine): resuming a finished run instead"
fi
"$peft" train "${args[@]}" --out "$work/killed" --resume | grep -E 'resuming|completed'
cmp "$work/full/adapter/adapter_model.safetensors" "$work/killed/adapter/adapter_model.safetensors"
cmp "$work/full/adapter/adapter_config.json" "$work/killed/adapter/adapter_config.json"
echo "train-kill-resume ok: the resumed adapter is the uninterrupted run's, byte for byte"
