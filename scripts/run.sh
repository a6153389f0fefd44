#!/usr/bin/env bash
# README command one: the main job. Builds fedinspect, creates a development PKI, and runs a
# federation on this machine as real processes: `coordinator serve` and three `client run`
# plants over mutual TLS on 127.0.0.1. Each plant trains the detector on its own data and
# sends a q8-encoded delta; every round's FedAvg model is versioned and signed by the
# coordinator, exported through its admin service and evaluated on the held-out test split.
# Prints a per-round table and names the data folder (models, logs) at the end. Ctrl-C stops
# every process.
#
#   scripts/run.sh                          the embedded synthetic plants (the default)
#   scripts/run.sh --data /path/PCBData     DeepPCB (or any folder in its layout): three plants,
#                                           one board group each
#   scripts/run.sh --rounds 6 --codec f16   any `simulate quickstart` option (see --help)
#
# Output: .fedinspect/quickstart (OUT=... overrides). Running it again replaces the previous
# run (coordinator data, plant state, models, logs) and reuses the keys and generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

data_given=no
for a in "$@"; do
  case "$a" in
    --data|--data=*) data_given=yes ;;
  esac
done
if [ "$data_given" = no ]; then
  echo "fedinspect: no --data: the embedded synthetic plants; for real PCB data run"
  echo "fedinspect:   scripts/run.sh --data /path/to/deeppcb/PCBData"
fi

echo "fedinspect: building (release)"
cargo build --release --quiet -p fedinspect-simulations -p fedinspect-coordinator \
  -p fedinspect-client --bin simulate --bin coordinator --bin client
exec target/release/simulate quickstart --out "${OUT:-.fedinspect/quickstart}" "$@"
