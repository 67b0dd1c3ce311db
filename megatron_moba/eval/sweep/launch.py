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


def provenance() -> dict:
    """Where a result comes from: the checkout's commit (and whether it had uncommitted changes), the
    versions of Python, torch and megatron-core, the machine."""
    import platform
    import subprocess
    from importlib import metadata

    def git(*a):
        try:
            return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "megatron-core", "sentencepiece", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    machine = dict(platform=platform.platform(), processor=platform.machine(), cpus=os.cpu_count())
    return dict(commit=git("rev-parse", "HEAD") or None, dirty=dirty, versions=versions, machine=machine)


def _job_tokens_per_s(metrics_file: str) -> Optional[float]:
    """The mean of the job's own tokens/s figures in its --metrics-file (step time only: saves and
    evaluation excluded)."""
    import json
    with open(metrics_file) as f:
        rates = [row["tokens_per_s"] for row in map(json.loads, f) if row.get("tokens_per_s")]
    return sum(rates) / len(rates) if rates else None


def start_hybrid(run: Run) -> bool:
    """Give a hybrid run (``run.source`` continued with full attention) its starting point: a copy of
    the moba run's checkpoint at ``run.switch_iteration`` (weights, optimizer, schedule, data position,
    RNG), named by the hybrid's tracker.  False while that checkpoint does not exist yet; True when
    the hybrid already has a checkpoint of its own (a resume) or was given one."""
    import shutil

    from megatron_moba.training.checkpointing import checkpoint_dir, saved_iterations
    if os.path.isfile(run.latest):
        return True
    src = checkpoint_dir(run.source.checkpoint, run.switch_iteration)
    if run.switch_iteration not in saved_iterations(run.source.checkpoint):
        return False
    dst = checkpoint_dir(run.checkpoint, run.switch_iteration)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    with open(run.latest + ".tmp", "w") as f:
        f.write(str(run.switch_iteration))
    os.replace(run.latest + ".tmp", run.latest)
    return True


def _iteration_cost(run: Run) -> float:
    """The job's FLOP count of one iteration of ``run`` (attention over the keys each query attends:
    full attention's iterations cost more than MoBA's), to estimate the time left."""
    from megatron_moba.training.arguments import config_from_args, parse_args
    from megatron_moba.training.flops import flops_per_iteration
    args = parse_args(run.argv)
    return flops_per_iteration(args, config_from_args(args))


def _iterations_left(run: Run) -> int:
    from megatron_moba.training.checkpointing import read_latest
    start = run.switch_iteration or 0
    if os.path.isfile(run.latest):
        try:
            start = read_latest(run.checkpoint)
        except ValueError:
            pass
    return max(0, run.train_iters - start)


def _invocations_wall(run: Run) -> float:
    """The wall time of every invocation of the job for ``run`` (one unless it was resumed)."""
    import json
    with open(os.path.join(run.directory, "invocations.jsonl")) as f:
        return sum(json.loads(line)["wall_s"] for line in f)


def train_locally(runs: List[Run], desc: dict, python: str, log=print) -> None:
    """Train every run that has no final checkpoint yet, one after another (output in RUN/train.log,
    wall time, tokens/s and provenance in RUN/run.json).  One line per run: run i of n, its
    throughput, and the time left estimated from the job's FLOP count (attention included) per
    second of the runs so far.  An interrupted run resumes from its last checkpoint; a hybrid run
    starts from its moba run's checkpoint at the switch (``start_hybrid``)."""
    import json
    import subprocess
    import time
    done_flops = done_s = 0.0
    cost = {r.name: _iteration_cost(r) for r in runs}
    for i, r in enumerate(runs, 1):
        if r.done():
            log(f"[{i}/{len(runs)}] {r.name}: final checkpoint exists, skipped")
            continue
        os.makedirs(r.directory, exist_ok=True)
        if r.source is not None and not start_hybrid(r):
            raise RuntimeError(f"run {r.name} continues {r.source.name} from iteration {r.switch_iteration}, "
                               f"which {r.source.checkpoint} does not hold")
        todo = _iterations_left(r)
        logfile = os.path.join(r.directory, "train.log")
        log(f"[{i}/{len(runs)}] {r.name}: training {todo} of {r.train_iters} iterations (N {r.params:,}, "
            f"D {r.tokens:,}; log {logfile})")
        t0 = time.time()
        with open(logfile, "a") as f:
            path = os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")      # its torchrun too
            code = subprocess.call(launch_command(r, desc, python), stdout=f, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PATH=path, **desc["launch"]["env"]))
        wall = time.time() - t0
        trained = todo - _iterations_left(r)        # fewer than planned when the job was stopped (SIGTERM)
        with open(os.path.join(r.directory, "invocations.jsonl"), "a") as f:    # a resumed run has several
            f.write(json.dumps(dict(iterations=trained, planned=todo, wall_s=round(wall, 1), exit_code=code)) + "\n")
        tail = open(logfile).read().splitlines()
        if code != 0 or not r.done():
            raise RuntimeError(f"run {r.name} failed (exit code {code}); last lines of {logfile}:\n  " +
                               "\n  ".join(tail[-15:]))
        rate = _job_tokens_per_s(os.path.join(r.directory, "metrics.jsonl"))
        meta = dict(name=r.name, model=r.model, variant=r.variant, non_embedding_params=r.params,
                    train_tokens=r.tokens, train_iters=r.train_iters, compute_pflops_days=r.compute_pflops_days,
                    wall_s=round(_invocations_wall(r), 1), last_invocation=dict(iterations=todo, wall_s=round(wall, 1)),
                    tokens_per_s_wall=round(todo * r.tokens / r.train_iters / wall, 1),
                    tokens_per_s_job=round(rate, 1) if rate else None, argv=r.argv, env=desc["launch"]["env"],
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance())
        with open(os.path.join(r.directory, "run.json"), "w") as f:
            json.dump(meta, f, indent=1)
        done_flops, done_s = done_flops + cost[r.name] * todo, done_s + wall
        left = sum(cost[x.name] * _iterations_left(x) for x in runs[i:] if not x.done()) * done_s / done_flops
        last = next((x for x in reversed(tail) if x.startswith("iteration")), "")
        log(f"[{i}/{len(runs)}] {r.name}: done in {wall:.0f} s, {todo * r.tokens / r.train_iters / wall:,.0f} tokens/s "
            f"(job: {rate or 0:,.0f}), estimated {left / 60:.1f} min left: {last[:60]}")
