#!/usr/bin/env python
"""Fit power laws L = a * C^b of LM loss against training compute, per variant and position bucket.

    python tools/fit_scaling.py results.csv --out fits/ [--ratio-at 1.0]

Input: a CSV with at least the columns variant,bucket,compute_pflops_days,loss (one row per
measured point: e.g. the scaling sweep's table, or points read off a paper).  The fit is a
least-squares line in log-log space; a_ci and b_ci are 95% confidence intervals (Student t),
r2 is in log space.  Writes DIR/fits.json ({variant: {bucket: {a, b, a_ci, b_ci, r2, n}}}) and
DIR/scaling.png / scaling.pdf: one panel per bucket, log-log axes, measured points and dashed
projections ("MoBA Projection" in blue, "Full Attention Projection" in red).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict

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
    fits = defaultdict(dict)
    for (variant, bucket), pts in sorted(points.items()):
        c, loss = zip(*pts)
        try:
            fits[variant][bucket] = fit_power_law(c, loss)
        except ValueError as e:
            raise ValueError(f"variant {variant!r}, bucket {bucket!r}: {e}") from None
    return dict(fits)


def plot(points: dict, fits: dict, out_dir: str) -> list:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="CSV with variant,bucket,compute_pflops_days,loss")
    p.add_argument("--out", required=True, help="directory for fits.json and the plots")
    p.add_argument("--ratio-at", type=float, default=None,
                   help="also report the fitted loss ratio moba/full at this compute (PFLOP/s-days)")
    args = p.parse_args(argv)
    try:
        points = read_points(args.table)
        fits = fit_all(points)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fits.json"), "w") as f:
        json.dump(fits, f, indent=1)
    for variant, per_bucket in fits.items():
        for bucket, fit in per_bucket.items():
            print(f"{variant:>6} {bucket:>10}: L = {fit['a']:.4g} * C^{fit['b']:.4f}  (R^2 {fit['r2']:.3f}, n {fit['n']})")
    if args.ratio_at is not None and "moba" in fits and "full" in fits:
        for bucket in sorted(set(fits["moba"]) & set(fits["full"])):
            m, f_ = fits["moba"][bucket], fits["full"][bucket]
            ratio = (m["a"] * args.ratio_at ** m["b"]) / (f_["a"] * args.ratio_at ** f_["b"])
            print(f"fitted loss ratio moba/full at {args.ratio_at:g} PFLOP/s-days, {bucket}: {ratio:.4f}")
    for path in plot(points, fits, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
