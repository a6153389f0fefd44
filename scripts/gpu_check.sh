#!/usr/bin/env bash
# The GPU check of issue 3 (benchmark 4): training images/s and inference latency (batch 1 and
# 8, 640x640) of the fedinspect detector on one CUDA GPU, next to the same architecture in
# plain PyTorch (scripts/bench_train_pytorch.py) in the same run. Prints figures; about 2 min.
#
#   scripts/gpu_check.sh [CLIENT_BINARY]      default target/release/client
#
# Needs an NVIDIA GPU and python3 with torch 2.11.0 (a CUDA build; PyPI's default is CUDA 13).
# The client binary is built elsewhere (`scripts/cargo build --release -p fedinspect-client`)
# and finds this machine's LibTorch through LD_LIBRARY_PATH, set here from python3's torch.
# FEDINSPECT_PYTHON picks another interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/client}"
PY="${FEDINSPECT_PYTHON:-python3}"
[ -x "$BIN" ] || { echo "no client binary at $BIN: build it with scripts/cargo build --release -p fedinspect-client" >&2; exit 2; }
TORCH_LIB=$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { echo "$PY has no torch: install torch==2.11.0 (CUDA build)" >&2; exit 2; }
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0))'
nproc

status=0
for batch in 8 32; do
  echo "== training batch $batch (320x320 crops), autocast float16; inference batch 1 and 8 (640x640)"
  echo "-- fedinspect (tch)"
  "$BIN" bench --device cuda --train-batch "$batch" --train-steps 60 --infer-batches 1,8 --infer-iters 200 --json || status=1
  echo "-- PyTorch (same architecture, same run)"
  "$PY" scripts/bench_train_pytorch.py --device cuda --batch "$batch" --steps 60 --warmup 5 \
    --infer-batches 1,8 --infer-iters 200 || status=1
done
echo "== float32 training (no autocast), batch 32"
"$BIN" bench --device cuda --train-batch 32 --train-steps 40 --no-mixed-precision --infer-batches 1 --infer-iters 100 || status=1
exit $status
