#!/usr/bin/env bash
# Train the toy Uni-Perceiver v2 (configs/toy/uni_perceiver_v2_R50_tiny.yaml) on
# toy_shapes_train and evaluate it on toy_shapes_val with detectron2's COCOEvaluator: box and
# mask AP over the 10 categories, each region classified by comparing its decoded feature
# with the decoded category names (the unified class-embedding path).
#
#   bash tools/run_toy_uni_perceiver_v2.sh [OUTPUT_DIR] [KEY VALUE ...]
#
# Generates what is missing first: the toy dataset ($DETECTRON2_DATASETS/toy_shapes, ~15 s)
# and its BPE tokenizer (~2 s). Training is sized to take at most 15 minutes on a 2-core
# CPU; the evaluation adds ~20 s. Extra KEY VALUE pairs override the config.
# --resume: run again, an interrupted run continues from its last checkpoint and a
# finished one is only evaluated again (a fresh run needs a new OUTPUT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-output/toy_uni_perceiver_v2}
shift || true
TOY_ROOT=${DETECTRON2_DATASETS:-datasets}/toy_shapes

"$PY" tools/make_toy_dataset.py
"$PY" tools/train_toy_tokenizer.py
start=$(date +%s)
"$PY" tools/train_net.py --resume --config-file configs/toy/uni_perceiver_v2_R50_tiny.yaml \
    MODEL.TEXT_ENCODER.TOKENIZER "$TOY_ROOT/tokenizer" OUTPUT_DIR "$OUT" "$@"
echo "[toy] training + evaluation took $(( $(date +%s) - start )) s; log: $OUT/log.txt"
