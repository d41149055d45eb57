#!/usr/bin/env bash
# Train the toy generalist on one task alone on toy_shapes and evaluate it on the 200 val
# images (configs/toy/<TASK>_R50_tiny.yaml; sized for at most 10 minutes of training on a
# 2-core CPU):
#
#   bash tools/run_toy_task.sh TASK [OUTPUT_DIR] [KEY VALUE ...]      TASK: classification
#
# Generates what is missing first (the toy dataset, its BPE tokenizer). --resume: an
# interrupted run continues from its last checkpoint and a finished one is only evaluated
# again (a fresh run needs a new OUTPUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TASK=${1:?usage: bash tools/run_toy_task.sh TASK [OUTPUT_DIR] [KEY VALUE ...]}
CONFIG=configs/toy/${TASK}_R50_tiny.yaml
[ -f "$CONFIG" ] || { echo "no toy config $CONFIG for task '$TASK'" >&2; exit 2; }
OUT=${2:-output/toy_${TASK}}
shift $(( $# >= 2 ? 2 : 1 ))
TOY_ROOT=${DETECTRON2_DATASETS:-datasets}/toy_shapes

"$PY" tools/make_toy_dataset.py
"$PY" tools/train_toy_tokenizer.py
start=$(date +%s)
"$PY" tools/train_net.py --resume --config-file "$CONFIG" \
    MODEL.TEXT_ENCODER.TOKENIZER "$TOY_ROOT/tokenizer" OUTPUT_DIR "$OUT" "$@"
echo "[toy] $TASK: training + evaluation took $(( $(date +%s) - start )) s; log: $OUT/log.txt"
