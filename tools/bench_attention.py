#!/usr/bin/env python
"""Benchmark MoBA backends against dense causal SDPA on the same shapes.

    python tools/bench_attention.py --seqlens 2048,4096,8192,16384,32768 --chunk-size 512 --topk 3 \
        --heads 4 --kv-heads 4 --head-dim 64 --dtype fp32 --out benchmarks/results/bench_cpu.json
    python tools/bench_attention.py --device cuda --dtype bf16 --heads 16 --kv-heads 4 --head-dim 128 \
        --impls sdpa_flash,sdpa_cudnn,flex,torch,triton --seqlens 8192,32768,131072 --out gpu.json

Implementations: ``sdpa`` (dense causal, PyTorch's own backend choice), ``sdpa_flash`` and
``sdpa_cudnn`` (dense causal pinned to that SDPA backend), ``flex`` (compiled flex_attention with
a block mask encoding the same MoBA selection; forward only on CPU, where compiled flex_attention
has no backward), and the MoBA backends (``triton``, ``torch``,
``reference``; ``triton_atomic`` is ``triton`` with dQ by atomics).  Speedups are against ``sdpa_flash``
when it ran, else ``sdpa``.
TFLOP/s count only the (query, key) pairs each implementation attends (dense causal for SDPA).
``first_call_s`` is the first call's time (Triton compilation and autotuning included).

Each (implementation, sequence length, mode) runs in a fresh subprocess, so its peak memory
is its own: CUDA's peak allocated bytes on GPU, the CPU allocator's peak (from the profiler's
allocation records) on CPU.  Times are the
median of --reps runs after one warm-up.  Prints a table and writes JSON with the device,
the versions and every figure; speedups are against SDPA dense causal from the same run.  The
JSON is rewritten after every measurement (``"complete": false`` until the last), so a run cut
short keeps what it measured; ``--measure-timeout`` bounds one measurement.  The measurements are
moba_kernels.bench's (``run``); this file is the command line.
"""
from __future__ import annotations

import argparse

# the measurements live in moba_kernels.bench, imported once the flags are parsed (it imports torch):
# `--help` answers without torch
DTYPES = ("bf16", "fp16", "fp32")      # --dtype (moba_kernels.bench.DTYPES: the torch dtype of each)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="2048,4096,8192,16384,32768", help="comma-separated sequence lengths")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--impls", default="sdpa,torch,flex,reference",
                   help="comma-separated: sdpa, sdpa_flash, sdpa_cudnn (dense causal baselines), flex, "
                        "and MoBA backends (triton, torch, reference)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--reference-max-seqlen", type=int, default=16384,
                   help="skip the O(S^2)-memory reference backend above this length")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file to write (rewritten after every measurement)")
    p.add_argument("--measure-timeout", type=float, default=None,
                   help="seconds one measurement (one subprocess) may take; past it the row records an error")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv=None):
    args = parse_args(argv)
    from moba_kernels.bench import run
    run(args)


if __name__ == "__main__":
    main()
