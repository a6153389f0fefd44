#!/usr/bin/env bash
# Installs torch==2.11.0 (the LibTorch that tch 0.24 is built for) and onnxruntime (the
# reference runtime the ONNX export is checked against) into a cache outside the clone, once,
# and prints the environment the build needs.
#
#   scripts/install-torch.sh            install if missing, print `export` lines
#   eval "$(scripts/install-torch.sh)"  install if missing and set the variables
#
# torch-sys finds torch by running `python` from the active venv, hence VIRTUAL_ENV and PATH.
# The cache is $FEDINSPECT_CACHE (default ~/.cache/fedinspect); the venv lives in
# $FEDINSPECT_CACHE/torch-2.11.0. Delete that folder to force a reinstall. A venv made before
# onnxruntime joined the list gets onnxruntime added in place; torch is not reinstalled.
set -euo pipefail
TORCH_VERSION=2.11.0
# 1.31.1 has CPython 3.11 wheels for manylinux x86_64 and works with numpy 2.
ONNXRUNTIME_VERSION=1.31.1
CACHE="${FEDINSPECT_CACHE:-$HOME/.cache/fedinspect}"
VENV="$CACHE/torch-$TORCH_VERSION"
PY="$VENV/bin/python"

have_torch() {
  [ -x "$PY" ] && "$PY" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null
}

# Reads the installed version from package metadata: no import, so it costs milliseconds.
have_onnxruntime() {
  "$PY" -c "import importlib.metadata as m,sys; sys.exit(0 if m.version('onnxruntime')=='$ONNXRUNTIME_VERSION' else 1)" 2>/dev/null
}

if ! have_torch; then
  echo "fedinspect: installing torch==$TORCH_VERSION into $VENV (about 4.7 GB, once)" >&2
  mkdir -p "$CACHE"
  rm -rf "$VENV.partial"
  python3 -m venv "$VENV.partial"
  "$VENV.partial/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$VENV.partial/bin/python" -m pip install --quiet --disable-pip-version-check \
      "torch==$TORCH_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION" numpy safetensors >&2
  # venvs hard-code their own path: recreate in place after the move so scripts keep working
  rm -rf "$VENV"
  mv "$VENV.partial" "$VENV"
  python3 -m venv --upgrade "$VENV" >&2
  have_torch || { echo "fedinspect: torch install in $VENV failed; remove it and rerun $0" >&2; exit 1; }
fi

if ! have_onnxruntime; then
  # Several builds may source this at once: one installs, the others wait for it.
  exec 9>"$CACHE/onnxruntime.lock"
  flock 9
  if ! have_onnxruntime; then
    echo "fedinspect: adding onnxruntime==$ONNXRUNTIME_VERSION to $VENV (about 20 MB, once)" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "onnxruntime==$ONNXRUNTIME_VERSION" >&2
    have_onnxruntime || { echo "fedinspect: onnxruntime install in $VENV failed; rerun $0 and read pip's error" >&2; exit 1; }
  fi
  flock -u 9
  exec 9>&-
fi

TORCH_LIB="$("$PY" -c 'import torch,os; print(os.path.join(os.path.dirname(torch.__file__),"lib"))')"
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export VIRTUAL_ENV=$VENV"
echo "export PATH=$VENV/bin:\$PATH"
echo "export FEDINSPECT_PYTHON=$PY"
echo "export FEDINSPECT_TORCH_LIB=$TORCH_LIB"
