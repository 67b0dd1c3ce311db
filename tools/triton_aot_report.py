#!/usr/bin/env python
# python tools/triton_aot_report.py --json benchmarks/results/triton_aot_report.json
"""Ahead-of-time compile report of the ``triton`` backend's kernels for sm_80 and sm_90, no GPU needed.

Every kernel is compiled with Triton's compiler and its bundled ptxas (moba_kernels.triton_backend
.aot) for each target, head dim, dtype and config -- the fixed launch config (``kernel_config``;
the gate at several topk, dK/dV with and without atomic dQ) and every autotune config -- and a
table of registers, spill bytes (stores + loads), shared memory against the target's opt-in limit
and ptxas performance warnings is printed.  ``--json`` writes every figure.

    python tools/triton_aot_report.py --arch 90 --dims 128 --dtypes bf16 --tuned none   # a quick look

Runs the compiles in a child process without ``TRITON_INTERPRET`` (which would replace the
kernels by the interpreter) and ``--jobs`` worker processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor


def _run(job):
    return job.run()


def compile_all(jobs, workers: int):
    if workers <= 1:
        return [j.run() for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs, chunksize=1))


def dumps(doc) -> str:
    """JSON with one line per result (diff-friendly)."""
    head = json.dumps({k: v for k, v in doc.items() if k != "results"}, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(r) for r in doc["results"])
    return f'{head},\n "results": [\n{rows}\n ]\n}}\n'


def table(results) -> str:
    head = (f"{'kernel':<19}{'sm':>3} {'dtype':<5}{'D':>4}  {'config':<34}{'regs':>5}{'spill':>7}{'smem':>8}"
            f"{'limit':>8}  notes")
    lines = [head, "-" * len(head)]
    for r in results:
        if not r.ok:
            lines.append(f"{r.kernel:<19}{r.arch:>3} {r.dtype:<5}{r.D:>4}  {r.config:<34}FAILED {r.error}")
            continue
        notes = [w.split(":")[0] for w in r.warnings]           # e.g. "(C7515) Potential Performance Loss"
        if r.shared > r.smem_limit:
            notes.insert(0, "SMEM OVER LIMIT" + ("" if r.kept else " (pruned)"))
        elif not r.kept:
            notes.insert(0, "pruned")
        lines.append(f"{r.kernel:<19}{r.arch:>3} {r.dtype:<5}{r.D:>4}  {r.config:<34}{r.registers:>5}{r.spill:>7}"
                     f"{r.shared:>8}{r.smem_limit:>8}  {'; '.join(notes)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--topk", default="3,8,17", help="gate kernel: the topk values compiled")
    p.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    p.add_argument("--tuned", choices=("all", "largest", "none"), default="all",
                   help="autotune configs compiled: all, the largest kept one per kernel, none")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default="", help="write every figure here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        from moba_kernels.triton_backend.aot import child_env
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=child_env())

    import triton

    from moba_kernels.triton_backend import aot
    from moba_kernels.triton_backend.tuning import CHUNK_REF, SMEM_LIMIT
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)
    jobs = aot.jobs(ints(args.arch), ints(args.dims), tuple(args.dtypes.split(",")), ints(args.topk),
                    args.tuned, [k for k in args.kernels.split(",") if k] or None)
    results = compile_all(jobs, args.jobs)
    print(table(results))
    bad = [r for r in results if not r.ok or (r.kept and r.shared > r.smem_limit)]
    defaults = [r for r in results if r.ok and r.config.startswith("default")]
    spills = sorted({(r.kernel, r.arch, r.D, r.config, r.spill) for r in defaults if r.spill})
    print(f"\n{len(results)} compiles, {len(bad)} failed or over the shared-memory limit; "
          f"default configs with spills: {len(spills)}")
    for s in spills:
        print("  spill:", *s)
    if args.json:
        doc = dict(tool="tools/triton_aot_report.py", device="none (ahead-of-time compile, ptxas -v)",
                   triton=triton.__version__, python=platform.python_version(),
                   targets={f"sm_{a}": dict(arch=a, smem_limit=SMEM_LIMIT[a]) for a in ints(args.arch)},
                   launch=dict(chunk_size=CHUNK_REF, gqa_group=2, note="dtype bf16/fp16: IEEE=False"),
                   results=[r.as_dict() for r in results])
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(dumps(doc))
        print("wrote", args.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
