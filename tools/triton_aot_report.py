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
import os
import subprocess
import sys

# moba_kernels.triton_backend.aot_report (torch, triton), which does the work (aot_report.report), is
# imported once the flags are parsed: `--help` answers without it


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
    if os.environ.get("TRITON_INTERPRET"):          # the interpreter replaces the kernels: run again without it
        from moba_kernels.triton_backend.aot import child_env
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=child_env())

    from moba_kernels.triton_backend import aot_report
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)
    bad = aot_report.report(ints(args.arch), ints(args.dims), tuple(args.dtypes.split(",")), ints(args.topk),
                            args.tuned, [k for k in args.kernels.split(",") if k] or None, args.jobs, args.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
