#!/usr/bin/env bash
# Compiles real TensorRT engines from a fedinspect bundle and measures their latency with
# NVIDIA's trtexec. For anyone WITH TensorRT (it cannot be installed where fedinspect is
# developed); docs/bundles.md, "TensorRT", says how to run it and read it.
#
#   scripts/trt_build_and_time.sh BUNDLE_DIR [OUT_DIR]
#
# BUNDLE_DIR is a bundle folder (manifest.json, model-fp32.onnx, ...), e.g. the coordinator's
# <data_dir>/bundles/<bundle id>/ or a plant's <state>/bundles/<bundle id>/bundle/. The ONNX
# files are checked against the manifest's SHA-256 first. For each precision it runs
#   trtexec --onnx=... --saveEngine=OUT/engine-<p>.plan --timingCacheFile=OUT/timing.cache
#           --skipInference --minShapes/--optShapes=<input>:1xCxHxW --maxShapes=<input>:<max_batch>xCxHxW
#           (fp16: --fp16; int8: --int8 --fp16 on the QDQ ONNX; fp32: no flag)
# then times the engine at batch BATCH:
#   trtexec --loadEngine=OUT/engine-<p>.plan --shapes=<input>:BATCHxCxHxW
#           --iterations=ITERATIONS --avgRuns=AVG_RUNS --warmUp=WARMUP_MS --duration=0
# and prints trtexec's latency, GPU compute time and throughput lines, one block per
# precision, plus OUT/summary.txt. Logs: OUT/build-<p>.log, OUT/time-<p>.log.
#
# Environment: TRTEXEC (default: trtexec on the PATH), PRECISIONS (default "fp32 fp16 int8"),
# BATCH (1), ITERATIONS (1000), AVG_RUNS (100), WARMUP_MS (500), BUILD_TIMEOUT_S (1800).
# ALLOW_STANDIN=1 lets scripts/trtexec-standin run it, to check this script's plumbing only:
# the stand-in measures nothing and its figures print as nan.
set -euo pipefail

die() { echo "trt_build_and_time: $*" >&2; exit 2; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 BUNDLE_DIR [OUT_DIR]"
bundle="$1"
out="${2:-${bundle%/}-trt}"
[[ -f "$bundle/manifest.json" ]] || die "$bundle has no manifest.json; pass a bundle folder"
command -v python3 >/dev/null || die "python3 is needed to read manifest.json; install it"
trtexec="${TRTEXEC:-$(command -v trtexec || true)}"
[[ -n "$trtexec" && -x "$trtexec" ]] || die "trtexec not found; put TensorRT's bin/ on the PATH or set TRTEXEC=/path/to/trtexec"
precisions="${PRECISIONS:-fp32 fp16 int8}"
batch="${BATCH:-1}"
iterations="${ITERATIONS:-1000}"
avg_runs="${AVG_RUNS:-100}"
warmup="${WARMUP_MS:-500}"
build_timeout="${BUILD_TIMEOUT_S:-1800}"

banner="$("$trtexec" --help 2>&1 | head -n 5 || true)"
if grep -q "STAND-IN" <<<"$banner"; then
    [[ "${ALLOW_STANDIN:-0}" == "1" ]] || die "$trtexec is the fedinspect stand-in, not TensorRT; its figures would mean nothing (ALLOW_STANDIN=1 to test this script)"
    echo "WARNING: running the trtexec STAND-IN: no engine is built, nothing is measured" >&2
fi

# Input name, C, H, W, max batch, and the ONNX files with their manifest hashes.
read -r input c h w max_batch < <(python3 - "$bundle/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
i = m["input"]
_, c, h, w = i["shape"]
print(i["name"], c, h, w, i["max_batch"])
EOF
)
onnx_hash() { # role -> "name sha256" or nothing
    python3 - "$bundle/manifest.json" "$1" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for f in m["files"]:
    if f["role"] == sys.argv[2]:
        print(f["name"], f["sha256"])
EOF
}

mkdir -p "$out"
summary="$out/summary.txt"
{
    echo "bundle: $bundle"
    echo "trtexec: $trtexec ($(grep -o 'TensorRT v[0-9]*' <<<"$banner" | head -n 1))"
    if command -v nvidia-smi >/dev/null; then
        echo "gpu: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -n 1)"
    fi
    echo "input: $input ${batch}x${c}x${h}x${w} (engines built for batch 1..$max_batch)"
} > "$summary"

for p in $precisions; do
    case "$p" in
        fp32) role=onnx-fp32; flags=() ;;
        fp16) role=onnx-fp32; flags=(--fp16) ;;
        int8) role=onnx-int8-qdq; flags=(--int8 --fp16) ;;
        *) die "precision '$p' is not fp32, fp16 or int8" ;;
    esac
    name="" sha=""
    read -r name sha < <(onnx_hash "$role" || true) || true
    if [[ -z "$name" ]]; then
        echo "$p: skipped, the bundle has no $role file (INT8 needs calibration ranges)" | tee -a "$summary"
        continue
    fi
    actual="$(sha256sum "$bundle/$name" | cut -d' ' -f1)"
    [[ "$actual" == "$sha" ]] || die "$bundle/$name has SHA-256 $actual but the manifest says $sha; verify the bundle first"
    engine="$out/engine-$p.plan"
    echo "== $p: building $engine from $name" >&2
    if ! timeout "$build_timeout" "$trtexec" --onnx="$bundle/$name" --saveEngine="$engine" \
        --timingCacheFile="$out/timing.cache" --skipInference \
        --minShapes="$input:1x${c}x${h}x${w}" --optShapes="$input:1x${c}x${h}x${w}" \
        --maxShapes="$input:${max_batch}x${c}x${h}x${w}" "${flags[@]}" > "$out/build-$p.log" 2>&1; then
        echo "$p: build failed, see $out/build-$p.log; it ends with:" | tee -a "$summary"
        tail -n 20 "$out/build-$p.log" | tee -a "$summary"
        continue
    fi
    [[ -s "$engine" ]] || die "trtexec wrote no engine for $p; see $out/build-$p.log"
    echo "== $p: timing at batch $batch" >&2
    "$trtexec" --loadEngine="$engine" --shapes="$input:${batch}x${c}x${h}x${w}" \
        --iterations="$iterations" --avgRuns="$avg_runs" --warmUp="$warmup" --duration=0 \
        > "$out/time-$p.log" 2>&1 || { echo "$p: timing failed, see $out/time-$p.log" | tee -a "$summary"; continue; }
    {
        echo "$p: engine $(stat -c %s "$engine") bytes"
        grep -E "\] (Throughput|Latency|GPU Compute Time):" "$out/time-$p.log" | sed -E 's/^.*\] /  /'
    } | tee -a "$summary"
done
echo "summary: $summary" >&2
