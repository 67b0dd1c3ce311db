"""The ahead-of-time compile report of the backend's kernels (what tools/triton_aot_report.py prints
and writes): compile every job of ``aot.jobs`` (worker processes), a table of registers, spills,
shared memory against the target's limit and ptxas warnings, and a JSON file with every figure.

    from moba_kernels.triton_backend import aot_report
    bad = aot_report.report(archs=(90,), dims=(128,), dtypes=("bf16",), tuned="none")   # [] when all is well

Must run without ``TRITON_INTERPRET`` (see ``aot``).
"""
from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional, Sequence

from . import aot
from .tuning import CHUNK_REF, SMEM_LIMIT


def _run(job):
    return job.run()


def compile_all(jobs, workers: int) -> List[aot.Result]:
    """Run the jobs, in ``workers`` processes when more than one."""
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


def report(archs: Sequence[int] = aot.ARCHS, dims: Sequence[int] = (64, 128, 256),
           dtypes: Sequence[str] = tuple(aot.DTYPES), topks: Sequence[int] = (3, 8, 17), tuned: str = "all",
           kernels: Optional[Sequence[str]] = None, workers: int = 1, json_path: str = "") -> List[aot.Result]:
    """Compile the grid (``aot.jobs``), print the table and a summary (compiles failed or over the
    shared-memory limit, default configs that spill), write every figure to ``json_path`` if given.
    Returns the failed or over-limit results (empty: all is well)."""
    import triton
    jobs = aot.jobs(tuple(archs), tuple(dims), tuple(dtypes), tuple(topks), tuned, list(kernels) if kernels else None)
    results = compile_all(jobs, workers)
    print(table(results))
    bad = [r for r in results if not r.ok or (r.kept and r.shared > r.smem_limit)]
    defaults = [r for r in results if r.ok and r.config.startswith("default")]
    spills = sorted({(r.kernel, r.arch, r.D, r.config, r.spill) for r in defaults if r.spill})
    print(f"\n{len(results)} compiles, {len(bad)} failed or over the shared-memory limit; "
          f"default configs with spills: {len(spills)}")
    for s in spills:
        print("  spill:", *s)
    if json_path:
        doc = dict(tool="tools/triton_aot_report.py", device="none (ahead-of-time compile, ptxas -v)",
                   triton=triton.__version__, python=platform.python_version(),
                   targets={f"sm_{a}": dict(arch=a, smem_limit=SMEM_LIMIT[a]) for a in archs},
                   launch=dict(chunk_size=CHUNK_REF, gqa_group=2, note="dtype bf16/fp16: IEEE=False"),
                   results=[r.as_dict() for r in results])
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            f.write(dumps(doc))
        print("wrote", json_path)
    return bad
