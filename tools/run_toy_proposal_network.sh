#!/usr/bin/env bash
# Train the toy image encoder (configs/toy/proposal_network_R50_tiny.yaml) on toy_shapes_train
# and evaluate it, class-agnostically, on toy_shapes_val: box and mask AP, AR@100.
#
#   bash tools/run_toy_proposal_network.sh [OUTPUT_DIR] [KEY VALUE ...]
#
# Generates the toy dataset first if it is missing (datasets/toy_shapes, ~15 s). Training is
# sized to take at most 10 minutes on a 2-core CPU; the evaluation adds ~15 s. Extra
# KEY VALUE pairs override the config (e.g. SOLVER.MAX_ITER 100 for a quick look).
# --resume: run again, an interrupted run continues from its last checkpoint and a
# finished one is only evaluated again (a fresh run needs a new OUTPUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-output/toy_proposal_network}
shift || true

"$PY" tools/make_toy_dataset.py
start=$(date +%s)
"$PY" tools/train_net.py --resume --config-file configs/toy/proposal_network_R50_tiny.yaml \
    OUTPUT_DIR "$OUT" "$@"
echo "[toy] training + evaluation took $(( $(date +%s) - start )) s; log: $OUT/log.txt"
