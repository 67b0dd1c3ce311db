"""Learning curves of a sweep with ``curve.points``: the positional loss of every run at each
saved point (``evaluate_curves``), one row per (run, point, bucket) with three x axes
(``curve_rows``: 6·N·D, the FLOPs the job counts, measured training time), and the figures and
power-law fits drawn from them (``summarize_curves``).

A hybrid run's curve is its moba run's up to the switch (the same checkpoints: it is that run
continued), then its own points with full attention.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from megatron_moba.eval.sweep.plan import Run


def curve_points(run: Run) -> List[Tuple[Run, int]]:
    """(the run whose checkpoint it is, iteration) for each point of ``run``'s learning curve."""
    if run.source is None:
        return [(run, i) for i in run.curve]
    before = sorted({i for i in run.curve if i < run.switch_iteration} | {run.switch_iteration})
    return [(run.source, i) for i in before] + [(run, i) for i in run.curve if i > run.switch_iteration]


def point_path(run: Run, iteration: int) -> str:
    """Where the evaluation of ``run`` at ``iteration`` is cached (the final one shared with
    ``evaluate_runs``)."""
    if iteration == run.train_iters:
        return os.path.join(run.directory, "positional_loss.json")
    return os.path.join(run.directory, "curve", f"iter_{iteration:07d}.json")


def evaluate_curves(runs: List[Run], evaluate, log=print) -> Dict[str, List[Tuple[int, dict]]]:
    """{run name: [(iteration, positional-loss result), ...]} for every point of every run's curve;
    ``evaluate``: a ``results.Evaluator`` (cached per checkpoint)."""
    curves = {}
    for r in runs:
        curves[r.name] = [(i, evaluate(src, i, point_path(src, i))) for src, i in curve_points(r)]
        log(f"{r.name}: learning curve of {len(curves[r.name])} points evaluated")
    return curves


def training_seconds(run: Run) -> Dict[int, float]:
    """{iteration: training time so far (s)} from the job's own step times in ``run``'s metrics file
    (checkpoint saves and evaluation left out); a hybrid's starts from its moba run's at the switch."""
    import json
    before = {}
    if run.source is not None:
        before = {i: t for i, t in training_seconds(run.source).items() if i <= run.switch_iteration}
    total, last = (before.get(run.switch_iteration, 0.0), run.switch_iteration) if run.source is not None else (0.0, 0)
    seconds = dict(before)
    with open(os.path.join(run.directory, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "step_time_s" not in row or row["iteration"] <= last:
                continue
            total += row["step_time_s"] * (row["iteration"] - last)
            last = row["iteration"]
            seconds[last] = total
    return seconds


def _flops_per_iteration(run: Run, iteration: int) -> float:
    """The job's FLOP count of one iteration (attention over the keys each query attends), from the
    flags saved in the checkpoint."""
    from megatron_moba.eval.checkpoint import saved_args
    from megatron_moba.training.arguments import config_from_args
    from megatron_moba.training.flops import flops_per_iteration
    args = saved_args(run.checkpoint, iteration)
    return flops_per_iteration(args, config_from_args(args))


CURVE_FIELDS = ("variant", "model", "bucket", "iteration", "final", "loss", "compute_pflops_days",
                "job_compute_pflops_days", "train_hours", "non_embedding_params", "train_tokens", "eval_tokens",
                "eval_documents", "kind", "start", "end")


def curve_rows(runs: List[Run], curves: Dict[str, List[Tuple[int, dict]]]) -> List[dict]:
    """One row per run, curve point and bucket: the loss against 6·N·D (PFLOP/s-days), against the FLOPs
    the job counts (attention included, so MoBA's are fewer) and against the measured training time."""
    from megatron_moba.eval.positional_loss import result_rows
    from megatron_moba.eval.sweep.plan import PFLOPS_DAY
    rows = []
    for r in runs:
        tokens_per_iteration = r.tokens // r.train_iters
        seconds = training_seconds(r)
        first = r.source or r
        cost = {"first": _flops_per_iteration(first, first.curve[-1] if r.source is None else r.switch_iteration)}
        cost["then"] = _flops_per_iteration(r, r.train_iters) if r.source is not None else cost["first"]
        switch = r.switch_iteration or r.train_iters
        for iteration, result in curves[r.name]:
            job = cost["first"] * min(iteration, switch) + cost["then"] * max(0, iteration - switch)
            for b in result_rows(result):
                if b["loss"] is None:
                    continue
                rows.append(dict(variant=r.variant, model=r.model["name"], bucket=b["bucket"], iteration=iteration,
                                 final=iteration == r.train_iters, loss=b["loss"],
                                 compute_pflops_days=6.0 * r.params * iteration * tokens_per_iteration / PFLOPS_DAY,
                                 job_compute_pflops_days=job / PFLOPS_DAY, train_hours=seconds[iteration] / 3600,
                                 non_embedding_params=r.params, train_tokens=iteration * tokens_per_iteration,
                                 eval_tokens=b["tokens"], eval_documents=b["documents"], kind=b["kind"],
                                 start=b["start"], end=b["end"]))
    return rows


def write_rows(rows: List[dict], path: str, fields=CURVE_FIELDS) -> str:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def summarize_curves(runs: List[Run], desc: dict, out: str, log=print) -> List[str]:
    """Evaluate every run's learning curve, write OUT/curves.csv (``curve_rows``), then the figures and
    fits (``curve_figures``)."""
    from megatron_moba.eval.sweep.results import Evaluator
    curves = evaluate_curves(runs, Evaluator(desc, out, log), log)
    path = write_rows(curve_rows(runs, curves), os.path.join(out, "curves.csv"))
    log(f"wrote {path}")
    return [path]
