#!/usr/bin/env bash
# One command on a GPU machine: GPU tests, attention benchmarks, training throughput; JSON under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh              # the default stages, within BUDGET_S seconds
#   OUT=/tmp/out bash benchmarks/gpu_run.sh train 128k   # some stages, in the order given
#
# Sized for one 15-minute device session (a 10-minute command once the machine has started):
# the stages run in order, each under `timeout` (STAGE_TIMEOUT_S, default 300 s, and never past the
# end of BUDGET_S, default 540 s, counted from the script's start); a stage that would start with
# less than MIN_STAGE_S (60 s) left is skipped.  After every stage $OUT/gpu_run_<gpu>.json lists each
# stage with its status (pending, ok, failed, timeout, skipped), exit code and seconds.  The
# benchmark stages rewrite their JSON after every measurement (tools/bench_attention.py), so a stage
# cut by its timeout keeps what it measured; one measurement may take MEASURE_TIMEOUT_S (120 s).
# The script exits 1 when a stage failed or timed out (skipped stages are not failures).
#
# Stages (default order: the kernel tests and the 32K benchmark first, the optional AOT tests last):
#   test   GPU kernel tests (triton, torch and reference backends, the host-side layout cache)
#   32k    chunk 512/topk 3 at 32K, GQA 16/4 then MHA: SDPA flash/cuDNN, flex, torch, triton, triton_atomic
#   train  pretraining throughput, ~1B GPT at 32K, MoBA then full attention (tools/bench_training.py),
#          one JSON per variant
#   8k16k  chunk 512/topk 3 at 8K and 16K, GQA and MHA
#   128k   chunk 512/topk 3 at 128K, GQA      64k  chunk 128/topk 8 at 64K, GQA
#   1m     chunk 4096/topk 12 at 1M tokens, forward only
#   aot    tests/kernels/test_triton_aot.py (Triton's ahead-of-time compilation for sm_80/sm_90), if present
# Needs torch with CUDA and triton (NVIDIA's PyTorch containers have both).  The train stage also
# needs megatron-core: installed from .whl/ when missing (fetch it beforehand where the GPU machine
# is offline:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl 'megatron-core>=0.16.1,<0.20' ).
# The job trains with megatron's DDP + distributed optimizer and bf16 weights on CUDA (never run on a
# GPU yet); TRAIN_EXTRA="--optimizer-impl torch" falls back to torch AdamW under autocast.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"     # each stage runs as: bash "$SELF" __stage NAME
cd "$(dirname "$SELF")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
STAGE_TIMEOUT_S=${STAGE_TIMEOUT_S:-300}
BUDGET_S=${BUDGET_S:-540}
MIN_STAGE_S=${MIN_STAGE_S:-60}
MEASURE_TIMEOUT_S=${MEASURE_TIMEOUT_S:-120}
ALL_STAGES=(test 32k train 8k16k 128k 64k 1m aot)
IMPLS=sdpa_flash,sdpa_cudnn,flex,torch,triton,triton_atomic
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"

bench() {
    "$PY" tools/bench_attention.py --device cuda --dtype bf16 --heads 16 --head-dim 128 --reps 5 \
        --measure-timeout "$MEASURE_TIMEOUT_S" "$@"
}

# One stage, run by the script itself under `timeout` (bash "$SELF" __stage NAME).
run_one() {
    local stage=$1 gpu=$GPU_RUN_GPU
    case "$stage" in
        test) "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_backend.py tests/kernels/test_torch_backend.py \
                  tests/kernels/test_reference.py tests/kernels/test_host_cache.py 2>&1 | tee "$OUT/gpu_tests_$gpu.txt" ;;
        32k) for kv in 4 16; do
                 bench --kv-heads "$kv" --chunk-size 512 --topk 3 --seqlens 32768 --impls "$IMPLS" \
                     --out "$OUT/bench_attention_${gpu}_bf16_c512k3_32k_kv${kv}.json"
             done ;;
        train) if ! "$PY" -c "import megatron.core" 2>/dev/null; then
                   local wheels=(.whl/megatron_core-*.whl)
                   if [ -e "${wheels[0]}" ]; then
                       "$PY" -m pip install -q --no-deps "${wheels[@]}"
                   else
                       "$PY" -m pip install -q --no-deps 'megatron-core>=0.16.1,<0.20'
                   fi
               fi
               for variant in moba full; do
                   "$PY" tools/bench_training.py --variants "$variant" --extra="${TRAIN_EXTRA:-}" \
                       --out "$OUT/bench_training_${gpu}_bf16_32k_${variant}.json"
               done ;;
        8k16k) for kv in 4 16; do
                   bench --kv-heads "$kv" --chunk-size 512 --topk 3 --seqlens 8192,16384 --impls "$IMPLS" \
                       --out "$OUT/bench_attention_${gpu}_bf16_c512k3_8k16k_kv${kv}.json"
               done ;;
        128k) bench --kv-heads 4 --chunk-size 512 --topk 3 --seqlens 131072 --impls "$IMPLS" --reps 3 \
                  --out "$OUT/bench_attention_${gpu}_bf16_c512k3_128k.json" ;;
        64k) bench --kv-heads 4 --chunk-size 128 --topk 8 --seqlens 65536 --impls "$IMPLS" \
                 --out "$OUT/bench_attention_${gpu}_bf16_c128k8_64k.json" ;;
        1m) bench --kv-heads 4 --chunk-size 4096 --topk 12 --seqlens 1048576 --modes fwd \
                --impls sdpa_flash,torch,triton --reps 2 --out "$OUT/bench_attention_${gpu}_bf16_c4096k12_1m.json" ;;
        aot) if [ ! -f tests/kernels/test_triton_aot.py ]; then
                 echo "aot: tests/kernels/test_triton_aot.py not present, nothing to run"
                 return 0
             fi
             env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_aot.py 2>&1 \
                 | tee "$OUT/gpu_aot_tests_$gpu.txt" ;;
    esac
}

if [ "${1:-}" = __stage ]; then
    run_one "$2"
    exit
fi

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=("${ALL_STAGES[@]}")
for stage in "${stages[@]}"; do
    case " ${ALL_STAGES[*]} " in
        *" $stage "*) ;;
        *) echo "unknown stage $stage (${ALL_STAGES[*]})" >&2; exit 2 ;;
    esac
done
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else 'none')")
[ "$gpu" = none ] && { echo "no CUDA device" >&2; exit 1; }
export GPU_RUN_GPU=$gpu
summary="$OUT/gpu_run_$gpu.json"
status=() codes=() seconds=()
for i in "${!stages[@]}"; do status[i]=pending; codes[i]=null; seconds[i]=0; done

write_summary() {
    local i sep="" body=""
    for i in "${!stages[@]}"; do
        body+="$sep"$'\n'"  {\"stage\": \"${stages[i]}\", \"status\": \"${status[i]}\", \"exit_code\": ${codes[i]}, \"seconds\": ${seconds[i]}}"
        sep=","
    done
    printf '{"gpu": "%s", "budget_s": %s, "stage_timeout_s": %s, "elapsed_s": %s, "stages": [%s\n]}\n' \
        "$gpu" "$BUDGET_S" "$STAGE_TIMEOUT_S" "$SECONDS" "$body" > "$summary.tmp"
    mv "$summary.tmp" "$summary"
}

write_summary
failed=0
for i in "${!stages[@]}"; do
    left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt "$MIN_STAGE_S" ]; then
        echo "== ${stages[i]}: skipped (${left}s of the ${BUDGET_S}s budget left)" >&2
        status[i]=skipped
        write_summary
        continue
    fi
    limit=$((left < STAGE_TIMEOUT_S ? left : STAGE_TIMEOUT_S))
    echo "== ${stages[i]} (at most ${limit}s)" >&2
    start=$SECONDS
    rc=0
    timeout --kill-after=10 "$limit" bash "$SELF" __stage "${stages[i]}" || rc=$?
    seconds[i]=$((SECONDS - start))
    codes[i]=$rc
    case $rc in
        0) status[i]=ok ;;
        124|137) status[i]=timeout; failed=1 ;;
        *) status[i]=failed; failed=1 ;;
    esac
    echo "== ${stages[i]}: ${status[i]} after ${seconds[i]}s" >&2
    write_summary
done
exit "$failed"
