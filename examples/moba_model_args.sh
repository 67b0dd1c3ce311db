# Shared by the launch scripts (sourced): builds TRAIN_ARGS, the trainer's flags, from variables.
# Model: ~1B-parameter GPT (24 layers, hidden 2048, 16 heads, 4 KV groups) unless overridden, or
# MODEL_ARGS: the flags of an imported Hugging Face model, as `tools/convert_hf_checkpoint.py flags`
# (or `import`) prints them (model, tokenizer, --vocab-size; words split on spaces).  They replace
# the model variables, the tokenizer and, unless ROTARY_BASE is set, the RoPE base; their
# --max-position-embeddings gives way to SEQ_LENGTH's (each flag is passed once).
# Data: DATA_PATH (megatron's "[w1] p1 [w2 p2 ...]"), or random tokens only when asked for with
# MOCK_DATA=1 (neither: an error).  TRAIN_DATA_SLICE="BEGIN END" trains on that fraction of the
# training documents (--train-data-slice; the continued-pretraining recipe's stages).
# shellcheck shell=bash

ROTARY_BASE_GIVEN=${ROTARY_BASE:+1}
NUM_LAYERS=${NUM_LAYERS:-24}
HIDDEN=${HIDDEN:-2048}
FFN_HIDDEN=${FFN_HIDDEN:-5632}
HEADS=${HEADS:-16}
KV_GROUPS=${KV_GROUPS:-4}
SEQ_LENGTH=${SEQ_LENGTH:-32768}
ROTARY_BASE=${ROTARY_BASE:-500000}
ATTENTION=${ATTENTION:-moba}
MOBA_CHUNK=${MOBA_CHUNK:-512}
MOBA_TOPK=${MOBA_TOPK:-3}
MOBA_FULL_LAYERS=${MOBA_FULL_LAYERS:-0}
TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
TRAIN_ITERS=${TRAIN_ITERS:-10000}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
WARMUP=${WARMUP:-500}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}

if [[ -n "${MODEL_ARGS:-}" ]]; then
    read -r -a imported <<< "$MODEL_ARGS"
    # drop the imported flags that a stage sets itself: positions always, the RoPE base with ROTARY_BASE
    model_args=()
    for ((i = 0; i < ${#imported[@]}; i++)); do
        case "${imported[i]}" in
            --max-position-embeddings) i=$((i + 1)); continue ;;
            --rotary-base) if [[ -n "$ROTARY_BASE_GIVEN" ]]; then i=$((i + 1)); continue; fi ;;
        esac
        model_args+=("${imported[i]}")
    done
    rope_args=()
    if [[ -n "$ROTARY_BASE_GIVEN" ]]; then rope_args=(--rotary-base "$ROTARY_BASE"); fi
else
    model_args=(--num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN_HIDDEN"
                --num-attention-heads "$HEADS" --num-query-groups "$KV_GROUPS"
                --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights)
    rope_args=(--rotary-base "$ROTARY_BASE")
fi
TRAIN_ARGS=(
    "${model_args[@]}"
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH" ${rope_args[@]+"${rope_args[@]}"}
    --attention "$ATTENTION" --moba-chunk-size "$MOBA_CHUNK" --moba-topk "$MOBA_TOPK"
    --moba-full-attn-layers "$MOBA_FULL_LAYERS"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --bf16
    --save-interval "$SAVE_INTERVAL" --log-interval 10 --eval-interval 500 --eval-iters 10
)
if [[ "$TP" -gt 1 ]]; then TRAIN_ARGS+=(--sequence-parallel); fi
if [[ -n "${DATA_PATH:-}" ]]; then
    # shellcheck disable=SC2206  # DATA_PATH is megatron's "[w1] p1 [w2 p2 ...]" list
    TRAIN_ARGS+=(--data-path ${DATA_PATH})
    if [[ -z "${MODEL_ARGS:-}" || -n "${TOKENIZER_MODEL:-}" ]]; then
        TRAIN_ARGS+=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL}")
    fi
elif [[ "${MOCK_DATA:-0}" == 1 ]]; then
    TRAIN_ARGS+=(--mock-data)
    if [[ -z "${MODEL_ARGS:-}" ]]; then TRAIN_ARGS+=(--tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-32000}"); fi
else
    echo "error: set DATA_PATH to the training data (prefixes of .bin/.idx files), or MOCK_DATA=1 to train on" \
         "random tokens" >&2
    exit 2
fi
if [[ -n "${TRAIN_DATA_SLICE:-}" ]]; then
    read -r -a data_slice <<< "$TRAIN_DATA_SLICE"
    TRAIN_ARGS+=(--train-data-slice "${data_slice[@]}")
fi
