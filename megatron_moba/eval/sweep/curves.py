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


CURVE_FIELDS = ("variant", "model", "bucket", "iteration", "switch_iteration", "final", "loss", "compute_pflops_days",
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
                                 switch_iteration=r.switch_iteration, final=iteration == r.train_iters, loss=b["loss"],
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


# The MoBA paper (arXiv 2502.13189), Table 3 "Loss scaling with different positions": L = a * C^b
# (C in PFLOP/s-days) per 2K position bucket of models trained at 32K context, MoBA block 512, top-3.
PAPER_TABLE3 = {
    "0k-2k": {"moba": (3.075, -0.078), "full": (3.068, -0.078)},
    "2k-4k": {"moba": (2.415, -0.084), "full": (2.411, -0.083)},
    "4k-6k": {"moba": (2.085, -0.081), "full": (2.077, -0.081)},
    "6k-8k": {"moba": (1.899, -0.092), "full": (1.894, -0.092)},
    "8k-10k": {"moba": (1.789, -0.091), "full": (1.774, -0.089)},
    "10k-12k": {"moba": (1.721, -0.092), "full": (1.697, -0.087)},
    "12k-14k": {"moba": (1.670, -0.089), "full": (1.645, -0.088)},
    "14k-16k": {"moba": (1.630, -0.089), "full": (1.600, -0.087)},
    "16k-18k": {"moba": (1.607, -0.090), "full": (1.567, -0.087)},
    "18k-20k": {"moba": (1.586, -0.091), "full": (1.542, -0.087)},
    "20k-22k": {"moba": (1.571, -0.093), "full": (1.519, -0.086)},
    "22k-24k": {"moba": (1.566, -0.089), "full": (1.513, -0.085)},
    "24k-26k": {"moba": (1.565, -0.091), "full": (1.502, -0.085)},
    "26k-28k": {"moba": (1.562, -0.095), "full": (1.493, -0.088)},
    "28k-30k": {"moba": (1.547, -0.097), "full": (1.471, -0.091)},
    "30k-32k": {"moba": (1.546, -0.108), "full": (1.464, -0.097)},
}
AXES = {    # x axis -> (curves.csv column, label, file suffix)
    "6nd": ("compute_pflops_days", "Training compute 6ND (PFLOP/s-days)", ""),
    "job_flops": ("job_compute_pflops_days", "Training FLOPs the job counts, attention included (PFLOP/s-days)",
                  "_job_flops"),
    "train_time": ("train_hours", "Measured training time (hours, step time)", "_train_time"),
}


def bucket_order(rows: List[dict]) -> List[str]:
    """The position buckets of ``rows`` in position order ("all" and "last N" left out)."""
    starts = {r["bucket"]: r["start"] for r in rows if r["kind"] == "bucket"}
    return sorted(starts, key=starts.get)


def fit_final_points(rows: List[dict], column: str) -> dict:
    """{variant: {bucket: power-law fit}} of the final points of the curves (one per model size)."""
    from collections import defaultdict

    from megatron_moba.eval import scaling_fit
    points = defaultdict(list)
    for r in rows:
        if r["final"]:
            points[(r["variant"], r["bucket"])].append((r[column], r["loss"]))
    return scaling_fit.fit_all(dict(points)) if points else {}


def plot_curves(rows: List[dict], fits: dict, buckets: List[str], column: str, xlabel: str, path: str,
                extend_decades: float = 1.0, title: str = "") -> str:
    """One log-log panel per bucket, like the MoBA paper's Figure 8: each run's learning curve as a
    solid line (MoBA blue, full attention red, hybrid green), and each variant's power law fitted to
    the final points as a dashed projection, ``extend_decades`` past the largest run."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import ScalarFormatter

    from megatron_moba.eval.scaling_fit import COLORS, NAMES
    cols = min(4, len(buckets))
    lines = math.ceil(len(buckets) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.6 * cols, 3.9 * lines), squeeze=False)
    variants = [v for v in ("full", "moba", "hybrid") if any(r["variant"] == v for r in rows)]   # drawing order
    dashes = {"full": "--", "moba": "--", "hybrid": ":"}
    for ax, bucket in zip(axes.flat, buckets):
        here = [r for r in rows if r["bucket"] == bucket]
        for v in variants:
            models = sorted({r["model"] for r in here if r["variant"] == v},
                            key=lambda m: next(r["non_embedding_params"] for r in here if r["model"] == m))
            for k, model in enumerate(models):
                pts = sorted((r[column], r["loss"]) for r in here if r["variant"] == v and r["model"] == model
                             and r["iteration"] >= (r["switch_iteration"] or 0))   # a hybrid: from its switch on
                x, y = zip(*pts)
                ax.plot(x, y, "-", color=COLORS[v], lw=1.1, alpha=0.85, label=NAMES[v] if k == 0 else None)
                ax.plot(x[-1:], y[-1:], "o", color=COLORS[v], ms=3.5)
            if bucket in fits.get(v, {}):
                f = fits[v][bucket]
                lo = min(r[column] for r in here)
                hi = max(r[column] for r in here if r["final"]) * 10 ** extend_decades
                grid = np.geomspace(lo, hi, 100)
                ax.plot(grid, f["a"] * grid ** f["b"], dashes[v], color=COLORS[v], lw=1.4 if v == "hybrid" else 1.2,
                        label=f"{'Full Attention' if v == 'full' else NAMES[v]} Projection")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(f"Scaling law ({bucket.upper().replace('K', 'k')})", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"LM Loss {bucket}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(buckets):]:
        ax.axis("off")
    if title:
        import textwrap
        fig.suptitle("\n".join(textwrap.wrap(title, 70 * cols)), fontsize=8 if cols == 1 else 9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _fit_text(f: dict) -> str:
    ci = f" (b {f['b_ci'][0]:.3f} to {f['b_ci'][1]:.3f})" if f.get("b_ci") else ""
    return f"{f['a']:.3f}·C^{f['b']:.3f}{ci}"


def paper_table(fits: dict, buckets: List[str]) -> str:
    """A Markdown table: every bucket's fit (6ND) of each variant here beside the paper's Table 3 row."""
    variants = [v for v in ("moba", "full", "hybrid") if v in fits]
    head = ["bucket"] + [f"{v} (here)" for v in variants] + ["MoBA (paper)", "Full (paper)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in buckets:
        paper = PAPER_TABLE3.get(b)
        cells = [b] + [_fit_text(fits[v][b]) if b in fits[v] else "" for v in variants]
        cells += [f"{paper[v][0]:.3f}·C^{paper[v][1]:.3f}" if paper else "" for v in ("moba", "full")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_ratios(runs: List[Run], curves: Dict[str, List[Tuple[int, dict]]], buckets: List[str]) -> dict:
    """At the largest model: the loss of moba and of hybrid over full attention's per bucket, measured on
    the same held-out documents, with paired bootstrap 95% intervals (``scaling_fit.paired_ratio``)."""
    from megatron_moba.eval import scaling_fit
    finals = {(r.model["name"], r.variant): (r, curves[r.name][-1][1]) for r in runs}
    top = max((r for r in runs if r.variant == "full"), key=lambda r: r.params).model["name"]
    full = finals[(top, "full")][1]["per_document"]
    out = dict(model=top, buckets={})
    for v in ("moba", "hybrid"):
        if (top, v) not in finals:
            continue
        mine = finals[(top, v)][1]["per_document"]
        names = [b["bucket"] for b in finals[(top, v)][1]["buckets"]]
        for b in buckets:
            i = names.index(b)
            out["buckets"].setdefault(b, {})[f"{v}/full"] = scaling_fit.paired_ratio(
                [x[i] for x in mine["bucket_sums"]], [x[i] for x in mine["bucket_tokens"]],
                [x[i] for x in full["bucket_sums"]], [x[i] for x in full["bucket_tokens"]])
    return out


def context_statistics(run: Run, start: int, end: int) -> dict:
    """How the training sequences of ``run`` are formed at positions [start, end): documents are packed
    (megatron's GPTDataset) and attention crosses their boundaries, so a token there has only the part
    of the sequence since the last end-of-document token as its own document's context.  Returns the
    fraction of those tokens whose document covers the sequence from its start (no end-of-document
    token before them) and their mean own-document context, over the samples the run trains on."""
    import numpy as np

    from megatron_moba.training.arguments import parse_args
    from megatron_moba.training.data import build_datasets
    from megatron_moba.training.tokenizer import build_tokenizer
    args = parse_args(run.argv)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    train = build_datasets(args, tokenizer)[0]
    samples = run.train_iters * args.global_batch_size
    whole = context = 0
    for i in range(samples):
        tokens = train[i]["tokens"].numpy()                                  # [seq]
        ends = np.concatenate([[-1], np.nonzero(tokens[:end] == tokenizer.eod)[0]])   # -1: the sequence start
        p = np.arange(start, end)
        before = np.searchsorted(ends[1:], p, side="left")          # end-of-document tokens before p
        own = p - ends[before] - 1                                   # p's own document's tokens before it
        whole += int((before == 0).sum())
        context += int(own.sum())
    n = samples * (end - start)
    return dict(positions=[start, end], samples=samples, tokens=n, whole_document_fraction=whole / n,
                mean_own_document_context=context / n, attention_crosses_documents=not args.document_attention)


def summarize_curves(runs: List[Run], desc: dict, out: str, log=print) -> List[str]:
    """Evaluate every run's learning curve, then write OUT/curves.csv (``curve_rows``), the fits of the
    final points against each x axis (OUT/curve_fits.json), the figures (OUT/curves_0k-2k.png,
    curves_12k-14k.png: the seed panels; curves_all.png: every bucket; the same against the job's FLOPs
    and the training time), OUT/fits_vs_paper.md, OUT/ratios.json and OUT/context.json."""
    import json

    from megatron_moba.eval.sweep.results import Evaluator
    curves = evaluate_curves(runs, Evaluator(desc, out, log), log)
    rows = curve_rows(runs, curves)
    paths = [write_rows(rows, os.path.join(out, "curves.csv"))]
    buckets = bucket_order(rows)
    panels = desc["fit"]["panels"] or [buckets[0], buckets[-1]]
    params = sorted({r.params for r in runs})
    scale = (f"{desc['name']}: {len(params)} sizes, N {params[0]:,}-{params[-1]:,} non-embedding parameters, "
             f"context {desc['seq_length']}, MoBA chunk {desc['moba']['chunk']} top-{desc['moba']['topk']}")
    fits = {}
    for axis, (column, xlabel, suffix) in AXES.items():
        fits[axis] = fit_final_points(rows, column)
        extend = desc["fit"]["extend_decades"]
        for b in panels:
            paths.append(plot_curves(rows, fits[axis], [b], column, xlabel,
                                     os.path.join(out, f"curves_{b}{suffix}.png"), extend, scale))
        paths.append(plot_curves(rows, fits[axis], buckets, column, xlabel,
                                 os.path.join(out, f"curves_all{suffix}.png"), extend, scale))
    with open(os.path.join(out, "curve_fits.json"), "w") as f:
        json.dump(fits, f, indent=1)
    with open(os.path.join(out, "fits_vs_paper.md"), "w") as f:
        f.write(paper_table(fits["6nd"], buckets))
    ratios = paired_ratios(runs, curves, buckets)
    with open(os.path.join(out, "ratios.json"), "w") as f:
        json.dump(ratios, f, indent=1)
    largest = max(runs, key=lambda r: r.params)
    s = desc["seq_length"]
    context = [context_statistics(largest, a, min(a + desc["eval"]["bucket_width"], s))
               for a in range(0, s, desc["eval"]["bucket_width"])]
    with open(os.path.join(out, "context.json"), "w") as f:
        json.dump(dict(run=largest.name, buckets=context), f, indent=1)
    paths += [os.path.join(out, n) for n in ("curve_fits.json", "fits_vs_paper.md", "ratios.json", "context.json")]
    for b in panels:
        line = "; ".join(f"{k} {v['ratio']:.4f} [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]"
                         for k, v in ratios["buckets"].get(b, {}).items())
        log(f" loss ratios at {ratios['model']}, {b}: {line}")
    log("wrote " + ", ".join(paths))
    return paths
