#!/usr/bin/env bash
# Builds the libFuzzer harnesses of fuzz/ (clang, ASan + UBSan) in their own build folder and
# runs a campaign: per harness a number of executions or a time, on a number of jobs, with a
# corpus folder seeded from the golden files and a folder of crash artifacts. Prints executions
# and seconds per harness; exits non-zero if any harness found something (docs/reliability.md).
#
#   scripts/fuzz.sh [options] [harness...]     harness: safetensors model_config adapter_config
#                                              golden_case tokenizer (default: all five)
#   --runs N        executions per job (default 1000000; 0: no limit, use --time)
#   --time S        seconds per harness (default 0: no limit, use --runs)
#   --jobs J        parallel fuzzing processes per harness (default 1)
#   --work DIR      corpora and artifacts go to DIR/<harness>/{corpus,crashes,logs} (default
#                   build-fuzz/campaign)
#   --build DIR     the build folder (default build-fuzz)
#   --golden DIR    the golden cases (default ../shared/golden, or $PEFT_GOLDEN_DIR)
#   --no-build      use the harnesses already built
#   --max-len N     largest input (default per harness: 64 KiB, golden_case 256 KiB)
#   --timeout S     an input running longer than S seconds is a hang (default 10; golden_case 60)
#   --replay        no campaign: replay fuzz/findings/<harness>-* (inputs flagged earlier) and
#                   say which still fail; exits non-zero if any does
#   --keep-going    go on after a finding (libFuzzer's -fork=J with -ignore_crashes, -ignore_ooms,
#                   -ignore_timeouts): a campaign collects every finding instead of stopping at
#                   the first; needs --time
#
# Every harness runs with -rss_limit_mb=2048 -malloc_limit_mb=512: an input that makes the
# library allocate half a gigabyte in one piece (before validating the size) is a finding.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=1000000
time_limit=0
jobs=1
build=build-fuzz
work=""
golden="${PEFT_GOLDEN_DIR:-../shared/golden}"
do_build=1
max_len=""
timeout_s=""
keep_going=0
replay=0
harnesses=()

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] || { echo "fuzz.sh: $1 needs a value" >&2; exit 2; }; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: $2 expected a non-negative integer, found '$1'" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
  case "$1" in
    --runs) need "$@"; is_count "$2" --runs; runs=$2; shift 2 ;;
    --time) need "$@"; is_count "$2" --time; time_limit=$2; shift 2 ;;
    --jobs) need "$@"; is_count "$2" --jobs; jobs=$2; shift 2 ;;
    --work) need "$@"; work=$2; shift 2 ;;
    --build) need "$@"; build=$2; shift 2 ;;
    --golden) need "$@"; golden=$2; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --keep-going) keep_going=1; shift ;;
    --replay) replay=1; shift ;;
    --max-len) need "$@"; is_count "$2" --max-len; max_len=$2; shift 2 ;;
    --timeout) need "$@"; is_count "$2" --timeout; timeout_s=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    safetensors|model_config|adapter_config|golden_case|tokenizer) harnesses+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument '$1' (harnesses: safetensors model_config adapter_config golden_case tokenizer; --help)" >&2; exit 2 ;;
  esac
done
all_harnesses=0
if [ ${#harnesses[@]} -eq 0 ]; then
  harnesses=(safetensors model_config adapter_config golden_case tokenizer)
  all_harnesses=1
fi
[ "$jobs" -ge 1 ] || { echo "fuzz.sh: --jobs must be at least 1" >&2; exit 2; }
[ "$runs" -gt 0 ] || [ "$time_limit" -gt 0 ] || { echo "fuzz.sh: give --runs or --time" >&2; exit 2; }
if [ "$keep_going" -eq 1 ]; then
  [ "$time_limit" -gt 0 ] || { echo "fuzz.sh: --keep-going needs --time" >&2; exit 2; }
  runs=0  # fork mode is bounded by time
fi
[ -d "$golden/models" ] || { echo "fuzz.sh: no golden cases at $golden (--golden or PEFT_GOLDEN_DIR)" >&2; exit 2; }
golden=$(cd "$golden" && pwd)
work=${work:-$build/campaign}

if [ "$do_build" -eq 1 ]; then
  command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (scripts/install-deps.sh)" >&2; exit 2; }
  # Debug: assertions stay on; the harnesses add -O1 themselves.
  cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
    -DPEFT_BUILD_FUZZERS=ON -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_EXAMPLES=OFF \
    -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_CLI=OFF -DPEFT_WITH_CUDA=OFF -DPEFT_NATIVE_ARCH=OFF \
    "-DPEFT_GOLDEN_DIR=$golden" >/dev/null
  # Every harness: one target that depends on them all, so that make builds them side by side
  # (several --target are built one after the other, each a single file: serial).
  targets=(--target fuzz_harnesses)
  if [ "$all_harnesses" -eq 0 ]; then
    targets=()
    for h in "${harnesses[@]}"; do targets+=(--target "fuzz_$h"); done
  fi
  cmake --build "$build" "${targets[@]}" -j"${FUZZ_BUILD_JOBS:-2}"
fi

# Seeds: the golden files of each kind (copied into the corpus, so the corpus only grows) and
# the small hand-made seeds of fuzz/seeds/.
seed() {
  local h=$1 corpus=$2
  cp -f fuzz/seeds/"$h"/* "$corpus"/ 2>/dev/null || true
  case "$h" in
    safetensors)
      for f in "$golden"/*/adapter/adapter_model.safetensors "$golden"/*/expected.safetensors; do
        [ -f "$f" ] || continue
        cp -f "$f" "$corpus/$(basename "$(dirname "$f")")_$(basename "$f")"
      done ;;
    model_config)
      for f in "$golden"/models/*/config.json; do
        cp -f "$f" "$corpus/$(basename "$(dirname "$f")")_config.json"
      done ;;
    adapter_config)
      for f in "$golden"/*/adapter/adapter_config.json; do
        cp -f "$f" "$corpus/$(basename "$(dirname "$(dirname "$f")")")_adapter_config.json"
      done ;;
    golden_case)
      # case.json, the separator line, expected.safetensors (fuzz/fuzz_golden_case.cpp); and
      # case.json alone (the reference's expected.safetensors is used).
      for c in gpt2_lora llama_lora_rslora; do
        cp -f "$golden/$c/case.json" "$corpus/${c}_case_only.json"
        { cat "$golden/$c/case.json"; printf '\n#expected.safetensors\n'; cat "$golden/$c/expected.safetensors"; } \
          >"$corpus/${c}_case_and_expected"
      done ;;
  esac
}

export OMP_NUM_THREADS=1 PEFT_GOLDEN_DIR="$golden"
status=0

if [ "$replay" -eq 1 ]; then
  for h in "${harnesses[@]}"; do
    bin="$build/bin/fuzz_$h"
    hang=${timeout_s:-$([ "$h" = golden_case ] && echo 60 || echo 10)}
    for f in fuzz/findings/"$h"-*; do
      [ -f "$f" ] || continue
      if out=$(PEFT_GOLDEN_DIR="$golden" "$bin" -timeout="$hang" -rss_limit_mb=2048 -malloc_limit_mb=512 "$f" 2>&1); then
        echo "fixed         $f"
      else
        status=1
        what=$(grep -aoE -m1 '(FINDING: .*|SUMMARY: [A-Za-z]+Sanitizer: [a-z-]+|runtime error: .*|ERROR: libFuzzer: [a-z -]+)' <<<"$out" || true)
        echo "still failing $f: ${what:-exit status non-zero}"
      fi
    done
  done
  exit $status
fi
summary=()
for h in "${harnesses[@]}"; do
  bin="$build/bin/fuzz_$h"
  [ -x "$bin" ] || { echo "fuzz.sh: $bin not built (drop --no-build)" >&2; exit 2; }
  dir="$work/$h"
  mkdir -p "$dir/corpus" "$dir/crashes" "$dir/logs"
  seed "$h" "$dir/corpus"
  len=${max_len:-$([ "$h" = golden_case ] && echo 262144 || echo 65536)}
  hang=${timeout_s:-$([ "$h" = golden_case ] && echo 60 || echo 10)}
  args=(-rss_limit_mb=2048 -malloc_limit_mb=512 "-timeout=$hang" "-max_len=$len"
        "-dict=fuzz/dict/$h.dict" "-artifact_prefix=$dir/crashes/" -print_final_stats=1)
  [ "$runs" -gt 0 ] && args+=("-runs=$runs")
  [ "$time_limit" -gt 0 ] && args+=("-max_total_time=$time_limit")
  rm -f "$dir"/logs/*.log
  echo "== fuzz_$h: $jobs job(s), $([ "$runs" -gt 0 ] && echo "$runs runs/job")$([ "$runs" -gt 0 ] && [ "$time_limit" -gt 0 ] && echo ", ")$([ "$time_limit" -gt 0 ] && echo "${time_limit}s"), corpus $dir/corpus"
  start=$(date +%s%N)
  pids=()
  if [ "$keep_going" -eq 1 ]; then
    "$bin" "${args[@]}" "-fork=$jobs" -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
      "$dir/corpus" >"$dir/logs/job1.log" 2>&1 &
    pids+=($!)
  else
    for j in $(seq 1 "$jobs"); do
      # One process per job, each on the shared corpus (libFuzzer's -jobs would restart jobs
      # after a crash; here a crash ends its job and is reported below).
      "$bin" "${args[@]}" "$dir/corpus" >"$dir/logs/job$j.log" 2>&1 &
      pids+=($!)
    done
  fi
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
  seconds=$(awk -v ns=$(($(date +%s%N) - start)) 'BEGIN { printf "%.1f", ns / 1e9 }')
  # "Done N runs in S second(s)", or for a job that stopped on a finding its last "#N" line.
  execs=0
  for log in "$dir"/logs/job*.log; do
    n=$(grep -aoE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    [ -n "$n" ] || n=$(grep -aoE '^#[0-9]+' "$log" | tr -d '#' | tail -1 || true)
    execs=$((execs + ${n:-0}))
  done
  crashes=$(find "$dir/crashes" -type f | wc -l)
  line=$(printf 'fuzz_%-15s %12d executions in %8s s (%d job(s)), %d artifact(s) in %s' \
    "$h" "$execs" "$seconds" "$jobs" "$crashes" "$dir/crashes")
  echo "$line"
  summary+=("$line")
  if [ "$failed" -gt 0 ] || [ "$crashes" -gt 0 ]; then
    status=1
    # What each artifact is: replayed, first report line, grouped (at most 50 replayed).
    find "$dir/crashes" -type f | head -50 | while read -r artifact; do
      what=$("$bin" -timeout="$hang" -rss_limit_mb=2048 -malloc_limit_mb=512 "$artifact" 2>&1 |
        grep -aoE -m1 '(FINDING: .*|SUMMARY: [A-Za-z]+Sanitizer: [a-z-]+|runtime error: .*|ERROR: libFuzzer: [a-z -]+|ERROR: LeakSanitizer.*|out-of-memory.*)' || true)
      # nlohmann's mangled type names make equal messages look different: dropped.
      what=$(sed -E 's/ \(N8nlohmann[^)]*\)//' <<<"${what:-(no report on replay)}")
      printf '%s\t%s\n' "$what" "$(basename "$artifact")"
    done | sort | awk -F'\t' '{ n[$1]++; if (!($1 in e)) e[$1] = $2 }
      END { for (m in n) printf "  %5d  %s  (e.g. %s)\n", n[m], m, e[m] }' | sort -rn
  fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
