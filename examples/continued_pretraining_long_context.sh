#!/usr/bin/env bash
# Continued pretraining to long context, the MoBA paper's recipe, on Slurm:
#   1. import a Hugging Face model (safetensors; Llama 3.1-8B-class by default: RoPE scaling llama3,
#      GQA; Qwen2/2.5, Qwen3 and Mistral import the same way) into a megatron checkpoint, with srun on
#      a compute node;
#   2. switch to MoBA (chunk 4096, top-12, last 3 layers full attention) with a larger RoPE base;
#   3. context stages 128K -> 256K (-> ...), each stage starting from the previous one's weights,
#      with context parallelism growing with the sequence;
#   4. export the last stage to Hugging Face format (srun on a compute node).
# The model, tokenizer and vocabulary flags are the imported model's own: the script asks
# `tools/convert_hf_checkpoint.py flags` for them (it reads HF_DIR's config.json and tokenizer, also
# under DRY_RUN) and passes them to every stage as MODEL_ARGS (examples/moba_model_args.sh).
#
# Before anything is submitted (also under DRY_RUN), every stage's full flag set is checked with the
# job's own parser and model checks at that stage's world size, NODES x GPUS_PER_NODE
# (tools/check_job_flags.py, through CHECK_ONLY=1 of the sbatch script): a stage that does not fit
# is named and nothing is submitted. Each check prints what its stage trains, RoPE base and maximum
# positions included. This runs on the submitting host: it needs the project's Python (PYTHON) there,
# CPU-only torch is enough.
#
# Data: DATA_PATH, or random tokens only with MOCK_DATA=1. Each stage trains on its own slice of the
# training documents (--train-data-slice), in proportion to its tokens (STAGE_ITERS x GLOBAL_BATCH x
# its sequence length), so no stage rereads an earlier stage's documents.
#
#   HF_DIR=/models/Meta-Llama-3.1-8B DATA_PATH=/data/long_text_document \
#       CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.01-py3 bash examples/continued_pretraining_long_context.sh
#   DRY_RUN=1 HF_DIR=... DATA_PATH=... bash examples/continued_pretraining_long_context.sh   # check, print
#
# Variables: HF_DIR (required), DATA_PATH (or MOCK_DATA=1), WORK (runs/long_context), NODES (8),
# GPUS_PER_NODE (8), TP (8), STAGES ("131072:4 262144:8", seq_length:context_parallel pairs: TP 8 x CP 8
# = 64 GPUs at most), STAGE_ITERS (1000), GLOBAL_BATCH (32), ROTARY_BASE (5000000), PYTHON (python),
# CONTAINER_IMAGE (unset: run on the hosts) and CONTAINER_MOUNTS (pyxis' SRC[:DST],... list; the
# directories of HF_DIR, WORK and the DATA_PATH files are added to it, the submission directory is
# always mounted), SHUTDOWN_TIMEOUT (seconds torchrun gives the ranks to save on preemption, 240),
# EXPORT_DIR ($WORK/hf), plus the training variables of moba_model_args.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

HF_DIR=${HF_DIR:?set HF_DIR to the Hugging Face model directory}
WORK=${WORK:-runs/long_context}
NODES=${NODES:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
STAGES=${STAGES:-"131072:4 262144:8"}
STAGE_ITERS=${STAGE_ITERS:-1000}
PYTHON=${PYTHON:-python}
EXPORT_DIR=${EXPORT_DIR:-$WORK/hf}
export ROTARY_BASE=${ROTARY_BASE:-5000000} MOBA_CHUNK=4096 MOBA_TOPK=12 MOBA_FULL_LAYERS=3
export TP=${TP:-8} GLOBAL_BATCH=${GLOBAL_BATCH:-32} GPUS_PER_NODE SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
export TRAIN_ITERS=$STAGE_ITERS WARMUP=${WARMUP:-50} LR=${LR:-2e-5} MIN_LR=${MIN_LR:-2e-6}
if [[ -z "${DATA_PATH:-}" && "${MOCK_DATA:-0}" != 1 ]]; then
    echo "error: set DATA_PATH to the training data (prefixes of .bin/.idx files), or MOCK_DATA=1 to train on" \
         "random tokens" >&2
    exit 2
fi
MODEL_ARGS=$("$PYTHON" tools/convert_hf_checkpoint.py flags --hf-dir "$HF_DIR")

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Container mounts: the directories of the model, the run and the data, where they are outside $PWD.
here=$(pwd -P)
mounts=()
add_mount() {      # $1: a directory (resolved when it exists; an absolute one that does not yet is kept)
    local dir=$1 m
    if [[ -d "$dir" ]]; then dir=$(cd "$dir" && pwd -P); elif [[ "$dir" != /* ]]; then return 0; fi
    [[ "$dir" == "$here" || "$dir" == "$here"/* ]] && return 0
    for m in ${mounts[@]+"${mounts[@]}"}; do [[ "$dir" == "$m" || "$dir" == "$m"/* ]] && return 0; done
    mounts+=("$dir")
}
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    add_mount "$HF_DIR"
    add_mount "$WORK"
    # shellcheck disable=SC2086  # DATA_PATH is megatron's "[w1] p1 [w2 p2 ...]" list
    for word in ${DATA_PATH:-}; do
        [[ "$word" =~ ^[0-9.eE+-]+$ ]] || add_mount "$(dirname "$word")"
    done
    for m in ${mounts[@]+"${mounts[@]}"}; do CONTAINER_MOUNTS="${CONTAINER_MOUNTS:+$CONTAINER_MOUNTS,}$m:$m"; done
    export CONTAINER_MOUNTS
fi
on_compute_node=(srun --nodes=1 --ntasks=1 --exclusive)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    on_compute_node+=(--container-image "$CONTAINER_IMAGE" --container-workdir "$PWD"
                      --container-mounts "$PWD:$PWD${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi

# Each stage's slice of the training documents, in proportion to its tokens.
read -r -a stages <<< "$STAGES"
slices=$(for stage in "${stages[@]}"; do echo "${stage%%:*}"; done | awk -v iters="$STAGE_ITERS" -v gb="$GLOBAL_BATCH" '
    { tokens[NR] = $1 * iters * gb; total += tokens[NR] }
    END { begin = 0; for (i = 1; i <= NR; i++) { end = (i == NR) ? 1 : begin + tokens[i] / total;
          printf "%.6f %.6f\n", begin, end; begin = end } }')
mapfile -t stage_slices <<< "$slices"

# Check every stage before anything runs.
previous=$WORK/stage0
for n in "${!stages[@]}"; do
    stage=${stages[n]}; seq=${stage%%:*}; cp=${stage##*:}; k=$((n + 1))
    if ! env SEQ_LENGTH="$seq" CP="$cp" RUN_DIR="$WORK/stage$k" INIT_FROM="$previous" MODEL_ARGS="$MODEL_ARGS" \
            TRAIN_DATA_SLICE="${stage_slices[n]}" NODES="$NODES" CHECK_ONLY=1 PYTHON="$PYTHON" \
            CHECK_NAME="stage $k (seq $seq, CP $cp, $((NODES * GPUS_PER_NODE)) GPUs)" \
            bash examples/slurm/pretrain_gpt_moba.sbatch; then
        echo "error: stage $k ($stage of STAGES) does not fit NODES=$NODES x GPUS_PER_NODE=$GPUS_PER_NODE; nothing" \
             "was submitted" >&2
        exit 2
    fi
    previous=$WORK/stage$k/checkpoints
done

run mkdir -p "$WORK/logs"
if [[ -f "$WORK/stage0/latest_checkpointed_iteration.txt" ]]; then
    echo "$WORK/stage0 holds the imported model already: not importing again"
else
    run "${on_compute_node[@]}" --job-name moba-import \
        "$PYTHON" tools/convert_hf_checkpoint.py import --hf-dir "$HF_DIR" --save "$WORK/stage0"
fi
previous=$WORK/stage0
for n in "${!stages[@]}"; do
    stage=${stages[n]}; k=$((n + 1))
    # Each stage starts from the previous one's weights (--finetune); a requeue resumes its own checkpoints.
    run env SEQ_LENGTH="${stage%%:*}" CP="${stage##*:}" RUN_DIR="$WORK/stage$k" INIT_FROM="$previous" \
        MODEL_ARGS="$MODEL_ARGS" TRAIN_DATA_SLICE="${stage_slices[n]}" \
        sbatch --wait --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --job-name "moba-long-$k" \
        --output "$WORK/logs/%x-%j.out" examples/slurm/pretrain_gpt_moba.sbatch
    previous=$WORK/stage$k/checkpoints
done
run "${on_compute_node[@]}" --job-name moba-export \
    "$PYTHON" tools/convert_hf_checkpoint.py export --load "$previous" --out "$EXPORT_DIR"
