#!/usr/bin/env python
"""Training stall per checkpoint save, synchronous against --async-save, from the job's own log lines.

    python benchmarks/async_save_stall.py --out runs/async_stall --json benchmarks/results/async_save_stall.json

Trains the same model twice in one process (CPU unless CUDA is present), saving every --save-interval
iterations with the job's synchronous save and then with --async-save, and reads "training stalled X s"
from each save's log line: the time the training loop waited for the save call.  With --async-save the
tensors are staged (on CPU: nothing to copy; megatron-core forks a writer that sees a snapshot) and written
by the background process, published when the queue finalizes it ("written ... s after it was staged").
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(flags):
    r = subprocess.run([sys.executable, "-m", "megatron_moba.pretrain", *flags], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    stalls = [float(x) for x in re.findall(r"training stalled ([0-9.]+) s", r.stdout)]
    written = [float(x) for x in re.findall(r"([0-9.]+) s after it was staged", r.stdout)]
    params = int(re.search(r"model: ([0-9,]+) parameters", r.stdout).group(1).replace(",", ""))
    return stalls, written, params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--save-interval", type=int, default=2)
    a = p.parse_args(argv)
    if os.path.exists(a.out) and os.listdir(a.out):
        p.error(f"--out {a.out} is not empty")
    base = ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", "8",
            "--seq-length", "128", "--moba-chunk-size", "32", "--moba-topk", "2", "--micro-batch-size", "1",
            "--train-iters", str(a.iters), "--mock-data", "--vocab-size", "1024", "--normalization", "RMSNorm",
            "--swiglu", "--disable-bias-linear", "--log-interval", "1", "--save-interval", str(a.save_interval)]
    git = [subprocess.run(["git", *c], capture_output=True, text=True, cwd=ROOT).stdout.strip()
           for c in (["rev-parse", "HEAD"], ["status", "--porcelain"])]       # the code as it ran
    results = {}
    for mode, extra in (("sync", []), ("async", ["--async-save"])):
        stalls, written, params = _run(base + ["--save", os.path.join(a.out, mode)] + extra)
        results[mode] = {"stall_s": stalls, "mean_stall_s": sum(stalls) / len(stalls), "written_after_s": written}
        print(f"{mode}: {len(stalls)} saves, training stalled {stalls} s", flush=True)
    ckpt = os.path.join(a.out, "sync", f"iter_{a.iters:07d}")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    import megatron.core
    import torch
    report = {"what": "training stall per checkpoint save (the save call's duration, as the job logs it)",
              "params": params, "checkpoint_bytes": size, "results": results,
              "async_over_sync_stall": results["async"]["mean_stall_s"] / results["sync"]["mean_stall_s"],
              "device": "cuda" if torch.cuda.is_available() else "cpu",
              "provenance": {"commit": git[0], "clean_at_start": git[1] == "",
                             "python": platform.python_version(), "torch": torch.__version__,
                             "megatron_core": megatron.core.__version__, "cpus": os.cpu_count(),
                             "platform": platform.platform()}}
    print(f"{params:,} parameters, checkpoint {size / 1e9:.2f} GB: mean stall sync "
          f"{results['sync']['mean_stall_s']:.2f} s, async {results['async']['mean_stall_s']:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
