#!/usr/bin/env bash
# Continued pretraining to long context, the MoBA paper's recipe, on Slurm:
#   1. import a Llama-3.1-8B-class HF model (safetensors) into a megatron checkpoint;
#   2. switch to MoBA (chunk 4096, top-12, last 3 layers full attention) with a larger RoPE base;
#   3. context stages 128K -> 256K (-> ...), each stage starting from the previous one's weights,
#      with context parallelism growing with the sequence.
#
#   HF_DIR=Meta-Llama-3.1-8B DATA_PATH=data/long TOKENIZER_MODEL=Meta-Llama-3.1-8B \
#       bash examples/continued_pretraining_long_context.sh
#   DRY_RUN=1 HF_DIR=... bash examples/continued_pretraining_long_context.sh   # print every command
#
# Variables: HF_DIR (required), WORK (runs/long_context), NODES (8), STAGES ("131072:8 262144:16",
# i.e. seq_length:context_parallel pairs), STAGE_ITERS (1000), ROTARY_BASE (5000000), plus
# DATA_PATH/TOKENIZER_MODEL. Uses TokenizerType HuggingFaceTokenizer by default.
set -euo pipefail
cd "$(dirname "$0")/.."

HF_DIR=${HF_DIR:?set HF_DIR to the Hugging Face model directory}
WORK=${WORK:-runs/long_context}
NODES=${NODES:-8}
STAGES=${STAGES:-"131072:8 262144:16"}
STAGE_ITERS=${STAGE_ITERS:-1000}
export TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
export ROTARY_BASE=${ROTARY_BASE:-5000000} MOBA_CHUNK=4096 MOBA_TOPK=12 MOBA_FULL_LAYERS=3
export NUM_LAYERS=${NUM_LAYERS:-32} HIDDEN=${HIDDEN:-4096} FFN_HIDDEN=${FFN_HIDDEN:-14336}
export HEADS=${HEADS:-32} KV_GROUPS=${KV_GROUPS:-8} TP=${TP:-8} GLOBAL_BATCH=${GLOBAL_BATCH:-32}
export TRAIN_ITERS=$STAGE_ITERS WARMUP=${WARMUP:-50} LR=${LR:-2e-5} MIN_LR=${MIN_LR:-2e-6}

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

run python tools/convert_hf_checkpoint.py import --hf-dir "$HF_DIR" --save "$WORK/stage0"
previous=$WORK/stage0
n=0
for stage in $STAGES; do
    n=$((n + 1))
    seq=${stage%%:*}
    cp=${stage##*:}
    # Each stage starts from the previous one's weights (--finetune); a requeue resumes its own checkpoints.
    run env SEQ_LENGTH="$seq" CP="$cp" RUN_DIR="$WORK/stage$n" INIT_FROM="$previous" \
        sbatch --wait --nodes "$NODES" --job-name "moba-long-$n" examples/slurm/pretrain_gpt_moba.sbatch
    previous=$WORK/stage$n/checkpoints
done
