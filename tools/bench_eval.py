#!/usr/bin/env python
"""Wall time and peak memory of the evaluation tools at long context: positional loss and passkey retrieval.

    python tools/bench_eval.py --out benchmarks/results/eval_long_context_cpu.json
    python tools/bench_eval.py --lengths 2048 --hidden-size 64 --out /tmp/e.json      # a quick check

Builds a small checkpoint with the pretraining job (2 layers, RoPE, MoBA chunk 512 top-3, a
32,000-token vocabulary: NullTokenizer --vocab-size 31999 plus its end-of-document id, no padding
rows) and one random document of max(--lengths) + 1 tokens, then runs, one at a time, for every
length: tools/eval_positional_loss.py (the document cut to the length, buckets of length / 8) and
tools/eval_needle.py (one passkey at depth 0.5), each in one process and under
`torchrun --nproc-per-node 2 ... --context-parallel-size 2`, and, with --before COMMIT, the same
tools at that commit (one process: they have no --context-parallel-size), extracted with
`git archive`.  Every process records its peak resident memory (getrusage); a run's figure is
its largest rank's.  Wall time is the whole command (imports and loading included).  Threads:
the machine's cores shared between the ranks, or --threads per process; --append adds the runs to
those of an earlier --out (each run names its commit and command).  The JSON (rewritten after every run, so a
killed benchmark keeps what it measured) records the commit, whether the tree was clean, the
versions, the machine and its load average before and after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = '''import json, os, resource, runpy, sys
tool = sys.argv[1]
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(tool, run_name="__main__")
except SystemExit as e:
    code = e.code or 0
finally:
    with open(os.path.join(os.environ["BENCH_PEAK_DIR"], os.environ.get("RANK", "0") + ".json"), "w") as f:
        json.dump(dict(peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, code=code), f)
sys.exit(code)
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--tools", nargs="+", default=["positional_loss", "needle"], choices=["positional_loss", "needle"])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context-parallel sizes of the new tools")
    p.add_argument("--before", default=None, help="commit of the tools before the change (run in one process)")
    p.add_argument("--before-max-length", type=int, default=None, help="skip the old tools above this length")
    p.add_argument("--work", default=None, help="directory for the checkpoint and data (default: a temporary one)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: the machine's cores / processes)")
    p.add_argument("--append", action="store_true", help="add the runs to those already in --out")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args(argv)


def _git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return dict(cpu=model, cores=os.cpu_count(), memory_bytes=mem, platform=platform.platform(), host=platform.node())


def versions() -> dict:
    import megatron.core
    import torch
    return dict(python=platform.python_version(), torch=torch.__version__, megatron_core=megatron.core.__version__)


def build_inputs(work: str, length: int, hidden: int) -> tuple:
    """(checkpoint directory, data prefix), built once in ``work``."""
    ckpt, data = os.path.join(work, "ckpt"), os.path.join(work, "doc")
    if not os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        flags = ["--num-layers", "2", "--hidden-size", str(hidden), "--num-attention-heads", "4",
                 "--num-query-groups", "2", "--ffn-hidden-size", str(2 * hidden), "--seq-length", "2048",
                 "--moba-chunk-size", "512", "--moba-topk", "3", "--micro-batch-size", "1", "--global-batch-size", "1",
                 "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--vocab-size", "31999", "--normalization",
                 "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--save", ckpt]
        subprocess.run([sys.executable, "-m", "megatron_moba.pretrain", *flags], check=True, cwd=work,
                       stdout=subprocess.DEVNULL)
    if not os.path.exists(data + ".idx"):
        import numpy as np

        from megatron_moba.training.preprocess import build_indexed_dataset
        ids = np.random.default_rng(0).integers(0, 31999, length)         # + EOD: length + 1 tokens
        build_indexed_dataset(iter([" ".join(map(str, ids))]), data, "NullTokenizer", vocab_size=31999, progress=False)
    return ckpt, data


def tool_argv(tool: str, length: int, ckpt: str, data: str, out: str) -> list:
    if tool == "positional_loss":
        return ["eval_positional_loss.py", "--load", ckpt, "--data-path", data, "--seq-length", str(length),
                "--bucket-width", str(length // 8), "--num-docs", "1", "--out", out]
    return ["eval_needle.py", "--load", ckpt, "--lengths", str(length), "--depths", "0.5", "--trials", "1",
            "--batch-size", "1", "--out", out, "--no-progress"]


def run_one(src: str, tool: str, length: int, cp: int, ckpt: str, data: str, timeout: int,
            threads: int = None) -> dict:
    """One command: wall time, peak memory of its largest rank, and what the tool printed last."""
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = os.path.join(tmp, "peak.py")
        with open(wrapper, "w") as f:
            f.write(WRAPPER)
        name, *argv = tool_argv(tool, length, ckpt, data, os.path.join(tmp, "out"))
        if cp > 1:
            argv += ["--context-parallel-size", str(cp)]
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp),
                      "--master-port", str(29500 + os.getpid() % 1000)]
        else:
            launch = [sys.executable]
        threads = threads or max(1, (os.cpu_count() or 1) // cp)
        env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.path.join(src, 'kernels')}", BENCH_PEAK_DIR=tmp,
                   OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        load = os.getloadavg()
        start = time.perf_counter()
        try:
            proc = subprocess.run(launch + [wrapper, os.path.join(src, "tools", name), *argv], env=env, cwd=tmp,
                                  capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        wall = time.perf_counter() - start
        ranks = [json.load(open(os.path.join(tmp, f))) for f in sorted(os.listdir(tmp)) if f[0].isdigit()]
        result = json.load(open(os.path.join(tmp, "out", "needle.json" if tool == "needle" else
                                             "positional_loss.json"))) if rc == 0 else None
    row = dict(tool=tool, length=length, processes=cp, threads_per_process=threads, returncode=rc,
               wall_s=round(wall, 2), peak_rss_bytes=max((r["peak_rss_bytes"] for r in ranks), default=None),
               peak_rss_bytes_per_rank=[r["peak_rss_bytes"] for r in ranks], loadavg_before=load,
               loadavg_after=os.getloadavg())
    if result and tool == "needle":
        row["answer"] = dict(accuracy=result[0]["accuracy"], prediction=result[0]["predictions"][0])
    elif result:
        row["answer"] = dict(overall_loss=result[0]["overall_loss"], tokens=result[0]["overall_tokens"])
    if rc != 0:
        row["output_tail"] = tail
    return row


def main(argv=None):
    args = parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench_eval_")
    os.makedirs(work, exist_ok=True)
    ckpt, data = build_inputs(work, max(args.lengths) + 1, args.hidden_size)
    report = dict(commit=_git("rev-parse", "HEAD"), clean=not _git("status", "--porcelain"),
                  before=args.before, versions=versions(), machine=machine(),
                  model=dict(layers=2, hidden_size=args.hidden_size, heads=4, query_groups=2, vocab=32000,
                             moba_chunk_size=512, moba_topk=3, position_embedding="rope"),
                  command=" ".join(sys.argv), runs=[])
    if args.append and os.path.exists(args.out):
        earlier = json.load(open(args.out))
        report["runs"] = [dict(r, commit=r.get("commit") or earlier["commit" if r["code"] == "after" else "before"],
                               command=r.get("command", earlier["command"])) for r in earlier["runs"]]
        report["earlier"] = {k: earlier[k] for k in ("commit", "clean", "command") if k in earlier}
    plan = [(ROOT, "after", tool, n, cp) for n in args.lengths for tool in args.tools for cp in args.cp]
    old = None
    if args.before:
        old = os.path.join(work, "before")
        if not os.path.isdir(old):
            os.makedirs(old)
            archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        plan += [(old, "before", tool, n, 1) for n in args.lengths for tool in args.tools
                 if args.before_max_length is None or n <= args.before_max_length]
    for src, which, tool, n, cp in plan:
        row = dict(code=which, commit=report["commit"] if which == "after" else args.before, command=report["command"],
                   **run_one(src, tool, n, cp, ckpt, data, args.timeout, args.threads))
        report["runs"].append(row)
        peak = row["peak_rss_bytes"]
        print(f"{which:>6} {tool:>15} {n:>7} tokens  {cp} process(es): {row['wall_s']:8.1f} s  "
              f"peak {peak / 2**30 if peak else float('nan'):6.2f} GiB  rc {row['returncode']}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    report["peak_rss_of_this_script_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
