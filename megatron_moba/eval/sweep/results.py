"""A sweep's results: the positional loss of every run's final checkpoint (``evaluate_runs``,
cached in RUN/positional_loss.json and recomputed only when the checkpoint or the evaluation
settings change), one table of loss against training compute (``table_rows``, ``write_table``:
OUT/table.csv, the input of ``megatron_moba.eval.scaling_fit``) and ``summarize``, which runs
these, the loss-by-position plot and the power-law fits once every run is trained.
"""
from __future__ import annotations

import json
import os
from typing import List

from megatron_moba.eval import scaling_fit
from megatron_moba.eval.sweep.plan import Run, data_paths


def evaluate_runs(runs: List[Run], desc: dict, out: str, log=print) -> list:
    """Positional loss of every run's final checkpoint (cached in RUN/positional_loss.json)."""
    from megatron_moba.eval.positional_loss import evaluate_checkpoint, read_documents
    e, eval_prefix = desc["eval"], data_paths(desc, os.path.abspath(out))["eval"]
    settings = dict(data=eval_prefix, seq_length=desc["seq_length"], bucket_width=e["bucket_width"],
                    trailing_tokens=e["trailing_tokens"], num_docs=e["num_docs"])
    docs, results = None, []
    threads = desc["launch"]["env"].get("OMP_NUM_THREADS")
    if threads:                                  # the runs' thread count applies to their evaluation too
        import torch
        torch.set_num_threads(int(threads))
    for r in runs:
        if not r.done():
            raise ValueError(f"run {r.name} has no final checkpoint (iteration {r.train_iters}) in {r.checkpoint}")
        path = os.path.join(r.directory, "positional_loss.json")
        settings.update(iteration=r.train_iters, saved=os.path.getmtime(r.latest) if os.path.exists(r.latest) else None)
        cached = {}
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
        if cached.get("settings") == settings:
            results.append(cached["result"])
            continue
        if docs is None:
            docs = read_documents(eval_prefix, desc["seq_length"] + 1, e["num_docs"])
        log(f"evaluating {r.name} on {len(docs)} documents of {eval_prefix}")
        result = evaluate_checkpoint(r.checkpoint, docs, e["bucket_width"], e["trailing_tokens"],
                                     micro_batch_size=e["micro_batch"], label=r.name)
        with open(path, "w") as f:
            json.dump(dict(settings=settings, result=result), f, indent=1)
        results.append(result)
    return results


TABLE_FIELDS = ("variant", "bucket", "compute_pflops_days", "loss", "model", "non_embedding_params", "train_tokens",
                "layers", "hidden", "heads", "seq_length", "train_iters", "kind", "start", "end", "eval_tokens",
                "eval_documents", "checkpoint")


def table_rows(runs: List[Run], results: list) -> list:
    """One row per run and bucket (and "all", "last N"), ready for ``scaling_fit`` (tools/fit_scaling.py)."""
    from megatron_moba.eval.positional_loss import result_rows
    rows = []
    for r, res in zip(runs, results):
        for b in result_rows(res):
            if b["loss"] is None:
                continue
            rows.append(dict(variant=r.variant, bucket=b["bucket"], compute_pflops_days=r.compute_pflops_days,
                             loss=b["loss"], model=r.model["name"], non_embedding_params=r.params,
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


def summarize(runs: List[Run], desc: dict, out: str, log=print) -> List[str]:
    """Evaluate the trained runs, then write OUT/table.csv, OUT/positional_loss.png and the fits of
    the table (``desc["fit"]``: OUT/fits.json, OUT/scaling.png/.pdf); returns the paths written."""
    from megatron_moba.eval.positional_loss import plot_results
    results = evaluate_runs(runs, desc, out, log)
    table = write_table(table_rows(runs, results), os.path.join(out, "table.csv"))
    plot = plot_results(results, os.path.join(out, "positional_loss.png"))
    log(f"wrote {table}, {plot}")
    fits = scaling_fit.fit_table(table, out, desc["fit"]["buckets"], desc["fit"]["ratio_at"], log=log, indent=" ")
    log("wrote " + ", ".join(fits))
    return [table, plot] + fits
