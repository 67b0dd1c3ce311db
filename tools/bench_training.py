#!/usr/bin/env python
"""Training throughput of the pretraining job: MoBA against full attention, same model, same run.

    python tools/bench_training.py --out benchmarks/results/bench_training_h100.json
    python tools/bench_training.py --num-layers 2 --hidden-size 128 --num-attention-heads 4 \\
        --seq-length 1024 --moba-chunk-size 128 --iters 4 --out /tmp/t.json     # a quick CPU check

Runs ``python -m megatron_moba.pretrain`` (``torchrun --nproc-per-node N`` with ``--gpus N``) once
per variant on mock data, reads the job's metrics file (one JSON line per iteration) and reports
the median step time, tokens/s, TFLOP/s per device and MFU over the iterations after
``--warmup`` (MFU and TFLOP/s count only the attention MoBA computes, as the job logs them),
plus peak memory.  Writes JSON with the device, versions and every figure, and prints a table
with the ratio MoBA / full.  Default model: ~1B parameters (16 layers, hidden 2048, SwiGLU 5632,
16 heads, 4 KV groups, vocab 32000) at 32K tokens, bf16, micro batch 1.
"""
from __future__ import annotations

import argparse

# megatron_moba.training.bench (torch), which does the work (bench.run), is imported once the flags are
# parsed: `--help` answers without it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--moba-chunk-size", type=int, default=512)
    p.add_argument("--moba-topk", type=int, default=3)
    p.add_argument("--moba-full-attn-layers", type=int, default=0)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=12, help="training iterations per variant")
    p.add_argument("--warmup", type=int, default=3, help="iterations left out of the medians")
    p.add_argument("--gpus", type=int, default=1, help="processes (torchrun) per variant")
    p.add_argument("--variants", default="full,moba")
    p.add_argument("--extra", default="", help="more flags for the job, e.g. '--moba-backend torch'")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.warmup >= args.iters:
        p.error(f"--warmup ({args.warmup}) must be smaller than --iters ({args.iters})")
    return args


def main(argv=None):
    args = parse_args(argv)
    from megatron_moba.training import bench
    bench.run(args)


if __name__ == "__main__":
    main()
