"""Power laws L = a * C^b of LM loss against training compute, per variant and position bucket.

    from megatron_moba.eval import scaling_fit
    points = scaling_fit.read_points("results.csv")     # {(variant, bucket): [(compute, loss), ...]}
    fits = scaling_fit.fit_all(points)                   # {variant: {bucket: {a, b, a_ci, b_ci, r2, n}}}
    scaling_fit.plot(points, fits, "fits/")              # fits/scaling.png, fits/scaling.pdf

Input: a CSV with at least the columns variant,bucket,compute_pflops_days,loss (one row per
measured point: e.g. the scaling sweep's table, or points read off a paper).  The fit is a
least-squares line in log-log space; a_ci and b_ci are 95% confidence intervals (Student t),
r2 is in log space.  ``fit_table`` does it all for one table: DIR/fits.json and DIR/scaling.png /
scaling.pdf, one panel per bucket, log-log axes, measured points and dashed projections ("MoBA
Projection" in blue, "Full Attention Projection" in red).  ``tools/fit_scaling.py`` is the
command line.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import List, Optional, Sequence

import numpy as np

REQUIRED = ("variant", "bucket", "compute_pflops_days", "loss")
COLORS = {"moba": "tab:blue", "full": "tab:red"}
NAMES = {"moba": "MoBA", "full": "Full Attention"}
# two-sided 95% Student t quantiles, df = 1..30 (beyond: normal)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def read_points(path: str) -> dict:
    """{(variant, bucket): [(compute, loss), ...]} with clear errors for unusable input."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; need {list(REQUIRED)}")
        points = defaultdict(list)
        for line, row in enumerate(reader, 2):
            try:
                c, loss = float(row["compute_pflops_days"]), float(row["loss"])
            except ValueError:
                raise ValueError(f"{path}:{line}: compute_pflops_days and loss must be numbers") from None
            if c <= 0 or loss <= 0:
                raise ValueError(f"{path}:{line}: compute and loss must be positive for a log-log fit")
            points[(row["variant"], row["bucket"])].append((c, loss))
    if not points:
        raise ValueError(f"{path}: the table is empty")
    return points


def fit_power_law(compute, loss) -> dict:
    """Least squares of log L = log a + b log C."""
    x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError("a fit needs at least two distinct compute values")
    sxx = float(((x - x.mean()) ** 2).sum())
    b = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    log_a = float(y.mean() - b * x.mean())
    resid = y - (log_a + b * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    out = dict(a=math.exp(log_a), b=b, r2=r2, n=n, a_ci=None, b_ci=None)
    if n > 2:
        s2 = float((resid ** 2).sum()) / (n - 2)
        t = _T95[n - 3] if n - 2 <= len(_T95) else 1.96
        se_b, se_log_a = math.sqrt(s2 / sxx), math.sqrt(s2 * (1 / n + x.mean() ** 2 / sxx))
        out["b_ci"] = [b - t * se_b, b + t * se_b]
        out["a_ci"] = [math.exp(log_a - t * se_log_a), math.exp(log_a + t * se_log_a)]
    return out


def fit_all(points: dict) -> dict:
    """``fit_power_law`` of every (variant, bucket): {variant: {bucket: fit}}; errors name the pair."""
    fits = defaultdict(dict)
    for (variant, bucket), pts in sorted(points.items()):
        c, loss = zip(*pts)
        try:
            fits[variant][bucket] = fit_power_law(c, loss)
        except ValueError as e:
            raise ValueError(f"variant {variant!r}, bucket {bucket!r}: {e}") from None
    return dict(fits)


def plot(points: dict, fits: dict, out_dir: str) -> list:
    """One log-log panel per bucket: the points and fitted projections; returns [png, pdf] paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    buckets = sorted({b for _, b in points}, key=lambda s: (len(s), s))
    fig, axes = plt.subplots(1, len(buckets), figsize=(5 * len(buckets), 4.2), squeeze=False)
    for ax, bucket in zip(axes[0], buckets):
        for variant in sorted(fits):
            if bucket not in fits[variant]:
                continue
            c, loss = zip(*sorted(points[(variant, bucket)]))
            color = COLORS.get(variant.lower())
            name = NAMES.get(variant.lower(), variant)
            ax.scatter(c, loss, color=color, label=name, zorder=3)
            f = fits[variant][bucket]
            grid = np.geomspace(min(c) / 2, max(c) * 4, 100)
            ax.plot(grid, f["a"] * grid ** f["b"], "--", color=color, label=f"{name} Projection")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Training compute (PFLOP/s-days)")
        ax.set_ylabel(f"LM Loss {bucket}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "scaling.png"), os.path.join(out_dir, "scaling.pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def select_buckets(points: dict, buckets: Optional[Sequence[str]], table: str = "the table") -> dict:
    """``points`` of the named buckets only (all of them for ``None`` or an empty list)."""
    if not buckets:
        return points
    have = sorted({b for _, b in points})
    missing = sorted(set(buckets) - set(have))
    if missing:
        raise ValueError(f"fit buckets {missing} are not in {table} (buckets: {have})")
    return {k: v for k, v in points.items() if k[1] in buckets}


def loss_ratio(fits: dict, bucket: str, compute: float) -> float:
    """Fitted loss of moba over full at ``compute`` PFLOP/s-days in ``bucket``."""
    m, f = fits["moba"][bucket], fits["full"][bucket]
    return (m["a"] * compute ** m["b"]) / (f["a"] * compute ** f["b"])


def fit_table(table: str, out: str, buckets: Optional[Sequence[str]] = None, ratio_at: Optional[float] = None,
              log=print, indent: str = "") -> List[str]:
    """Fit every (variant, bucket) of the CSV ``table`` (restricted to ``buckets``), write
    OUT/fits.json and the plots, log one line per fit (and the fitted moba/full loss ratio at
    ``ratio_at`` PFLOP/s-days); returns [fits.json, scaling.png, scaling.pdf].  Nothing is written
    when the table cannot be fitted (ValueError)."""
    if ratio_at is not None and not ratio_at > 0:
        raise ValueError(f"the loss ratio needs a positive compute, got {ratio_at!r}")
    points = select_buckets(read_points(table), buckets, table)
    fits = fit_all(points)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "fits.json")
    with open(path, "w") as f:
        json.dump(fits, f, indent=1)
    for variant, per_bucket in fits.items():
        for bucket, fit in per_bucket.items():
            log(f"{indent}{variant:>6} {bucket:>10}: L = {fit['a']:.4g} * C^{fit['b']:.4f}  "
                f"(R^2 {fit['r2']:.3f}, n {fit['n']})")
    if ratio_at is not None and "moba" in fits and "full" in fits:
        for bucket in sorted(set(fits["moba"]) & set(fits["full"])):
            log(f"{indent}fitted loss ratio moba/full at {ratio_at:g} PFLOP/s-days, {bucket}: "
                f"{loss_ratio(fits, bucket, ratio_at):.4f}")
    return [path] + plot(points, fits, out)
