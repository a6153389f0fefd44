#!/usr/bin/env bash
# README command one: the main job. Builds fedinspect, creates a development PKI, and runs a
# federation of three plants on this machine: each plant trains the detector on its own data,
# sends a q8-encoded delta, and every round's FedAvg model is versioned, signed and evaluated
# on the held-out test split. Prints a per-round table and names the data folder at the end.
#
#   scripts/run.sh                          DeepPCB if the team's copy is next to the clone,
#                                           else the embedded synthetic plants
#   scripts/run.sh --data /path/PCBData     DeepPCB (or any folder in its layout)
#   scripts/run.sh --synthetic              the embedded synthetic plants
#   scripts/run.sh --rounds 6 --codec f16   any `simulate quickstart` option (see --help)
#
# Output: .fedinspect/quickstart (OUT=... overrides). Running it again replaces the models and
# reports and reuses the keys.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

args=()
data_given=no
synthetic=no
for a in "$@"; do
  case "$a" in
    --synthetic) synthetic=yes ;;
    --data|--data=*) data_given=yes; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
team_data="$(pwd)/../shared/datasets/deeppcb/PCBData"
if [ "$data_given" = no ] && [ "$synthetic" = no ] && [ -f "$team_data/trainval.txt" ]; then
  echo "fedinspect: using the DeepPCB data at $team_data (--synthetic for the embedded plants)"
  args+=(--data "$team_data")
fi

echo "fedinspect: building (release)"
cargo build --release --quiet -p fedinspect-simulations --bin simulate
exec target/release/simulate quickstart --out "${OUT:-.fedinspect/quickstart}" "${args[@]}"
