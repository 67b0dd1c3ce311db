#!/usr/bin/env bash
# One command on a GPU machine: GPU tests + attention benchmarks, JSON under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh            # every stage (about 20-25 min on one H100)
#   OUT=/tmp/out bash benchmarks/gpu_run.sh test 32k   # some stages (each fits a 10-minute slot)
#
# Stages: test (GPU kernel tests), 32k (chunk 512/topk 3 at 8K-32K, MHA and GQA), 128k (chunk 512/topk 3
# at 128K), 64k (chunk 128/topk 8 at 64K), 1m (chunk 4096/topk 12 at 1M tokens, forward), train (the
# pretraining job, ~1B GPT at 32K, MoBA vs full attention: tools/bench_training.py).
# Needs torch with CUDA and triton (NVIDIA's PyTorch containers have both).  The train stage also needs
# megatron-core: installed from .whl/ when missing (fetch it beforehand where the GPU machine is offline:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl megatron-core==0.16.1 ).
# The job trains with megatron's DDP + distributed optimizer and bf16 weights on CUDA (never run on a
# GPU yet); TRAIN_EXTRA="--optimizer-impl torch" falls back to torch AdamW under autocast.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(test 32k 128k 64k 1m train)
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else 'none')")
[ "$gpu" = none ] && { echo "no CUDA device" >&2; exit 1; }
IMPLS=sdpa_flash,sdpa_cudnn,flex,torch,triton,triton_atomic
bench() { "$PY" tools/bench_attention.py --device cuda --dtype bf16 --heads 16 --head-dim 128 --reps 5 "$@"; }
for stage in "${stages[@]}"; do
    case "$stage" in
        test) "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_torch_backend.py \
                  tests/test_reference.py 2>&1 | tee "$OUT/gpu_tests_$gpu.txt" || echo "GPU tests failed (see $OUT/gpu_tests_$gpu.txt)" >&2 ;;
        32k) for kv in 16 4; do
                 bench --kv-heads "$kv" --chunk-size 512 --topk 3 --seqlens 8192,16384,32768 --impls "$IMPLS" \
                     --out "$OUT/bench_attention_${gpu}_bf16_c512k3_kv${kv}.json"
             done ;;
        128k) bench --kv-heads 4 --chunk-size 512 --topk 3 --seqlens 131072 --impls "$IMPLS" --reps 3 \
                  --out "$OUT/bench_attention_${gpu}_bf16_c512k3_128k.json" ;;
        64k) bench --kv-heads 4 --chunk-size 128 --topk 8 --seqlens 65536 --impls "$IMPLS" \
                 --out "$OUT/bench_attention_${gpu}_bf16_c128k8_64k.json" ;;
        1m) bench --kv-heads 4 --chunk-size 4096 --topk 12 --seqlens 1048576 --modes fwd \
                --impls sdpa_flash,torch,triton --reps 2 --out "$OUT/bench_attention_${gpu}_bf16_c4096k12_1m.json" ;;
        train) "$PY" -c "import megatron.core" 2>/dev/null || "$PY" -m pip install -q --no-deps .whl/megatron_core-*.whl
               "$PY" tools/bench_training.py --extra="${TRAIN_EXTRA:-}" --out "$OUT/bench_training_${gpu}_bf16_32k.json" ;;
        *) echo "unknown stage $stage (test, 32k, 128k, 64k, 1m, train)" >&2; exit 2 ;;
    esac
done
