#!/usr/bin/env bash
# MoBA pretraining of a ~1B GPT at 32K context on one 8-GPU node (torchrun).
#
#   DATA_PATH=data/corpus TOKENIZER_MODEL=data/spm.model bash examples/pretrain_gpt_moba_single_node.sh
#   TP=2 CP=2 ATTENTION=full DATA_PATH=... bash examples/pretrain_gpt_moba_single_node.sh   # the dense baseline
#   MOCK_DATA=1 DRY_RUN=1 bash examples/pretrain_gpt_moba_single_node.sh       # print the command only
#
# Variables (defaults): GPUS (8), TP (1), PP (1), CP (1), SEQ_LENGTH (32768), MOBA_CHUNK (512),
# MOBA_TOPK (3), ATTENTION (moba), DATA_PATH (or MOCK_DATA=1: random tokens), TOKENIZER_MODEL, RUN_DIR
# (runs/moba_1b), plus the model/training variables in examples/moba_model_args.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/moba_model_args.sh
source examples/moba_model_args.sh

GPUS=${GPUS:-8}
RUN_DIR=${RUN_DIR:-runs/moba_1b}
cmd=(torchrun --standalone --nproc-per-node "$GPUS" -m megatron_moba.pretrain "${TRAIN_ARGS[@]}"
     --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --tensorboard-dir "$RUN_DIR/tensorboard"
     --metrics-file "$RUN_DIR/metrics.jsonl")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
mkdir -p "$RUN_DIR"
exec "${cmd[@]}"
