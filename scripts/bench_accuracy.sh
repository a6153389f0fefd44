#!/usr/bin/env bash
# Issue 3, benchmark 2: accuracy on DeepPCB after a fixed training time, fedinspect's detector
# (tch, default architecture) against the team's PyTorch baseline in the same invocation.
#
#   scripts/bench_accuracy.sh [--data PCBData] [--minutes 30] [--mode parallel|sequential] [--out DIR]
#
# --mode parallel (default): both train at once, each pinned to its own core with one thread.
#   Fair when the machine is shared: whatever else runs slows both alike.
# --mode sequential: ours, then the baseline, each with two threads: the baseline README's
#   protocol; use it on an otherwise idle machine.
# Both train on the official train split (trainval.txt) from 320x320 crops, batch 8, AdamW 2e-3
# with warmup and cosine decay over the time budget, then evaluate on the full official test
# split at 640x640, and on its four test-only boards (groups 12000, 12100, 12300, 90100).
# Ours is also snapshotted every 5 minutes and each snapshot evaluated (mAP against wall time).
# Output: DIR (default target/bench-accuracy) with logs, checkpoints, JSON reports, summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

DATA="$(pwd)/../shared/datasets/deeppcb/PCBData"
MINUTES=30
MODE=parallel
OUT=target/bench-accuracy
BASELINE="$(pwd)/../shared/baselines/deeppcb_centernet.py"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --minutes) MINUTES="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --baseline) BASELINE="$2"; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -f "$DATA/trainval.txt" ] || { echo "no DeepPCB at $DATA (trainval.txt missing): pass --data /path/to/PCBData" >&2; exit 2; }
[ -f "$BASELINE" ] || { echo "no baseline script at $BASELINE: pass --baseline PATH" >&2; exit 2; }
"$FEDINSPECT_PYTHON" -c "import PIL" 2>/dev/null || "$FEDINSPECT_PYTHON" -m pip install --quiet pillow

echo "building the client (release)"
cargo build --release --quiet -p fedinspect-client --bin client
BIN="$(pwd)/target/release/client"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/ours*.safetensors "$OUT"/*.json

case "$MODE" in
  parallel) OURS_PIN=(taskset -c 0); BASE_PIN=(taskset -c 1); THREADS=1 ;;
  sequential) OURS_PIN=(); BASE_PIN=(); THREADS=2 ;;
  *) echo "--mode parallel or sequential" >&2; exit 2 ;;
esac

run_ours() {
  "${OURS_PIN[@]}" "$BIN" train --data "$DATA" --minutes "$MINUTES" --threads "$THREADS" \
    --device cpu --out "$OUT/ours.safetensors" > "$OUT/ours-train.log" 2>&1 &
  local pid=$! t=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 60; t=$((t + 1))
    if [ $((t % 5)) -eq 0 ] && [ -f "$OUT/ours.safetensors" ]; then
      cp "$OUT/ours.safetensors" "$OUT/ours.t${t}min.safetensors"   # written atomically by train
    fi
  done
  wait "$pid"
}
run_baseline() {
  "${BASE_PIN[@]}" "$FEDINSPECT_PYTHON" -c "
import runpy, sys, torch
torch.set_num_threads($THREADS); torch.set_num_threads = lambda n: None
sys.argv = ['$BASELINE', '$DATA', '$MINUTES', '$OUT/baseline.json']
runpy.run_path('$BASELINE', run_name='__main__')" > "$OUT/baseline.log" 2>&1
}

echo "training for $MINUTES min ($MODE, $THREADS thread(s) each); logs in $OUT"
start=$(date +%s)
if [ "$MODE" = parallel ]; then
  run_ours & ours_pid=$!
  run_baseline & base_pid=$!
  wait "$ours_pid"; wait "$base_pid"
else
  run_ours
  run_baseline
fi
echo "training done after $(( ($(date +%s) - start) / 60 )) min; evaluating"

unseen=group12000,group12100,group12300,group90100
"$BIN" eval --data "$DATA" --checkpoint "$OUT/ours.safetensors" --threads 2 --json > "$OUT/ours-eval.json"
"$BIN" eval --data "$DATA" --checkpoint "$OUT/ours.safetensors" --threads 2 --groups "$unseen" --json > "$OUT/ours-unseen.json"
for snap in "$OUT"/ours.t*min.safetensors; do
  [ -f "$snap" ] || continue
  "$BIN" eval --data "$DATA" --checkpoint "$snap" --threads 2 --json > "${snap%.safetensors}.json"
done

"$FEDINSPECT_PYTHON" - "$OUT" "$MODE" "$MINUTES" <<'PY' | tee "$OUT/summary.md"
import glob, json, os, re, sys
out, mode, minutes = sys.argv[1], sys.argv[2], sys.argv[3]
ours = json.load(open(f"{out}/ours-eval.json")); unseen = json.load(open(f"{out}/ours-unseen.json"))
base = json.load(open(f"{out}/baseline.json"))
log = open(f"{out}/ours-train.log").read()
m = re.findall(r"done: (\d+) steps", log)
steps = int(m[-1]) if m else None
print(f"# DeepPCB accuracy after {minutes} min of training ({mode})\n")
print("| | fedinspect (tch) | PyTorch baseline |\n|---|---|---|")
print(f"| params | {ours.get('params', 'see log')} | {base['params']} |")
print(f"| optimizer steps of 8 | {steps} | {base['steps']} |")
print(f"| map_33 (test split) | {ours['map_33']:.3f} | {base['map_33']:.3f} |")
print(f"| map_50 | {ours['map_50']:.3f} | {base['map_50']:.3f} |")
print(f"| map_50_95 | {ours['map_50_95']:.3f} | not computed |")
print(f"| map_33 on the 4 test-only boards | {unseen['map_33']:.3f} | {base['unseen_map_33']:.3f} |")
print(f"| map_50 on the 4 test-only boards | {unseen['map_50']:.3f} | {base['unseen_map_50']:.3f} |")
print(f"| eval seconds per image | {ours['seconds'] / ours['images']:.3f} | {base['eval_s_per_image']:.3f} |")
print("\nfedinspect against wall time:\n\n| minutes | map_33 | map_50 | map_50_95 |\n|---|---|---|---|")
snaps = sorted(glob.glob(f"{out}/ours.t*min.json"), key=lambda p: int(re.search(r"t(\d+)min", p).group(1)))
for p in snaps:
    r = json.load(open(p)); t = re.search(r"t(\d+)min", p).group(1)
    print(f"| {t} | {r['map_33']:.3f} | {r['map_50']:.3f} | {r['map_50_95']:.3f} |")
print(f"| {minutes} (final) | {ours['map_33']:.3f} | {ours['map_50']:.3f} | {ours['map_50_95']:.3f} |")
PY
