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
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

# torch is imported inside the functions that use it: `--help` answers without it


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


def job_flags(args, variant: str, metrics: str) -> list:
    flags = ["--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
             "--ffn-hidden-size", args.ffn_hidden_size, "--num-attention-heads", args.num_attention_heads,
             "--num-query-groups", args.num_query_groups, "--seq-length", args.seq_length,
             "--rotary-base", 500000, "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--attention", variant,
             "--moba-chunk-size", args.moba_chunk_size, "--moba-topk", args.moba_topk,
             "--moba-full-attn-layers", args.moba_full_attn_layers,
             "--micro-batch-size", args.micro_batch_size, "--train-iters", args.iters,
             "--lr", "1e-4", "--lr-warmup-iters", min(1, args.iters - 1), "--mock-data", "--vocab-size", 32000,
             "--log-interval", 1, "--metrics-file", metrics, "--eval-iters", 1]
    import torch
    if torch.cuda.is_available():
        flags.append("--bf16")
    return [str(f) for f in flags] + args.extra.split()


def run_variant(args, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(args.gpus)] if args.gpus > 1 else [sys.executable])
        cmd = launcher + ["-m", "megatron_moba.pretrain"] + job_flags(args, variant, metrics)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return dict(variant=variant, error=" | ".join(tail))
        rows = [json.loads(line) for line in open(metrics) if line.strip()]
    steps = [r for r in rows if "step_time_s" in r and r["iteration"] > args.warmup]
    med = lambda key: statistics.median(r[key] for r in steps) if steps and steps[0].get(key) is not None else None
    return dict(variant=variant, step_time_s=med("step_time_s"), tokens_per_s=med("tokens_per_s"),
                tflops_per_device=med("tflops_per_device"), mfu=med("mfu"),
                peak_memory_gib=max(r["memory_gib"] for r in steps), final_loss=rows[-1]["loss"],
                iterations=len(steps))


def main(argv=None):
    args = parse_args(argv)
    results = [run_variant(args, v) for v in args.variants.split(",")]
    by = {r["variant"]: r for r in results}
    ratio = None
    if "error" not in by.get("moba", {"error": 1}) and "error" not in by.get("full", {"error": 1}):
        ratio = by["moba"]["step_time_s"] / by["full"]["step_time_s"]
    print(f"{'variant':>8} {'step s':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:>8}  error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['variant']:>8} {r['step_time_s']:>9.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['tflops_per_device']:>8.1f} {mfu:>6} {r['peak_memory_gib']:>8.1f}")
    if ratio is not None:
        print(f"MoBA step time / full attention step time: {ratio:.3f}")
    import torch
    env = dict(torch=torch.__version__, python=platform.python_version(), host=platform.node(),
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               cuda=torch.version.cuda)
    try:
        import megatron.core
        import triton
        env.update(megatron_core=megatron.core.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, args=vars(args), results=results, moba_over_full_step_time=ratio),
                      f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
