#!/usr/bin/env bash
# Continued pretraining to long context, the MoBA paper's recipe, on Slurm:
#   1. import a Hugging Face model (safetensors; Llama 3.1-8B-class by default: RoPE scaling llama3,
#      GQA; Qwen2/2.5, Qwen3 and Mistral import the same way) into a megatron checkpoint;
#   2. switch to MoBA (chunk 4096, top-12, last 3 layers full attention) with a larger RoPE base;
#   3. context stages 128K -> 256K (-> ...), each stage starting from the previous one's weights,
#      with context parallelism growing with the sequence.
# The model, tokenizer and vocabulary flags are the imported model's own: the script asks
# `tools/convert_hf_checkpoint.py flags` for them (it reads HF_DIR's config.json and tokenizer, also
# under DRY_RUN) and passes them to every stage as MODEL_ARGS (examples/moba_model_args.sh).
#
#   HF_DIR=Meta-Llama-3.1-8B DATA_PATH=data/long bash examples/continued_pretraining_long_context.sh
#   DRY_RUN=1 HF_DIR=... bash examples/continued_pretraining_long_context.sh   # print every command
#
# Variables: HF_DIR (required), WORK (runs/long_context), NODES (8), STAGES ("131072:8 262144:16",
# i.e. seq_length:context_parallel pairs), STAGE_ITERS (1000), ROTARY_BASE (5000000), PYTHON
# (python), plus DATA_PATH (unset: mock data) and the training variables of moba_model_args.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

HF_DIR=${HF_DIR:?set HF_DIR to the Hugging Face model directory}
WORK=${WORK:-runs/long_context}
NODES=${NODES:-8}
STAGES=${STAGES:-"131072:8 262144:16"}
STAGE_ITERS=${STAGE_ITERS:-1000}
PYTHON=${PYTHON:-python}
export ROTARY_BASE=${ROTARY_BASE:-5000000} MOBA_CHUNK=4096 MOBA_TOPK=12 MOBA_FULL_LAYERS=3
export TP=${TP:-8} GLOBAL_BATCH=${GLOBAL_BATCH:-32}
export TRAIN_ITERS=$STAGE_ITERS WARMUP=${WARMUP:-50} LR=${LR:-2e-5} MIN_LR=${MIN_LR:-2e-6}
MODEL_ARGS=$("$PYTHON" tools/convert_hf_checkpoint.py flags --hf-dir "$HF_DIR")

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

run "$PYTHON" tools/convert_hf_checkpoint.py import --hf-dir "$HF_DIR" --save "$WORK/stage0"
previous=$WORK/stage0
n=0
for stage in $STAGES; do
    n=$((n + 1))
    seq=${stage%%:*}
    cp=${stage##*:}
    # Each stage starts from the previous one's weights (--finetune); a requeue resumes its own checkpoints.
    run env SEQ_LENGTH="$seq" CP="$cp" RUN_DIR="$WORK/stage$n" INIT_FROM="$previous" MODEL_ARGS="$MODEL_ARGS" \
        sbatch --wait --nodes "$NODES" --job-name "moba-long-$n" examples/slurm/pretrain_gpt_moba.sbatch
    previous=$WORK/stage$n/checkpoints
done
