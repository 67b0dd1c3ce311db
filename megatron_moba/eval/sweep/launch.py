"""Launching a sweep's training runs: ``launch_command`` (``python -m megatron_moba.pretrain`` or
torchrun), ``slurm_script`` (a Slurm array script, one task per run) and ``train_locally`` (the
runs one after another on this machine).  A run whose final checkpoint exists is skipped by both,
so a sweep resumes where it stopped.
"""
from __future__ import annotations

import os
import shlex
from typing import List, Optional

import megatron_moba
from megatron_moba.eval.sweep.plan import Run

# the checkout megatron_moba runs from: the Slurm tasks start there (tools/, examples/ at hand)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(megatron_moba.__file__)))


def launch_command(run: Run, desc: dict, python: str = "python") -> List[str]:
    """The command line that trains ``run`` (torchrun when launch.nproc_per_node > 1)."""
    n = desc["launch"]["nproc_per_node"]
    head = ["torchrun", "--nproc-per-node", str(n)] if n > 1 else [python]
    return head + ["-m", "megatron_moba.pretrain"] + run.argv


def slurm_script(runs: List[Run], desc: dict, out: str, description_path: str, python_bin: Optional[str] = None) -> str:
    """A Slurm array script, one task per run; a task whose final checkpoint exists does nothing.
    ``python_bin``: the directory of the python (and torchrun) to run, put first on PATH."""
    sl, n = desc["slurm"], desc["launch"]["nproc_per_node"]
    gpus = n if sl["gpus_per_task"] is None else sl["gpus_per_task"]
    out = os.path.abspath(out)
    lines = ["#!/bin/bash",
             f"# Scaling sweep {desc['name']!r}: {len(runs)} training runs, one array task each.",
             "#   submit with sbatch; when every task has finished, evaluate, tabulate and fit with:",
             f"#   python tools/scaling_sweep.py {description_path} --out {out}",
             f"#SBATCH --job-name=moba-sweep-{desc['name']}", f"#SBATCH --array=0-{len(runs) - 1}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={sl['cpus_per_task']}",
             f"#SBATCH --time={sl['time']}", f"#SBATCH --output={out}/slurm/%A_%a.out"]
    lines += [f"#SBATCH --gpus-per-task={gpus}"] if gpus else []
    lines += [f"#SBATCH --partition={sl['partition']}"] if sl["partition"] else []
    lines += [f"#SBATCH --account={sl['account']}"] if sl["account"] else []
    lines += [f"#SBATCH {x}" for x in sl["extra"]]
    lines += ["set -euo pipefail", f"cd {shlex.quote(REPO)}"]
    lines += [f'export PATH={shlex.quote(python_bin)}:"$PATH"'] if python_bin else []
    lines += [f"export {k}={shlex.quote(v)}" for k, v in desc["launch"]["env"].items()]
    lines += ['case "${SLURM_ARRAY_TASK_ID}" in']
    for i, r in enumerate(runs):
        latest = shlex.quote(r.latest)
        lines += [f"  {i})  # {r.name}",
                  f'    if [ "$(cat {latest} 2>/dev/null)" = "{r.train_iters}" ]; then '
                  f'echo "{r.name}: done"; exit 0; fi',
                  f"    mkdir -p {shlex.quote(r.directory)}",
                  f"    {shlex.join(launch_command(r, desc))} ;;"]
    lines += ['  *) echo "no run for task ${SLURM_ARRAY_TASK_ID}" >&2; exit 1 ;;', "esac", ""]
    return "\n".join(lines)


def train_locally(runs: List[Run], desc: dict, python: str, log=print) -> None:
    """Train every run that has no final checkpoint yet, one after another (output in RUN/train.log)."""
    import subprocess
    import time
    for i, r in enumerate(runs, 1):
        if r.done():
            log(f"[{i}/{len(runs)}] {r.name}: final checkpoint exists, skipped")
            continue
        os.makedirs(r.directory, exist_ok=True)
        logfile = os.path.join(r.directory, "train.log")
        log(f"[{i}/{len(runs)}] {r.name}: training {r.train_iters} iterations (N {r.params:,}, D {r.tokens:,}; "
            f"log {logfile})")
        t0 = time.time()
        with open(logfile, "w") as f:
            path = os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")      # its torchrun too
            code = subprocess.call(launch_command(r, desc, python), stdout=f, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PATH=path, **desc["launch"]["env"]))
        tail = open(logfile).read().splitlines()
        if code != 0 or not r.done():
            raise RuntimeError(f"run {r.name} failed (exit code {code}); last lines of {logfile}:\n  " +
                               "\n  ".join(tail[-15:]))
        last = next((x for x in reversed(tail) if x.startswith("iteration")), "")
        log(f"    done in {time.time() - t0:.0f} s: {last[:60]}")
