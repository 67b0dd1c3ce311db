"""Training throughput of the pretraining job, MoBA against full attention (what tools/bench_training.py
runs): one ``python -m megatron_moba.pretrain`` process (``torchrun`` with ``gpus`` > 1) per variant on
mock data, its metrics file read back, medians after the warm-up iterations, a table and a JSON file.

    from megatron_moba.training import bench
    results = bench.run(args)          # args: tools/bench_training.py's parsed flags

MFU and TFLOP/s count only the attention MoBA computes, as the job logs them.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

# torch is imported inside the functions that use it


def job_flags(args, variant: str, metrics: str) -> list:
    """The pretraining job's command-line flags for one variant (``--attention``), metrics to ``metrics``."""
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
    """Train one variant; its median figures over the iterations after ``args.warmup``, or
    ``{variant, error}`` with the tail of the job's output when it failed."""
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


def environment() -> dict:
    """Versions and the device, for the JSON file."""
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
    return env


def run(args) -> list:
    """Every variant of ``args.variants`` (comma-separated), a table with the ratio MoBA / full step
    time, and the JSON file ``args.out`` (environment, ``vars(args)``, results, ratio) if set.
    ``args``: tools/bench_training.py's parsed flags.  Returns the results."""
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
    env = environment()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, args=vars(args), results=results, moba_over_full_step_time=ratio),
                      f, indent=1)
        print(f"wrote {args.out}")
    return results
