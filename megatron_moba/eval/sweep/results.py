"""A sweep's results: the positional loss of every run's final checkpoint (``evaluate_runs``,
cached in RUN/positional_loss.json and recomputed only when the checkpoint or the evaluation
settings change), one table of loss against training compute (``table_rows``, ``write_table``:
OUT/table.csv, the input of ``megatron_moba.eval.scaling_fit``) and ``summarize``, which runs
these, the loss-by-position plot and the power-law fits once every run is trained.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import List

from megatron_moba.eval import scaling_fit
from megatron_moba.eval.sweep.data import data_info_path
from megatron_moba.eval.sweep.launch import provenance
from megatron_moba.eval.sweep.plan import PFLOPS_DAY, Run, data_paths

RESULT_FORMAT = 2        # RUN/positional_loss.json's layout (2: with per-document sums); older caches are redone


class Evaluator:
    """Positional loss of a run's checkpoint at one iteration, cached in a JSON file beside it and
    recomputed only when the checkpoint or the evaluation settings change.  The held-out documents
    are read once, at the first evaluation."""

    def __init__(self, desc: dict, out: str, log=print):
        e = desc["eval"]
        self.desc, self.log, self.docs = desc, log, None
        self.prefix = data_paths(desc, os.path.abspath(out))["eval"]
        self.base = dict(data=self.prefix, seq_length=desc["seq_length"], bucket_width=e["bucket_width"],
                         trailing_tokens=e["trailing_tokens"], num_docs=e["num_docs"], format=RESULT_FORMAT)
        if e["min_tokens"] != 2:                 # (the default keeps the caches of earlier sweeps valid)
            self.base["min_tokens"] = e["min_tokens"]
        threads = desc["launch"]["env"].get("OMP_NUM_THREADS")
        if threads:                              # the runs' thread count applies to their evaluation too
            import torch
            torch.set_num_threads(int(threads))

    def __call__(self, run: Run, iteration: int, path: str) -> dict:
        from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
        from megatron_moba.training.checkpointing import checkpoint_dir
        saved = checkpoint_dir(run.checkpoint, iteration)
        if not os.path.isdir(saved):
            raise ValueError(f"run {run.name} has no checkpoint of iteration {iteration} ({saved})")
        final = iteration == run.train_iters
        settings = dict(self.base, iteration=iteration, saved=os.path.getmtime(run.latest if final else saved))
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("settings") == settings:
                return cached["result"]
        if self.docs is None:
            e = self.desc["eval"]
            self.docs = read_documents(self.prefix, self.desc["seq_length"] + 1, e["num_docs"], e["min_tokens"])
        self.log(f"evaluating {run.name} at iteration {iteration} on {len(self.docs)} documents of {self.prefix}")
        t0 = time.time()
        e = self.desc["eval"]
        result = evaluate_checkpoint(run.checkpoint, self.docs, e["bucket_width"], e["trailing_tokens"],
                                     micro_batch_size=e["micro_batch"], label=run.name,
                                     iteration=None if final else iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(settings=settings, result=result, wall_s=round(time.time() - t0, 1), **provenance()),
                      f, indent=1)
        return result


def evaluate_runs(runs: List[Run], desc: dict, out: str, log=print, evaluator=None) -> list:
    """Positional loss of every run's final checkpoint (cached in RUN/positional_loss.json)."""
    evaluate = evaluator or Evaluator(desc, out, log)
    results = []
    for r in runs:
        if not r.done():
            raise ValueError(f"run {r.name} has no final checkpoint (iteration {r.train_iters}) in {r.checkpoint}")
        results.append(evaluate(r, r.train_iters, os.path.join(r.directory, "positional_loss.json")))
    return results


TABLE_FIELDS = ("variant", "bucket", "compute_pflops_days", "loss", "model", "non_embedding_params", "train_tokens",
                "layers", "hidden", "heads", "seq_length", "train_iters", "kind", "start", "end", "eval_tokens",
                "eval_documents", "job_compute_pflops_days", "checkpoint")


def job_compute(run: Run) -> float:
    """The training FLOPs the job itself counts for ``run`` (``training.flops``: every matmul, the
    logits, and attention over the keys each query really attends, so MoBA's are fewer), in
    PFLOP/s-days, from the flags saved in its final checkpoint."""
    from megatron_moba.eval.checkpoint import saved_args
    from megatron_moba.training.arguments import config_from_args
    from megatron_moba.training.flops import flops_per_iteration
    args = saved_args(run.checkpoint)
    return flops_per_iteration(args, config_from_args(args)) * run.train_iters / PFLOPS_DAY


def table_rows(runs: List[Run], results: list) -> list:
    """One row per run and bucket (and "all", "last N"), ready for ``scaling_fit`` (tools/fit_scaling.py)."""
    from megatron_moba.eval.positional_loss import result_rows
    rows = []
    for r, res in zip(runs, results):
        job = job_compute(r)
        for b in result_rows(res):
            if b["loss"] is None:
                continue
            rows.append(dict(variant=r.variant, bucket=b["bucket"], compute_pflops_days=r.compute_pflops_days,
                             job_compute_pflops_days=job, loss=b["loss"], model=r.model["name"],
                             non_embedding_params=r.params,
                             train_tokens=r.tokens, layers=r.model["layers"], hidden=r.model["hidden"],
                             heads=r.model["heads"], seq_length=res["seq_length"], train_iters=r.train_iters,
                             kind=b["kind"], start=b["start"], end=b["end"], eval_tokens=b["tokens"],
                             eval_documents=b["documents"], checkpoint=r.checkpoint))
    return rows


def write_table(rows: list, path: str) -> str:
    """``rows`` as CSV (columns ``TABLE_FIELDS``); returns ``path``."""
    import csv
    if not rows:
        raise ValueError("the sweep produced no table rows (no run evaluated)")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def compare_pairs(runs: List[Run], results: list, fits: dict, buckets: List[str]) -> dict:
    """MoBA against full attention at the largest compute: for each of ``buckets``, the fitted loss
    ratio there with its 95% interval (``scaling_fit.ratio_interval``), and the measured ratio of the
    largest MoBA/full pair on the same held-out documents with a paired bootstrap 95% interval."""
    by = {(r.model["name"], r.variant): (r, res) for r, res in zip(runs, results)}
    pairs = [name for name, v in by if v == "moba" and (name, "full") in by]
    if not pairs:
        return {}
    top = max(pairs, key=lambda n: by[(n, "full")][0].compute_pflops_days)
    (_, m), (rf, f) = by[(top, "moba")], by[(top, "full")]
    out = dict(model=top, compute_pflops_days=rf.compute_pflops_days, buckets={})
    names = [b["bucket"] for b in m["buckets"]]
    for bucket in buckets:
        entry = {}
        if bucket in fits.get("moba", {}) and bucket in fits.get("full", {}):
            entry["fitted"] = scaling_fit.ratio_interval(fits, bucket, rf.compute_pflops_days)
        pm, pf = m.get("per_document"), f.get("per_document")
        if pm and pf and pm["index"] == pf["index"]:
            if bucket in names or bucket == "all":
                cols = [names.index(bucket)] if bucket in names else range(len(names))
                sums = [[sum(x[i] for i in cols) for x in p["bucket_sums"]] for p in (pm, pf)]
                tokens = [[sum(x[i] for i in cols) for x in p["bucket_tokens"]] for p in (pm, pf)]
                entry["measured"] = scaling_fit.paired_ratio(sums[0], tokens[0], sums[1], tokens[1])
            elif bucket.startswith("last ") and bucket == f"last {m['trailing_tokens']}":
                keep = [j for j, x in enumerate(pm["trailing_sums"]) if x is not None]
                tok = [m["trailing_tokens"]] * len(keep)
                entry["measured"] = scaling_fit.paired_ratio([pm["trailing_sums"][j] for j in keep], tok,
                                                             [pf["trailing_sums"][j] for j in keep], tok)
        out["buckets"][bucket] = entry
    return out


def summarize(runs: List[Run], desc: dict, out: str, log=print) -> List[str]:
    """Evaluate the trained runs, then write OUT/table.csv, OUT/positional_loss.png (every run),
    OUT/positional.png (the largest MoBA/full pair), the fits of the table against 6ND
    (OUT/fits.json, OUT/scaling.png/.pdf: the panels ``desc["fit"]["panels"]``, default the first
    and the trailing bucket) and against the FLOPs the job counts (OUT/fits_job_flops.json,
    OUT/scaling_job_flops.png/.pdf), and OUT/comparison.json (``compare_pairs``); returns the paths."""
    from megatron_moba.eval.positional_loss import bucket_name, plot_results
    results = evaluate_runs(runs, desc, out, log)
    table = write_table(table_rows(runs, results), os.path.join(out, "table.csv"))
    plot = plot_results(results, os.path.join(out, "positional_loss.png"))
    biggest = max(runs, key=lambda r: r.compute_pflops_days).model["name"]
    top = [res for r, res in zip(runs, results) if r.model["name"] == biggest]
    pair = plot_results(top, os.path.join(out, "positional.png"))
    log(f"wrote {table}, {plot}, {pair}")
    f, e = desc["fit"], desc["eval"]
    panels = f["panels"] or [bucket_name(0, e["bucket_width"]), f"last {e['trailing_tokens']}"]
    scale = (f"{desc['name']}: {len(runs)} runs, N {min(r.params for r in runs):,}-{max(r.params for r in runs):,} "
             f"non-embedding parameters, sequence {desc['seq_length']}")
    paths = scaling_fit.fit_table(table, out, f["buckets"], f["ratio_at"], log=log, indent=" ", panels=panels,
                                  extend_decades=f["extend_decades"], title=scale)
    paths += scaling_fit.fit_table(table, out, f["buckets"], None, log=lambda *a: None,
                                   compute_column="job_compute_pflops_days", name="scaling_job_flops",
                                   fits_name="fits_job_flops", panels=panels, extend_decades=f["extend_decades"],
                                   xlabel="Training FLOPs the job counts (PFLOP/s-days)",
                                   title=scale + "; x: the job's FLOP count (MoBA attends fewer keys)")
    with open(paths[0]) as fp:
        fits = json.load(fp)
    comparison = compare_pairs(runs, results, fits, panels + ["all"])
    path = os.path.join(out, "comparison.json")
    with open(path, "w") as fp:
        json.dump(comparison, fp, indent=1)
    for bucket, entry in comparison.get("buckets", {}).items():
        text = "; ".join(f"{k} {v['ratio']:.4f}" + (f" [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]" if v.get("ci") else "")
                         for k, v in entry.items())
        log(f" moba/full loss ratio at {comparison['model']} ({comparison['compute_pflops_days']:.3g} "
            f"PFLOP/s-days), {bucket}: {text}")
    log("wrote " + ", ".join(paths + [path]))
    return [table, plot, pair] + paths + [path]


CURVE_PUBLISHED = ["curves.csv", "curve_fits.json", "fits_vs_paper.md", "ratios.json", "context.json"]
PUBLISHED = ("table.csv", "fits.json", "fits_job_flops.json", "comparison.json", "scaling.png", "scaling_job_flops.png",
             "positional.png", "positional_loss.png")


def _eval_documents(desc: dict, out: str) -> dict:
    """How many held-out documents there are, how many reach eval.min_tokens and how many are evaluated."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    e = desc["eval"]
    dataset = IndexedDataset(data_paths(desc, os.path.abspath(out))["eval"])
    lengths = np.array(dataset.sequence_lengths)          # a copy: the dataset's own array is a view of its mmap
    long_enough = int((lengths >= e["min_tokens"]).sum())
    return dict(held_out=int(len(lengths)), min_tokens=e["min_tokens"], reaching_min_tokens=long_enough,
                evaluated=min(long_enough, e["num_docs"]), tokens_per_document=dict(
                    min=int(lengths.min()), median=float(np.median(lengths)), max=int(lengths.max())))


def publish(runs: List[Run], desc: dict, out: str, dest: str, log=print) -> str:
    """Copy a summarized sweep's results to ``dest`` (e.g. benchmarks/results/NAME/): the table, fits,
    comparison and figures, every run's metrics (metrics/NAME.jsonl) and one summary.json: the
    description, the data (documents, tokens, hashes, build time), per run N, D, C, epochs, wall
    times and tokens/s, the training and evaluation commits, versions and machine, and the wall time
    of the whole study.  Returns summary.json's path."""
    os.makedirs(os.path.join(dest, "metrics"), exist_ok=True)
    names = list(PUBLISHED)
    if desc["curve"]["points"]:                  # learning curves (sweep.curves.summarize_curves)
        names += CURVE_PUBLISHED + sorted(f for f in os.listdir(out) if f.startswith("curves_") and f.endswith(".png"))
    for name in names:
        shutil.copyfile(os.path.join(out, name), os.path.join(dest, name))
    data = None
    if os.path.isfile(data_info_path(desc, out)):
        with open(data_info_path(desc, out)) as f:
            data = json.load(f)
    per_run = []
    for r in runs:
        with open(os.path.join(r.directory, "run.json")) as f:
            meta = json.load(f)
        with open(os.path.join(r.directory, "positional_loss.json")) as f:
            ev = json.load(f)
        shutil.copyfile(os.path.join(r.directory, "metrics.jsonl"), os.path.join(dest, "metrics", r.name + ".jsonl"))
        meta.pop("argv", None)
        meta.update(argv=[a.replace(os.path.abspath(out), "{out}") for a in r.argv],
                    epochs=r.tokens / data["train"]["tokens"] if data else None,
                    eval_wall_s=ev.get("wall_s"), eval_commit=ev.get("commit"),
                    overall_loss=ev["result"]["overall_loss"], trailing_loss=ev["result"]["trailing_loss"])
        per_run.append(meta)
    train_s = sum(m["wall_s"] for m in per_run)
    eval_s = sum(m["eval_wall_s"] or 0 for m in per_run)
    curve_eval_s = 0.0
    if desc["curve"]["points"]:        # the evaluations of the curves' other points (the final ones counted above)
        for r in runs:
            folder = os.path.join(r.directory, "curve")
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                with open(os.path.join(folder, name)) as f:
                    curve_eval_s += json.load(f).get("wall_s") or 0.0
        eval_s += curve_eval_s
    data_s = data["wall_s"] if data else 0.0
    summary = dict(name=desc["name"], description=desc, data=data, evaluation_documents=_eval_documents(desc, out),
                   runs=per_run,
                   wall_s=dict(data=data_s, training=round(train_s, 1), evaluation=round(eval_s, 1),
                               total=round(data_s + train_s + eval_s, 1)),
                   published_by=provenance())
    path = os.path.join(dest, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    log(f"published {len(names)} files, {len(runs)} metrics files and {path}: study wall time "
        f"{summary['wall_s']['total'] / 60:.1f} min (data {data_s:.0f} s, training {train_s:.0f} s, "
        f"evaluation {eval_s:.0f} s)")
    return path
