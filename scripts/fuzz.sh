#!/usr/bin/env bash
# Runs every fuzz target of common/fuzz (cargo fuzz, libFuzzer) for SECONDS each.
#
#   scripts/fuzz.sh [SECONDS]        default 60 per target; CI uses about 20
#   FUZZ_TARGETS="delta_decode onnx_decode" scripts/fuzz.sh 600   only these targets
#   FUZZ_OPTIONAL=1 scripts/fuzz.sh  without nightly or cargo-fuzz: a loud SKIPPED line, exit 0
#
# Needs the nightly toolchain (AddressSanitizer and libFuzzer's instrumentation are nightly-only)
# and cargo-fuzz (`cargo install cargo-fuzz --locked`, tested with 0.13.2). Without them it says
# what is missing and exits 1, unless FUZZ_OPTIONAL=1.
#
# The kept corpus (common/fuzz/corpus/<target>/) is read, never written: new inputs go to a
# work corpus under $FUZZ_WORK (default common/fuzz/target/corpus-work/<target>/), which the
# next run starts from. A crash is saved under common/fuzz/artifacts/<target>/ and ends the run
# with exit 1; docs/reliability.md says how it becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: SECONDS must be a positive whole number of seconds, got '$seconds'" >&2
    exit 2
fi
fuzz_dir=common/fuzz
all_targets=(delta_decode safetensors_read bundle_manifest bundle_archive onnx_decode
    proto_messages)
read -r -a targets <<<"${FUZZ_TARGETS:-${all_targets[*]}}"
work="${FUZZ_WORK:-$fuzz_dir/target/corpus-work}"

missing=()
if ! cargo +nightly --version >/dev/null 2>&1; then
    missing+=("the nightly Rust toolchain (rustup toolchain install nightly)")
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    missing+=("cargo-fuzz (cargo install cargo-fuzz --locked)")
fi
if ((${#missing[@]})); then
    reason="fuzzing needs $(printf '%s; ' "${missing[@]}")"
    if [[ "${FUZZ_OPTIONAL:-0}" == 1 ]]; then
        echo "################################################################" >&2
        echo "### SKIPPED: fuzz targets NOT run: ${reason%; }" >&2
        echo "################################################################" >&2
        exit 0
    fi
    echo "error: ${reason%; }; install them, or set FUZZ_OPTIONAL=1 to skip with a warning" >&2
    exit 1
fi

# Same flags for build and run, or cargo fuzz rebuilds: release, debug assertions and
# overflow checks on, AddressSanitizer (the default).
flags=(--fuzz-dir "$fuzz_dir" -a)
echo "fuzz: $(cargo fuzz --version), $(cargo +nightly --version)"
echo "fuzz: building ${#targets[@]} targets"
cargo +nightly fuzz build "${flags[@]}"

# libFuzzer options: hangs over 10 s and single allocations over 2 GiB are failures.
lf_opts=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048
    -print_final_stats=1)
summary=()
failed=()
for t in "${targets[@]}"; do
    if [[ ! -d "$fuzz_dir/corpus/$t" ]]; then
        echo "error: no target '$t' (no $fuzz_dir/corpus/$t); targets: ${all_targets[*]}" >&2
        exit 2
    fi
    mkdir -p "$work/$t"
    dict=()
    [[ -f "$fuzz_dir/dictionaries/$t.dict" ]] && dict=(-dict="$fuzz_dir/dictionaries/$t.dict")
    log="$work/$t.log"
    echo "fuzz: $t for ${seconds}s (log $log)"
    status=0
    cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" "$fuzz_dir/corpus/$t" -- \
        "${lf_opts[@]}" "${dict[@]}" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corpus=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    line=$(printf '%-18s %10s runs %7s exec/s  cov %6s  corpus %5s' \
        "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${corpus:-?}")
    if ((status != 0)); then
        failed+=("$t")
        line+="  FAILED (exit $status)"
        echo "---- $t failed; what went wrong, from its log:" >&2
        grep -a -A2 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)|==ERROR" "$log" | head -n 20 >&2 || true
        grep -a -E "^(Failing input:|\s+common/fuzz/artifacts/)" "$log" >&2 || true
    fi
    summary+=("$line")
done

echo
echo "fuzz summary (${seconds}s per target):"
printf '  %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "fuzz: FAILED: ${failed[*]}; the inputs are under $fuzz_dir/artifacts/<target>/." >&2
    echo "fuzz: minimise one with" >&2
    echo "fuzz:   cargo +nightly fuzz tmin --fuzz-dir $fuzz_dir -a <target> <file>," >&2
    echo "fuzz: copy it to $fuzz_dir/regressions/<target>/, fix the bug (docs/reliability.md)." >&2
    exit 1
fi
