#!/usr/bin/env bash
# with_mpirun.sh MPIRUN [FLAGS...] -- COMMAND [ARGS...]: runs COMMAND after checking that this
# machine can start an MPI job at all (`mpirun -np 2 true`). Where it cannot (a sandbox without
# shared memory or process control), the test is skipped (exit 77, ctest SKIP_RETURN_CODE) with
# mpirun's own message, instead of failing for a reason outside the project.
set -uo pipefail
mpirun=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpirun+=("$1"); shift; done
shift
if ! probe=$("${mpirun[@]}" -np 2 true 2>&1); then
  echo "mpirun cannot start a 2-rank job on this machine; skipped:"
  echo "$probe" | head -20
  exit 77
fi
exec "$@"
