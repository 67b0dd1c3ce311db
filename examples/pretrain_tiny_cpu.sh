#!/usr/bin/env bash
# Tiny MoBA pretraining on CPU: what `make demo` runs.
#
#   bash examples/pretrain_tiny_cpu.sh                 # ~6 minutes on 2 cores
#   DRY_RUN=1 bash examples/pretrain_tiny_cpu.sh       # print the resolved command only
#
# Variables: OUT (runs/demo), TRAIN_ITERS (200), PYTHON (python3; .venv/bin/python if present).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/demo}
TRAIN_ITERS=${TRAIN_ITERS:-200}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

cmd=("$PYTHON" examples/demo_pretrain.py --out "$OUT" --train-iters "$TRAIN_ITERS")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
