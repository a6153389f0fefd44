#!/usr/bin/env bash
# README command two: runs every test of the workspace on a fresh machine.
# Installs torch==2.11.0 into the cache when missing (once), then `cargo test --workspace`.
# Tests create their own PKI, sled databases and data in temporary folders; tests that read
# the DeepPCB data look for it at $FEDINSPECT_DEEPPCB or ../shared/datasets/deeppcb/PCBData.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export FEDINSPECT_DEEPPCB="${FEDINSPECT_DEEPPCB:-$(pwd)/../shared/datasets/deeppcb/PCBData}"
exec cargo test --workspace "$@"
