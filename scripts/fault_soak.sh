#!/usr/bin/env bash
# The larger run of issue 8's crash faults: coordinator/tests/fault_kill_rounds.rs (the real
# coordinator process SIGKILLed at a random named point or time in every round, restarted on
# the same data folder, every version checked bit for bit against the canonical FedAvg) for
# several seeds of many rounds each, then one summary of all runs.
#
#   scripts/fault_soak.sh [--runs N] [--rounds N] [--seed N]
#
# Defaults: 7 runs of 200 rounds (about 5 minutes on 2 cores), seeds from the current time
# (printed; a failed run prints the command that replays it). Logs of failed runs are kept
# under target/fault_soak/.
# Exits non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=7
rounds=200
seed=$(date +%s)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "unknown argument '$1'; use --runs N, --rounds N, --seed N" >&2; exit 2 ;;
  esac
done

logs=target/fault_soak
mkdir -p "$logs"
echo "building the coordinator and the fault test (debug, as in CI)"
# The test binary itself is run below (not through cargo, which would wait on the build
# folder's lock whenever another build runs).
test_bin=$(scripts/cargo test -p fedinspect-coordinator --test fault_kill_rounds --no-run \
    --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*fault_kill_rounds[^"]*"' | tail -1 | cut -d'"' -f4) || true
if [[ -z $test_bin || ! -x $test_bin ]]; then
  echo "build failed; run: scripts/cargo test -p fedinspect-coordinator --test fault_kill_rounds --no-run" >&2
  exit 1
fi

SECONDS=0
declare -A crashes=()
passed=0 failed=0 restarts=0 checks=0 duplicates=0
for ((i = 0; i < runs; i++)); do
  s=$((seed + i))
  log="$logs/seed-$s.log"
  if FEDINSPECT_FAULT_SEED=$s FEDINSPECT_FAULT_ROUNDS=$rounds \
      "$test_bin" --nocapture >"$log" 2>&1; then
    passed=$((passed + 1))
    summary=$(grep '^fault summary:' "$log")
    echo "seed $s: ${summary#fault summary: }"
    restarts=$((restarts + $(sed -E 's/.*restarts ([0-9]+).*/\1/' <<<"$summary")))
    checks=$((checks + $(sed -E 's/.*checks ([0-9]+).*/\1/' <<<"$summary")))
    duplicates=$((duplicates + $(sed -E 's/.*duplicates answered ([0-9]+).*/\1/' <<<"$summary")))
    while IFS=$'\t' read -r point n; do
      crashes[$point]=$(( ${crashes[$point]:-0} + n ))
    done < <(grep -o '"[^"]*": [0-9]*' <<<"$summary" | sed -E 's/^"([^"]*)": ([0-9]+)$/\1\t\2/')
    rm -f "$log"
  else
    failed=$((failed + 1))
    echo "seed $s: FAILED; log kept in $log; replay with:"
    echo "  FEDINSPECT_FAULT_SEED=$s FEDINSPECT_FAULT_ROUNDS=$rounds scripts/cargo test -p fedinspect-coordinator --test fault_kill_rounds -- --nocapture"
  fi
done
wall=$SECONDS

echo
echo "fault soak summary"
echo "  runs: $runs (passed $passed, failed $failed), rounds per run: $rounds, rounds in total: $((passed * rounds)) passed"
echo "  seeds: $seed..$((seed + runs - 1))"
total=0
while IFS= read -r point; do
  [[ -n $point ]] || continue
  n=${crashes[$point]}
  printf '  crashes: %-34s %6d\n' "$point" "$n"
  total=$((total + n))
done < <(printf '%s\n' "${!crashes[@]}" | sort)
echo "  crashes in total: $total, restarts: $restarts, admin checks: $checks (all without a problem)"
echo "  duplicates answered to updates sent again: $duplicates"
echo "  mismatches (lost, doubled or differing versions; inconsistent checks): $failed failed runs"
echo "  wall time: $wall s"
[[ $failed -eq 0 ]]
